"""Train: `tuneline train --model models/base --data data/dataset --adapters models/adapters ...`

Fine-tunes the base model with mlx-lm (LoRA, DoRA or full) on the chat-format dataset. mlx-lm's
`lora.run()` replaces any callback it is given, so this module calls its `train()` directly with
its own batching (loss masked to every assistant turn, not only the last) and a metrics callback.

Checkpoints go to `.tuneline/checkpoints/<run key>/`, outside the DVC output, so an interrupted
run resumes from its last checkpoint when re-run; they are removed once the adapter is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.core.errors import UserError
from pipeline.rows import pairs
from pipeline.rows.jsonl import (
    atomic_dir,
    atomic_path,
    check_safetensors,
    read_jsonl,
    safetensors_problem,
    write_metrics,
    write_text,
)
from pipeline.training import best, preference
from pipeline.training import metrics as train_metrics
from pipeline.training.batches import batch_iterator
from pipeline.training.checkpoints import MetricsLog, checkpointing, folder_hashes, load_checkpoint
from pipeline.training.model import encode_chat, masked_loss

CHECKPOINT_ROOT = Path(".tuneline/checkpoints")
CHECKPOINT_RE = re.compile(r"^(\d{7})_adapters\.safetensors$")
COSINE_FLOOR = 0.1  # cosine decays to this fraction of the peak learning rate


class TrainError(UserError):
    """Settings or data that cannot train, with the numbers and the key to change."""


@dataclass(frozen=True)
class TrainConfig:
    fine_tune_type: Literal["lora", "dora", "full"]
    num_layers: int
    rank: int
    scale: float
    dropout: float
    keys: tuple[str, ...]
    learning_rate: float
    lr_schedule: Literal["constant", "cosine"]
    warmup: int
    optimizer: Literal["adam", "adamw", "sgd", "adafactor"]
    weight_decay: float
    batch_size: int
    iters: int
    epochs: float | None
    grad_accumulation_steps: int
    grad_checkpoint: bool
    max_seq_length: int
    mask_prompt: bool
    steps_per_report: int
    steps_per_eval: int
    val_batches: int
    save_every: int
    pack: bool | Literal["auto"]  # rows end to end in fixed-width sequences (pipeline/training/packing.py)
    pack_width: int  # inputs per packed sequence
    tokens_per_step: int  # packed positions per optimizer step (all processes together)
    force: bool  # train even if predicted not to fit memory, or a quantized base on a CPU is slow
    objective: Literal["sft", "dpo", "orpo"]  # dpo/orpo: on data/preference pairs (training/preference.py)
    beta: float  # dpo: the KL strength beta; orpo: the odds-ratio weight lambda
    keep: Literal["last", "best_val"]  # the adapter written (pipeline/training/best.py)
    early_stop_patience: int | None  # stop after this many validations without a new best


@dataclass(frozen=True)
class TrainPaths:
    model: Path
    data: Path
    adapters: Path
    metrics: Path
    curve: Path
    checkpoints: Path = CHECKPOINT_ROOT  # resumable state of unfinished runs, outside DVC outputs
    live: Path | None = None  # DVCLive folder (pipeline/training/metrics.py), rewritten while training
    reference: Path | None = None  # dpo: each pair's reference log-probs (a DVC output; empty for sft)
    reference_cache: Path | None = None  # reference log-probs per row across runs (not a DVC output)


@dataclass(frozen=True)
class TrainResult:
    iters: int
    train_loss: float
    val_loss: float
    tokens_per_second: float
    steps_per_second: float
    trained_tokens: int
    peak_memory_gb: float  # MLX's live arrays at their peak
    process_peak_memory_gb: float  # the process's resident set (host memory; ru_maxrss)
    mlx_held_peak_gb: float  # live arrays + MLX's buffer cache, the most seen at a report (device)
    wall_seconds: float
    resumed_from: int
    world_size: int
    adapter_sha256: str  # of the trained weights: equal across ranks and reruns with one seed
    kept_iteration: int  # the step whose weights were written (train.keep)
    kept_val_loss: float  # their validation loss
    stopped_early_at: int | None  # train.early_stop_patience ended training at this step


# --- data ------------------------------------------------------------------------------------


def load_split(path: Path, tokenizer: Any, mask_prompt: bool) -> list[tuple[list[int], list[int]]]:
    rows = read_jsonl(path)
    encoded = []
    for lineno, row in enumerate(rows, start=1):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TrainError(f"{path}: row {lineno} has no 'messages' list; run `dvc repro curate`")
        encoded.append(encode_chat(tokenizer, messages, mask_prompt))
    return encoded


# --- settings --------------------------------------------------------------------------------


def total_iters(cfg: TrainConfig, n_train: int, steps_per_epoch: float | None = None) -> int:
    if cfg.epochs is not None:
        per_epoch = steps_per_epoch or math.ceil(n_train / cfg.batch_size)  # packed: layout
        return max(1, math.ceil(cfg.epochs * per_epoch))
    return cfg.iters


def check_splits(data: Path, train_set: list[Any], valid_set: list[Any]) -> None:
    """An empty split would divide by zero (packing's layout) or give a NaN validation loss."""
    for name, rows in (("train", train_set), ("valid", valid_set)):
        if not rows:
            raise TrainError(f"{data / name}.jsonl has no rows (params.yaml:curate."
                             "min_split_rows); add questions and run `dvc repro curate`")
        if not any(any(m[1:]) for _, m in rows):
            raise TrainError(f"{data / name}.jsonl: no row has an assistant token to learn "
                             "or score; check its messages (`tuneline validate`)")


def check_settings(cfg: TrainConfig, n_layers: int, n_train: int, n_valid: int,
                   iters: int | None = None) -> None:
    where = "params.yaml:train"
    iters = total_iters(cfg, n_train) if iters is None else iters
    if cfg.num_layers > n_layers or cfg.num_layers == 0 or cfg.num_layers < -1:
        raise TrainError(f"{where}.num_layers: asked for {cfg.num_layers} layers, the model has "
                         f"{n_layers}; use 1..{n_layers} or -1 for all")
    if cfg.fine_tune_type != "full" and cfg.rank < 1:
        raise TrainError(f"{where}.rank: must be >= 1 for {cfg.fine_tune_type}, got {cfg.rank}")
    # Packed steps are tokens_per_step positions: batch_size is unused (packing.check_settings).
    if not cfg.pack and (cfg.batch_size < 1 or n_train < cfg.batch_size):
        raise TrainError(f"{where}.batch_size: {cfg.batch_size} needs at least that many training "
                         f"rows; train.jsonl has {n_train}")
    if not cfg.pack and n_valid < cfg.batch_size:
        raise TrainError(f"{where}.batch_size: {cfg.batch_size} is more than the {n_valid} rows in "
                         "valid.jsonl; lower batch_size or give curate a larger valid split")
    if cfg.warmup < 0 or cfg.warmup >= iters:
        raise TrainError(f"{where}.warmup: {cfg.warmup} must be in 0..iters-1 (iters is {iters})")
    if min(cfg.grad_accumulation_steps, cfg.steps_per_report, cfg.steps_per_eval,
           cfg.save_every) < 1:
        raise TrainError(f"{where}: grad_accumulation_steps, steps_per_report, steps_per_eval "
                         "and save_every must all be >= 1")
    if cfg.dropout < 0 or cfg.dropout >= 1:
        raise TrainError(f"{where}.dropout: {cfg.dropout} must be in [0, 1)")
    if cfg.weight_decay and cfg.optimizer != "adamw":
        raise TrainError(f"{where}.weight_decay: only used by optimizer adamw, "
                         f"got optimizer {cfg.optimizer}; set weight_decay: 0.0")


def lora_parameters(cfg: TrainConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout}
    if cfg.keys:
        params["keys"] = list(cfg.keys)
    return params


def adapter_config(cfg: TrainConfig, n_layers: int) -> dict[str, Any]:
    """What mlx-lm's `load_adapters` reads back, plus the settings for the record."""
    layers = n_layers if cfg.num_layers == -1 else cfg.num_layers
    return {"fine_tune_type": cfg.fine_tune_type, "num_layers": layers,
            "lora_parameters": lora_parameters(cfg), "tuneline": asdict(cfg)}


def apply_adapters(model: Any, cfg: TrainConfig) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    layers = n_layers if cfg.num_layers == -1 else cfg.num_layers
    model.freeze()
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-layers:]:
            layer.unfreeze()
        return
    linear_to_lora_layers(model, layers, lora_parameters(cfg), use_dora=cfg.fine_tune_type == "dora")
    if not any(k.endswith(("lora_a", "m")) for k, _ in _flat(model.trainable_parameters())):
        raise TrainError(f"params.yaml:train.keys: none of {list(cfg.keys)} names a linear module "
                         "in the model's blocks (e.g. self_attn.q_proj, mlp.up_proj)")


