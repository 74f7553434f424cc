"""Team flows through real DVC remotes: a local folder, S3 (moto_server) and SSH (sshd) on 127.0.0.1.

Each test builds a tiny DVC project laid out like this repository (DVC-tracked questions and
corrections, generate -> curate -> train -> export stages writing data/generated, data/dataset,
models/adapters, models/gguf, a params.yaml with `train.learning_rate`), pushes it to a bare git
remote and a DVC remote as "alice", and has "bob" clone and pull it in another folder. The stages
are small Python stand-ins so the flows take seconds; the git, DVC and server parts are all real.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.remote import remote_status
from servers import Server, s3, s3_objects, s3_put, ssh  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Stand-ins for pipeline/*.py: same inputs and outputs, deterministic bytes, no model.
STAGES_PY = '''
import hashlib, json, pathlib, sys, yaml

def digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.digest()

def rows(path):
    return [json.loads(l) for l in pathlib.Path(path).read_text().splitlines() if l.strip()]

def write(path, data):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())

stage, params = sys.argv[1], yaml.safe_load(open("params.yaml"))
if stage == "generate":
    out = [{"id": q["id"], "question": q["question"], "answer": "A: " + q["question"]}
           for q in rows("data/questions.jsonl")]
    write("data/generated/answers.jsonl", "".join(json.dumps(r) + "\\n" for r in out))
elif stage == "curate":
    fixes = {c["id"]: c["answer"] for c in rows("data/corrections.jsonl")}
    split = {"train": [], "valid": [], "test": []}
    for r in rows("data/generated/answers.jsonl"):
        answer, source = fixes.get(r["id"], r["answer"]), "expert" if r["id"] in fixes else "generated"
        name = ["train", "train", "valid", "test"][digest(r["id"])[0] % 4]
        split[name].append({"messages": [{"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": answer}],
                            "id": r["id"], "source": source})
    for name, out in split.items():
        write(f"data/dataset/{name}.jsonl", "".join(json.dumps(r) + "\\n" for r in out))
elif stage == "train":
    data = b"".join(pathlib.Path(f"data/dataset/{n}.jsonl").read_bytes() for n in ("train", "valid"))
    seed = digest(data, params["base"]["seed"], params["train"]["learning_rate"])
    write("models/adapters/adapters.safetensors", b"".join(digest(seed, i) for i in range(512)))
    write("models/adapters/adapter_config.json", json.dumps(params["train"]))
    write("reports/train.json", json.dumps({"val_loss": seed[0] / 255}))
elif stage == "export":
    weights = pathlib.Path("models/adapters/adapters.safetensors").read_bytes()
    write("models/gguf/model-q8_0.gguf", b"GGUF" + digest(weights) * 64)
'''

DVC_YAML = {
    "stages": {
        "generate": {"cmd": "python stages.py generate", "deps": ["stages.py",
                     "data/questions.jsonl"], "outs": ["data/generated/answers.jsonl"]},
        "curate": {"cmd": "python stages.py curate", "deps": ["stages.py",
                   "data/generated/answers.jsonl", "data/corrections.jsonl"],
                   "outs": ["data/dataset"]},
        "train": {"cmd": "python stages.py train", "deps": ["stages.py", "data/dataset"],
                  "params": ["base.seed", "train.learning_rate"], "outs": ["models/adapters"],
                  "metrics": [{"reports/train.json": {"cache": False}}]},
        "export": {"cmd": "python stages.py export", "deps": ["stages.py", "models/adapters"],
                   "outs": ["models/gguf"]},
    },
}
PARAMS = {"base": {"seed": 0}, "train": {"learning_rate": 2.0e-4}}
QUESTIONS = [{"id": f"q-{i:04d}", "question": f"How do I do thing {i}?", "source": "expert"}
             for i in range(1, 13)]
CORRECTIONS = [{"id": "q-0002", "answer": "Expert answer two."}]
# Everything a teammate must get byte-identical.
SHARED = ["data/questions.jsonl", "data/corrections.jsonl", "data/generated/answers.jsonl",
          "data/dataset", "models/adapters", "models/gguf", "reports/train.json"]


@dataclass
class Remote:
    """One DVC remote as a team would configure it: url + options committed, secrets not."""
    kind: str
    url: str
    options: dict[str, str] = field(default_factory=dict)   # committed .dvc/config
    local: dict[str, str] = field(default_factory=dict)     # .dvc/config.local (per machine)
    env: dict[str, str] = field(default_factory=dict)       # environment (credentials)
    server: Server | None = None
    root: Path | None = None  # where a local or SSH remote keeps objects on this disk

    def objects(self) -> dict[str, bytes]:
        """Data objects stored in the remote, relative key -> bytes."""
        if self.kind == "s3":
            prefix = self.url.split("/", 3)[3] + "/"
            return {k[len(prefix):]: v for k, v in s3_objects(self.server).items()
                    if k.startswith(prefix)}
        return {str(p.relative_to(self.root)): p.read_bytes()
                for p in self.root.rglob("*") if p.is_file() and ".tmp" not in p.name}

    def overwrite(self, key: str, data: bytes) -> None:
        if self.kind == "s3":
            s3_put(self.server, self.url.split("/", 3)[3] + "/" + key, data)
            return
        path = self.root / key
        path.chmod(0o644)
        path.write_bytes(data)


@pytest.fixture(params=["local", "s3", "ssh"])
def remote(request, tmp_path: Path) -> Remote:
    return make_remote(request, request.param, tmp_path)


def make_remote(request, kind: str, tmp_path: Path) -> Remote:
    if kind == "local":
        return Remote("local", str(tmp_path / "storage"), root=tmp_path / "storage")
    name = request.node.name.replace("[", "-").replace("]", "")
    server = request.getfixturevalue(kind)
    if kind == "s3":
        return Remote("s3", f"{server.url}/{name}", dict(server.remote_config),
                      env=dict(server.env), server=server)
    return Remote("ssh", f"{server.url}/{name}", local=dict(server.local_config), server=server,
                  root=server.root / name)


@dataclass
class Team:
    """A bare git remote, a DVC remote, and working copies under one temp folder."""
    base: Path
    remote: Remote
    env: dict[str, str]

    def run(self, cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def dvc(self, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(cwd, str(BIN / "dvc"), *args, check=check)

    def git(self, cwd: Path, *args: str) -> str:
        return self.run(cwd, "git", *args).stdout

    @property
    def origin(self) -> Path:
        return self.base / "origin.git"

    def clone(self, who: str) -> Path:
        """A teammate's checkout: git clone, then the per-machine config secrets."""
        self.git(self.base, "clone", "-q", str(self.origin), who)
        repo = self.base / who
        for key, value in self.remote.local.items():
            self.dvc(repo, "remote", "modify", "--local", "team", key, value)
        return repo


