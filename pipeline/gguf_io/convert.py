"""llama.cpp's own converter (convert_hf_to_gguf.py), for the architectures and tokenizers the
built-in writer (pipeline/gguf_io/file.py) does not cover: SentencePiece vocabularies (Llama 2,
Mistral, Gemma, Phi-3) and the qwen2, qwen3, gemma2, gemma3 and phi3 architectures.

    python -m pipeline.gguf_io.convert --install     # what `scripts/setup.sh --dev` runs

The converter is the one vendored in the pinned llama-cpp-python source package, i.e. the same
llama.cpp that loads the files in the proof. On first use it is installed into
`<venv>/llama-convert/`: the converter's scripts and its gguf-py, extracted from the source
package (pip download, 77 MB), and CPU torch in a folder of its own (`pip install --target`,
torch==2.13.0: 878 MB, ~1 min from a local wheel). transformers, sentencepiece and protobuf come
from the project's venv. It runs in a subprocess, so its gguf-py never meets PyPI's `gguf`.

`TUNELINE_CONVERT_HOME` moves that folder (a machine whose Python already has torch can point it
at a folder with the scripts and an empty `torch/.complete`, as bench/bench_arch_gpu.py's GPU
run does).

Two additions to the stock converter, applied in the subprocess (convert_main.py): a
pre-tokenizer it does not recognise by hash falls back to the name read from tokenizer.json's
split regex (the same rule the built-in writer uses); and tuneline's `general.*` fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import tokenizer as gguf_tokenizer
from pipeline.gguf_io.file import GGUFError

# CPU torch: on Linux a bare `torch` from PyPI is a multi-GB CUDA build; +cpu comes from
# PyTorch's CPU index (or a local wheel); macOS wheels are CPU builds already.
TORCH = "torch==2.13.0+cpu" if sys.platform == "linux" else "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
MAIN = Path(__file__).with_name("convert_main.py")


def llama_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def home() -> Path:
    return Path(os.environ.get("TUNELINE_CONVERT_HOME", Path(sys.prefix) / "llama-convert"))


def ready() -> bool:
    root = home()
    return (root / "llama.cpp" / llama_version() / "convert_hf_to_gguf.py").is_file() and \
        (root / "torch" / ".complete").is_file()


def install(say: Any = print) -> Path:
    """The converter's scripts and torch, once; returns the llama.cpp folder."""
    root, version = home(), llama_version()
    scripts = root / "llama.cpp" / version
    if not (scripts / "convert_hf_to_gguf.py").is_file():
        say(f"export: fetching llama.cpp's converter (llama-cpp-python {version} source, 77 MB) "
            f"into {root}, once")
        extract_scripts(version, scripts)
    torch_dir = root / "torch"
    if not (torch_dir / ".complete").is_file():
        say(f"export: installing {TORCH} (CPU, ~900 MB) for llama.cpp's converter into "
            f"{torch_dir}, once (about a minute)")
        t0 = time.perf_counter()
        args = ["install", "--quiet", "--target", str(torch_dir), "--upgrade", TORCH]
        try:  # a local wheel or the configured index first; PyTorch's CPU index if not there
            pip(args, torch_dir.parent)
        except GGUFError:
            pip([*args, "--extra-index-url", CPU_INDEX], torch_dir.parent)
        (torch_dir / ".complete").write_text(f"{TORCH} {time.perf_counter() - t0:.0f}s\n")
    return scripts


def pip(args: list[str], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    log = where / "install.log"
    with log.open("a") as out:
        rc = subprocess.call([sys.executable, "-m", "pip", *args], stdout=out, stderr=out)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-8:])
        raise GGUFError(f"installing llama.cpp's converter failed (pip exit {rc}); log: {log}\n"
                        f"{tail}\nfix the cause (network? disk space?) and re-run export")