def build_optimizer(cfg: TrainConfig, iters: int, start: int) -> Any:
    import mlx.core as mx
    import mlx.optimizers as optim

    peak = cfg.learning_rate
    # mlx optimizers need schedules that return mx.array: a Python float crashes at the first step.
    decay = (optim.cosine_decay(peak, max(1, iters - cfg.warmup), peak * COSINE_FLOOR)
             if cfg.lr_schedule == "cosine" else (lambda step: mx.array(peak, dtype=mx.float32)))
    if cfg.warmup:
        warm = optim.linear_schedule(0.0, peak, cfg.warmup)
        schedule = optim.join_schedules([warm, decay], [cfg.warmup])
    else:
        schedule = decay
    lr = (lambda step: schedule(step + start)) if start else schedule  # resume mid-schedule
    kinds = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
             "adafactor": optim.Adafactor}
    extra = {"weight_decay": cfg.weight_decay} if cfg.optimizer == "adamw" else {}
    return kinds[cfg.optimizer](learning_rate=lr, **extra)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


# --- checkpoints -----------------------------------------------------------------------------


def run_key(cfg: TrainConfig, seed: int, paths: TrainPaths) -> str:
    """Checkpoints are only reused by a run with identical settings, data and base model: every
    file of the base counts (weights, tokenizer), not only its config.json."""
    base = folder_hashes(paths.model, paths.checkpoints.parent / "file_hashes.json")
    digest = hashlib.sha256(json.dumps([asdict(cfg), seed, base], sort_keys=True).encode())
    files = [paths.data / "train.jsonl", paths.data / "valid.jsonl"]
    if cfg.objective != "sft":  # the pairs it trains on
        files += [paths.data / "preference" / f"{s}.jsonl" for s in ("train", "valid")]
    for f in files:
        digest.update(f.read_bytes() if f.exists() else b"")
    return digest.hexdigest()[:16]