def make_team(tmp_path: Path, remote: Remote) -> Team:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),  # no user-level git, DVC, AWS or SSH config leaks in
        "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0", "AWS_EC2_METADATA_DISABLED": "true",
        "GIT_AUTHOR_NAME": "alice", "GIT_AUTHOR_EMAIL": "alice@example.com",
        "GIT_COMMITTER_NAME": "alice", "GIT_COMMITTER_EMAIL": "alice@example.com",
        **remote.env,
    }
    return Team(tmp_path, remote, env)


def publish_project(team: Team) -> Path:
    """Alice: a DVC project with the team remote committed, reproduced, pushed to both remotes."""
    team.git(team.base, "init", "-q", "--bare", "-b", "main", str(team.origin))
    alice = team.base / "alice"
    alice.mkdir()
    team.git(alice, "init", "-q", "-b", "main")
    team.git(alice, "remote", "add", "origin", str(team.origin))
    team.dvc(alice, "init", "-q")
    team.dvc(alice, "config", "core.autostage", "true")
    write_project(alice)
    configure_remote(team, alice)
    team.dvc(alice, "add", "-q", "data/questions.jsonl", "data/corrections.jsonl")
    team.dvc(alice, "repro", "-q")
    team.git(alice, "add", "-A")
    team.git(alice, "commit", "-q", "-m", "project")
    team.dvc(alice, "push", "-q")
    team.git(alice, "push", "-q", "origin", "main")
    return alice


