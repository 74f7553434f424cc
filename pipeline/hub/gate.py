"""The checks of the publish gate, one function each, taking values and returning a Check.

Which inputs may vouch (tracked), report checks (validation, improvement, gguf, judge), the
license, the artifacts, the dataset, and the state of the repository (git clean, outputs up to
date with dvc.lock, outputs pushed). pipeline/publish.py decides which apply and when; none of
these raise for bad input, they fail their check and say what to do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.hub import dataset_card, modelcard, repo_facts


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    pending: bool = False  # cannot be judged yet (inside `dvc repro`): `tuneline publish` will


def check_tracked(inputs: Mapping[str, Path], *, stage: bool) -> Check:
    """Only what DVC tracks (an output in dvc.lock, which up_to_date compares) or what git has
    committed (which git_clean compares) may vouch for a release: a file ignored by both (say
    .tuneline/eval.json) could hold any numbers. Inside `dvc repro` (`stage`), a file git does
    not ignore passes: the pending git_clean check will want it committed."""
    top = repo_facts.toplevel() or Path.cwd()
    outs = repo_facts.dvc_outputs()
    loose = []
    for option, path in inputs.items():
        rel = repo_facts.relative(path, top)
        if rel is None or not Path(path).exists() or any(rel == o or rel.startswith(o + "/")
                                                         for o in outs):
            continue  # outside: refused before the gate runs; missing: its own check says so
        where = str(Path(path).absolute())  # git takes paths in its work tree from any cwd
        if repo_facts.committed(where) if not stage else not repo_facts.ignored(where):
            continue
        loose.append(f"{option} {path}")
    if not loose:
        return Check("tracked", True, "every input is a DVC output in dvc.lock or committed "
                     "to git")
    return Check("tracked", False, f"{'; '.join(loose)}: neither a DVC output in dvc.lock nor "
                 "committed to git, so nothing vouches for its content; use the files the "
                 "pipeline wrote (as dvc.yaml does), or commit the file")


def check_dataset(data: Any, folder: Path) -> Check:
    """What only the dataset repository needs: its own license, and every split file."""
    missing = [f"{s}.jsonl" for s in dataset_card.HUB_SPLITS
               if not (folder / f"{s}.jsonl").is_file()]
    if missing:
        return Check("dataset", False, f"{folder} lacks {', '.join(missing)}: run `dvc repro "
                     "curate`")
    if not data.license:
        return Check("dataset", False, "publish.dataset.license is not set: choose the dataset's "
                     "license (generated answers carry the terms of the model that wrote them, "
                     "imports those of their source)")
    return Check("dataset", True, f"dataset repository "
                 f"{data.repo_id or '<publish.dataset.repo_id>'} "
                 f"({'private' if data.private else 'public'}, license {data.license})")


def check_validation(path: Path) -> Check:
    data = read_report(path)
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


def check_gguf(report: Path, folder: Path, *, needed: bool,
               hashes: Mapping[Path, str] | None = None) -> Check:
    """Every GGUF on disk is, byte for byte, a file the export report says passed. `hashes`:
    the sha256 the release recorded for its files (what will be uploaded), used where given."""
    if not needed:
        return Check("gguf", True, "not required (gguf not in publish.upload)")
    data = read_report(report)
    if not isinstance(data, dict):
        return Check("gguf", False, _missing(report, "export", data))
    proven = _gguf_entries(data.get("files"))
    failed = sorted(name for name, (ok, _) in proven.items() if not ok)
    passed_hashes = {digest for ok, digest in proven.values() if ok and digest}
    on_disk = sorted(folder.glob("*.gguf"))
    known = hashes or {}
    unchecked = sorted(p.name for p in on_disk if (known.get(p) or repo_facts.sha256_file(p))
                       not in passed_hashes and p.name not in failed)
    overall = data.get("passed", True) is True
    if overall and proven and not failed and not unchecked:
        return Check("gguf", True, f"{len(on_disk)} GGUF file(s) loaded and stopped in llama.cpp "
                     "(matched to the report by sha256)")
    problems = [f"failed: {', '.join(failed)}"] if failed else []
    problems += [f"never checked (no passed entry with this sha256): {', '.join(unchecked)}"] \
        if unchecked else []
    problems += [] if proven else ["no files in the report"]
    problems += [] if overall else ["report says passed: false"]
    return Check("gguf", False, f"GGUF check failed ({'; '.join(problems)}): see {report}, "
                 "then `dvc repro export`")


def _gguf_entries(files: Any) -> dict[str, tuple[bool, str | None]]:
    """File name -> (passed, sha256), from export's {qtype: {file, failures, sha256}} or a list
    of {name, passed, sha256}."""
    entries = files.values() if isinstance(files, dict) else files if isinstance(files, list) \
        else []
    result = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = Path(str(entry.get("name") or entry.get("file") or "?")).name
        ok = entry["passed"] is True if "passed" in entry else entry.get("failures") == []
        digest = entry.get("sha256")
        result[name] = (ok, digest if isinstance(digest, str) else None)
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


def check_preference(path: Path, evaluation: Any, minimum: float | None) -> Check:
    """publish.min_preference_accuracy: the tuned model prefers the expert's answer over the
    generated one it replaced on at least this share of the held-out pairs."""
    if minimum is None:
        return Check("preference", True, "not required (publish.min_preference_accuracy: null)")
    accuracy = _number(evaluation, "tuned", "preference_accuracy")
    if accuracy is None:
        return Check("preference", False, f"{path} has no tuned.preference_accuracy: the test "
                     "split has no preference pairs (replace generated answers with `tuneline "
                     "review`, or import pairs), or set publish.min_preference_accuracy: null")
    base = _number(evaluation, "base", "preference_accuracy")
    was = "n/a" if base is None else f"{base:.3f}"
    summary = (f"preference accuracy tuned {accuracy:.3f} (base {was}; "
               f"publish.min_preference_accuracy {minimum})")
    if accuracy >= minimum:
        return Check("preference", True, summary)
    return Check("preference", False, f"{summary}: train with train.objective dpo or orpo, or "
                 "lower publish.min_preference_accuracy")


def check_license(license: str | None, source: str, allowed: Iterable[str]) -> Check:
    """`license` of the base model (None = unknown) as found in `source`."""
    if license is None:
        return Check("license", False, f"base model license unknown ({source}): check its terms "
                     "and set publish.license to its license id (as on its Hub page)")
    allowed = {name.lower() for name in allowed}
    if license in allowed:
        return Check("license", True, f"base model license {license} (from {source}) is allowed")
    return Check("license", False, f"base model license {license} (from {source}) is not in "
                 f"publish.allowed_licenses {sorted(allowed)}: read its terms; add it only if "
                 "they allow publishing fine-tunes")


def check_artifacts(upload: Iterable[str], adapters: Path, fused: Path, gguf: Path) -> Check:
    upload = list(upload)
    wanted = {
        "adapter": [adapters / name for name in ("adapters.safetensors", "adapter_config.json")],
        "fused": [fused / "config.json"],
        "modelfile": [gguf / "Modelfile"],
    }
    missing = [str(p) for item in upload for p in wanted.get(item, []) if not p.is_file()]
    if "fused" in upload and not list(fused.glob("*.safetensors")):
        missing.append(f"{fused}/*.safetensors")
    if "gguf" in upload and not list(gguf.glob("*.gguf")):
        missing.append(f"{gguf}/*.gguf")
    if missing:
        return Check("artifacts", False, f"missing: {', '.join(missing)}: run `dvc repro` (or "
                     "`dvc pull`), or remove the item from publish.upload")
    return Check("artifacts", True, f"present: {', '.join(upload)}")


def check_git_clean(required: bool, ignore: Iterable[Path | None]) -> Check:
    """No uncommitted change except tuneline's own records (`ignore`: files or folders)."""
    if not required:
        return Check("git_clean", True, "not required (publish.require_clean_git: false)")
    top = repo_facts.toplevel()
    if top is None:
        return Check("git_clean", False, "not a git repository: `git init` and commit, so the "
                     "card can name the commit that reproduces the model")
    own = [r for r in (repo_facts.relative(p, top) for p in ignore if p is not None) if r]
    dirty = [f"{state} {path}" for state, path in repo_facts.changes()
             if not any(path == o or path.startswith(o.rstrip("/") + "/") for o in own)]
    if not dirty:
        return Check("git_clean", True, "working tree clean")
    shown = "; ".join(dirty[:5]) + (f"; and {len(dirty) - 5} more" if len(dirty) > 5 else "")
    return Check("git_clean", False, f"{len(dirty)} uncommitted change(s) ({shown}): commit them "
                 "(or add them to .gitignore) so the card's commit reproduces this model")


