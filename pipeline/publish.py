"""Publish: `tuneline publish [--dry-run]` (the `publish` stage of dvc.yaml runs it with
`--dry-run --exit-zero`, so `dvc repro` and `dvc exp run` record the gate verdict but never upload).

1. The gate: every check from the `publish:` section of params.yaml, reported one by one in
   reports/publish.json; any failed check blocks publishing (non-zero exit).
2. The release: the files chosen in `publish.upload`, a model card (pipeline/modelcard.py) and a
   manifest (`tuneline-publish.json`) naming every file tuneline put in the repo with its sha256.
3. The upload, only when `publish.enabled`, `publish.repo_id` and an `HF_TOKEN` in the environment
   are all present and --dry-run is not given: one `create_commit` with every file (and the
   deletion of files an earlier publish put there that this one no longer has), so the Hub shows
   all of a release or none of it. If the Hub already holds this content (same files, same card
   facts), nothing is uploaded and no commit is made.

The token is read from the environment, handed to `huggingface_hub` only, and scrubbed from every
message: it never reaches logs, reports, exceptions or the card.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import modelcard
from pipeline.errors import UserError
from pipeline.jsonl import write_json, write_text

UploadItem = Literal["adapter", "fused", "gguf", "modelfile", "card"]
MANIFEST = "tuneline-publish.json"
CARD = "README.md"
ADAPTER_DIR = "adapter"
CHECKPOINT_RE = re.compile(r"^\d{7}_adapters\.safetensors$")  # mlx-lm resumable checkpoints
DEFAULT_ENDPOINT = "https://huggingface.co"
NOTHING_PUBLISHED = (
    "Nothing was published: the Hub shows a new revision only once its single commit succeeds."
)


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
    require_pushed: bool  # outputs match dvc.lock and are in the default DVC remote
    require_clean_git: bool  # no uncommitted changes, so the card's commit reproduces the model
    card_samples: int  # evaluation samples shown in the card


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
    report: Path
    card: Path | None  # also write the card here (a preview); None = don't


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ReleaseFile:
    path: str  # path in the Hub repo
    size: int
    sha256: str
    source: Path | None  # local file, or None for generated content
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Release:
    files: tuple[ReleaseFile, ...]
    content_id: str  # sha256 over the artifacts and the card facts (not the git commit)
    card: str
    git: modelcard.GitFacts


@dataclass
class PublishResult:
    status: Literal["dry_run", "blocked", "published", "unchanged", "failed"]
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

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["total_bytes"] = sum(f["size"] for f in self.files)
        return data


def run(cfg: PublishConfig, paths: PublishPaths, *, dry_run: bool,
        env: Mapping[str, str] = os.environ) -> PublishResult:
    """Check the gate, build the release, upload it unless this is a dry run."""
    validate_config(cfg)
    token = env.get("HF_TOKEN") or None
    reasons = dry_run_reasons(cfg, dry_run, token)
    checks = gate(cfg, paths)
    release = build_release(cfg, paths)
    if paths.card is not None:
        write_text(paths.card, release.card)
    result = PublishResult(
        status="dry_run" if reasons else "blocked", dry_run=bool(reasons), dry_run_reasons=reasons,
        checks=checks, repo_id=cfg.repo_id, private=cfg.private, content_id=release.content_id,
        files=[_file_entry(f) for f in release.files],
        card_path=str(paths.card) if paths.card is not None else None,
    )
    if reasons or not result.passed:
        write_json(paths.report, result.to_json())
        return result
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    try:
        result.status, result.commit_url, result.revision = push(cfg, release, token, endpoint)
    except PublishError as exc:
        result.status, result.error = "failed", redact(str(exc), token)
        write_json(paths.report, result.to_json())
        raise PublishError(result.error) from None
    write_json(paths.report, result.to_json())
    return result


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
    if cfg.card_samples < 0:
        raise PublishError(f"{where}.card_samples is {cfg.card_samples}; use 0 or more")


def dry_run_reasons(cfg: PublishConfig, dry_run: bool, token: str | None) -> list[str]:
    """Why this run will not upload; empty when it will (if the gate passes)."""
    reasons = ["--dry-run given"] if dry_run else []
    reasons += [] if cfg.enabled else ["publish.enabled is false"]
    reasons += [] if cfg.repo_id else ["publish.repo_id is not set"]
    reasons += [] if token else ["HF_TOKEN is not set"]
    return reasons


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "<HF_TOKEN>") if token and len(token) >= 4 else text


# --- the gate --------------------------------------------------------------------------------


def gate(cfg: PublishConfig, paths: PublishPaths) -> list[Check]:
    evaluation = _read_report(paths.eval)
    return [
        check_validation(paths.validation),
        check_improvement(paths.eval, evaluation, cfg.min_improvement),
        check_gguf(paths.gguf_report, paths.gguf, needed="gguf" in cfg.upload),
        check_judge(paths.eval, evaluation, cfg.require_judge_win_rate),
        check_license(cfg, paths),
        check_artifacts(cfg, paths),
        check_git_clean(cfg.require_clean_git, ignore=[paths.report, paths.card]),
        check_dvc_pushed(cfg.require_pushed),
    ]


def check_validation(path: Path) -> Check:
    data = _read_report(path)
    if not isinstance(data, dict):
        return Check("validation", False, _missing(path, "validate", data))
    errors, warnings = _count(data.get("errors")), _count(data.get("warnings"))
    passed = data.get("passed")
    if errors is None and not isinstance(passed, bool):
        return Check("validation", False, f"{path} has neither 'passed' nor 'errors'; "
                     "re-run `dvc repro validate`")
    ok = passed is not False and not errors
    counts = f"{errors if errors is not None else '?'} errors, " \
        f"{warnings if warnings is not None else '?'} warnings"
    if ok:
        return Check("validation", True, f"dataset validated: {counts}")
    return Check("validation", False, f"dataset validation failed ({counts}): see {path}, fix "
                 "the rows it names (`tuneline validate data/dataset`), then `dvc repro`")


def check_improvement(path: Path, evaluation: Any, minimum: float) -> Check:
    base = _number(evaluation, "base", "test_loss")
    tuned = _number(evaluation, "tuned", "test_loss")
    if base is None or tuned is None:
        if isinstance(evaluation, Exception) or evaluation is None:
            return Check("improvement", False, _missing(path, "evaluate", evaluation))
        return Check("improvement", False, f"{path} has no numeric base.test_loss and "
                     "tuned.test_loss; run `dvc repro evaluate`")
    gain = base - tuned
    summary = f"test loss base {base:.4f} -> tuned {tuned:.4f} (improved by {gain:.4f}; " \
        f"publish.min_improvement {minimum})"
    if gain >= minimum:
        return Check("improvement", True, summary)
    return Check("improvement", False, f"{summary}: the tuned model does not beat the base by "
                 "enough; train more or on better data, or lower publish.min_improvement")


def check_gguf(report: Path, folder: Path, *, needed: bool) -> Check:
    if not needed:
        return Check("gguf", True, "not required (gguf not in publish.upload)")
    data = _read_report(report)
    if not isinstance(data, dict):
        return Check("gguf", False, _missing(report, "export", data))
    files = _gguf_entries(data.get("files"))
    failed = sorted(name for name, ok in files.items() if not ok)
    unchecked = sorted(p.name for p in folder.glob("*.gguf") if p.name not in files)
    overall = data.get("passed", True) is True
    if overall and files and not failed and not unchecked:
        return Check("gguf", True, f"{len(files)} GGUF file(s) loaded and stopped in llama.cpp")
    problems = [f"failed: {', '.join(failed)}"] if failed else []
    problems += [f"never checked: {', '.join(unchecked)}"] if unchecked else []
    problems += [] if files else ["no files in the report"]
    problems += [] if overall else ["report says passed: false"]
    return Check("gguf", False, f"GGUF check failed ({'; '.join(problems)}): see {report}, "
                 "then `dvc repro export`")


def _gguf_entries(files: Any) -> dict[str, bool]:
    """File name -> passed, from a list of {name, passed} or export's {qtype: {file, failures}}."""
    entries = files.values() if isinstance(files, dict) else files if isinstance(files, list) \
        else []
    result = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = Path(str(entry.get("name") or entry.get("file") or "?")).name
        ok = entry["passed"] is True if "passed" in entry else entry.get("failures") == []
        result[name] = ok
    return result