def write_project(repo: Path) -> None:
    (repo / "stages.py").write_text(STAGES_PY)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    write_rows(repo / "data/questions.jsonl", QUESTIONS)
    write_rows(repo / "data/corrections.jsonl", CORRECTIONS)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def configure_remote(team: Team, repo: Path) -> None:
    # Committed: url, non-secret options and verify (pull re-hashes what it downloads).
    team.dvc(repo, "remote", "add", "-d", "team", team.remote.url)
    team.dvc(repo, "remote", "modify", "team", "verify", "true")
    for key, value in team.remote.options.items():
        team.dvc(repo, "remote", "modify", "team", key, value)
    for key, value in team.remote.local.items():
        team.dvc(repo, "remote", "modify", "--local", "team", key, value)


def snapshot(repo: Path, paths: list[str] = SHARED) -> dict[str, str]:
    """Relative path -> sha256 of every file under `paths`."""
    out = {}
    for rel in paths:
        root = repo / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_nothing_to_do(team: Team, repo: Path) -> None:
    status = team.dvc(repo, "status").stdout
    assert "Data and pipelines are up to date" in status, status
    repro = team.dvc(repo, "repro").stdout
    assert "Running stage" not in repro, repro
    assert team.git(repo, "status", "--porcelain") == ""


@pytest.fixture
def team(tmp_path: Path, remote: Remote) -> Team:
    return make_team(tmp_path, remote)


def test_teammate_clone_and_pull_gets_identical_files_and_nothing_to_reproduce(team: Team):
    alice = publish_project(team)
    bob = team.clone("bob")
    assert not (bob / "models/adapters").exists()

    team.dvc(bob, "pull", "-q")

    assert snapshot(bob) == snapshot(alice)
    assert_nothing_to_do(team, bob)
    cloud = team.dvc(bob, "status", "--cloud").stdout
    assert "in sync" in cloud, cloud


def test_named_experiment_pushed_by_one_is_pulled_and_applied_by_another(team: Team):
    alice = publish_project(team)
    team.dvc(alice, "exp", "run", "-q", "-n", "lr-high", "-S", "train.learning_rate=1.0e-3")
    experiment = snapshot(alice, ["models/adapters", "models/gguf", "reports/train.json"])
    team.dvc(alice, "exp", "push", "origin", "lr-high")

    bob = team.clone("bob")
    team.dvc(bob, "pull", "-q")
    baseline = snapshot(bob, ["models/adapters", "models/gguf", "reports/train.json"])
    assert baseline != experiment  # the experiment really changed the adapter
    team.dvc(bob, "exp", "pull", "origin", "lr-high")
    assert "lr-high" in team.dvc(bob, "exp", "list", "--name-only").stdout
    team.dvc(bob, "exp", "apply", "lr-high")

    assert snapshot(bob, ["models/adapters", "models/gguf", "reports/train.json"]) == experiment
    assert yaml.safe_load((bob / "params.yaml").read_text())["train"]["learning_rate"] == 1.0e-3
    status = team.dvc(bob, "status").stdout
    assert "Data and pipelines are up to date" in status, status


def test_expert_edit_reproduced_and_pushed_reaches_teammate_without_rerun(team: Team):
    alice = publish_project(team)
    bob = team.clone("bob")
    team.dvc(bob, "pull", "-q")
    old_dataset = snapshot(bob, ["data/dataset"])

    # Alice (the expert) corrects an answer, reproduces, commits and pushes.
    write_rows(alice / "data/corrections.jsonl", CORRECTIONS + [{"id": "q-0005",
                                                                 "answer": "Better five."}])
    repro = team.dvc(alice, "repro").stdout
    assert "Running stage 'curate'" in repro and "Running stage 'generate'" not in repro
    team.git(alice, "commit", "-q", "-am", "correct q-0005")
    team.dvc(alice, "push", "-q")
    team.git(alice, "push", "-q", "origin", "main")

    team.git(bob, "pull", "-q", "origin", "main")
    team.dvc(bob, "pull", "-q")

    assert snapshot(bob) == snapshot(alice)
    assert snapshot(bob, ["data/dataset"]) != old_dataset
    assert "Better five." in (bob / "data/dataset/train.jsonl").read_text() + \
        (bob / "data/dataset/valid.jsonl").read_text() + (bob / "data/dataset/test.jsonl").read_text()
    assert_nothing_to_do(team, bob)