def check_dvc(require_pushed: bool) -> list[Check]:
    """[up_to_date, dvc_pushed]: outputs match dvc.lock (always required: the reports the gate
    reads must describe these outputs), and are in the DVC remote (publish.require_pushed)."""
    try:
        local, remote = repo_facts.dvc_status(cloud=require_pushed)
    except Exception as exc:  # noqa: BLE001 - DVC raises many kinds; all mean "cannot verify"
        hint = "; set a default remote: `dvc remote add -d NAME URL`" \
            if "remote" in str(exc).lower() else ""
        detail = f"cannot check DVC outputs ({type(exc).__name__}: {_first_line(exc)}){hint}"
        return [Check("up_to_date", False, detail), _pushed_skipped(require_pushed, detail)]
    if local:
        detail = f"stage(s) {', '.join(sorted(local))} changed since dvc.lock or never ran: " \
            "run `dvc repro` and commit dvc.lock"
        return [Check("up_to_date", False, detail),
                _pushed_skipped(require_pushed, "outputs are not up to date (see up_to_date)")]
    up_to_date = Check("up_to_date", True, "outputs and reports match dvc.lock")
    if not require_pushed:
        return [up_to_date, _pushed_skipped(False, "")]
    # DVC lists each file of a folder output too: name the outputs, count the files.
    tops = sorted(k for k in remote if not any(k.startswith(o + "/") for o in remote))
    if tops:
        shown = ", ".join(f"{path} ({remote[path]})" for path in tops[:6])
        return [up_to_date, Check("dvc_pushed", False, f"{len(tops)} output(s) ({len(remote)} "
                                  f"entries) not in the DVC remote: {shown}: run `dvc push`")]
    return [up_to_date, Check("dvc_pushed", True, "outputs are all in the DVC remote")]


def _pushed_skipped(required: bool, why: str) -> Check:
    if not required:
        return Check("dvc_pushed", True, "not required (publish.require_pushed: false)")
    return Check("dvc_pushed", False, why)


# --- small helpers ---------------------------------------------------------------------------


def read_report(path: Path) -> Any:
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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