def check_judge(path: Path, evaluation: Any, threshold: float | None) -> Check:
    if threshold is None:
        return Check("judge", True, "not required (publish.require_judge_win_rate: null)")
    rate = _number(evaluation, "judge", "tuned_win_rate")
    rate = rate if rate is not None else _number(evaluation, "judge", "win_rate")
    if rate is None:
        return Check("judge", False, f"{path} has no judge.win_rate: enable the judge in the "
                     "evaluate settings, or set publish.require_judge_win_rate: null")
    summary = f"judge win rate {rate:.3f} (publish.require_judge_win_rate {threshold})"
    if rate >= threshold:
        return Check("judge", True, summary)
    return Check("judge", False, f"{summary}: the judge prefers the tuned model too rarely")


def check_license(cfg: PublishConfig, paths: PublishPaths) -> Check:
    model = modelcard.read_yaml(paths.params).get("base", {}).get("model")
    found, where = modelcard.base_license(model, paths.base)
    license = found or (None if cfg.license == "auto" else cfg.license.lower())
    if license is None:
        return Check("license", False, f"base model license unknown ({where}): check its terms "
                     "and set publish.license to its license id (as on its Hub page)")
    allowed = {name.lower() for name in cfg.allowed_licenses}
    source = where if found else "publish.license"
    if license in allowed:
        return Check("license", True, f"base model license {license} (from {source}) is allowed")
    return Check("license", False, f"base model license {license} (from {source}) is not in "
                 f"publish.allowed_licenses {sorted(allowed)}: read its terms; add it only if "
                 "they allow publishing fine-tunes")


