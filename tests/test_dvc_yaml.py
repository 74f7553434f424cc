"""dvc.yaml agrees with the code: each stage lists its own module and real params keys, and every
params.yaml section loads into its stage's config class (no key the code does not read). Deps are
checked against the import graph (ast, transitively, lazy imports included) and the command line:
an undeclared module or input fails here, before a stale `dvc repro` can."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.core import config

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]
MODULE_OF_SECTION = {"base": "core.config", "launch": "training.launch",  # sections named otherwise
                     "questions": "commands.questions"}                    # than their module


def test_pipeline_has_every_stage_of_the_design_in_order():
    expected = ["base_model", "generate", "curate", "validate", "train", "evaluate", "fuse",
                "export", "publish"]
    assert [s for s in STAGES if s in expected] == expected


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_depends_on_its_own_module(stage):
    assert f"pipeline/{stage}.py" in STAGES[stage].get("deps", [])


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_exist_in_params_yaml(stage):
    for key in STAGES[stage].get("params", []):
        node = PARAMS
        for part in str(key).split("."):
            assert isinstance(node, dict) and part in node, f"{stage}: params key {key} missing"
            node = node[part]


def _config_classes(module_name: str) -> list[type]:
    module = importlib.import_module(f"pipeline.{module_name}")
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if dataclasses.is_dataclass(c) and c.__module__ == module.__name__
            and c.__name__.endswith("Config")]


@pytest.mark.parametrize("section", list(PARAMS))
def test_params_section_loads_into_its_config_class(section):
    module = MODULE_OF_SECTION.get(section, section)
    keys = set(PARAMS[section])
    matches = [c for c in _config_classes(module)
               if {f.name for f in dataclasses.fields(c)} == keys]
    assert matches, f"no *Config class in pipeline/{module}.py has exactly the keys {sorted(keys)}"
    config.load(matches[0], section, ROOT / "params.yaml")  # types check out too


# --- deps computed from the code ------------------------------------------------------------

LOCAL_PACKAGES = ("pipeline", "validation")
CLI = ROOT / "pipeline" / "cli.py"
# Not required in deps, with the reason. cli.py only dispatches (declaring it everywhere would
# rerun every stage when a command is added); what each command imports is checked below. A
# package's __init__.py that holds only its docstring changes no behaviour (trivial_init).
NOT_DEPS = {"pipeline/cli.py", "pipeline/__main__.py", "pipeline/__init__.py"}  # the last: __version__
# Modules that only register commands no stage runs (the people's commands): not deps, and the
# walk does not follow their lazy imports.
DISPATCH = {"pipeline/commands/app.py"}
# Paths in a stage's command that are neither deps nor outputs, with the reason.
UNDECLARED_PATHS = {
    ".tuneline/cache/generate": "reply cache, kept outside DVC on purpose",
    ".tuneline/cache/evaluate": "base-model results cache, kept outside DVC on purpose",
    ".tuneline/cache/reference": "DPO reference log-probs per row, kept outside DVC on purpose",
    ".tuneline/cache/sft": "finished SFT adapters (a dpo run's baseline), kept outside DVC on purpose",
    "dvc.lock": "DVC's own record; a stage cannot depend on it",
    "reports/data_docs": "GX Data Docs HTML for people, with the run's time in it: git-ignored, "
                         "not an output, so a rerun changes no tracked byte",
}


def module_file(name: str) -> str | None:
    """`pipeline.llm.clients` -> `pipeline/llm/clients.py`, `pipeline.llm` -> its `__init__.py`,
    when it is a module or package of this repository."""
    parts = name.split(".")
    if parts[0] not in LOCAL_PACKAGES or len(parts) < 2:
        return None
    for rel in (Path(*parts).with_suffix(".py"), Path(*parts, "__init__.py")):
        if (ROOT / rel).is_file():
            return rel.as_posix()
    return None


def packages_of(rel: str) -> set[str]:
    """The __init__.py files Python runs before the module itself: `pipeline/llm/clients.py`
    -> pipeline/__init__.py, pipeline/llm/__init__.py."""
    parts = Path(rel).parts[:-1]
    inits = {Path(*parts[:i], "__init__.py").as_posix() for i in range(1, len(parts) + 1)}
    return {i for i in inits if (ROOT / i).is_file()}


def trivial_init(rel: str) -> bool:
    """An __init__.py that holds only a docstring: importing it changes nothing."""
    body = ast.parse((ROOT / rel).read_text()).body
    return rel.endswith("__init__.py") and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def imports_in(tree: ast.AST) -> set[str]:
    """Repository modules imported anywhere in `tree`, lazy imports inside functions included."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {f for f in map(module_file, names) if f is not None}
    return found


def closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        rel = todo.pop()
        if rel not in seen and rel not in DISPATCH:
            seen.add(rel)
            todo += imports_in(ast.parse((ROOT / rel).read_text())) | packages_of(rel)
    return seen


def command_functions() -> dict[str, ast.FunctionDef]:
    """cli.py's top-level commands by the name `tuneline NAME` uses."""
    out = {}
    for node in ast.parse(CLI.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            call = dec if isinstance(dec, ast.Call) else None
            target = call.func if call else dec
            if isinstance(target, ast.Attribute) and target.attr == "command" and \
                    isinstance(target.value, ast.Name) and target.value.id == "app":
                named = call.args[0].value if call and call.args else None  # type: ignore[attr-defined]
                out[named or node.name.replace("_", "-")] = node
    return out


def cli_module_imports() -> set[str]:
    tree = ast.parse(CLI.read_text())
    top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                     type_ignores=[])
    return imports_in(top)


def stage_code(stage: str) -> set[str]:
    """Every repository module the stage's command runs: its cli function's imports, what cli.py
    itself imports (params loading), and everything those import, transitively."""
    words = shlex.split(STAGES[stage]["cmd"])
    function = command_functions()[words[1]]
    code = closure(imports_in(function) | cli_module_imports()) - NOT_DEPS
    return {m for m in code if not trivial_init(m)}


def covered(path: str, declared: list[str]) -> bool:
    """Declared itself, inside a declared folder, or a folder whose read files are declared
    one by one (train reads train.jsonl and valid.jsonl of --data, not test.jsonl)."""
    path = path.rstrip("/")
    return any(path == d or path.startswith(d.rstrip("/") + "/") or d.startswith(path + "/")
               for d in declared)


def declared_paths(spec: dict) -> list[str]:
    paths = [str(d) for d in spec.get("deps", [])]
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            paths += list(entry) if isinstance(entry, dict) else [str(entry)]
    return paths


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_include_every_module_its_command_imports(stage):
    deps = [str(d) for d in STAGES[stage].get("deps", [])]
    missing = sorted(m for m in stage_code(stage) if not covered(m, deps))
    assert missing == [], f"dvc.yaml stage {stage}: add to deps: {missing}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_path_in_a_stage_command_is_declared(stage):
    words = shlex.split(STAGES[stage]["cmd"])
    paths = [w for w in words[2:] if not w.startswith("-")]
    declared = declared_paths(STAGES[stage])
    undeclared = [p for p in paths if not covered(p, declared) and p not in UNDECLARED_PATHS]
    assert undeclared == [], f"dvc.yaml stage {stage}: declare as deps or outs: {undeclared}"


def test_no_stage_module_imports_another_stage_module():
    stages = {f"pipeline/{s}.py" for s in STAGES}
    for stage in STAGES:
        own = f"pipeline/{stage}.py"
        others = closure({own}) & stages - {own}
        assert others == set(), f"{own} imports the stage module(s) {sorted(others)}"


def test_the_import_walk_sees_lazy_imports_aliases_and_packages():
    tree = ast.parse("def f():\n    from pipeline import llm as l\n    from pipeline.rows import jsonl\n"
                     "    import pipeline.core.errors\nfrom pipeline.core.config import load\n"
                     "import numpy\n")
    assert imports_in(tree) == {"pipeline/llm/__init__.py", "pipeline/rows/__init__.py",
                                "pipeline/rows/jsonl.py", "pipeline/core/errors.py",
                                "pipeline/core/config.py"}
    assert packages_of("pipeline/llm/clients.py") == {"pipeline/__init__.py",
                                                      "pipeline/llm/__init__.py"}


