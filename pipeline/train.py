"""Train: `tuneline train --model models/base --data data/dataset --adapters models/adapters ...`

Fine-tunes the base model with mlx-lm (LoRA, DoRA or full) on the chat-format dataset. mlx-lm's
`lora.run()` replaces any callback it is given, so this module calls its `train()` directly with
its own batching (loss masked to every assistant turn, not only the last) and a metrics callback.

Checkpoints go to `.tuneline/checkpoints/<run key>/`, outside the DVC output, so an interrupted
run resumes from its last checkpoint when re-run; they are removed once the adapter is written.

A dpo/orpo run also writes the SFT-only adapter of the same settings as `<adapters>/sft/`, the
baseline evaluate compares it with. Every SFT run keeps its adapter in `--sft-cache`
(`.tuneline/cache/sft/<key>/`, outside DVC), so the default pipeline's run is that baseline and a
`dvc exp run -S train.objective=dpo` reuses it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.rows import pairs
from pipeline.rows.jsonl import (
    VOLATILE_KEYS,
    atomic_dir,
    atomic_path,
    check_safetensors,
    read_jsonl,
    safetensors_problem,
    write_json,
    write_metrics,
    write_text,
)
from pipeline.training import best, preference
from pipeline.training import metrics as train_metrics
from pipeline.training.batches import batch_iterator, batching  # noqa: F401 (tests use it)
from pipeline.training.checkpoints import MetricsLog, checkpointing, folder_hashes, load_checkpoint
from pipeline.training.model import encode_chat
from pipeline.training.settings import (
    TrainError,
    adapter_config,
    apply_adapters,
    build_optimizer,
    check_settings,
    check_splits,
    total_iters,
)

CHECKPOINT_ROOT = Path(".tuneline/checkpoints")
SFT_FILES = ("adapters.safetensors", "adapter_config.json", "sft.json")  # <adapters>/sft/
SFT_BETA = 0.0  # sft ignores beta: the baseline's settings name it constant, a beta sweep shares one
CHECKPOINT_RE = re.compile(r"^(\d{7})_adapters\.safetensors$")


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
    objective: Literal["sft", "dpo", "orpo", "sft_then_dpo"]  # pairs: training/preference.py
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
    sft_cache: Path | None = None  # finished SFT adapters by run key (not a DVC output); None: none kept


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
    from pipeline.training import fit, launch, packing
    from pipeline.training import model as mlx_model

    progress.plain_mlx_console()  # no colour codes in `dvc repro` logs
    started = time.perf_counter()
    world = launch.init_world()  # size 1 unless started by `mlx.launch` (pipeline/training/launch.py)
    lead = world.rank() == 0
    if cfg.pack == "auto":  # recorded resolved: the adapter config says what was done
        cfg = replace(cfg, pack=packing.wanted(cfg.pack))
    sft = None
    if cfg.objective != "sft":  # pairs counted first, then the SFT-only baseline trained or
        pair_file = paths.data / "preference" / "train.jsonl"  # reused: one model at a time
        preference.check_count(pair_file.parent, len(pairs.read(pair_file))
                               if pair_file.exists() else 0, cfg.objective, cfg.batch_size)
        sft = sft_baseline(cfg, paths, seed, world)
    for weights_file in sorted(paths.model.glob("*.safetensors")):
        check_safetensors(weights_file)  # mlx would stop with a RuntimeError traceback
    model, tokenizer = mlx_model.load(paths.model)
    if cfg.objective == "sft":
        train_set = load_split(paths.data / "train.jsonl", tokenizer, cfg.mask_prompt)
        valid_set = load_split(paths.data / "valid.jsonl", tokenizer, cfg.mask_prompt)
        check_splits(paths.data, train_set, valid_set)
    else:  # pairs, with the reference log-probs of the model before any adapter exists
        train_set, valid_set = preference.prepare(loss_of(cfg), model, tokenizer, paths.model,
                                                  paths.data / "preference", pairs.read,
                                                  cfg.batch_size, cfg.max_seq_length,
                                                  paths.reference_cache)
    if lead and paths.reference is not None:
        preference.write_reference(paths.reference, {"train": train_set, "valid": valid_set}
                                   if loss_of(cfg) == "dpo" else {})
    batches, loss, per_epoch = batching(replace(cfg, objective=loss_of(cfg)), model, train_set,
                                        world.size())
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
    elif sft is not None and cfg.objective == "sft_then_dpo":  # DPO from the SFT adapter
        model.load_weights(str(sft[0] / SFT_FILES[0]), strict=False)
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
        _write_outputs(weights, cfg, len(model.layers), paths, log, result, sft)
        if cfg.objective == "sft" and paths.sft_cache is not None:
            store_sft(paths.sft_cache / run_key(sft_config(cfg), seed, paths), weights, cfg,
                      len(model.layers), result)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if sft is not None and paths.sft_cache is None:
            shutil.rmtree(sft[0], ignore_errors=True)  # trained for this run only
    return result


# --- the SFT-only baseline of a preference run -----------------------------------------------


def loss_of(cfg: TrainConfig) -> str:
    """The loss a run trains with: sft_then_dpo is DPO (reference: the base) started from the
    SFT-only adapter's weights instead of a fresh adapter."""
    return "dpo" if cfg.objective == "sft_then_dpo" else cfg.objective