def check_artifacts(cfg: PublishConfig, paths: PublishPaths) -> Check:
    wanted = {
        "adapter": [paths.adapters / name for name in ("adapters.safetensors",
                                                      "adapter_config.json")],
        "fused": [paths.fused / "config.json"],
        "modelfile": [paths.gguf / "Modelfile"],
    }
    missing = [str(p) for item in cfg.upload for p in wanted.get(item, []) if not p.is_file()]
    if "fused" in cfg.upload and not list(paths.fused.glob("*.safetensors")):
        missing.append(f"{paths.fused}/*.safetensors")
    if "gguf" in cfg.upload and not list(paths.gguf.glob("*.gguf")):
        missing.append(f"{paths.gguf}/*.gguf")
    if missing:
        return Check("artifacts", False, f"missing: {', '.join(missing)}: run `dvc repro` (or "
                     "`dvc pull`), or remove the item from publish.upload")
    return Check("artifacts", True, f"present: {', '.join(cfg.upload)}")


def check_git_clean(required: bool, ignore: list[Path | None]) -> Check:
    if not required:
        return Check("git_clean", True, "not required (publish.require_clean_git: false)")
    top = _git("rev-parse", "--show-toplevel")
    if top is None:
        return Check("git_clean", False, "not a git repository: `git init` and commit, so the "
                     "card can name the commit that reproduces the model")
    own = {_relative(p, Path(top)) for p in ignore if p is not None}
    dirty = [f"{state} {path}" for state, path in _git_changes() if path not in own]
    if not dirty:
        return Check("git_clean", True, "working tree clean")
    shown = "; ".join(dirty[:5]) + (f"; and {len(dirty) - 5} more" if len(dirty) > 5 else "")
    return Check("git_clean", False, f"{len(dirty)} uncommitted change(s) ({shown}): commit them "
                 "(or add them to .gitignore) so the card's commit reproduces this model")


def check_dvc_pushed(required: bool) -> Check:
    if not required:
        return Check("dvc_pushed", True, "not required (publish.require_pushed: false)")
    try:
        local, remote = _dvc_status()
    except Exception as exc:  # noqa: BLE001 - DVC raises many kinds; all mean "cannot verify"
        hint = "; set a default remote: `dvc remote add -d NAME URL`" \
            if "remote" in str(exc).lower() else ""
        return Check("dvc_pushed", False, f"cannot check DVC outputs ({type(exc).__name__}: "
                     f"{_first_line(exc)}){hint}")
    if local:
        return Check("dvc_pushed", False, f"stage(s) {', '.join(sorted(local))} changed since "
                     "dvc.lock or never ran: run `dvc repro` and commit dvc.lock")
    # DVC lists each file of a folder output too: name the outputs, count the files.
    tops = sorted(k for k in remote if not any(k.startswith(o + "/") for o in remote))
    if tops:
        shown = ", ".join(f"{path} ({remote[path]})" for path in tops[:6])
        return Check("dvc_pushed", False, f"{len(tops)} output(s) ({len(remote)} entries) not in "
                     f"the DVC remote: {shown}: run `dvc push`")
    return Check("dvc_pushed", True, "outputs match dvc.lock and are all in the DVC remote")