# --- params computed from the code ----------------------------------------------------------

LOADERS = {"load", "load_keys"}  # config.load(Cls, "section"), params.load(...), load_keys(...)


def dataclass_fields(class_name: str, modules: set[str]) -> list[str]:
    """Field names of the config class `class_name`, found in the stage's own modules."""
    if class_name in globals():  # the walk's own test
        return [f.name for f in dataclasses.fields(globals()[class_name])]
    for rel in sorted(modules):
        name = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        cls = getattr(importlib.import_module(name), class_name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return [f.name for f in dataclasses.fields(cls)]
    raise AssertionError(f"config class {class_name} not found in {sorted(modules)}")


def keys_read(tree: ast.AST, modules: set[str]) -> set[str]:
    """params keys read in `tree`: `load(Cls, "s")` -> s.<each field of Cls>; `section("s")` and
    the names in a `*_SECTIONS` tuple -> the whole section s; `X.base.k` -> base.k; `X.base`
    passed on whole -> base."""
    keys: set[str] = set()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            args = node.args
            if name in LOADERS and len(args) >= 2 and isinstance(args[1], ast.Constant):
                cls = args[0].attr if isinstance(args[0], ast.Attribute) else args[0].id  # type: ignore[attr-defined]
                keys |= {f"{args[1].value}.{f}" for f in dataclass_fields(cls, modules)}
            elif name == "section" and args and isinstance(args[0], ast.Constant):
                keys.add(str(args[0].value))
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.endswith("_SECTIONS") for t in node.targets):
            keys |= {str(e.value) for e in node.value.elts}  # type: ignore[attr-defined]
        elif isinstance(node, ast.Attribute) and node.attr == "base" and (
                isinstance(node.value, ast.Call) or getattr(node.value, "id", "") == "params"):
            above = parents.get(node)
            keys.add(f"base.{above.attr}" if isinstance(above, ast.Attribute) else "base")
    return keys


def stage_params_read(stage: str) -> set[str]:
    """Keys read by the stage's cli function, the cli_support helpers it calls, and every module
    it runs (config.py and cli_support.py themselves only define the loaders)."""
    words = shlex.split(STAGES[stage]["cmd"])
    function = command_functions()[words[1]]
    modules = stage_code(stage)
    support = ast.parse((ROOT / "pipeline/core/cli_support.py").read_text())
    called = {n.func.id for n in ast.walk(function) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name)}
    helpers = [f for f in support.body if isinstance(f, ast.FunctionDef) and f.name in called]
    keys = keys_read(function, modules) | {k for h in helpers for k in keys_read(h, modules)}
    for rel in modules - {"pipeline/core/config.py", "pipeline/core/cli_support.py"}:
        keys |= keys_read(ast.parse((ROOT / rel).read_text()), modules)
    return keys


def declares(key: str, declared: set[str]) -> bool:
    """`train.pack` is declared by `train` or `train.pack`; a whole section by its name or by
    every one of its keys in params.yaml."""
    section = key.split(".")[0]
    if section in declared or key in declared:
        return True
    return "." not in key and all(f"{key}.{k}" in declared for k in PARAMS.get(key, {}))


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_declares_every_params_key_its_code_reads(stage):
    declared = {str(k) for k in STAGES[stage].get("params", [])}
    missing = sorted(k for k in stage_params_read(stage) if not declares(k, declared))
    assert missing == [], f"dvc.yaml stage {stage}: add to params: {missing}"


def test_the_params_walk_sees_loads_sections_and_base():
    tree = ast.parse("def f(params):\n    cfg = params.load(stage.DemoConfig, 'train')\n"
                     "    seed = params.base.seed\n    config.section('publish', p)\n"
                     "CARD_SECTIONS = ('generate', 'questions')\n")
    found = keys_read(tree, set())
    assert found == {"train.lr", "train.steps", "base.seed", "publish", "generate", "questions"}


@dataclasses.dataclass(frozen=True)
class DemoConfig:  # read by test_the_params_walk_sees_loads_sections_and_base
    lr: float
    steps: int
