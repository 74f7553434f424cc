"""What fits: peak memory of a training run predicted from the base's config.json and the knobs,
before any weights are loaded (`tuneline plan`, and the train stage's refusal to start a run
that would not fit).

    shape = fit.Shape.from_config(json.loads(Path("models/base/config.json").read_text()))
    est = fit.estimate(shape, fit.Run(...))          # bytes, by part
    fit.device_memory()                              # what this machine offers MLX

The formula (bytes; T = token positions per step per process, B = bytes of the compute dtype):
- weights: each matrix at its dtype, or `bits`/8 + 2 x B / group_size per weight when quantized
  (MLX quantizes embeddings too); norms at B.
- trainable: LoRA/DoRA in float32 (4 B value + 4 grad + 4 x Adam's 2 states = 16 B a weight);
  full fine-tuning 3 x B more for the adapted blocks (grad + 2 states).
- activations kept for backward, only through the adapted blocks (frozen blocks below keep
  none): T x (4 x hidden + 4 x intermediate) x B per block, or T x hidden x B per block plus one
  block's worth with grad_checkpoint; logits: T x vocab x (2B + 8).
- attention: one block's fp32 scores and probabilities at a time, sequences x heads x L^2 x 8.
- MLX's cache and workspace: 23% of the weights.
- a quantized base: one copy of each adapted block's weights at B besides (the measured 4-bit 7B
  run on an H100 peaked 8.8 GiB above the formula without it, about 16 such blocks; fitted to
  that one run, issue 26's table in bench/README.md).
Fitted on measured peaks (bench/README.md "What fits"): the 7.38B llama shape packed 2x1024 to
16x1024 in bf16 on an H200, and the embedded SmolLM2-135M in float32 on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from pipeline.core.errors import UserError

GIB = 2**30
CACHE_SHARE = 0.23  # MLX's buffer cache + workspace beside live arrays, as a share of the weights
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Shape:
    """The sizes of a llama-family decoder, read from config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        config = config.get("text_config", config)  # multimodal configs nest the decoder
        heads = config["num_attention_heads"]
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear in one block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return dict(zip(LINEARS, ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))))

    def block_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden

    def matrix_params(self) -> int:
        return self.layers * (self.block_params() - 2 * self.hidden) + \
            self.vocab * self.hidden * (1 if self.tied else 2)

    def parameters(self) -> int:
        return self.matrix_params() + self.layers * 2 * self.hidden + self.hidden


@dataclass(frozen=True)
class Run:
    """The knobs that decide memory (params.yaml names in comments)."""

    dtype_bytes: int  # 2 (bf16 on GPUs) or 4 (float32 on CPUs): pipeline/training/accel.py
    bits: int | None  # base.quantize (or the base's own quantization)
    group_size: int  # base.quantize_group_size
    fine_tune_type: str  # train.fine_tune_type
    num_layers: int  # train.num_layers (-1 = all)
    rank: int  # train.rank
    keys: tuple[str, ...]  # train.keys ([] = every linear)
    optimizer: str  # train.optimizer
    sequences: int  # sequences per step per process (packed: tokens_per_step / pack_width)
    seq_len: int  # positions per sequence (packed: pack_width; padded: max_seq_length)
    grad_checkpoint: bool  # train.grad_checkpoint

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


@dataclass(frozen=True)
class Estimate:
    parameters: int
    weights: float
    trainable_parameters: int
    trainable: float  # their values, gradients and optimizer state
    activations: float
    attention: float
    cache: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + self.attention + self.cache


def estimate(shape: Shape, run: Run) -> Estimate:
    weights = _weight_bytes(shape, run)
    adapted = shape.layers if run.num_layers == -1 else min(run.num_layers, shape.layers)
    trainable, per_weight = _trainable(shape, run, adapted)
    return Estimate(
        parameters=shape.parameters(), weights=weights, trainable_parameters=trainable,
        trainable=trainable * per_weight, activations=_activations(shape, run, adapted),
        attention=float(run.sequences * shape.heads * run.seq_len**2 * 8),
        cache=CACHE_SHARE * weights)


def _weight_bytes(shape: Shape, run: Run) -> float:
    per = run.dtype_bytes if run.bits is None else run.bits / 8 + 2 * run.dtype_bytes / run.group_size
    norms = (shape.layers * 2 + 1) * shape.hidden * run.dtype_bytes
    return shape.matrix_params() * per + norms


