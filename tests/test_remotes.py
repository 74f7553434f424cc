"""Team flows through real DVC remotes: a local folder, S3 (moto_server), SSH (sshd) on 127.0.0.1.

Each test builds a tiny DVC project laid out like this repository (questions and corrections in
git; generate -> curate -> train -> export stages writing data/generated, data/dataset,
models/adapters, models/gguf; params.yaml with `train.learning_rate`), pushes it to a bare git
remote and a DVC remote as "alice", and has "bob" clone and pull it in another folder. The stages
are small Python stand-ins so the flows take seconds; git, DVC and the servers are all real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from servers import (  # noqa: F401 (fixtures s3 and ssh)
    Server,
    free_port,
    s3_delete,
    s3_fixture,
    s3_keys,
    s3_put,
    ssh_fixture,
)

from pipeline.core.remote import remote_status

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
        answer = fixes.get(r["id"], r["answer"])
        source = "expert" if r["id"] in fixes else "generated"
        name = ["train", "train", "valid", "test"][digest(r["id"])[0] % 4]
        split[name].append({"messages": [{"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": answer}],
                            "id": r["id"], "source": source})
    for name, out in split.items():
        write(f"data/dataset/{name}.jsonl", "".join(json.dumps(r) + "\\n" for r in out))
elif stage == "train":
    data = b"".join(pathlib.Path(f"data/dataset/{n}.jsonl").read_bytes()
                    for n in ("train", "valid"))
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
    "artifacts": {
        "dataset": {"path": "data/dataset", "type": "dataset", "desc": "curated chat dataset"},
        "adapter": {"path": "models/adapters", "type": "model", "desc": "LoRA adapter"},
        "gguf-model": {"path": "models/gguf", "type": "model", "desc": "GGUF export"},
    },
}
PARAMS = {"base": {"seed": 0}, "train": {"learning_rate": 2.0e-4}}
QUESTIONS = [{"id": f"q-{i:04d}", "question": f"How do I do thing {i}?", "source": "expert"}
             for i in range(1, 13)]
CORRECTIONS = [{"id": "q-0002", "answer": "Expert answer two."}]
# Everything a teammate must get byte-identical.
SHARED = ["data/questions.jsonl", "data/corrections.jsonl", "data/generated/answers.jsonl",
          "data/dataset", "models/adapters", "models/gguf", "reports/train.json"]
MODEL = ["models/adapters", "models/gguf", "reports/train.json"]


# --- remotes and teammates --------------------------------------------------------------------

@dataclass
class Remote:
    """One DVC remote as a team configures it: url and options committed, secrets kept apart."""
    kind: str
    url: str
    options: dict[str, str] = field(default_factory=dict)   # committed .dvc/config
    local: dict[str, str] = field(default_factory=dict)     # .dvc/config.local (per machine)
    env: dict[str, str] = field(default_factory=dict)       # environment (credentials)
    server: Server | None = None
    root: Path | None = None  # where a local or SSH remote keeps its objects on this disk

    def keys(self) -> list[str]:
        """Objects in the remote, relative to its url (files/md5/ab/cdef...)."""
        if self.kind == "s3":
            prefix = self.url.split("/", 3)[3] + "/"
            return [k[len(prefix):] for k in s3_keys(self.server, prefix)]
        if self.root is None or not self.root.exists():
            return []
        return [str(p.relative_to(self.root)) for p in self.root.rglob("*")
                if p.is_file() and "tmp" not in p.name]

    def delete(self, key: str) -> None:
        if self.kind == "s3":
            s3_delete(self.server, self.url.split("/", 3)[3] + "/" + key)
        else:
            (self.root / key).unlink()

    def overwrite(self, key: str, data: bytes) -> None:
        if self.kind == "s3":
            s3_put(self.server, self.url.split("/", 3)[3] + "/" + key, data)
            return
        path = self.root / key
        path.chmod(0o644)  # DVC stores objects read-only
        path.write_bytes(data)


@pytest.fixture
def remote(request, tmp_path: Path) -> Remote:
    kind = request.param
    if kind == "local":
        return Remote("local", str(tmp_path / "storage"), root=tmp_path / "storage")
    name = re.sub(r"\W", "-", request.node.name)  # one prefix per test on the shared server
    server = request.getfixturevalue(kind)
    if kind == "s3":
        return Remote("s3", f"{server.url}/{name}", dict(server.remote_config),
                      env=dict(server.env), server=server)
    return Remote("ssh", f"{server.url}/{name}", local=dict(server.local_config), server=server,
                  root=server.root / name)


def on(*kinds: str):
    return pytest.mark.parametrize("remote", kinds, indirect=True)


@dataclass
class Team:
    """A bare git remote, a DVC remote, and the teammates' checkouts under one temp folder."""
    base: Path
    remote: Remote
    env: dict[str, str]

    def run(self, cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(cmd)} hung:\n{exc.stdout}\n{exc.stderr}") from None
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
        """A teammate's checkout: git clone, then this machine's secrets in config.local."""
        self.git(self.base, "clone", "-q", str(self.origin), who)
        repo = self.base / who
        write_local_config(repo, self.remote)
        return repo