def latest_checkpoint(folder: Path) -> tuple[int, Path | None]:
    """The newest complete checkpoint; a torn one (a kill mid-write, a full disk) is skipped."""
    found = sorted(((int(m.group(1)), p) for p in folder.glob("*_adapters.safetensors")
                    if (m := CHECKPOINT_RE.match(p.name))), reverse=True)
    for step, path in found:
        state = path.with_name(path.name.replace("_adapters.", "_optimizer."))
        if safetensors_problem(path) is None and safetensors_problem(state) is None:
            return step, path
        print(f"skipping torn checkpoint {path}")
    return 0, None


def save_checkpoint(model: Any, optimizer: Any, ckpt_dir: Path, step: int) -> None:
    """Optimizer state first, then the weights: a checkpoint counts once its weights file is
    complete, and then its optimizer state is too."""
    import mlx.core as mx

    for kind, flat in (("optimizer", dict(_flat(optimizer.state))),
                       ("adapters", dict(_flat(model.trainable_parameters())))):
        with atomic_path(ckpt_dir / f"{step:07d}_{kind}.safetensors", suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), flat)  # mlx appends a missing suffix


# --- the stage -------------------------------------------------------------------------------


def run(cfg: TrainConfig, paths: TrainPaths, *, seed: int) -> TrainResult:
    import mlx.core as mx
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train

    from pipeline.core import progress
    from pipeline.training import fit, launch
    from pipeline.training import model as mlx_model

    progress.plain_mlx_console()  # no colour codes in `dvc repro` logs
    started = time.perf_counter()
    world = launch.init_world()  # size 1 unless started by `mlx.launch` (pipeline/training/launch.py)
    lead = world.rank() == 0
    for weights_file in sorted(paths.model.glob("*.safetensors")):
        check_safetensors(weights_file)  # mlx would stop with a RuntimeError traceback
    model, tokenizer = mlx_model.load(paths.model)
    if cfg.objective == "sft":
        train_set = load_split(paths.data / "train.jsonl", tokenizer, cfg.mask_prompt)
        valid_set = load_split(paths.data / "valid.jsonl", tokenizer, cfg.mask_prompt)
        check_splits(paths.data, train_set, valid_set)
    else:  # pairs, with the reference log-probs of the model before any adapter exists
        train_set, valid_set = preference.prepare(cfg.objective, model, tokenizer, paths.model,
                                                  paths.data / "preference", pairs.read,
                                                  cfg.batch_size, cfg.max_seq_length,
                                                  paths.reference_cache)
    if lead and paths.reference is not None:
        preference.write_reference(paths.reference, {"train": train_set, "valid": valid_set}
                                   if cfg.objective == "dpo" else {})
    if cfg.pack == "auto":  # recorded resolved: the adapter config says what was done
        cfg = replace(cfg, pack=packing_wanted(cfg.pack))
    batches, loss, per_epoch = _batching(cfg, model, train_set, world.size())
    iters = total_iters(cfg, len(train_set), per_epoch)
    check_settings(cfg, len(model.layers), len(train_set),
                   len(valid_set) if cfg.objective == "sft" else cfg.batch_size, iters)
    best.check(cfg.keep, cfg.early_stop_patience, len(valid_set))
    fit_cfg, lengths = preference.fit_view(cfg, train_set)  # pairs: both sides are rows
    fit.check_train(fit_cfg, paths.model, lengths, world.size(), iters)

    mx.random.seed(seed)
    apply_adapters(model, cfg)
    ckpt_dir = paths.checkpoints / run_key(cfg, seed, paths)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    done, ckpt = latest_checkpoint(ckpt_dir)
    optimizer = build_optimizer(cfg, iters, 0)  # the restored state carries the step count
    if ckpt is not None:
        print(f"resuming from checkpoint {ckpt} (step {done} of {iters})")
        load_checkpoint(model, optimizer, ckpt)
    log = MetricsLog(ckpt_dir / "metrics.jsonl", offset=done, write=lead)
    callback = train_metrics.wrap(log, paths.live if lead else None, done)
    keeper = best.Keeper(cfg.keep, cfg.early_stop_patience, model, ckpt_dir, lead=lead,
                         offset=done, rows=log.rows)
    if done < iters:
        args = TrainingArgs(
            batch_size=cfg.batch_size, iters=iters - done, val_batches=cfg.val_batches,
            steps_per_report=cfg.steps_per_report, steps_per_eval=cfg.steps_per_eval,
            steps_per_save=iters + 1, max_seq_length=cfg.max_seq_length,  # we save: checkpointing
            adapter_file=str(ckpt_dir / "adapters.safetensors"),
            grad_checkpoint=cfg.grad_checkpoint,
            grad_accumulation_steps=cfg.grad_accumulation_steps)

        def save(step: int) -> None:
            if lead:
                save_checkpoint(model, optimizer, ckpt_dir, step)
            mx.random.seed(seed + step)  # dropout draws from here on: the same after a resume

        if done:
            mx.random.seed(seed + done)
        # mlx-lm's grad_checkpoint patches the layer class for the whole process: undo it, or
        # every later model in this process (tests, a notebook) checkpoints and draws dropout anew.
        layer_type = type(model.layers[0])
        layer_call = layer_type.__call__
        try:
            train(model=model, optimizer=optimizer, train_dataset=train_set,
                  val_dataset=valid_set, args=args, loss=loss,
                  iterate_batches=keeper.stopping(checkpointing(
                      batches(seed), cfg.save_every, save, done, cfg.grad_accumulation_steps)),
                  training_callback=keeper.wrap(callback))
        finally:
            layer_type.__call__ = layer_call
    keeper.restore(model)  # train.keep: best_val puts the best validation's weights back
    val_loss = evaluate(model, valid_set, cfg.batch_size, cfg.val_batches, cfg.max_seq_length,
                        loss=loss, iterate_batches=batches(seed)) if valid_set else float("nan")
    last = keeper.stopped_at if keeper.stopped_at is not None else iters
    kept = keeper.kept(last, val_loss)
    train_metrics.mark_kept(callback, *kept)
    train_metrics.finish(callback)
    weights = dict(_flat(model.trainable_parameters()))
    result = _result(log, iters, val_loss, started, done, world.size(), _digest(weights))
    result = replace(result, kept_iteration=kept[0], kept_val_loss=kept[1],
                     stopped_early_at=keeper.stopped_at)
    if lead:
        _write_outputs(weights, cfg, len(model.layers), paths, log, result)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