def _trainable(shape: Shape, run: Run, adapted: int) -> tuple[int, float]:
    """(trainable weights, bytes per trainable weight with gradient and optimizer state)."""
    states = {"adam": 2, "adamw": 2, "sgd": 0, "adafactor": 1}.get(run.optimizer, 2)
    if run.fine_tune_type == "full":
        return adapted * shape.block_params(), float(run.dtype_bytes * (1 + states))
    chosen = {k: v for k, v in shape.linear_shapes().items() if not run.keys or k in run.keys}
    per_block = sum(run.rank * (i + o) + (o if run.fine_tune_type == "dora" else 0)
                    for i, o in chosen.values())
    return adapted * per_block, 4.0 * (2 + states)


def _activations(shape: Shape, run: Run, adapted: int) -> float:
    block = (4 * shape.hidden + 4 * shape.intermediate) * run.dtype_bytes
    kept = adapted * shape.hidden * run.dtype_bytes + block if run.grad_checkpoint \
        else adapted * block
    logits = shape.vocab * (2 * run.dtype_bytes + 8)
    dequantized = 0 if run.bits is None else adapted * shape.block_params() * run.dtype_bytes
    return float(run.tokens * (kept + logits) + dequantized)


# --- this machine ------------------------------------------------------------------------------


def device_memory() -> tuple[int, str]:
    """Bytes MLX may use here and where the number comes from: the GPU's recommended working set
    (Apple silicon) or memory (CUDA), else the machine's RAM."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if info.get(key):
                return int(info[key]), f"{info.get('device_name', 'GPU')} ({key})"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram), "system RAM"


def suggestions(shape: Shape, run: Run, available: float) -> list[str]:
    """Knob changes (params.yaml names) that bring the estimate under `available`, one by one,
    then combined."""
    tries: list[tuple[str, Run]] = []
    if run.bits is None:
        tries.append(("base.quantize: 4", replace(run, bits=4)))
    if not run.grad_checkpoint:
        tries.append(("train.grad_checkpoint: true", replace(run, grad_checkpoint=True)))
    for n in sorted({run.sequences // 2, run.sequences // 4, 1}, reverse=True):
        if 0 < n < run.sequences:
            name = (f"{n} sequences a step (train.tokens_per_step: {n * run.seq_len} packed, "
                    f"or train.batch_size: {n})")
            tries.append((name, replace(run, sequences=n)))
    adapted = shape.layers if run.num_layers == -1 else run.num_layers
    if adapted > 4:
        tries.append((f"train.num_layers: {adapted // 2}", replace(run, num_layers=adapted // 2)))
    found = [f"{name} -> {estimate(shape, r).total / GIB:.1f} GiB" for name, r in tries
             if estimate(shape, r).total <= available]
    if not found and tries:
        combined = run
        for _, r in tries:
            combined = replace(combined, bits=r.bits, grad_checkpoint=r.grad_checkpoint,
                               sequences=min(combined.sequences, r.sequences))
        total = estimate(shape, combined).total
        found.append(f"all of {', '.join(n for n, _ in tries[:2])} and 1 sequence a step -> "
                     f"{total / GIB:.1f} GiB" + ("" if total <= available else ": still too big"))
    return found


# --- the train stage's checks ------------------------------------------------------------------

CPU_QUANTIZED_LIMIT_S = 3600.0  # a quantized base on a CPU predicted slower than this is refused


@dataclass(frozen=True)
class TrainKnobs:
    """The `train` keys the plan reads (config.load_keys), the stage's own TrainConfig has them."""

    fine_tune_type: str
    num_layers: int
    rank: int
    keys: tuple[str, ...]
    optimizer: str
    batch_size: int
    grad_checkpoint: bool
    max_seq_length: int
    pack: bool | str
    pack_width: int
    tokens_per_step: int


class FitError(UserError):
    """A run predicted not to fit, or to take hours: the numbers, and the knobs that help."""


def check_train(cfg: Any, model_dir: Any, row_lengths: list[int], world_size: int,
                iters: int) -> None:
    """The train stage's checks, before the first step: refuse (unless train.force) a run
    predicted not to fit memory, or to take hours on a CPU with a quantized base."""
    import json

    from pipeline.training import accel

    config = json.loads((model_dir / "config.json").read_text())
    try:
        shape = Shape.from_config(config)
    except KeyError as exc:
        print(f"memory check skipped: {model_dir}/config.json has no {exc} (not a llama shape)")
        return
    dtype_bytes = 4 if accel.compute_dtype() == "float32" else 2
    run = run_for(cfg, config, dtype_bytes, world_size, max(row_lengths, default=1))
    check_cpu_quantized(shape, run, iters, "params.yaml:train", cfg.force)
    check_memory(shape, run, device_memory()[0], "params.yaml:train", cfg.force)


