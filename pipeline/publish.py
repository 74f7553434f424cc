"""Publish: `tuneline publish [--dry-run]`; the `publish` stage of dvc.yaml runs `--stage`.

1. The gate (pipeline/hub/gate.py): every check from the `publish:` section of params.yaml,
   reported one by one; any failed check blocks publishing (non-zero exit).
2. The release: the files chosen in `publish.upload`, a model card (pipeline/hub/modelcard.py) and a
   manifest (`tuneline-publish.json`) naming every file tuneline put in the repo with its sha256.
3. The upload (pipeline/hub/client.py), only when `publish.enabled`, `publish.repo_id` and an `HF_TOKEN`
   in the environment are all present and --dry-run is not given: one commit with the whole
   release, or nothing. If the Hub already holds this content, no commit is made.
4. With `publish.dataset.enabled`, the curated dataset goes first to its own Hub dataset
   repository (pipeline/hub/dataset_card.py: the split files, a dataset card, a manifest; one commit,
   same gate), and the model card's `datasets:` metadata names it.

Inside `dvc repro` (`--stage`) nothing is uploaded and the verdict in reports/publish.json judges
what can be judged there: the reports, the license, the artifacts and whether the outputs match
dvc.lock. `git_clean` and `dvc_pushed` are listed as pending: dvc.lock is being rewritten and
nothing is pushed yet at that moment; `tuneline publish` judges them after commit and push.

A real publish (an upload attempt) keeps its own record in `--releases` (reports/releases/, one
file per attempt, for git): a DVC output would be replaced by the next `dvc repro`.

Every input path must lie inside the repository: the git-clean and `dvc status` checks vouch
only for files there. The token is read from the environment and never reaches logs, reports,
exceptions or the card.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.hub import client as hub
from pipeline.hub import dataset_card, modelcard, repo_facts
from pipeline.hub import gate as publish_gate
from pipeline.hub.client import ReleaseFile
from pipeline.hub.dataset_card import DatasetConfig
from pipeline.hub.gate import Check
from pipeline.rows.jsonl import write_json, write_text

UploadItem = Literal["adapter", "fused", "gguf", "modelfile", "card"]
MANIFEST = "tuneline-publish.json"
CARD = "README.md"
ADAPTER_DIR = "adapter"
CHECKPOINT_RE = re.compile(r"^\d{7}_adapters\.safetensors$")  # mlx-lm resumable checkpoints
# A dpo/orpo run's SFT-only adapter (train.py): evaluate's yardstick, not the model released.
SFT_BASELINE = "sft"
OUTPUTS = ("report", "card", "releases", "dataset_card")  # written by publish; every other path is an input


class PublishError(UserError):
    """Publishing failed or cannot start; the message says why and what to do (never the token)."""


@dataclass(frozen=True)
class PublishConfig:
    enabled: bool  # upload at all (else every run is a dry run)
    repo_id: str | None  # namespace/name on the Hub
    private: bool  # create the repo private; refuse to upload into a public one
    upload: tuple[UploadItem, ...]  # what goes into the repo
    license: str  # license of the published model; "auto" = the base model's
    allowed_licenses: tuple[str, ...]  # base model licenses that allow publishing a fine-tune
    tags: tuple[str, ...]  # extra tags on the card
    min_improvement: float  # base test_loss - tuned test_loss must be at least this
    require_judge_win_rate: float | None  # null = no judge needed
    min_preference_accuracy: float | None  # held-out pairs; null = not required
    require_pushed: bool  # outputs are in the default DVC remote
    require_clean_git: bool  # no uncommitted changes, so the card's commit reproduces the model
    card_samples: int  # evaluation samples shown in the card
    dataset: DatasetConfig  # the curated dataset as a Hub dataset repository (opt-in)


@dataclass(frozen=True)
class PublishPaths:
    params: Path
    validation: Path
    eval: Path
    gguf_report: Path
    train_report: Path
    dataset: Path
    dvc_lock: Path
    base: Path
    adapters: Path
    fused: Path
    gguf: Path
    report: Path  # this run's verdict
    card: Path | None  # also write the card here (a preview); None = don't
    releases: Path | None = None  # folder keeping one record per upload attempt; None = don't
    dataset_card: Path | None = None  # also write the dataset card here (a preview)


@dataclass(frozen=True)
class Release:
    files: tuple[ReleaseFile, ...]
    content_id: str  # sha256 over the artifacts and the card facts (not the git commit)
    card: str
    git: repo_facts.GitFacts
    dataset: DatasetRelease | None = None  # publish.dataset.enabled


@dataclass(frozen=True)
class DatasetRelease:
    repo_id: str | None
    files: tuple[ReleaseFile, ...]
    content_id: str
    card: str


@dataclass
class PublishResult:
    status: Literal["stage", "dry_run", "blocked", "published", "unchanged", "failed"]
    dry_run: bool
    dry_run_reasons: list[str]
    checks: list[Check]
    repo_id: str | None
    private: bool
    content_id: str
    files: list[dict[str, Any]]
    commit_url: str | None = None
    revision: str | None = None
    error: str | None = None
    card_path: str | None = None
    record_path: str | None = None
    dataset: dict[str, Any] | None = None  # the dataset repository: repo_id, files, status, url

    @property
    def passed(self) -> bool:
        """Every check that could be judged passed (pending ones are listed, not counted)."""
        return all(check.passed for check in self.checks if not check.pending)

    @property
    def pending(self) -> list[str]:
        return [check.name for check in self.checks if check.pending]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(passed=self.passed, pending=self.pending)
        data["total_bytes"] = sum(f["size"] for f in self.files)
        return data


def run(cfg: PublishConfig, paths: PublishPaths, *, dry_run: bool, stage: bool = False,
        env: Mapping[str, str] = os.environ) -> PublishResult:
    """Check the gate, build the release, upload it unless this is a dry run or the stage."""
    validate_config(cfg)
    check_inside_repository(paths)
    token = env.get("HF_TOKEN") or None
    reasons = dry_run_reasons(cfg, dry_run or stage, token)
    release = build_release(cfg, paths)  # hashes every file once: the gate judges these hashes
    checks = gate(cfg, paths, stage=stage, hashes={f.source: f.sha256 for f in release.files
                                                   if f.source is not None})
    if paths.card is not None:
        write_text(paths.card, release.card)
    if paths.dataset_card is not None and release.dataset is not None:
        write_text(paths.dataset_card, release.dataset.card)
    result = PublishResult(
        status="stage" if stage else "dry_run" if reasons else "blocked", dry_run=bool(reasons),
        dry_run_reasons=["inside dvc repro (--stage)"] if stage else reasons, checks=checks,
        repo_id=cfg.repo_id, private=cfg.private, content_id=release.content_id,
        files=[_file_entry(f) for f in release.files],
        card_path=str(paths.card) if paths.card is not None else None,
        dataset=_dataset_entry(cfg, release.dataset, paths),
    )
    if reasons or not result.passed:
        write_json(paths.report, result.to_json())
        return result
    endpoint = (env.get("HF_ENDPOINT") or hub.DEFAULT_ENDPOINT).rstrip("/")
    scratch = (repo_facts.toplevel() or Path.cwd()) / ".tuneline"  # ignored by git and DVC
    try:
        # Upload private copies, hashed as they are made: what goes out is what was checked.
        with hub.snapshot(release.files, scratch) as files, hub.snapshot(
                release.dataset.files if release.dataset else (), scratch) as data_files:
            if release.dataset is not None and result.dataset is not None:
                # First: the model card links to it; a model without its data is the worse half.
                status, url, _ = hub.push(_dataset_upload(cfg, release, data_files), token,
                                          endpoint)
                result.dataset.update(status=status, commit_url=url)
            result.status, result.commit_url, result.revision = hub.push(
                _upload(cfg, release, files), token, endpoint)
    except hub.HubError as exc:
        result.status, result.error = "failed", hub.redact(str(exc), token)
        _record(paths, result)
        raise PublishError(result.error) from None
    _record(paths, result)
    return result


def _record(paths: PublishPaths, result: PublishResult) -> None:
    """The verdict, and for an upload attempt its own file under `releases` (kept in git)."""
    if paths.releases is not None:
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        record = paths.releases / f"{stamp}-{result.status}.json"  # sorts in time order
        result.record_path = str(record)
        write_json(record, {**result.to_json(), "git_commit": repo_facts.commit()})
    write_json(paths.report, result.to_json())


def _upload(cfg: PublishConfig, release: Release, files: list[ReleaseFile]) -> hub.Upload:
    return hub.Upload(
        repo_id=str(cfg.repo_id), private=cfg.private, files=files, manifest=MANIFEST,
        content_id=release.content_id,
        title=f"tuneline publish {(release.git.commit or 'uncommitted')[:12]}",
        description=f"content {release.content_id}\ngit commit {release.git.commit}")


def _dataset_upload(cfg: PublishConfig, release: Release,
                    files: list[ReleaseFile]) -> hub.Upload:
    data = release.dataset
    assert data is not None
    return hub.Upload(
        repo_id=str(data.repo_id), private=cfg.dataset.private, files=files,
        manifest=MANIFEST, content_id=data.content_id, repo_type="dataset",
        title=f"tuneline dataset {(release.git.commit or 'uncommitted')[:12]}",
        description=f"content {data.content_id}\ngit commit {release.git.commit}")


def _dataset_entry(cfg: PublishConfig, data: DatasetRelease | None,
                   paths: PublishPaths) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"repo_id": data.repo_id, "private": cfg.dataset.private,
            "content_id": data.content_id, "files": [_file_entry(f) for f in data.files],
            "card_path": str(paths.dataset_card) if paths.dataset_card is not None else None,
            "status": None, "commit_url": None}


def _file_entry(f: ReleaseFile) -> dict[str, Any]:
    # The card and manifest name the git commit: their hashes would change the report (and
    # dvc.lock) after every commit, so the report keeps them out.
    if f.source is None:
        return {"path": f.path, "size": f.size, "generated": True}
    return {"path": f.path, "size": f.size, "sha256": f.sha256}


def validate_config(cfg: PublishConfig) -> None:
    where = "params.yaml:publish"
    if not cfg.upload:
        raise PublishError(f"{where}.upload is empty; list some of adapter, fused, gguf, "
                           "modelfile, card")
    if "modelfile" in cfg.upload and "gguf" not in cfg.upload:
        raise PublishError(f"{where}.upload has modelfile without gguf: the Modelfile's FROM "
                           "names the GGUF files; add gguf or drop modelfile")
    if cfg.repo_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.repo_id):
        raise PublishError(f"{where}.repo_id {cfg.repo_id!r} must look like 'namespace/name' "
                           "(your user or organization, a slash, the model name)")
    data = cfg.dataset
    if data.repo_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", data.repo_id):
        raise PublishError(f"{where}.dataset.repo_id {data.repo_id!r} must look like "
                           "'namespace/name' (your user or organization, a slash, a name)")
    if cfg.card_samples < 0:
        raise PublishError(f"{where}.card_samples is {cfg.card_samples}; use 0 or more")


def check_inside_repository(paths: PublishPaths) -> None:
    """Inputs outside the repository escape the git and DVC checks: refuse them up front."""
    top = repo_facts.toplevel() or Path.cwd()
    for item in fields(paths):
        path = getattr(paths, item.name)
        if item.name in OUTPUTS or path is None or repo_facts.relative(path, top) is not None:
            continue
        raise PublishError(
            f"{_option(item.name)} {path} is outside the repository {top}: the git-clean and dvc status "
            "checks cannot vouch for it; use the file inside the repository (as dvc.yaml does)")


def _option(name: str) -> str:
    return "--eval" if name == "eval" else f"--{name.replace('_', '-')}"


def dry_run_reasons(cfg: PublishConfig, dry_run: bool, token: str | None) -> list[str]:
    """Why this run will not upload; empty when it will (if the gate passes)."""
    reasons = ["--dry-run given"] if dry_run else []
    reasons += [] if cfg.enabled else ["publish.enabled is false"]
    reasons += [] if cfg.repo_id else ["publish.repo_id is not set"]
    reasons += [] if token else ["HF_TOKEN is not set"]
    if cfg.dataset.enabled and not cfg.dataset.repo_id:
        reasons.append("publish.dataset.enabled but publish.dataset.repo_id is not set")
    return reasons


def gate(cfg: PublishConfig, paths: PublishPaths, *, stage: bool = False,
         hashes: Mapping[Path, str] | None = None) -> list[Check]:
    """`hashes`: sha256 of the files the release holds (the same ones its manifest records)."""
    evaluation = publish_gate.read_report(paths.eval)
    license, source = _base_license(cfg, paths)
    own = [paths.report, paths.card, paths.releases]
    inputs = {_option(f.name): getattr(paths, f.name) for f in fields(paths)
              if f.name not in OUTPUTS and getattr(paths, f.name) is not None}
    checks = [
        publish_gate.check_tracked(inputs, stage=stage),
        publish_gate.check_validation(paths.validation),
        publish_gate.check_improvement(paths.eval, evaluation, cfg.min_improvement),
        publish_gate.check_gguf(paths.gguf_report, paths.gguf, needed="gguf" in cfg.upload,
                                hashes=hashes),
        publish_gate.check_judge(paths.eval, evaluation, cfg.require_judge_win_rate),
        publish_gate.check_preference(paths.eval, evaluation, cfg.min_preference_accuracy),
        publish_gate.check_license(license, source, cfg.allowed_licenses),
        publish_gate.check_artifacts(cfg.upload, paths.adapters, paths.fused, paths.gguf),
        publish_gate.check_git_clean(cfg.require_clean_git and not stage, ignore=own),
        *publish_gate.check_dvc(cfg.require_pushed and not stage),
        *([publish_gate.check_dataset(cfg.dataset, paths.dataset)] if cfg.dataset.enabled
          else []),
    ]
    if stage:
        later = "judged by `tuneline publish` after `git commit` and `dvc push`"
        waiting = {"git_clean": cfg.require_clean_git, "dvc_pushed": cfg.require_pushed}
        checks = [Check(c.name, False, f"pending: {later}", pending=True)
                  if waiting.get(c.name) else c for c in checks]
    return checks


def _base_license(cfg: PublishConfig, paths: PublishPaths) -> tuple[str | None, str]:
    model = config.load(config.BaseConfig, "base", paths.params).model
    found, where = modelcard.base_license(model, paths.base)
    if found or cfg.license == "auto":
        return found, where
    return cfg.license.lower(), "publish.license"


# --- the release -----------------------------------------------------------------------------


def build_release(cfg: PublishConfig, paths: PublishPaths) -> Release:
    artifacts = _artifact_files(cfg, paths)
    license = cfg.license if cfg.license != "auto" else _base_license(cfg, paths)[0]
    inputs = modelcard.CardInputs(paths.params, paths.dataset, paths.dvc_lock,
                                  paths.train_report, paths.eval, paths.base)
    facts = modelcard.collect_facts(
        inputs, repo_id=cfg.repo_id, private=cfg.private, license=license, tags=cfg.tags,
        upload=cfg.upload, files=[(f.path, f.size) for f in artifacts], samples=cfg.card_samples)
    facts["datasets"] = [cfg.dataset.repo_id] if cfg.dataset.enabled and cfg.dataset.repo_id \
        else []
    content_id = hashlib.sha256(json.dumps(
        {"files": {f.path: f.sha256 for f in artifacts}, "facts": facts},
        sort_keys=True).encode()).hexdigest()
    git = repo_facts.GitFacts(repo_facts.commit(), repo_facts.remote_url())
    card = modelcard.render(facts, git)
    dataset = build_dataset_release(cfg, paths, git) if cfg.dataset.enabled else None
    files = list(artifacts)
    if "card" in cfg.upload:
        files.append(ReleaseFile.generated(CARD, card.encode("utf-8"), volatile=True))
    manifest = {
        "tool": "tuneline", "content_id": content_id, "git_commit": git.commit,
        "files": {f.path: {"sha256": f.sha256, "size": f.size} for f in files},
    }
    files.append(ReleaseFile.generated(
        MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        volatile=True))
    return Release(tuple(files), content_id, card, git, dataset)


def build_dataset_release(cfg: PublishConfig, paths: PublishPaths,
                          git: repo_facts.GitFacts) -> DatasetRelease:
    """Split files, the dataset card and a manifest, for the dataset repository."""
    files = dataset_card.release_files(paths.dataset)
    inputs = dataset_card.DatasetInputs(paths.params, paths.dataset, paths.dvc_lock,
                                        paths.validation)
    facts = dataset_card.collect_facts(inputs, cfg.dataset, model_repo=cfg.repo_id,
                                       files=[(f.path, f.size) for f in files])
    content_id = dataset_card.content_id(files, facts)
    card = dataset_card.render(facts, git)
    files.append(ReleaseFile.generated(CARD, card.encode("utf-8"), volatile=True))
    manifest = {"tool": "tuneline", "content_id": content_id, "git_commit": git.commit,
                "files": {f.path: {"sha256": f.sha256, "size": f.size} for f in files}}
    files.append(ReleaseFile.generated(
        MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        volatile=True))
    return DatasetRelease(cfg.dataset.repo_id, tuple(files), content_id, card)


def _artifact_files(cfg: PublishConfig, paths: PublishPaths) -> list[ReleaseFile]:
    chosen: dict[str, Path] = {}
    for item in cfg.upload:
        for repo_path, local in _item_files(item, paths):
            if repo_path in chosen or repo_path in (CARD, MANIFEST):
                raise PublishError(f"two files would be uploaded as {repo_path!r} ({local} and "
                                   f"{chosen.get(repo_path, 'a generated file')}); rename one")
            chosen[repo_path] = local
    return [ReleaseFile.local(repo_path, local) for repo_path, local in sorted(chosen.items())]


def _item_files(item: str, paths: PublishPaths) -> list[tuple[str, Path]]:
    """Where each local file goes in the repo: fused at the root (so `--model repo` works),
    the adapter under adapter/, GGUF files and the Modelfile at the root (Ollama's hf.co/ and
    llama.cpp's --hf-file find them there, and the Modelfile's FROM ./x.gguf resolves)."""
    if item == "fused":
        return [(p.relative_to(paths.fused).as_posix(), p) for p in _tree(paths.fused)]
    if item == "adapter":
        return [(f"{ADAPTER_DIR}/{p.relative_to(paths.adapters).as_posix()}", p)
                for p in _tree(paths.adapters) if not CHECKPOINT_RE.match(p.name)
                and p.relative_to(paths.adapters).parts[0] != SFT_BASELINE]
    if item == "gguf":
        return [(p.name, p) for p in sorted(paths.gguf.glob("*.gguf"))]
    if item == "modelfile":  # Modelfile.adapter: the LoRA route (export's adapter GGUF)
        return [(name, paths.gguf / name) for name in ("Modelfile", "Modelfile.adapter")
                if (paths.gguf / name).is_file()]
    return []


def _tree(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in
                                             p.relative_to(folder).parts))


def render(result: PublishResult) -> str:
    """What the CLI prints: one line per check, then what happened."""
    lines = [f"{'wait' if c.pending else 'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}"
             for c in result.checks]
    lines += [f"model card: {result.card_path}"] if result.card_path else []
    data = result.dataset
    if data is not None:
        size = sum(f["size"] for f in data["files"]) / 1e6
        where = data["repo_id"] or "<publish.dataset.repo_id>"
        lines += [f"dataset card: {data['card_path']}"] if data["card_path"] else []
        lines.append(f"dataset: {len(data['files'])} files ({size:.1f} MB) to dataset repo "
                     f"{where} ({'private' if data['private'] else 'public'})"
                     + (f": {data['status']} {data['commit_url']}" if data["status"] else ""))
    size = sum(f["size"] for f in result.files) / 1e6
    what = f"{len(result.files)} files ({size:.1f} MB) to {result.repo_id or '<publish.repo_id>'}"
    if result.status == "stage":
        verdict = "passed so far" if result.passed else "gate failed"
        lines.append(f"stage verdict: {verdict}; waiting for {', '.join(result.pending)}")
    elif result.status == "dry_run":
        verdict = "would upload" if result.passed else "gate failed; would not upload"
        lines.append(f"dry run ({'; '.join(result.dry_run_reasons)}): {verdict} {what}")
    elif result.status == "blocked":
        lines.append(f"gate failed: nothing uploaded to {result.repo_id}")
    elif result.status == "unchanged":
        lines.append(f"already published, nothing to do: {result.commit_url}")
    else:
        lines.append(f"published {what}: {result.commit_url}")
    lines += [f"record: {result.record_path}"] if result.record_path else []
    return "\n".join(lines)