def packing_wanted(pack: bool | str) -> bool:
    from pipeline.training import packing

    return packing.wanted(pack)


def _batching(cfg: TrainConfig, model: Any, train_set: list, world_size: int
              ) -> tuple[Callable[[int], Any], Callable[..., Any], float | None]:
    """(seed -> iterate_batches, loss, steps per epoch or None): packed or padded batches."""
    if cfg.objective != "sft":  # pairs: padded or packed (training/preference_packing.py)
        from pipeline.training import preference_packing

        return preference_packing.batching(cfg, model, train_set, world_size)
    if not cfg.pack:
        return batch_iterator, masked_loss, None
    from pipeline.training import attention, packing

    packing.check_model(model)
    per_rank = packing.check_settings(cfg.pack_width, cfg.tokens_per_step, cfg.max_seq_length,
                                      world_size)
    per_epoch = packing.steps_per_epoch(train_set, cfg.pack_width, per_rank * world_size,
                                        cfg.max_seq_length)
    # attention inside each row through the fused kernel (pipeline/training/attention.py)
    loss, wrap, _ = attention.choose(model)
    return (lambda seed: wrap(packing.batch_iterator(seed, cfg.pack_width, cfg.tokens_per_step)),
            loss, per_epoch)


def _digest(weights: dict[str, Any]) -> str:
    import mlx.core as mx

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.array(weights[name].astype(mx.float32)).tobytes())
    return digest.hexdigest()