def run_for(cfg: Any, config: dict[str, Any], dtype_bytes: int, world_size: int,
            longest: int) -> Run:
    """The Run of the train section `cfg` (pack resolved) on a base with `config`; padded
    batches are as wide as the longest row (capped at max_seq_length)."""
    quant = config.get("quantization") or {}
    if cfg.pack:
        sequences, seq_len = max(1, cfg.tokens_per_step // cfg.pack_width // world_size), \
            cfg.pack_width
    else:
        sequences, seq_len = max(1, cfg.batch_size // world_size), min(longest, cfg.max_seq_length)
    return Run(dtype_bytes=dtype_bytes, bits=quant.get("bits"),
               group_size=quant.get("group_size", 64), fine_tune_type=cfg.fine_tune_type,
               num_layers=cfg.num_layers, rank=cfg.rank, keys=tuple(cfg.keys),
               optimizer=cfg.optimizer, sequences=sequences, seq_len=seq_len,
               grad_checkpoint=cfg.grad_checkpoint)


def check_memory(shape: Shape, run: Run, available: int, where: str, force: bool) -> Estimate:
    est = estimate(shape, run)
    if est.total <= available or force:
        return est
    helps = "; ".join(suggestions(shape, run, available)) or "a machine with more memory"
    raise FitError(
        f"{where}: predicted peak {est.total / GIB:.1f} GiB (weights {est.weights / GIB:.1f}, "
        f"activations {est.activations / GIB:.1f} for {run.sequences}x{run.seq_len} positions a "
        f"step) does not fit the {available / GIB:.1f} GiB here; would fit with: {helps}. "
        "`tuneline plan` shows the details; train.force: true trains anyway")


def check_cpu_quantized(shape: Shape, run: Run, iters: int, where: str, force: bool) -> None:
    """MLX's quantized matmul on CPUs is slow enough that a run takes hours or days: measure it
    on this model's widest layer and refuse up front with the numbers."""
    import mlx.core as mx

    if run.bits is None or mx.default_device() != mx.cpu or force:
        return
    flops_per_s = quantized_matmul_rate(shape.hidden, shape.intermediate, run.bits, run.group_size)
    adapted = shape.layers if run.num_layers == -1 else min(run.num_layers, shape.layers)
    block = shape.block_params() - 2 * shape.hidden
    per_token = 2 * shape.matrix_params() + 2 * adapted * block  # forward + input gradients
    tokens_per_s = flops_per_s / per_token
    seconds = iters * run.tokens / tokens_per_s
    if seconds <= CPU_QUANTIZED_LIMIT_S:
        return
    raise FitError(
        f"{where}: base quantized to {run.bits} bits on a CPU: MLX's quantized matmul runs at "
        f"{flops_per_s / 1e9:.2f} GFLOP/s here, so {iters} steps of {run.tokens} positions would "
        f"take about {seconds / 3600:.1f} h ({tokens_per_s:.1f} positions/s). Set base.quantize: "
        "null on CPUs (float32 trains far faster here), train on a GPU or Apple silicon, or set "
        "train.force: true to run anyway")


def quantized_matmul_rate(hidden: int, intermediate: int, bits: int, group_size: int) -> float:
    """FLOP/s of MLX's quantized matmul on a (64 x hidden) @ (hidden x intermediate) layer and
    its transpose (the backward pass's shape), timed for at least 0.2 s."""
    import time

    import mlx.core as mx

    w = mx.random.normal((intermediate, hidden)) * 0.02
    qw, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    x, g = mx.random.normal((64, hidden)), mx.random.normal((64, intermediate))

    def step() -> None:
        y = mx.quantized_matmul(x, qw, scales, biases, transpose=True, group_size=group_size,
                                bits=bits)
        dx = mx.quantized_matmul(g, qw, scales, biases, transpose=False, group_size=group_size,
                                 bits=bits)
        mx.eval(y, dx)

    step()  # warm up
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < 0.2:
        step()
        done += 1
    return done * 2 * (2 * 64 * hidden * intermediate) / (time.perf_counter() - start)
