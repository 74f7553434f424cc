"""Gated publishing: each gate check on its own, the real huggingface_hub client against a local
Hub stand-in (tests/hub_standin.py), the model card, error paths, and the token never leaking.

A session fixture builds a tiny project once (git, DVC with a local remote, outputs pushed,
reports committed); each test works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_standin import GITATTRIBUTES, HubStandin, key

from pipeline import publish
from pipeline.core import config
from pipeline.hub import client as hub_client
from pipeline.hub import modelcard
from pipeline.hub.repo_facts import clean_remote

TOKEN = "hf_" + "FAKEtokenForTests0123456789abcdefXYZ"  # split: no token-shaped literal in git
READ_TOKEN = "hf_" + "READonlyTokenForTests0123456789abcd"
REPO = "alice/pg-helper"
TUNED_ANSWER = "Use CREATE INDEX:\n```sql\nCREATE INDEX ON t (c);\n```"
SAFE = b"\x00" * 64 + os.urandom(2048)  # bytes that stand in for safetensors / GGUF content
F16, Q8 = b"GGUF" + SAFE, b"GGUF" + SAFE[:1000]


# --- the project ---------------------------------------------------------------------------


def _params() -> dict[str, Any]:
    return {
        "base": {"seed": 0, "model": "embedded", "revision": None, "quantize": None,
                 "quantize_group_size": 64},
        "train": {"fine_tune_type": "lora", "rank": 8, "iters": 40, "learning_rate": 2.0e-4},
        "publish": {
            "enabled": True, "repo_id": REPO, "private": True,
            "upload": ["adapter", "fused", "gguf", "modelfile", "card"],
            "license": "auto", "allowed_licenses": ["apache-2.0", "mit"], "tags": ["postgres"],
            "min_improvement": 0.05, "require_judge_win_rate": None,
            "min_preference_accuracy": None, "require_pushed": True,
            "require_clean_git": True, "card_samples": 2,
            "dataset": {"enabled": False, "repo_id": None, "private": True, "license": None,
                        "languages": ["en"]},
        },
    }


def _eval() -> dict[str, Any]:
    return {
        "base": {"test_loss": 2.5, "test_ppl": 12.18, "test_tokens": 900,
                 "answers": [{"id": "q-1", "answer": "I am not sure."},
                             {"id": "q-2", "answer": "VACUUM cleans."}]},
        "tuned": {"test_loss": 1.9, "test_ppl": 6.69, "test_tokens": 900,
                  "answers": [{"id": "q-1", "answer": TUNED_ANSWER},
                              {"id": "q-2", "answer": "VACUUM reclaims dead row space."}]},
        "improvement": 0.6, "test_rows": 2,
        "prompts": [{"id": "q-1", "question": "How do I create an index?", "reference": "CREATE"},
                    {"id": "q-2", "question": "What does VACUUM do?", "reference": None}],
        "judge": {"enabled": False},
    }


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data, indent=2) if path.suffix == ".json" else
                        yaml.safe_dump(data, sort_keys=False))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def _dvc(cwd: Path, *args: str) -> str:
    return _sh(cwd, sys.executable, "-m", "dvc", *args)


def _commit(repo: Path, message: str = "change") -> None:
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", message)


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("publish-template")
    repo, src = root / "repo", root / "repo" / "src"
    (root / "store").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}],
             "id": f"q-{i}", "source": source}
            for i, source in enumerate(["generated", "generated", "expert", "imported"])]
    _write(src / "dataset/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:3]))
    _write(src / "dataset/valid.jsonl", "")
    _write(src / "dataset/test.jsonl", json.dumps(rows[3]) + "\n")
    _write(src / "base/tuneline.json", {"base.model": "embedded", "kind": "gguf"})
    _write(src / "base/config.json", {"model_type": "llama"})
    _write(src / "adapters/adapters.safetensors", SAFE)
    _write(src / "adapters/adapter_config.json", {"fine_tune_type": "lora"})
    _write(src / "adapters/0000010_adapters.safetensors", b"checkpoint: never uploaded")
    _write(src / "adapters/sft/adapters.safetensors", b"the SFT-only baseline: never uploaded")
    _write(src / "adapters/sft/adapter_config.json", {"fine_tune_type": "lora"})
    _write(src / "fused/config.json", {"model_type": "llama"})
    _write(src / "fused/model.safetensors", SAFE[::-1])
    _write(src / "fused/tokenizer.json", {"model": {"type": "BPE"}})
    _write(src / "gguf/model-f16.gguf", F16)
    _write(src / "gguf/model-q8_0.gguf", Q8)
    _write(src / "gguf/Modelfile", "FROM ./model-q8_0.gguf\nPARAMETER stop <|im_end|>\n")
    _write(repo / ".gitignore", "/.tuneline/\n")  # as in the real repository
    _write(repo / "params.yaml", _params())
    _write(repo / "reports/validation.json", {"passed": True, "errors": 0, "warnings": 1})
    _write(repo / "reports/eval.json", _eval())
    _write(repo / "reports/train.json", {"val_loss": 1.8, "iters": 40})
    _write(repo / "reports/gguf.json", {"files": {
        "f16": {"file": "model-f16.gguf", "failures": [], "sha256": _sha(F16)},
        "q8_0": {"file": "model-q8_0.gguf", "failures": [], "sha256": _sha(Q8)}}})
    _write(repo / "dvc.yaml", {"stages": {"build": {
        "cmd": "mkdir -p data models && cp -r src/dataset data/dataset && "
               "cp -r src/base src/adapters src/fused src/gguf models/",
        "deps": ["src"],
        "outs": ["data/dataset", "models/base", "models/adapters", "models/fused",
                 "models/gguf"]}}})
    _sh(repo, "git", "init", "-q", "-b", "main")
    _sh(repo, "git", "config", "user.email", "t@example.com")
    _sh(repo, "git", "config", "user.name", "t")
    _sh(repo, "git", "remote", "add", "origin", "https://bob:s3cret@git.example.com/pg.git")
    _dvc(repo, "init", "-q")
    _dvc(repo, "remote", "add", "-d", "store", "../store")
    _dvc(repo, "repro", "-q")
    _commit(repo, "project")
    _dvc(repo, "push", "-q")
    return root


@pytest.fixture
def project(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(template, tmp_path / "p", symlinks=True,
                    ignore=shutil.ignore_patterns("tmp"))
    repo = tmp_path / "p" / "repo"
    monkeypatch.chdir(repo)
    return repo


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Any:
    from huggingface_hub import constants

    # conftest sets HF_HUB_OFFLINE for every test; the stand-in is the one Hub allowed here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubStandin() as standin:
        standin.add_account(TOKEN, "alice")
        standin.add_account(READ_TOKEN, "alice", role="read")
        yield standin


def _paths(**changes: Any) -> publish.PublishPaths:
    paths = publish.PublishPaths(
        params=Path("params.yaml"), validation=Path("reports/validation.json"),
        eval=Path("reports/eval.json"), gguf_report=Path("reports/gguf.json"),
        train_report=Path("reports/train.json"), dataset=Path("data/dataset"),
        dvc_lock=Path("dvc.lock"), base=Path("models/base"), adapters=Path("models/adapters"),
        fused=Path("models/fused"), gguf=Path("models/gguf"),
        report=Path("reports/publish.json"), card=Path("reports/model_card.md"))
    return publish.PublishPaths(**{**paths.__dict__, **changes})


def _cfg() -> publish.PublishConfig:
    return config.load(publish.PublishConfig, "publish", "params.yaml")


def _edit_params(repo: Path, **publish_changes: Any) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["publish"].update(publish_changes)
    _write(repo / "params.yaml", params)


def _env(hub: HubStandin, token: str = TOKEN) -> dict[str, str]:
    return {"HF_TOKEN": token, "HF_ENDPOINT": hub.url}


def _run(hub: HubStandin, token: str = TOKEN, **paths: Any) -> publish.PublishResult:
    return publish.run(_cfg(), _paths(**paths), dry_run=False, env=_env(hub, token))


def _report() -> dict[str, Any]:
    return json.loads(Path("reports/publish.json").read_text())


def _assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and READ_TOKEN not in text


# --- the gate ------------------------------------------------------------------------------


def test_dry_run_checks_every_gate_and_says_why_it_did_not_upload(project: Path) -> None:
    _edit_params(project, enabled=False)
    _commit(project)

    result = publish.run(_cfg(), _paths(), dry_run=False, env={})

    assert result.status == "dry_run" and result.passed
    assert result.dry_run_reasons == ["publish.enabled is false", "HF_TOKEN is not set"]
    report = _report()
    assert [c["name"] for c in report["checks"]] == [
        "tracked", "validation", "improvement", "gguf", "judge", "preference", "license",
        "artifacts", "git_clean", "up_to_date", "dvc_pushed"]
    assert all(c["passed"] and c["detail"] for c in report["checks"])
    assert report["dry_run"] is True and report["commit_url"] is None
    files = {f["path"]: f["size"] for f in report["files"]}
    assert set(files) == {
        "adapter/adapters.safetensors", "adapter/adapter_config.json", "config.json",
        "model.safetensors", "tokenizer.json", "model-f16.gguf", "model-q8_0.gguf",
        "Modelfile", "README.md", publish.MANIFEST}
    assert files["adapter/adapters.safetensors"] == len(SAFE)
    assert report["total_bytes"] == sum(files.values())


def _break_validation(repo: Path) -> None:
    _write(repo / "reports/validation.json", {"passed": False, "errors": {"schema": 2, "empty": 1}})


def _break_improvement(repo: Path) -> None:
    data = _eval()
    data["tuned"]["test_loss"] = 2.48  # better, but by less than min_improvement 0.05
    _write(repo / "reports/eval.json", data)


def _break_gguf(repo: Path) -> None:
    _write(repo / "reports/gguf.json", {"files": {
        "f16": {"file": "model-f16.gguf", "failures": [], "sha256": _sha(F16)},
        "q8_0": {"file": "model-q8_0.gguf", "failures": ["did not stop within max_tokens"],
                 "sha256": _sha(Q8)}}})


def _break_judge(repo: Path) -> None:
    _edit_params(repo, require_judge_win_rate=0.6)
    data = _eval()
    data["judge"] = {"enabled": True, "tuned_win_rate": 0.4, "verdicts": []}
    _write(repo / "reports/eval.json", data)


def _break_preference(repo: Path) -> None:
    _edit_params(repo, min_preference_accuracy=0.6)
    data = _eval()
    data["base"]["preference_accuracy"], data["tuned"]["preference_accuracy"] = 0.2, 0.4
    _write(repo / "reports/eval.json", data)


def _break_license(repo: Path) -> None:
    _edit_params(repo, allowed_licenses=["mit"])


BREAKERS = {
    "validation": (_break_validation, "3 errors"),
    "improvement": (_break_improvement, "improved by 0.0200"),
    "gguf": (_break_gguf, "failed: model-q8_0.gguf"),
    "judge": (_break_judge, "judge win rate 0.400"),
    "preference": (_break_preference, "preference accuracy tuned 0.400 (base 0.200"),
    "license": (_break_license, "apache-2.0"),
}


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_each_report_check_fails_on_its_own(project: Path, name: str) -> None:
    breaker, expected = BREAKERS[name]
    breaker(project)
    _commit(project)

    result = publish.run(_cfg(), _paths(), dry_run=True, env={})

    failed = [c for c in result.checks if not c.passed]
    assert [c.name for c in failed] == [name]
    assert expected in failed[0].detail


def test_missing_artifact_fails_only_the_artifacts_check(project: Path) -> None:
    result = publish.run(_cfg(), _paths(fused=Path("models/nowhere")), dry_run=True, env={})
    failed = [c for c in result.checks if not c.passed]
    assert [c.name for c in failed] == ["artifacts"]
    assert "models/nowhere/config.json" in failed[0].detail


def test_uncommitted_file_fails_only_git_clean(project: Path) -> None:
    (project / "notes.txt").write_text("scratch")
    result = publish.run(_cfg(), _paths(), dry_run=True, env={})
    failed = [c for c in result.checks if not c.passed]
    assert [c.name for c in failed] == ["git_clean"]
    assert "notes.txt" in failed[0].detail


def test_unpushed_outputs_fail_only_dvc_pushed(project: Path) -> None:
    shutil.rmtree(project.parent / "store")
    (project.parent / "store").mkdir()
    result = publish.run(_cfg(), _paths(), dry_run=True, env={})
    failed = [c for c in result.checks if not c.passed]
    assert [c.name for c in failed] == ["dvc_pushed"]
    assert "dvc push" in failed[0].detail and "models/fused (new)" in failed[0].detail
    assert "data/dataset/train.jsonl" not in failed[0].detail


def test_output_changed_since_dvc_lock_fails_up_to_date(project: Path) -> None:
    (project / "models/fused/config.json").write_text('{"edited": true}')
    result = publish.run(_cfg(), _paths(), dry_run=True, env={})
    failed = [c for c in result.checks if not c.passed]
    assert [c.name for c in failed] == ["up_to_date", "dvc_pushed"]
    assert "build" in failed[0].detail and "dvc repro" in failed[0].detail


def test_reports_must_be_up_to_date_even_when_pushing_is_not_required(project: Path) -> None:
    _edit_params(project, require_pushed=False)
    _commit(project)
    (project / "models/fused/config.json").write_text('{"edited": true}')
    result = publish.run(_cfg(), _paths(), dry_run=True, env={})
    failed = {c.name: c.detail for c in result.checks if not c.passed}
    assert list(failed) == ["up_to_date"] and "dvc repro" in failed["up_to_date"]
    assert "not required" in next(c.detail for c in result.checks if c.name == "dvc_pushed")


def test_gguf_files_are_matched_to_the_report_by_content(project: Path) -> None:
    # Same name as a proven file, other bytes: llama.cpp never saw this file.
    (project / "models/gguf/model-q8_0.gguf").write_bytes(b"GGUF" + b"\x01" * 500)
    result = publish.run(_cfg(), _paths(), dry_run=True, env={})
    gguf = next(c for c in result.checks if c.name == "gguf")
    assert not gguf.passed and "never checked" in gguf.detail and "model-q8_0.gguf" in gguf.detail


@pytest.mark.parametrize("option", ["eval", "validation", "gguf_report", "fused", "gguf",
                                    "adapters", "params", "dvc_lock"])
def test_inputs_outside_the_repository_are_refused(project: Path, option: str) -> None:
    inside = getattr(_paths(), option)
    outside = project.parent / "elsewhere" / inside.name
    shutil.copytree(inside, outside) if inside.is_dir() else _write(outside, inside.read_bytes())
    with pytest.raises(publish.PublishError, match=r"is outside the repository") as info:
        publish.run(_cfg(), _paths(**{option: outside}), dry_run=True, env={})
    flag = "--eval" if option == "eval" else f"--{option.replace('_', '-')}"
    assert str(info.value).startswith(f"{flag} {outside}")
    assert "\n" not in str(info.value)
    with pytest.raises(publish.PublishError, match="outside the repository"):
        publish.run(_cfg(), _paths(**{option: Path("..") / "elsewhere" / inside.name}),
                    dry_run=True, env={})


def test_stage_verdict_judges_what_it_can_and_lists_what_waits(project: Path) -> None:
    # As inside `dvc repro`: uncommitted changes and nothing pushed yet.
    (project / "notes.txt").write_text("scratch")
    shutil.rmtree(project.parent / "store")
    (project.parent / "store").mkdir()
    result = publish.run(_cfg(), _paths(), dry_run=True, stage=True, env={"HF_TOKEN": TOKEN})
    report = _report()
    assert report["passed"] is True and report["status"] == "stage"
    assert report["pending"] == ["git_clean", "dvc_pushed"]
    assert {c["name"]: c["passed"] for c in report["checks"]}["up_to_date"] is True
    assert result.dry_run and report["commit_url"] is None
    _break_validation(project)
    assert not publish.run(_cfg(), _paths(), dry_run=True, stage=True, env={}).passed


def test_failed_gate_blocks_upload_and_contacts_no_hub(project: Path, hub: HubStandin) -> None:
    _break_improvement(project)
    _commit(project)
    result = _run(hub)
    assert result.status == "blocked" and not result.passed
    assert hub.requests == [] and hub.repos == {}


def test_config_errors_name_the_key(project: Path) -> None:
    cfg = _cfg()
    bad = publish.PublishConfig(**{**cfg.__dict__, "upload": ("modelfile", "card")})
    with pytest.raises(publish.PublishError, match="modelfile without gguf"):
        publish.run(bad, _paths(), dry_run=True, env={})
    bad = publish.PublishConfig(**{**cfg.__dict__, "repo_id": "just-a-name"})
    with pytest.raises(publish.PublishError, match="namespace/name"):
        publish.run(bad, _paths(), dry_run=True, env={})


# --- publishing to the stand-in ------------------------------------------------------------


def test_publishes_one_private_commit_with_byte_identical_files(project: Path,
                                                               hub: HubStandin) -> None:
    from huggingface_hub import HfApi

    result = _run(hub)

    assert result.status == "published", result.error
    repo = hub.repos[REPO]
    assert repo.private is True
    assert len(repo.commits) == 2  # the Hub's initial commit, then exactly one release commit
    assert result.revision == repo.head.oid and result.commit_url.endswith(repo.head.oid)
    # The protocol the issue measured, in order; LFS PUT + verify (per large file, in
    # parallel threads) come between the batch call and the commit.
    lfs = ("/lfs-upload/", "/lfs-verify/")
    assert [(m, p) for m, p in hub.requests if not p.startswith(lfs)] == [
        ("GET", "/api/whoami-v2"),
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    batch = hub.requests.index(("POST", f"/{REPO}.git/info/lfs/objects/batch"))
    assert all(p.startswith(lfs) for _, p in hub.requests[batch + 1:-1])
    assert hub.calls("PUT", r"^/lfs-upload/") == 4  # adapter, fused weights, two GGUFs
    assert hub.calls("POST", r"^/lfs-verify/") == 4
    sources = {
        "adapter/adapters.safetensors": "models/adapters/adapters.safetensors",
        "adapter/adapter_config.json": "models/adapters/adapter_config.json",
        "model.safetensors": "models/fused/model.safetensors",
        "config.json": "models/fused/config.json",
        "model-q8_0.gguf": "models/gguf/model-q8_0.gguf",
        "Modelfile": "models/gguf/Modelfile",
    }
    for repo_path, local in sources.items():
        assert hub.file_bytes(REPO, repo_path) == Path(local).read_bytes(), repo_path
    assert "adapter/0000010_adapters.safetensors" not in hub.paths(REPO)
    # a dpo run's SFT-only baseline stays home: the repo holds the adapter released
    assert not [p for p in hub.paths(REPO) if p.startswith("adapter/sft/")]
    assert hub.file_bytes(REPO, "README.md") == Path("reports/model_card.md").read_bytes()
    # The real client downloads the same bytes back.
    api = HfApi(endpoint=hub.url, token=TOKEN)
    with tempfile.TemporaryDirectory() as cache:
        got = api.hf_hub_download(REPO, "model-f16.gguf", cache_dir=cache)
        assert Path(got).read_bytes() == Path("models/gguf/model-f16.gguf").read_bytes()
    manifest = json.loads(hub.file_bytes(REPO, publish.MANIFEST))
    assert manifest["content_id"] == result.content_id
    assert manifest["git_commit"] == _sh(project, "git", "rev-parse", "HEAD").strip()
    report = _report()
    assert report["status"] == "published" and report["revision"] == repo.head.oid
    _assert_no_token(json.dumps(report), *(f.data.decode("utf-8", "replace")
                                           for f in repo.head.files.values()))


def test_card_tells_the_lineage(project: Path, hub: HubStandin) -> None:
    from huggingface_hub import ModelCard

    _run(hub)
    text = hub.file_bytes(REPO, "README.md").decode()
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"tuneline", "mlx", "lora", "gguf", "postgres"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert {"type": "loss", "value": 1.9, "name": "test loss"} in metrics
    body = card.text
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    dataset_md5 = next(o["md5"] for o in lock["stages"]["build"]["outs"]
                       if o["path"] == "data/dataset")
    assert dataset_md5 in body
    assert "| generated | 2 |" in body and "| expert | 1 |" in body and "| imported | 1 |" in body
    assert "| `rank` | `8` |" in body
    assert "| test_loss | 2.5 | 1.9 |" in body
    assert "How do I create an index?" in body and "I am not sure." in body
    assert "````text\n" + TUNED_ANSWER + "\n````" in body  # fence longer than the answer's
    assert f"mlx_lm.generate --model {REPO}" in body
    assert "--adapter-path adapter" in body
    assert f"llama-cli --hf-repo {REPO} --hf-file model-q8_0.gguf" in body
    assert f"ollama run hf.co/{REPO}:Q8_0" in body and "ollama create" in body
    assert "## Limitations" in body
    commit = _sh(project, "git", "rev-parse", "HEAD").strip()
    assert f"git checkout {commit}" in body
    assert "https://git.example.com/pg.git" in body and "s3cret" not in body


def test_republishing_the_same_content_is_a_noop(project: Path, hub: HubStandin) -> None:
    first = _run(hub)
    uploaded, commits = hub.uploaded_bytes, len(hub.repos[REPO].commits)
    _commit(project, "record the publish")  # a new git commit, same model

    again = _run(hub)

    assert again.status == "unchanged"
    assert again.revision == first.revision
    assert len(hub.repos[REPO].commits) == commits
    assert hub.uploaded_bytes == uploaded
    assert hub.calls("POST", "/commit/") == 1 and hub.calls("POST", "/preupload/") == 1


def test_dropping_an_item_deletes_only_what_tuneline_put_there(project: Path,
                                                              hub: HubStandin) -> None:
    _run(hub)
    hub.repos[REPO].commits[-1].files["notes.md"] = hub.repos[REPO].head.files["Modelfile"]
    _edit_params(project, upload=["adapter", "card"])
    _commit(project)

    result = _run(hub)

    assert result.status == "published"
    assert hub.paths(REPO) == {".gitattributes", "notes.md", "README.md", publish.MANIFEST,
                               "adapter/adapters.safetensors", "adapter/adapter_config.json"}
    assert hub.file_bytes(REPO, ".gitattributes") == GITATTRIBUTES.encode()


def test_refuses_to_upload_into_a_public_repo_when_private(project: Path,
                                                           hub: HubStandin) -> None:
    hub.create_repo(REPO, private=False)
    with pytest.raises(publish.PublishError, match="is public but publish.private is true"):
        _run(hub)
    assert len(hub.repos[REPO].commits) == 1


ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "invalid_token": ({"token": "hf_" + "notAValidTokenAtAll0123456789abcdef"}, "401"),
    "read_only_token": ({"token": READ_TOKEN}, "read-only token"),
    "no_rights_in_namespace": ({"repo_id": "postgres-org/pg-helper"}, "403"),
    "not_found": ({"fault": {"method": "POST", "path": "/preupload/", "status": 404}}, "404"),
    "server_echoes_token": (
        {"fault": {"method": "POST", "path": "/commit/", "status": 500, "echo_auth": True}},
        "answered 500"),
    "repo_changed_meanwhile": ({"seed_repo": True,
                                "fault": {"method": "POST", "path": "/commit/", "status": 412}},
                               "changed on the Hub"),
    "lfs_upload_refused": ({"fault": {"method": "PUT", "path": "/lfs-upload/", "status": 403}},
                           "403"),
    "connection_dropped_at_commit": (
        {"fault": {"method": "POST", "path": "/commit/", "drop": True}}, "network error"),
    "hub_unreachable": ({"endpoint": "closed-port"}, "network error"),
    # Hostile or broken replies: a proxy's HTML page, a body that is not JSON, the wrong shape.
    "proxy_html_error_page": ({"fault": {
        "method": "GET", "path": "/api/models/", "status": 502, "content_type": "text/html",
        "times": hub_client.READ_ATTEMPTS,
        "body": b"<html><body><h1>502 Bad Gateway</h1></body></html>"}}, "answered 502"),
    "reply_not_json": ({"fault": {"method": "GET", "path": "/api/models/", "status": 200,
                                  "content_type": "text/html", "body": b"<html>login</html>"}},
                       "not what the Hub sends"),
    "reply_wrong_shape": ({"fault": {"method": "GET", "path": "/api/models/", "status": 200,
                                     "body": b'{"id": 5, "siblings": 7, "private": "yes"}'}},
                          "not what the Hub sends"),
}


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again when we return


# --- the dataset repository ------------------------------------------------------------------

DATA_REPO = "alice/pg-helper-data"


def _enable_dataset(repo: Path, **changes: Any) -> None:
    dataset = {"enabled": True, "repo_id": DATA_REPO, "private": True, "license": "cc-by-4.0",
               "languages": ["en"], **changes}
    _edit_params(repo, dataset=dataset)
    _commit(repo, "publish the dataset too")


def _front_matter(text: str) -> dict[str, Any]:
    return yaml.safe_load(text.split("---\n")[1])


def test_dataset_goes_to_a_dataset_repo_in_one_commit_and_the_model_card_names_it(
        project: Path, hub: HubStandin) -> None:
    _enable_dataset(project)

    result = _run(hub)

    assert result.status == "published" and result.dataset is not None
    assert result.dataset["status"] == "published"
    stored = hub.repos[key(DATA_REPO, "dataset")]
    assert stored.private and len(stored.commits) == 2  # the Hub's initial commit + ours
    assert DATA_REPO not in hub.repos  # a dataset repo, not a model repo of that name
    data_key = key(DATA_REPO, "dataset")
    assert hub.paths(data_key) == {".gitattributes", "train.jsonl", "valid.jsonl", "test.jsonl",
                                   "README.md", publish.MANIFEST}
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert hub.file_bytes(data_key, name) == (Path("data/dataset") / name).read_bytes()
    card = hub.file_bytes(data_key, "README.md").decode()
    meta = _front_matter(card)
    assert meta["license"] == "cc-by-4.0" and meta["language"] == ["en"]
    assert meta["size_categories"] == ["n<1K"] and meta["task_categories"] == ["text-generation"]
    splits = {f["split"]: f["path"] for f in meta["configs"][0]["data_files"]}
    assert splits == {"train": "train.jsonl", "validation": "valid.jsonl", "test": "test.jsonl"}
    assert "| generated | 2 |" in card and "| expert | 1 |" in card and "| imported | 1 |" in card
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    dataset_md5 = next(o["md5"] for o in lock["stages"]["build"]["outs"]
                       if o["path"] == "data/dataset")
    assert dataset_md5 in card
    assert f"(https://huggingface.co/{REPO})" in card  # links back to the model
    model_meta = _front_matter(hub.file_bytes(REPO, "README.md").decode())
    assert model_meta["datasets"] == [DATA_REPO]
    assert model_meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_meta["base_model_relation"] == "finetune"
    _assert_no_token(card, json.dumps(result.to_json()))

    again = _run(hub)  # same content: neither repository gets a commit
    assert again.status == "unchanged" and again.dataset["status"] == "unchanged"
    assert len(hub.repos[data_key].commits) == 2


def test_dry_run_shows_the_dataset_card_and_the_model_cards_links(project: Path,
                                                                   hub: HubStandin) -> None:
    _enable_dataset(project)
    preview = Path(".tuneline/dataset_card.md")

    result = publish.run(_cfg(), _paths(dataset_card=preview), dry_run=True, env=_env(hub))

    assert result.status == "dry_run" and result.passed and hub.requests == []
    text = publish.render(result)
    assert f"dataset card: {preview}" in text
    assert f"to dataset repo {DATA_REPO} (private)" in text
    assert "license: cc-by-4.0" in preview.read_text()
    model_card = Path("reports/model_card.md").read_text()
    assert f"- {DATA_REPO}" in model_card and "base_model_relation: finetune" in model_card


def test_dataset_without_a_license_blocks_both_uploads(project: Path, hub: HubStandin) -> None:
    _enable_dataset(project, license=None)

    result = _run(hub)

    assert result.status == "blocked" and hub.requests == []
    check = next(c for c in result.checks if c.name == "dataset")
    assert not check.passed and "publish.dataset.license is not set" in check.detail


def test_card_offers_the_lora_gguf_route_and_never_suggests_it_as_the_model() -> None:
    from pipeline.hub import card_text as modelcard_text

    facts = {"repo_id": REPO, "upload": ["gguf", "modelfile", "card"], "private": False,
             "base": {"hf_id": None, "model": "embedded"}, "model_name": "pg-helper",
             "files": [{"path": p, "size": 1} for p in
                       ("adapter-f16.gguf", "base-f16.gguf", "model-f16.gguf")]}
    text = modelcard_text._run_section(facts)
    assert "--hf-file model-f16.gguf" in text
    assert "llama-cli -m base-f16.gguf --lora adapter-f16.gguf" in text
    assert "Modelfile.adapter" in text


def test_base_model_relation_follows_what_is_uploaded() -> None:
    assert modelcard.base_model_relation(["adapter", "card"]) == "adapter"
    assert modelcard.base_model_relation(["adapter", "fused", "gguf", "card"]) == "finetune"
    # GGUF files of a fine-tune are not the base model quantized: the Hub must not infer that.
    assert modelcard.base_model_relation(["gguf", "modelfile", "card"]) == "finetune"


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_hub_errors_are_clear_token_free_and_publish_nothing(
        project: Path, hub: HubStandin, case: str, caplog: pytest.LogCaptureFixture) -> None:
    setup, expected = ERRORS[case]
    if setup.get("repo_id"):
        _edit_params(project, repo_id=setup["repo_id"])
        _commit(project)
    if setup.get("seed_repo"):
        hub.create_repo(REPO, private=True)
    if setup.get("fault"):
        hub.fail(**setup["fault"])
    endpoint = _closed_port_url() if setup.get("endpoint") == "closed-port" else hub.url
    env = {"HF_TOKEN": setup.get("token", TOKEN), "HF_ENDPOINT": endpoint}
    caplog.set_level("INFO")

    with pytest.raises(publish.PublishError) as info:
        publish.run(_cfg(), _paths(), dry_run=False, env=env)

    message = str(info.value)
    assert expected in message and hub_client.NOTHING_PUBLISHED in message
    assert "\n" not in message and (endpoint in message or "HF_TOKEN" in message)
    assert info.value.__cause__ is None  # no chained client exception carrying headers
    report = _report()
    assert report["status"] == "failed" and report["error"] == message
    secret = env["HF_TOKEN"]
    for text in (message, json.dumps(report), Path("reports/model_card.md").read_text(),
                 "".join(traceback.format_exception(info.value)), caplog.text):
        _assert_no_token(text)
        assert secret not in text
    # Nothing a user could mistake for a release: no commit beyond the Hub's own first one,
    # and no empty repository this run created.
    for repo in hub.repos.values():
        assert [c.title for c in repo.commits] == ["initial commit"]
    assert list(hub.repos) == ([REPO] if setup.get("seed_repo") else [])


def test_a_passing_server_error_on_a_read_is_retried(project: Path, hub: HubStandin) -> None:
    hub.fail("GET", "/api/whoami-v2", status=503)
    hub.fail("GET", "/api/models/", status=502, body=b"<html>Bad Gateway</html>",
             content_type="text/html")
    result = _run(hub)
    assert result.status == "published"
    assert hub.calls("GET", "/api/whoami-v2") == 2 and hub.calls("POST", "/commit/") == 1


def test_a_repo_that_cannot_be_cleaned_up_is_named(project: Path, hub: HubStandin) -> None:
    hub.fail("POST", "/commit/", status=500)
    hub.fail("DELETE", "/api/repos/delete", status=500, times=hub_client.READ_ATTEMPTS)
    with pytest.raises(publish.PublishError, match="could not be deleted") as info:
        _run(hub)
    assert f"{hub.url}/{REPO}/settings" in str(info.value)
    assert [c.title for c in hub.repos[REPO].commits] == ["initial commit"]


# --- the window between the gate and the upload -------------------------------------------

SWAPPED = b"GGUF" + bytes(len(Q8) - 4)  # what a swap puts there: same name, size and mtime


def _swap_q8(repo: Path) -> None:
    """Overwrite the checked Q8 GGUF in place with other bytes, keeping its size and mtime."""
    path = repo / "models/gguf/model-q8_0.gguf"
    before = path.stat()
    path.write_bytes(SWAPPED)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_a_file_swapped_after_the_gate_never_reaches_the_hub(project: Path,
                                                             hub: HubStandin) -> None:
    hub.on("GET", r"^/api/whoami-v2$", lambda: _swap_q8(project))  # after the gate, pre-upload

    result = _run(hub)

    assert result.status == "published", result.error
    assert (project / "models/gguf/model-q8_0.gguf").read_bytes() == SWAPPED  # it did happen
    uploaded = hub.file_bytes(REPO, "model-q8_0.gguf")
    assert uploaded == Q8  # the bytes the gate matched to the export report
    manifest = json.loads(hub.file_bytes(REPO, publish.MANIFEST))
    assert manifest["files"]["model-q8_0.gguf"]["sha256"] == _sha(uploaded)
    assert {f["path"]: f["sha256"] for f in _report()["files"] if "sha256" in f}[
        "model-q8_0.gguf"] == _sha(uploaded)
    assert not list((project / ".tuneline").glob("publish-snapshot-*"))  # no copies left


def test_a_file_swapped_just_after_the_gate_stops_the_upload(
        project: Path, hub: HubStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    real = publish.gate

    def gate_then_swap(*args: Any, **kwargs: Any) -> Any:  # every check passed on the old bytes
        checks = real(*args, **kwargs)
        _swap_q8(project)
        return checks

    monkeypatch.setattr(publish, "gate", gate_then_swap)
    with pytest.raises(publish.PublishError, match="changed after the gate checked it") as info:
        _run(hub)
    assert "models/gguf/model-q8_0.gguf" in str(info.value)
    assert hub_client.NOTHING_PUBLISHED in str(info.value)
    assert hub.repos == {} and hub.calls("POST", "/commit/") == 0
    assert _report()["status"] == "failed"
    assert not list((project / ".tuneline").glob("publish-snapshot-*"))


def test_ctrl_c_during_a_first_commit_leaves_no_empty_repository(project: Path,
                                                                 hub: HubStandin) -> None:
    import signal
    import time

    def interrupt() -> None:  # Ctrl+C while the commit is in flight; answer only after cleanup
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 20
        while REPO in hub.repos and time.monotonic() < deadline:
            time.sleep(0.05)

    hub.on("POST", r"/commit/", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(hub)
    assert hub.calls("POST", "/api/repos/create") == 1
    assert hub.calls("DELETE", "/api/repos/delete") == 1 and hub.repos == {}


def test_a_forged_report_that_neither_git_nor_dvc_tracks_cannot_vouch(project: Path,
                                                                      hub: HubStandin) -> None:
    _break_improvement(project)  # the real evaluation does not beat the base by enough
    _commit(project)
    forged = _eval()
    forged["tuned"]["test_loss"] = 0.01
    _write(project / ".tuneline/eval.json", forged)  # ignored by git, unknown to DVC

    for stage in (False, True):
        result = publish.run(_cfg(), _paths(eval=Path(".tuneline/eval.json")), dry_run=stage,
                             stage=stage, env=_env(hub))
        failed = {c.name: c.detail for c in result.checks if not c.passed and not c.pending}
        assert list(failed) == ["tracked"], failed  # the forged loss itself "improves"
        assert "--eval .tuneline/eval.json" in failed["tracked"]
        assert "neither a DVC output in dvc.lock nor committed to git" in failed["tracked"]
    assert hub.requests == [] and hub.repos == {}
    # The same numbers, committed, are on record and may vouch (git_clean then compares them).
    _write(project / "reports/eval.json", forged)
    _commit(project)
    assert publish.run(_cfg(), _paths(), dry_run=True, env={}).passed


# --- the CLI and the pipeline wiring -------------------------------------------------------


def test_stage_command_records_a_failed_gate_but_exits_zero(project: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    _break_validation(project)
    _commit(project)
    runner = CliRunner()
    stage = runner.invoke(app, ["publish", "--stage", "--report", "reports/publish.json"],
                          env={"HF_TOKEN": TOKEN})
    assert stage.exit_code == 0, stage.output
    assert "FAIL validation" in stage.output and "stage verdict: gate failed" in stage.output
    strict = runner.invoke(app, ["publish", "--dry-run"], env={"HF_TOKEN": TOKEN})
    assert strict.exit_code == 1 and "would not upload" in strict.output
    _assert_no_token(stage.output, strict.output, Path("reports/publish.json").read_text())


@pytest.mark.slow
def test_cli_publishes_and_never_prints_the_token(project: Path, hub: HubStandin) -> None:
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(project.parent / "hf-home"),
           "HF_DEBUG": "0"}
    cmd = [sys.executable, "-m", "pipeline", "publish"]
    published = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert published.returncode == 0, published.stderr
    assert "published 10 files" in published.stdout
    assert hub.repos[REPO].head.oid in published.stdout
    card = Path(".tuneline/model_card.md").read_bytes()  # the preview is what was uploaded
    assert card == hub.file_bytes(REPO, "README.md")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert "already published" in again.stdout
    hub.fail("GET", "/api/models/", status=500, echo_auth=True, times=hub_client.READ_ATTEMPTS)
    failing = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert failing.returncode == 1 and "error:" in failing.stderr
    assert "Traceback" not in failing.stderr
    for proc in (published, again, failing):
        _assert_no_token(proc.stdout, proc.stderr)
    records = sorted(Path("reports/releases").glob("*.json"))
    assert [json.loads(r.read_text())["status"] for r in records] == [
        "published", "unchanged", "failed"]  # one record per attempt, in time order
    _assert_no_token(Path(".tuneline/publish.json").read_text(), *(r.read_text() for r in records))


@pytest.mark.slow
def test_publish_stage_runs_inside_dvc_repro_and_leaves_the_tree_clean(project: Path) -> None:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())
    stages["stages"]["publish"] = {
        "cmd": f"{sys.executable} -m pipeline publish --stage --report reports/publish.json",
        "deps": ["models/gguf", "reports/eval.json"], "params": ["publish"],
        "always_changed": True, "metrics": [{"reports/publish.json": {"cache": False}}]}
    _write(project / "dvc.yaml", stages)
    _commit(project, "add publish stage")

    _dvc(project, "repro", "-q", "publish")
    first = _report()
    _commit(project, "record the verdict")
    _dvc(project, "repro", "-q", "publish")  # DVC deletes the old report before running

    assert first["passed"], first["checks"]
    second = _report()
    assert second == first, [c for c in second["checks"] if not c["passed"]]  # deterministic
    assert _sh(project, "git", "status", "--porcelain") == ""


@pytest.mark.slow
def test_stage_verdict_inside_dvc_repro_and_records_of_real_publishes_survive(
        project: Path, hub: HubStandin) -> None:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())
    stages["stages"]["publish"] = {
        "cmd": f"{sys.executable} -m pipeline publish --stage --report reports/publish.json",
        "deps": ["models/gguf", "reports/eval.json"], "params": ["publish"],
        "metrics": [{"reports/publish.json": {"cache": False}}]}
    _write(project / "dvc.yaml", stages)
    _write(project / "src/gguf/Modelfile", "FROM ./model-f16.gguf\n")  # new, unpushed outputs
    _dvc(project, "repro", "-q")  # as a first repro: dvc.lock rewritten, nothing pushed

    verdict = _report()
    assert verdict["passed"] is True and verdict["status"] == "stage", verdict["checks"]
    assert verdict["pending"] == ["git_clean", "dvc_pushed"]

    _commit(project, "repro")
    _dvc(project, "push", "-q")
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(project.parent / "hf-home")}
    real = subprocess.run([sys.executable, "-m", "pipeline", "publish"], capture_output=True,
                          text=True, env=env, check=False)
    assert real.returncode == 0, real.stdout + real.stderr
    [record] = Path("reports/releases").glob("*.json")
    kept = record.read_bytes()
    assert json.loads(kept)["status"] == "published"
    assert json.loads(kept)["revision"] == hub.repos[REPO].head.oid
    _commit(project, "record the release")

    _dvc(project, "repro", "-q", "-f", "publish")  # DVC deletes and rewrites the stage's report
    assert _report()["status"] == "stage"
    assert record.read_bytes() == kept and list(Path("reports/releases").iterdir()) == [record]


def test_dvc_yaml_publish_stage_matches_the_code() -> None:
    root = Path(__file__).resolve().parents[1]
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["publish"]
    assert list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])[-1] == "publish"
    assert {"pipeline/publish.py", "pipeline/hub/modelcard.py", "reports/eval.json",
            "reports/validation.json", "reports/gguf.json", "models/gguf"} <= set(stage["deps"])
    assert "publish" in stage["params"]
    # Not always_changed: a second `dvc repro` must do nothing (tests/test_e2e.py);
    # `tuneline publish` re-checks git and remote state itself when it really uploads.
    assert not stage.get("always_changed", False)
    assert stage["metrics"] == [{"reports/publish.json": {"cache": False}}]
    assert "--stage --report reports/publish.json" in stage["cmd"]
    # The user's values (enabled, repo_id, ...) are theirs to set: only the keys must load.
    config.load(publish.PublishConfig, "publish", root / "params.yaml")


def test_remote_credentials_never_reach_the_card() -> None:
    assert clean_remote("https://bob:ghp_x@github.com/a/b.git") == "https://github.com/a/b.git"
    # git takes a password with "/" unencoded; the first "/" does not end the credentials.
    assert clean_remote("https://bob:pa/ss@git.example.com/a.git") == "https://git.example.com/a.git"
    assert clean_remote("https://x-token:a/b/c@h.example/r") == "https://h.example/r"
    assert clean_remote("git@github.com:a/b.git") == "git@github.com:a/b.git"