def _dvc_status() -> tuple[dict[str, Any], dict[str, Any]]:
    """(`dvc status` without the publish stage, `dvc status --cloud`) via DVC's Python API.
    Leaving publish out matters: inside `dvc repro` its own outputs are locked while it runs."""
    from dvc.repo import Repo

    with Repo() as repo:
        stages = [s.addressing for s in repo.index.stages if s.name != "publish"]
        local = repo.status(targets=stages) if stages else {}
        if local:
            return local, {}
        return {}, repo.status(targets=stages, cloud=True) if stages else {}


# --- the release -----------------------------------------------------------------------------


def build_release(cfg: PublishConfig, paths: PublishPaths) -> Release:
    artifacts = _artifact_files(cfg, paths)
    license = cfg.license if cfg.license != "auto" else modelcard.base_license(
        modelcard.read_yaml(paths.params).get("base", {}).get("model"), paths.base)[0]
    inputs = modelcard.CardInputs(paths.params, paths.dataset, paths.dvc_lock,
                                  paths.train_report, paths.eval, paths.base)
    facts = modelcard.collect_facts(
        inputs, repo_id=cfg.repo_id, private=cfg.private, license=license, tags=cfg.tags,
        upload=cfg.upload, files=[(f.path, f.size) for f in artifacts], samples=cfg.card_samples)
    content_id = _sha256_bytes(json.dumps(
        {"files": {f.path: f.sha256 for f in artifacts}, "facts": facts}, sort_keys=True).encode())
    git = modelcard.GitFacts(_git("rev-parse", "HEAD"),
                             modelcard.clean_remote(_git("remote", "get-url", "origin")))
    card = modelcard.render(facts, git)
    files = list(artifacts)
    if "card" in cfg.upload:
        files.append(_generated(CARD, card.encode("utf-8")))
    manifest = {
        "tool": "tuneline", "content_id": content_id, "git_commit": git.commit,
        "files": {f.path: {"sha256": f.sha256, "size": f.size} for f in files},
    }
    files.append(_generated(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                            .encode("utf-8")))
    return Release(tuple(files), content_id, card, git)


def _artifact_files(cfg: PublishConfig, paths: PublishPaths) -> list[ReleaseFile]:
    chosen: dict[str, Path] = {}
    for item in cfg.upload:
        for repo_path, local in _item_files(item, paths):
            if repo_path in chosen or repo_path in (CARD, MANIFEST):
                raise PublishError(f"two files would be uploaded as {repo_path!r} ({local} and "
                                   f"{chosen.get(repo_path, 'a generated file')}); rename one")
            chosen[repo_path] = local
    return [_local(repo_path, local) for repo_path, local in sorted(chosen.items())]


def _item_files(item: str, paths: PublishPaths) -> list[tuple[str, Path]]:
    """Where each local file goes in the repo: fused at the root (so `--model repo` works),
    the adapter under adapter/, GGUF files and the Modelfile at the root (Ollama's hf.co/ and
    llama.cpp's --hf-file find them there, and the Modelfile's FROM ./x.gguf resolves)."""
    if item == "fused":
        return [(p.relative_to(paths.fused).as_posix(), p) for p in _tree(paths.fused)]
    if item == "adapter":
        return [(f"{ADAPTER_DIR}/{p.relative_to(paths.adapters).as_posix()}", p)
                for p in _tree(paths.adapters) if not CHECKPOINT_RE.match(p.name)]
    if item == "gguf":
        return [(p.name, p) for p in sorted(paths.gguf.glob("*.gguf"))]
    if item == "modelfile":
        modelfile = paths.gguf / "Modelfile"
        return [("Modelfile", modelfile)] if modelfile.is_file() else []
    return []


def _tree(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in
                                             p.relative_to(folder).parts))


def _local(repo_path: str, local: Path) -> ReleaseFile:
    digest = hashlib.sha256()
    with local.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return ReleaseFile(repo_path, local.stat().st_size, digest.hexdigest(), local)


def _generated(repo_path: str, data: bytes) -> ReleaseFile:
    return ReleaseFile(repo_path, len(data), _sha256_bytes(data), None, data)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the upload ------------------------------------------------------------------------------