def _result(log: MetricsLog, iters: int, val_loss: float, started: float, done: int,
            world_size: int, sha: str) -> TrainResult:
    from pipeline.training import memory

    trains = [r for r in log.rows if r["kind"] == "train"]
    speeds = [r["tokens_per_second"] for r in trains]
    return TrainResult(
        iters=iters,
        train_loss=trains[-1]["loss"] if trains else float("nan"),
        val_loss=val_loss,
        tokens_per_second=float(np.mean(speeds)) if speeds else 0.0,
        steps_per_second=float(np.mean([r["steps_per_second"] for r in trains])) if trains else 0.0,
        trained_tokens=int(trains[-1]["trained_tokens"]) if trains else 0,
        peak_memory_gb=max((r["peak_memory"] for r in trains), default=0.0),
        process_peak_memory_gb=memory.process_peak_gb(),
        mlx_held_peak_gb=max(log.held_peak, memory.held_gb()),
        wall_seconds=time.perf_counter() - started,
        resumed_from=done,
        world_size=world_size,
        adapter_sha256=sha,
        kept_iteration=iters,
        kept_val_loss=val_loss,
        stopped_early_at=None,
    )


def _write_outputs(weights: dict[str, Any], cfg: TrainConfig, n_layers: int, paths: TrainPaths,
                   log: MetricsLog, result: TrainResult) -> None:
    import mlx.core as mx

    with atomic_dir(paths.adapters) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
        config = adapter_config(cfg, n_layers)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_text(paths.curve, log.curve_tsv())
    write_metrics(paths.metrics, {k: (round(v, 5) if isinstance(v, float) else v)
                               for k, v in asdict(result).items()})