@pytest.fixture
def team(tmp_path: Path, remote: Remote) -> Team:
    return make_team(tmp_path, remote)


def make_team(tmp_path: Path, remote: Remote) -> Team:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),  # no user-level git, DVC, AWS or SSH config leaks in
        "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0", "AWS_EC2_METADATA_DISABLED": "true",
        "GIT_AUTHOR_NAME": "alice", "GIT_AUTHOR_EMAIL": "alice@example.com",
        "GIT_COMMITTER_NAME": "alice", "GIT_COMMITTER_EMAIL": "alice@example.com",
        **remote.env,
    }
    return Team(tmp_path, remote, env)


def write_config(repo: Path, remote: Remote) -> None:
    # What `dvc remote add -d team URL` + `dvc remote modify team verify true` commit:
    # verify makes pull re-hash downloads so a corrupted object never reaches the workspace.
    lines = ["[core]", "    remote = team", "    autostage = true", "['remote \"team\"']",
             f"    url = {remote.url}", "    verify = true"]
    lines += [f"    {key} = {value}" for key, value in remote.options.items()]
    (repo / ".dvc/config").write_text("\n".join(lines) + "\n")
    write_local_config(repo, remote)


def write_local_config(repo: Path, remote: Remote) -> None:
    if remote.local:  # what `dvc remote modify --local team KEY VALUE` writes (git-ignored)
        lines = ["['remote \"team\"']"] + [f"    {k} = {v}" for k, v in remote.local.items()]
        (repo / ".dvc/config.local").write_text("\n".join(lines) + "\n")


def start_repo(team: Team) -> Path:
    """Alice's new DVC project with the team remote configured (before anything is shared)."""
    team.git(team.base, "init", "-q", "--bare", "-b", "main", str(team.origin))
    alice = team.base / "alice"
    alice.mkdir()
    team.git(alice, "init", "-q", "-b", "main")
    team.git(alice, "remote", "add", "origin", str(team.origin))
    team.dvc(alice, "init", "-q")
    write_config(alice, team.remote)
    return alice


def share(team: Team, repo: Path, message: str) -> None:
    team.git(repo, "add", "-A")
    team.git(repo, "commit", "-q", "-m", message)
    team.dvc(repo, "push", "-q")
    team.git(repo, "push", "-q", "origin", "main")