def extract_scripts(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = cached_sdist(version) or download_sdist(version, Path(tmp))
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(tmp) / "staging"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(MEMBERS) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise GGUFError(f"{sdist}: unsafe path {m.name!r} in the source package")
            # Regular files and folders under known names only; the "data" filter where this
            # Python has it (3.11.4+; Debian 12's python3 is 3.11.2).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **safe)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)


def cached_sdist(version: str) -> Path | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneline" / "sdist"
    found = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
    return found[0] if found else None


def download_sdist(version: str, tmp: Path) -> Path:
    pip(["download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
         f"llama-cpp-python=={version}"], home())
    found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise GGUFError(f"pip download llama-cpp-python=={version} gave no source package")
    return found[0]


def convert(model_dir: Path, out: Path, *, pre: str | None, general: dict[str, Any],
            outtype: str = "f16", say: Any = print) -> None:
    """Run llama.cpp's converter on an mlx-lm/Hugging Face directory; F16 GGUF at `out`.

    `pre`: llama.cpp pre-tokenizer name for a BPE vocabulary the converter may not know by hash;
    `general`: {name, license, base: {name, organization?, repo_url?}, tuneline: {key: text}}.
    """
    scripts = install(say)
    base = general["base"]
    override = {"general.name": general["name"], "general.tags": ["tuneline", "fine-tuned"],
                "general.base_models": [{k: base[k] for k in ("name", "organization", "repo_url")
                                         if k in base}]}
    if general.get("license"):
        override["general.license"] = general["license"]
    extra = {f"general.tuneline.{k}": v for k, v in general.get("tuneline", {}).items()}
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "metadata.json"
        meta.write_text(json.dumps(override))
        cmd = [sys.executable, str(MAIN), str(scripts), str(home() / "torch"),
               json.dumps({"pre": pre, "extra": extra}), str(model_dir), "--outfile", str(out),
               "--outtype", outtype, "--metadata", str(meta)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "NO_LOCAL_GGUF": ""})
    if done.returncode != 0 or not out.is_file():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
                      lines[-1] if lines else "no output")
        raise GGUFError(
            f"{model_dir}: llama.cpp's converter failed (exit {done.returncode}): {reason}\n"
            + "\n".join(lines[-6:]))


def write_f16(model_dir: Path, out: Path, general: dict[str, Any],
              source: Path | None = None, say: Any = print) -> dict[str, Any]:
    """The F16 GGUF of a model directory: the built-in writer where it covers the model (the
    llama family with a byte-level BPE; `source`: the GGUF the base came from, whose tokenizer
    fields are copied), llama.cpp's converter otherwise. Returns what the report records."""
    config = gguf_file.read_config(model_dir)
    reason = gguf_file.builtin_problem(config) or gguf_tokenizer.builtin_problem(model_dir)
    if reason is None:
        config = gguf_file.read_model_config(model_dir)
        weights = gguf_file.gguf_tensors(model_dir, config)
        tokenizer, origin = gguf_tokenizer.tokenizer_fields(model_dir, source,
                                                            config["vocab_size"])
        gguf_file.write(out, config, weights, tokenizer, general)
        return {"writer": "built-in", "tokenizer_source": origin}
    say(f"export: {model_dir.name}: llama.cpp's converter writes this model ({reason})")
    if gguf_tokenizer.chat_template(model_dir) is None:
        raise GGUFError(f"{model_dir}: no chat template (tokenizer_config.json chat_template or "
                        "chat_template.jinja); runtimes would not know how to format a conversation")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        source_dir = float_copy(model_dir, Path(tmp)) if quantized(model_dir) else model_dir
        convert(source_dir, out, pre=gguf_tokenizer.pre_name_or_none(model_dir),
                general=general, say=say)
    spm = model_dir / "tokenizer.model"
    return {"writer": "llama.cpp convert_hf_to_gguf.py", "writer_reason": reason,
            "tokenizer_source": str(spm if spm.exists() else model_dir / "tokenizer.json")}


def quantized(model_dir: Path) -> bool:
    return "quantization" in json.loads((model_dir / "config.json").read_text())


def float_copy(model_dir: Path, dest: Path) -> Path:
    """An MLX-quantized directory (a QLoRA base) as F16 weights llama.cpp's converter reads."""
    import shutil

    import mlx.core as mx

    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, dest / path.name)
    (dest / "config.json").write_text(json.dumps(gguf_file.read_config(model_dir), indent=2))
    weights = {k: mx.array(v).astype(mx.float16)
               for k, v in gguf_file.load_weights(model_dir).items()}
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dest


def main() -> None:
    if sys.argv[1:] != ["--install"]:
        raise SystemExit("usage: python -m pipeline.gguf_io.convert --install")
    install()
    print(f"llama.cpp converter ready in {home()}")


if __name__ == "__main__":
    main()