def push(cfg: PublishConfig, release: Release, token: str | None,
         endpoint: str) -> tuple[Literal["published", "unchanged"], str, str]:
    """One commit with the whole release, or nothing if the Hub already has this content."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    repo_id = str(cfg.repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, endpoint, token):
        _check_token(api)
        remote = _remote_info(api, repo_id)
        if remote is not None and remote.private is False and cfg.private:
            raise PublishError(f"{endpoint}/{repo_id} is public but publish.private is true: make "
                               "it private in its settings, or set publish.private: false")
        previous = _previous_manifest(api, repo_id, remote)
        if remote is not None and _already_there(release, previous, remote):
            return "unchanged", f"{endpoint}/{repo_id}/commit/{remote.sha}", str(remote.sha)
        if remote is None:
            api.create_repo(repo_id, private=cfg.private, exist_ok=True)
        current = {f.path for f in release.files}
        present = {s.rfilename for s in (remote.siblings or [])} if remote is not None else set()
        stale = sorted(p for p in (previous or {}).get("files", {}) if p not in current
                       and p in present)
        operations: list[Any] = [
            CommitOperationAdd(f.path, f.data if f.data is not None else str(f.source))
            for f in release.files]
        operations += [CommitOperationDelete(path) for path in stale]
        info = api.create_commit(
            repo_id, operations,
            commit_message=f"tuneline publish {(release.git.commit or 'uncommitted')[:12]}",
            commit_description=f"content {release.content_id}\ngit commit {release.git.commit}\n"
                               f"{len(release.files)} files, {len(stale)} removed",
            parent_commit=remote.sha if remote is not None else None)
    return "published", str(info.commit_url), str(info.oid)


def _check_token(api: Any) -> None:
    who = api.whoami()
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError("HF_TOKEN is a read-only token: create one with write access at "
                           "https://huggingface.co/settings/tokens and export it as HF_TOKEN. "
                           + NOTHING_PUBLISHED)


def _remote_info(api: Any, repo_id: str) -> Any:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return api.model_info(repo_id, revision="main", files_metadata=True)
    except RepositoryNotFoundError:
        return None  # a first publish: the repo is created just before the commit


def _previous_manifest(api: Any, repo_id: str, remote: Any) -> dict[str, Any] | None:
    """What an earlier publish put in the repo (to delete what this one no longer has)."""
    if remote is None or MANIFEST not in {s.rfilename for s in remote.siblings or []}:
        return None
    with tempfile.TemporaryDirectory(prefix="tuneline-hub-") as cache:
        path = api.hf_hub_download(repo_id, MANIFEST, revision=remote.sha, cache_dir=cache)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # edited by hand: publish everything again, delete nothing
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _already_there(release: Release, previous: dict[str, Any] | None, remote: Any) -> bool:
    """Same content id, and every artifact still on the Hub with the same bytes."""
    if previous is None or previous.get("content_id") != release.content_id:
        return False
    siblings = {s.rfilename: s for s in remote.siblings or []}
    for f in release.files:
        sibling = siblings.get(f.path)
        if sibling is None:
            return False
        if f.path in (CARD, MANIFEST):
            continue  # they name the git commit, which may differ for the same content
        if not _same_bytes(f, sibling):
            return False
    return True


def _same_bytes(local: ReleaseFile, sibling: Any) -> bool:
    if sibling.lfs is not None:
        return sibling.lfs.sha256 == local.sha256
    from huggingface_hub.utils import sha

    data = local.data if local.data is not None else Path(str(local.source)).read_bytes()
    return sibling.blob_id == sha.git_hash(data)


@contextmanager
def hub_errors(repo_id: str, endpoint: str, token: str | None) -> Iterator[None]:
    """Turn what the Hub client raises into one clear, token-free PublishError."""
    try:
        yield
    except PublishError as exc:
        raise PublishError(redact(str(exc), token)) from None
    except Exception as exc:  # noqa: BLE001 - every failure must come out token-free
        raise PublishError(redact(explain(exc, repo_id, endpoint), token)) from None


def explain(exc: BaseException, repo_id: str, endpoint: str) -> str:
    """What went wrong and what to do, from the innermost HTTP or network error."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cause = _root_cause(exc)
    if isinstance(cause, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to publish. " \
            + NOTHING_PUBLISHED
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return _explain_http(cause, repo_id, endpoint) + " " + NOTHING_PUBLISHED
    if _is_network(cause):
        return f"network error talking to {endpoint} ({type(cause).__name__}: " \
            f"{_first_line(cause)}): check the connection and re-run `tuneline publish`. " \
            + NOTHING_PUBLISHED
    if isinstance(cause, ValueError) and "README.md" in str(cause):
        return f"the Hub rejected the model card metadata: {_first_line(cause)}. " \
            + NOTHING_PUBLISHED
    return f"publishing to {endpoint}/{repo_id} failed ({type(cause).__name__}: " \
        f"{_first_line(cause)}). " + NOTHING_PUBLISHED


def _explain_http(exc: Any, repo_id: str, endpoint: str) -> str:
    status = exc.response.status_code
    namespace = repo_id.split("/")[0]
    if status == 401:
        return ("the Hub rejected HF_TOKEN (401): it is invalid, expired or revoked; create a "
                "token with write access at https://huggingface.co/settings/tokens and export it "
                "as HF_TOKEN.")
    if status == 403:
        return (f"the Hub refused (403) to write to {repo_id}: HF_TOKEN has no write access to "
                f"the namespace '{namespace}'; use a token with write access there, or change "
                "publish.repo_id.")
    if status == 404:
        return (f"{repo_id} was not found on {endpoint} (404), or HF_TOKEN cannot see it: check "
                "publish.repo_id and the token's permissions.")
    if status in (409, 412):
        return (f"{repo_id} changed on the Hub while publishing ({status}): someone else "
                "committed; re-run `tuneline publish`.")
    return f"the Hub answered {status} for {repo_id} ({_first_line(exc)}): re-run later."


def _root_cause(exc: BaseException) -> BaseException:
    """The Hub client wraps upload failures (RuntimeError from ...): find the real one."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = exc
    while True:
        if isinstance(seen, HfHubHTTPError) or _is_network(seen):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            return exc
        seen = nxt


def _is_network(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "NetworkError"}) or \
        isinstance(exc, (ConnectionError, TimeoutError))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# --- small helpers ---------------------------------------------------------------------------


def _read_report(path: Path) -> Any:
    try:
        return modelcard.read_json(path)
    except modelcard.CardError as exc:
        return exc  # reported by the check that needs it, with the file named


def _missing(path: Path, stage: str, data: Any) -> str:
    if isinstance(data, Exception):
        return str(data)
    if data is None:
        return f"{path} not found: run `dvc repro {stage}`"
    return f"{path} is not a JSON object: re-run `dvc repro {stage}`"


def _count(value: Any) -> int | None:
    """An error count from an int, a per-check mapping of counts, or a list of findings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        counts = [_count(v) for v in value.values()]
        return sum(c for c in counts if c is not None)
    if isinstance(value, list):
        return len(value)
    return None


def _number(data: Any, section: str, key: str) -> float | None:
    value = data.get(section, {}).get(key) if isinstance(data, dict) and \
        isinstance(data.get(section), dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_changes() -> list[tuple[str, str]]:
    """(status, path) per uncommitted change, paths from the top of the work tree."""
    proc = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"],
                          capture_output=True, text=True, check=False)
    entries = proc.stdout.split("\0")
    changes, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            changes.append((entry[:2].strip(), entry[3:]))
            i += 1 if entry[0] in "RC" else 0  # a rename is followed by its old path
        i += 1
    return changes


def _relative(path: Path, top: Path) -> str:
    try:
        return path.resolve().relative_to(top.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def render(result: PublishResult) -> str:
    """What the CLI prints: one line per check, then what happened."""
    lines = [f"{'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in result.checks]
    lines += [f"model card: {result.card_path}"] if result.card_path else []
    size = sum(f["size"] for f in result.files) / 1e6
    what = f"{len(result.files)} files ({size:.1f} MB) to {result.repo_id or '<publish.repo_id>'}"
    if result.status == "dry_run":
        verdict = "would upload" if result.passed else "gate failed; would not upload"
        lines.append(f"dry run ({'; '.join(result.dry_run_reasons)}): {verdict} {what}")
    elif result.status == "blocked":
        lines.append(f"gate failed: nothing uploaded to {result.repo_id}")
    elif result.status == "unchanged":
        lines.append(f"already published, nothing to do: {result.commit_url}")
    else:
        lines.append(f"published {what}: {result.commit_url}")
    return "\n".join(lines)