def publish_project(team: Team) -> Path:
    """Alice: the project reproduced and pushed, remote config committed first."""
    alice = start_repo(team)
    (alice / "stages.py").write_text(STAGES_PY)
    (alice / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (alice / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    write_rows(alice / "data/questions.jsonl", QUESTIONS)
    write_rows(alice / "data/corrections.jsonl", CORRECTIONS)
    team.dvc(alice, "repro", "-q")
    share(team, alice, "project")
    return alice


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def snapshot(repo: Path, paths: list[str] = SHARED) -> dict[str, str]:
    """Relative path -> sha256 of every file under `paths`."""
    out = {}
    for rel in paths:
        root = repo / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def object_key(path: Path) -> str:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def assert_nothing_to_reproduce(team: Team, repo: Path) -> None:
    repro = team.dvc(repo, "repro").stdout
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro, repro
    assert team.git(repo, "status", "--porcelain") == ""


# --- the three team flows ---------------------------------------------------------------------

@pytest.mark.slow
@on("local", "s3", "ssh")
def test_teammate_clone_and_pull_gets_identical_files_and_nothing_to_reproduce(team: Team):
    alice = publish_project(team)
    bob = team.clone("bob")
    assert not (bob / "models/adapters").exists()

    team.dvc(bob, "pull", "-q")

    assert snapshot(bob) == snapshot(alice)
    status = team.dvc(bob, "status").stdout
    assert "Data and pipelines are up to date" in status, status
    assert_nothing_to_reproduce(team, bob)
    cloud = team.dvc(bob, "status", "--cloud").stdout
    assert "in sync" in cloud, cloud


@pytest.mark.slow
@on("s3")
def test_named_experiment_pushed_by_one_is_pulled_and_applied_by_another(team: Team):
    alice = publish_project(team)
    team.dvc(alice, "exp", "run", "-q", "-n", "lr-high", "-S", "train.learning_rate=1.0e-3")
    experiment = snapshot(alice, MODEL)
    team.dvc(alice, "exp", "push", "origin", "lr-high")

    bob = team.clone("bob")
    team.dvc(bob, "pull", "-q")
    assert snapshot(bob, MODEL) != experiment  # the experiment really changed the adapter
    team.dvc(bob, "exp", "pull", "origin", "lr-high")
    team.dvc(bob, "exp", "apply", "lr-high")

    assert snapshot(bob, MODEL) == experiment
    assert yaml.safe_load((bob / "params.yaml").read_text())["train"]["learning_rate"] == 1.0e-3
    status = team.dvc(bob, "status").stdout
    assert "Data and pipelines are up to date" in status, status


@pytest.mark.slow
@on("local")
def test_expert_edit_reproduced_and_pushed_reaches_teammate_without_rerun(team: Team):
    alice = publish_project(team)
    bob = team.clone("bob")
    team.dvc(bob, "pull", "-q")
    before = snapshot(bob, ["data/dataset"])

    # Alice, the expert, corrects an answer (a git-tracked source: reviewable as a line diff).
    write_rows(alice / "data/corrections.jsonl",
               CORRECTIONS + [{"id": "q-0005", "answer": "Better five."}])
    repro = team.dvc(alice, "repro").stdout
    assert "Running stage 'curate'" in repro and "Running stage 'generate'" not in repro
    team.git(alice, "commit", "-q", "-am", "correct q-0005")
    team.dvc(alice, "push", "-q")
    team.git(alice, "push", "-q", "origin", "main")

    team.git(bob, "pull", "-q", "origin", "main")
    team.dvc(bob, "pull", "-q")

    assert snapshot(bob) == snapshot(alice)
    assert snapshot(bob, ["data/dataset"]) != before
    dataset = "".join((bob / f"data/dataset/{n}.jsonl").read_text() for n in ("train", "valid",
                                                                                  "test"))
    assert "Better five." in dataset
    assert_nothing_to_reproduce(team, bob)


@pytest.mark.slow
@on("local")
def test_tagged_artifact_is_fetched_by_name_from_outside_the_project(team: Team):
    alice = publish_project(team)
    team.git(alice, "tag", "-a", "adapter@v0.1.0", "-m", "first adapter")
    team.git(alice, "push", "-q", "origin", "adapter@v0.1.0")
    outside = team.base / "consumer"
    outside.mkdir()

    # A relative local remote url would resolve inside DVC's temporary clone: pass it absolute.
    team.dvc(outside, "artifacts", "get", str(team.origin), "adapter", "-o", "adapter",
             "--remote-config", f"url={team.remote.url}")

    got = {k.replace("adapter/", "models/adapters/"): v
           for k, v in snapshot(outside, ["adapter"]).items()}
    assert got == snapshot(alice, ["models/adapters"])


# --- faults -----------------------------------------------------------------------------------

SHARDS = 40  # uploads after the 10th are held until the push is killed (kill_push_midway)


@pytest.mark.slow
@on("s3", "ssh")
def test_interrupted_push_completes_when_run_again(team: Team):
    alice = start_repo(team)
    shards = alice / "models/adapters"
    shards.mkdir(parents=True)
    for i in range(SHARDS):
        (shards / f"shard-{i:03d}.bin").write_bytes(os.urandom(4096))
    team.dvc(alice, "add", "-q", "models/adapters")
    before = snapshot(alice, ["models/adapters"])

    partial = kill_push_midway(team, alice, total=SHARDS + 1)  # + the directory listing

    rerun = team.dvc(alice, "push", "-v").stdout
    pushed = int(re.search(r"(\d+) files? pushed", rerun).group(1))
    assert 0 < pushed <= SHARDS + 1 - partial + 2, rerun  # resumes: only in-flight ones redone
    assert "in sync" in team.dvc(alice, "status", "--cloud").stdout
    shutil.rmtree(alice / ".dvc/cache")
    shutil.rmtree(shards)
    team.dvc(alice, "pull", "-q")
    assert snapshot(alice, ["models/adapters"]) == before


HOLD_UPLOADS = """
import asyncio, os
HOLD, AFTER = os.environ["TUNELINE_TEST_HOLD"], int(os.environ["TUNELINE_TEST_HOLD_AFTER"])
started = [0]


def _hold(cls):
    real = cls._put_file

    async def _put_file(self, *args, **kwargs):
        started[0] += 1
        while started[0] > AFTER and os.path.exists(HOLD):
            await asyncio.sleep(0.02)
        return await real(self, *args, **kwargs)

    cls._put_file = _put_file


import s3fs, sshfs  # noqa: E402
_hold(s3fs.S3FileSystem)
_hold(sshfs.SSHFileSystem)
"""


def kill_push_midway(team: Team, repo: Path, total: int, after: int = 10) -> int:
    """Start `dvc push` with 2 jobs whose uploads after the first `after` wait (a sitecustomize
    holds them while a file exists), SIGKILL it there; return how many objects landed. The kill
    lands mid-push however fast or slow the machine is."""
    hook = repo.parent / "hold-uploads"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOLD_UPLOADS)
    hold = hook / "hold"
    hold.touch()
    env = {**team.env, "PYTHONPATH": str(hook), "TUNELINE_TEST_HOLD": str(hold),
           "TUNELINE_TEST_HOLD_AFTER": str(after)}
    proc = subprocess.Popen([str(BIN / "dvc"), "push", "-j", "2"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120  # a hang guard only: the hold keeps the push unfinished
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if len(team.remote.keys()) >= after:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hold.unlink()
    landed = len(team.remote.keys())
    assert 0 < landed <= after < total, f"push not held mid-way ({landed}/{total} objects)"
    return landed


@on("local", "s3", "ssh")
def test_corrupted_object_in_remote_fails_pull_and_never_reaches_workspace(team: Team):
    alice = start_repo(team)
    write_rows(alice / "data/dataset/train.jsonl", QUESTIONS)
    adapter = alice / "models/adapters/adapters.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(os.urandom(65536))
    team.dvc(alice, "add", "-q", "data/dataset", "models/adapters")
    share(team, alice, "data")
    good = snapshot(alice, ["models/adapters"])
    bad = object_key(adapter)
    team.remote.overwrite(bad, os.urandom(65536))  # bit rot, a bad disk, a botched copy

    bob = team.clone("bob")
    pull = team.dvc(bob, "pull", check=False)

    assert pull.returncode != 0, pull.stdout
    assert "models/adapters" in pull.stderr, pull.stderr
    got = bob / "models/adapters/adapters.safetensors"
    assert not got.exists() or snapshot(bob, ["models/adapters"]) == good
    assert snapshot(bob, ["data/dataset"]) == snapshot(alice, ["data/dataset"])

    # Repair (docs/remotes.md): drop the bad object and its directory listing, re-push a good copy.
    for key in [bad] + [k for k in team.remote.keys() if k.endswith(".dir")]:
        team.remote.delete(key)
    team.dvc(alice, "push", "-q")
    team.dvc(bob, "pull", "-q")
    assert snapshot(bob, ["models/adapters"]) == good


def one_file_repo(team: Team) -> Path:
    alice = start_repo(team)
    write_rows(alice / "data/dataset/train.jsonl", QUESTIONS)
    team.dvc(alice, "add", "-q", "data/dataset")
    return alice


def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process without credentials: no AWS keys, no ~/.aws, ~/.ssh or user DVC config."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_wrong_s3_endpoint_is_named_by_push_and_doctor(tmp_path, s3, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    team = make_team(tmp_path, Remote("s3", f"{s3.url}/wrong", {"endpointurl": closed},
                                      env=dict(s3.env)))
    alice = one_file_repo(team)

    push = team.dvc(alice, "push", check=False)

    assert push.returncode != 0
    assert f'Could not connect to the endpoint URL: "{closed}/' in push.stderr, push.stderr
    isolated_env(monkeypatch, tmp_path)
    status = remote_status(alice)
    assert status["reachable"] is False
    assert f"nothing answers at {closed[7:]}" in status["detail"]
    assert "endpointurl" in status["detail"]


def test_missing_s3_credentials_are_named_by_push_and_doctor(tmp_path, s3, monkeypatch):
    team = make_team(tmp_path, Remote("s3", f"{s3.url}/nocreds", dict(s3.remote_config)))
    alice = one_file_repo(team)

    push = team.dvc(alice, "push", check=False)

    assert push.returncode != 0
    assert "Unable to locate credentials" in push.stderr, push.stderr
    isolated_env(monkeypatch, tmp_path)
    status = remote_status(alice)
    assert status["reachable"] is False
    assert "AWS_ACCESS_KEY_ID" in status["detail"] and "--local team" in status["detail"]


def test_ssh_login_without_key_is_named_by_push_and_doctor(tmp_path, ssh, monkeypatch):
    team = make_team(tmp_path, Remote("ssh", f"{ssh.url}/nokey"))  # no keyfile in config.local
    alice = one_file_repo(team)

    push = team.dvc(alice, "push", check=False)

    assert push.returncode != 0
    assert "Permission denied" in push.stderr, push.stderr
    isolated_env(monkeypatch, tmp_path)
    status = remote_status(alice)
    assert status["reachable"] is False
    assert "keyfile" in status["detail"] and "refused" in status["detail"]


def test_reachable_remotes_report_kind_and_redacted_url(tmp_path, s3, ssh, monkeypatch):
    isolated_env(monkeypatch, tmp_path)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    for remote in (Remote("s3", f"{s3.url}/ok", dict(s3.remote_config)),
                   Remote("ssh", f"{ssh.url}/ok", local=dict(ssh.local_config))):
        repo = tmp_path / remote.kind
        (repo / ".dvc").mkdir(parents=True)
        write_config(repo, remote)
        status = remote_status(repo)
        assert status == {**status, "name": "team", "kind": remote.kind, "url": remote.url,
                          "reachable": True, "warnings": []}, status


# --- the committed configuration of this repository ----------------------------------------

def test_committed_default_remote_is_a_sibling_folder_with_verify_and_no_secrets(tmp_path,
                                                                                monkeypatch):
    isolated_env(monkeypatch, tmp_path)
    clone = tmp_path / "tuneline"
    (clone / ".dvc").mkdir(parents=True)
    shutil.copy(REPO / ".dvc/config", clone / ".dvc/config")

    status = remote_status(clone)

    assert status["kind"] == "local"
    assert Path(status["url"]) == tmp_path / "tuneline-storage"
    assert status["reachable"] is True, status
    assert status["warnings"] == []


def test_secrets_in_committed_config_are_flagged_and_never_printed(tmp_path, monkeypatch):
    isolated_env(monkeypatch, tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text(
        "[core]\n    remote = team\n['remote \"team\"']\n"
        f"    url = ssh://bob:hunter2-secret@127.0.0.1:{free_port()}/srv/dvc\n"
        "    password = hunter2-secret\n    verify = true\n")

    status = remote_status(tmp_path)

    assert "hunter2-secret" not in json.dumps(status)
    assert status["url"].startswith("ssh://bob:***@127.0.0.1:")
    assert status["reachable"] is False
    assert any("password" in w and ".dvc/config.local" in w for w in status["warnings"])


def test_dvc_yaml_names_dataset_adapter_and_gguf_artifacts():
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    paths = {name: (a["path"], a["type"]) for name, a in artifacts.items()}
    assert paths == {"dataset": ("data/dataset", "dataset"),
                     "adapter": ("models/adapters", "model"),
                     "gguf-model": ("models/gguf", "model")}
    assert all(a.get("desc") for a in artifacts.values())