def sft_config(cfg: TrainConfig) -> TrainConfig:
    """The settings of the SFT-only adapter a dpo/orpo run is compared with: its own, objective
    sft (keep and early stopping stay: they change the weights written)."""
    return replace(cfg, objective="sft", beta=SFT_BETA)


def sft_baseline(cfg: TrainConfig, paths: TrainPaths, seed: int, world: Any
                 ) -> tuple[Path, str]:
    """(folder holding SFT_FILES, "cached" | "trained"): the SFT adapter of these settings from
    `paths.sft_cache` when an earlier SFT run left it there, else trained now (recursively, by
    every rank: train unless every rank finds it, so no rank waits alone in a collective)."""
    import mlx.core as mx

    cache = paths.sft_cache if paths.sft_cache is not None else paths.checkpoints / "sft"
    folder = cache / run_key(sft_config(cfg), seed, paths)
    found = all(safetensors_problem(folder / SFT_FILES[0]) is None and (folder / f).is_file()
                for f in SFT_FILES)
    if world.size() > 1:
        found = mx.distributed.all_sum(mx.array(int(found)), group=world).item() == world.size()
    if found:
        return folder, "cached"
    scratch = paths.checkpoints / f"sft-{folder.name}"  # its stage outputs: not this run's
    run(sft_config(cfg), replace(paths, adapters=scratch / "adapters", metrics=scratch / "t.json",
                                 curve=scratch / "t.tsv", live=None, reference=None,
                                 sft_cache=cache), seed=seed)
    if world.rank() == 0:  # the writer: another rank may get here while rank 0 still writes
        shutil.rmtree(scratch, ignore_errors=True)
    return folder, "trained"


def store_sft(folder: Path, weights: dict[str, Any], cfg: TrainConfig, n_layers: int,
              result: TrainResult) -> None:
    """A finished SFT adapter, named by its settings (sft_config): written the same whichever
    run trained it, so a cached baseline is byte for byte the one a fresh run would write."""
    import mlx.core as mx

    facts = {"iters": result.iters, "val_loss": round(result.val_loss, 5),
             "kept_iteration": result.kept_iteration,
             "kept_val_loss": round(result.kept_val_loss, 5),
             "stopped_early_at": result.stopped_early_at, "adapter_sha256": result.adapter_sha256}
    with atomic_dir(folder) as tmp:
        mx.save_safetensors(str(tmp / SFT_FILES[0]), weights)
        write_json(tmp / SFT_FILES[1], adapter_config(sft_config(cfg), n_layers))
        write_json(tmp / SFT_FILES[2], facts)


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
                   log: MetricsLog, result: TrainResult, sft: tuple[Path, str] | None) -> None:
    import mlx.core as mx

    with atomic_dir(paths.adapters) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
        config = adapter_config(cfg, n_layers)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if sft is not None:  # the SFT-only baseline: evaluate scores it beside this adapter
            (tmp / "sft").mkdir()
            for name in SFT_FILES:
                shutil.copyfile(sft[0] / name, tmp / "sft" / name)
    write_text(paths.curve, log.curve_tsv())
    report = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(result).items()}
    # trained here or reused from the cache: differs between a fresh clone and a rerun
    extra = {"sft_baseline": sft[1]} if sft is not None else {}
    write_metrics(paths.metrics, {**report, **extra}, VOLATILE_KEYS | {"sft_baseline"})
