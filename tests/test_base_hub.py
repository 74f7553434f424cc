"""base.model as a Hub id, against tests/hub_standin.py serving a tiny model built in code:
download, revision pinned to a commit sha, gated (401/403), unknown id (404), an interrupted
download that resumes, and the offline rule for local sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandin
from tiny import base_source, make_tiny_llama

from pipeline import base_model
from pipeline.base_model import ModelError
from pipeline.core import model_source

REPO = "tiny-org/tiny-llama"
TOKEN = "hf_reader_token_123"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path):
    """The stand-in as huggingface_hub's endpoint (its constants are read at import: patched),
    an empty Hugging Face cache, and REPO holding the tiny model."""
    from huggingface_hub import constants

    with HubStandin() as standin:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            standin.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        standin.add_account(TOKEN, "bob", role="read")
        standin.add_model_dir(REPO, tiny_model_dir)
        yield standin


def fetch(model: str, out: Path, revision: str | None = None) -> dict:
    base_model.run(base_source(model, revision), base_model.BasePaths(out))
    return json.loads((out / "tuneline.json").read_text())


def test_hub_id_downloads_a_loadable_model_and_records_the_commit(hub, tmp_path):
    provenance = fetch(REPO, tmp_path / "base")
    assert provenance["kind"] == "hub" and provenance["revision"] is None
    assert provenance["commit"] == hub.repos[REPO].head.oid
    assert (tmp_path / "base/model.safetensors").read_bytes() == hub.file_bytes(
        REPO, "model.safetensors")
    from mlx_lm import load

    model, _ = load(str(tmp_path / "base"))
    assert len(model.layers) == 2


def test_pinned_revision_keeps_the_old_weights_after_a_new_commit(hub, tmp_path):
    first = hub.repos[REPO].head.oid
    newer = make_tiny_llama(tmp_path / "newer", seed=7)
    hub.push(REPO, {"model.safetensors": (newer / "model.safetensors").read_bytes()})
    provenance = fetch(REPO, tmp_path / "base", revision=first)
    assert provenance == {**provenance, "revision": first, "commit": first}
    assert (tmp_path / "base/model.safetensors").read_bytes() == hub.file_bytes(
        REPO, "model.safetensors", first)
    assert hub.file_bytes(REPO, "model.safetensors") != hub.file_bytes(
        REPO, "model.safetensors", first)


def test_a_tag_is_resolved_to_its_commit_sha(hub, tmp_path):
    sha = hub.push(REPO, {"README.md": b"v1"}, tag="v1.0")
    hub.push(REPO, {"README.md": b"v2"})
    assert fetch(REPO, tmp_path / "base", revision="v1.0")["commit"] == sha


def test_unpinned_hub_id_says_which_commit_to_pin(hub, tmp_path, capsys):
    fetch(REPO, tmp_path / "base")
    assert f"base.revision: {hub.repos[REPO].head.oid}" in capsys.readouterr().out


def test_gated_model_without_token_names_hf_token_and_the_license_page(hub, tmp_path):
    hub.add_model_dir("meta-like/gated", _model_dir(tmp_path), gated=("alice",))
    with pytest.raises(ModelError) as err:
        fetch("meta-like/gated", tmp_path / "base")
    line = str(err.value)
    assert "\n" not in line and "HF_TOKEN" in line and "accept its license" in line
    assert f"{hub.url}/meta-like/gated" in line
    assert not (tmp_path / "base").exists()


def test_gated_model_with_a_token_lacking_access_gets_the_same_advice(hub, tmp_path,
                                                                     monkeypatch):
    hub.add_model_dir("meta-like/gated", _model_dir(tmp_path), gated=("alice",))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ModelError, match="accept its license.*HF_TOKEN") as err:
        fetch("meta-like/gated", tmp_path / "base")
    assert TOKEN not in str(err.value)
    assert any(r for r in hub.requests if "gated/resolve" in r[1])  # it got to the files: 403


def test_unknown_id_says_no_such_model(hub, tmp_path):
    with pytest.raises(ModelError, match="no such model on .*check the id's spelling"):
        fetch("tiny-org/does-not-exist", tmp_path / "base")


def test_unknown_revision_names_the_key(hub, tmp_path):
    with pytest.raises(ModelError, match=r"base\.revision 'nope' does not exist"):
        fetch(REPO, tmp_path / "base", revision="nope")


def test_download_cut_mid_file_resumes_where_it_stopped(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub keeps what arrived in whole chunks (10 MB); the tiny file is 0.4 MB
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 500)
    hub.fail("GET", r"/resolve/.*/model\.safetensors$", cut=1000)
    fetch(REPO, tmp_path / "base")
    assert hub.ranges(r"model\.safetensors$") == ["", "bytes=1000-"]
    assert (tmp_path / "base/model.safetensors").read_bytes() == hub.file_bytes(
        REPO, "model.safetensors")


def test_rerun_after_a_failed_download_fetches_only_the_missing_files(hub, tmp_path):
    hub.fail("GET", r"/resolve/.*/tokenizer\.json$", status=500)
    with pytest.raises(ModelError, match="answered 500.*finished files are kept"):
        fetch(REPO, tmp_path / "base")
    fetch(REPO, tmp_path / "base")
    assert hub.calls("GET", r"/resolve/.*/model\.safetensors$") == 1
    assert hub.calls("GET", r"/resolve/.*/tokenizer\.json$") == 2


def test_revision_on_a_local_model_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="base.revision 'abc' pins a Hub id"):
        fetch(str(tiny_model_dir), tmp_path / "base", revision="abc")


def test_local_sources_run_offline_and_hub_ids_do_not():
    code = ("import os, sys; from pipeline.core import model_source as m; "
            "m.offline_unless_hub(sys.argv[1]); print(os.environ.get('HF_HUB_OFFLINE'))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    said = {model: subprocess.run([sys.executable, "-c", code, model], env=env, cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.strip()
            for model in ("embedded", "models/x.gguf", str(ROOT), REPO)}
    assert said == {"embedded": "1", "models/x.gguf": "1", str(ROOT): "1", REPO: "None"}
    assert model_source.is_hub_id(REPO) and not model_source.is_hub_id("embedded")


def _model_dir(tmp_path: Path) -> Path:
    return make_tiny_llama(tmp_path / "gated-src", seed=3)


def test_plan_reads_only_config_json_of_a_hub_id_before_any_download(hub, tmp_path,
                                                                      monkeypatch):
    import yaml

    from pipeline.commands import plan

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"]["model"] = REPO
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)  # no models/base here
    result = plan.run(tmp_path / "params.yaml", None, 64.0, "gpu")
    assert result.where == f"{REPO} on the Hub (config.json)" and result.shape.layers == 2
    assert result.fits
    downloads = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert downloads and all(p.endswith("/config.json") for p in downloads)
