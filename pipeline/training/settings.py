"""What the train stage's settings (pipeline.train.TrainConfig, `params.yaml:train`) build and
must satisfy: their checks against the model and the data (with the key to change), the adapter
layers and adapter_config.json they describe, and the optimizer with its learning-rate schedule.
Settings objects are duck-typed here: the stage owns the dataclass.

    check_settings(cfg, n_layers=30, n_train=120, n_valid=12)
    apply_adapters(model, cfg); optimizer = build_optimizer(cfg, iters=40, start=0)
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError

COSINE_FLOOR = 0.1  # cosine decays to this fraction of the peak learning rate


class TrainError(UserError):
    """Settings or data that cannot train, with the numbers and the key to change."""


def total_iters(cfg: Any, n_train: int, steps_per_epoch: float | None = None) -> int:
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


def check_settings(cfg: Any, n_layers: int, n_train: int, n_valid: int,
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


def lora_parameters(cfg: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout}
    if cfg.keys:
        params["keys"] = list(cfg.keys)
    return params


def adapter_config(cfg: Any, n_layers: int) -> dict[str, Any]:
    """What mlx-lm's `load_adapters` reads back, plus the settings for the record."""
    layers = n_layers if cfg.num_layers == -1 else cfg.num_layers
    return {"fine_tune_type": cfg.fine_tune_type, "num_layers": layers,
            "lora_parameters": lora_parameters(cfg), "tuneline": asdict(cfg)}


def apply_adapters(model: Any, cfg: Any) -> None:
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


def build_optimizer(cfg: Any, iters: int, start: int) -> Any:
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
