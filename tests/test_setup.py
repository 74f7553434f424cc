"""What a newcomer's machine needs: stage commands that find the project's venv without it being
activated (also in DVC's experiment copies), a llama.cpp build that runs on any CPU of its
architecture, and an embedded chat completion that really completes."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.commands import doctor

ROOT = Path(__file__).resolve().parents[1]
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # a shell with no virtualenv on PATH


def plain_env() -> dict[str, str]:
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": PLAIN_PATH, "LANG": "C.UTF-8",
            "DVC_NO_ANALYTICS": "1"}


def fake_checkout(where: Path, marker: str) -> Path:
    """scripts/tuneline plus a `pipeline` package that prints which copy and which python ran."""
    (where / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "tuneline", where / "scripts" / "tuneline")
    (where / "pipeline").mkdir()
    (where / "pipeline" / "__init__.py").write_text("")
    (where / "pipeline" / "__main__.py").write_text(
        "import json, sys, pipeline\n"
        f"print(json.dumps({{'marker': {marker!r}, 'prefix': sys.prefix, 'args': sys.argv[1:],"
        " 'code': pipeline.__file__}))\n")
    return where


def test_stage_wrapper_runs_this_checkouts_code_with_the_nearest_venv_above_it(tmp_path):
    repo = tmp_path / "repo"
    (repo).mkdir()
    (repo / ".venv").symlink_to(sys.prefix)  # the project's venv, not on PATH
    # A queued experiment's copy: inside the repository, with no .venv of its own.
    copy = fake_checkout(repo / ".dvc" / "tmp" / "exps" / "run" / "abc123", "copy")
    out = subprocess.run([str(copy / "scripts" / "tuneline"), "train", "--x"], cwd=tmp_path,
                         env=plain_env(), capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["marker"] == "copy" and seen["args"] == ["train", "--x"]
    assert Path(seen["code"]).parent == copy / "pipeline"  # the copy's code, not another's
    assert Path(seen["prefix"]) == repo / ".venv"


def test_stage_wrapper_without_any_venv_says_to_run_setup(tmp_path):
    repo = fake_checkout(tmp_path / "repo", "x")
    env = {**plain_env(), "PATH": "/nonexistent"}
    out = subprocess.run(["/bin/sh", str(repo / "scripts" / "tuneline"), "train"], cwd=repo,
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 127
    assert "run ./scripts/setup.sh" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_dvc_experiment_in_a_temp_copy_runs_stage_commands_without_the_venv_on_path(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("scripts", "pipeline", "validation"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    (repo / ".venv").symlink_to(sys.prefix)
    (repo / ".gitignore").write_text("/.venv\n__pycache__/\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  help:\n    cmd: scripts/tuneline --help > help.txt && pwd > where.txt\n"
        "    deps: [pipeline/cli.py]\n    params: [base.seed]\n"
        "    outs: [{where.txt: {cache: false}}, {help.txt: {cache: false}}]\n")
    dvc = str(Path(sys.prefix) / "bin" / "dvc")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=repo, env=plain_env(), capture_output=True, text=True,
                              check=False)

    for cmd in (["git", "init", "-q", "-b", "main"], [dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        assert run(*cmd).returncode == 0
    ran = run(dvc, "exp", "run", "--temp", "-S", "base.seed=7")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    ref = run("git", "for-each-ref", "refs/exps", "--format=%(objectname)").stdout.split()
    assert len(ref) == 1
    where = run("git", "show", f"{ref[0]}:where.txt").stdout.strip()
    assert "/.dvc/tmp/exps/" in where  # it really ran in a copy without a .venv
    assert "base-model" in run("git", "show", f"{ref[0]}:help.txt").stdout


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 flags")
def test_installed_llama_cpp_is_a_portable_x86_64_build():
    features = doctor.compiled_features(doctor.llama_system_info())
    assert {"AVX2", "FMA", "F16C"} <= set(features), features
    native_only = [f for f in features if doctor.NON_PORTABLE.match(f)]
    assert native_only == [], f"built for this CPU only (and AMX crashes): {native_only}"


CHAT = """
import json, sys
from pipeline.llm import clients as llm
from pipeline.base_model import embedded_gguf
client = llm.LlamaCppClient(embedded_gguf())
reply = client.chat([{"role": "system", "content": "Answer in one sentence."},
                     {"role": "user", "content": "What does VACUUM do in PostgreSQL?"}],
                    llm.Sampling(temperature=0.0, seed=0, max_tokens=48))
print(json.dumps({"text": reply.text, "finish": reply.finish_reason,
                  "tokens": reply.completion_tokens}))
"""


def test_embedded_chat_completes_a_multi_token_answer_in_a_subprocess():
    # The code the generate stage uses. A native llama.cpp build on an AMX CPU answers a
    # one-token completion and dies with SIGSEGV on the first chat prompt batch.
    out = subprocess.run([sys.executable, "-c", CHAT], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=False)
    assert out.returncode == 0, (f"exit {out.returncode} (negative: killed by a signal)\n"
                                 f"{out.stderr[-2000:]}")
    reply = json.loads(out.stdout.splitlines()[-1])
    assert reply["tokens"] > 5 and len(reply["text"].split()) > 3, reply
