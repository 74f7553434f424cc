"""The layout a newcomer reads: `ls pipeline/` shows the stages (named like dvc.yaml's) and the
CLI; every layer lives in a subpackage whose docstring says what it owns and may import; layers
import only what they say, stages never import stages, and no import goes round in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
# Each layer and the layers it may import (its own included), as its __init__ docstring says.
LAYERS = {
    "core": {"core"},
    "rows": {"core", "rows"},
    "training": {"core", "training"},
    "gguf_io": {"core", "gguf_io"},
    "llm": {"core", "llm", "training"},
    "hub": {"core", "rows", "hub"},
    "commands": {"core", "rows", "training", "gguf_io", "llm", "hub", "commands"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """`pipeline.x.y` modules imported anywhere in the file, lazy imports included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("pipeline.") and known(n)}
    return out


def known(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def test_the_top_level_shows_the_stages_the_cli_and_the_layers():
    files = {p.stem for p in PKG.glob("*.py")}
    assert files == set(STAGES) | {"cli", "__main__", "__init__"}
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS)


def test_every_layer_says_what_it_owns_and_what_it_may_import():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PKG / layer / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"pipeline/{layer}/__init__.py: say what it may import"


def test_layers_import_only_what_they_may_and_never_a_stage():
    stages = {f"pipeline.{s}" for s in STAGES}
    for name, path in MODULES.items():
        parts = name.split(".")
        if len(parts) < 3:
            continue  # stages, cli: checked below
        allowed = LAYERS[parts[1]]
        for dep in imported(path):
            assert dep not in stages, f"{path.relative_to(ROOT)} imports the stage {dep}"
            assert dep.split(".")[1] in allowed, f"{path.relative_to(ROOT)} imports {dep}"


def test_no_stage_imports_another_stage():
    for stage in STAGES:
        deps = imported(PKG / f"{stage}.py") & {f"pipeline.{s}" for s in STAGES}
        assert deps <= {f"pipeline.{stage}"}, f"pipeline/{stage}.py imports {sorted(deps)}"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (a -> b -> a), or None."""
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (found := visit(nxt, trail + [node])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [])):
            return found
    return None


def test_no_import_goes_round_in_a_circle():
    graph = {name: {d for d in imported(path) if d in MODULES and d != name}
             for name, path in MODULES.items()}
    assert find_circle(graph) is None, " -> ".join(find_circle(graph) or [])


def test_the_circle_check_finds_a_circle_two_modules_deep():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_readme_tree_names_every_module():
    readme = (ROOT / "README.md").read_text()
    tree = readme[readme.index("## Tree"):]
    tree = tree[:tree.index("\n## ", 5)] if "\n## " in tree[5:] else tree
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        if str(rel) not in tree and f" {path.name} " not in tree:
            missing.append(str(rel))
    assert missing == [], f"README.md Tree: add {missing}"
