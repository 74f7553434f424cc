"""The Modelfile's TEMPLATE, rendered by Go's text/template as Ollama feeds it
(tests/ollama_render/main.go), equals the model's chat template rendered by jinja2, for every
chat family and every tiny architecture."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_export import SMOLLM_TEMPLATE
from tiny import CHATML_TEMPLATE
from tiny_archs import KINDS, make_tiny_arch

from pipeline import export
from pipeline.gguf_io import ollama

CONVERSATIONS = [
    *ollama.PROBES,
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"},
     {"role": "user", "content": "E"}],
    [{"role": "system", "content": "Be brief.\nUse SQL."}, {"role": "user", "content": "How?"},
     {"role": "assistant", "content": "Like so."}, {"role": "user", "content": "Why?"}],
]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory):
    go = shutil.which("go")
    assert go, "Go not found: `scripts/setup.sh --dev` installs golang-go (Ollama's template engine)"
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    source = Path(__file__).parent / "ollama_render" / "main.go"
    env = {"GOCACHE": str(binary.parent / "cache"), "GO111MODULE": "off", "HOME": str(binary.parent),
           "PATH": "/usr/bin:/bin"}
    subprocess.run([go, "build", "-o", str(binary), str(source)], check=True, env=env)

    def render(template: str, conversations: list) -> list[str]:
        done = subprocess.run([str(binary)], input=json.dumps(
            {"template": template, "conversations": conversations}), capture_output=True,
            text=True, check=True)
        return json.loads(done.stdout)

    return render


@pytest.mark.parametrize("family", ollama.FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("prefix, default", [("", ""), ("<|begin_of_text|>", "You are kind.")])
def test_go_template_renders_like_its_python_mirror(go_render, family, prefix, default):
    go = go_render(ollama.go_template(family, prefix, default), CONVERSATIONS)
    assert go == [ollama.render_family(family, c, prefix, default) for c in CONVERSATIONS]


@pytest.mark.parametrize("kind", KINDS)
def test_modelfile_template_renders_like_the_chat_template(go_render, kind, tmp_path):
    model_dir = make_tiny_arch(kind, tmp_path / kind)
    render = export.chat_renderer(model_dir)
    found = ollama.find_family(render)
    assert found is not None, f"no Ollama template family reproduces {kind}'s chat template"
    family, prefix, default = found
    go = go_render(ollama.go_template(family, prefix, default), CONVERSATIONS)
    assert go == [render(c) for c in CONVERSATIONS]


@pytest.mark.parametrize("template, default", [(CHATML_TEMPLATE, ""), (SMOLLM_TEMPLATE, None)])
def test_chatml_default_system_prompt_is_kept(go_render, template, default):
    def render(messages):
        return ollama.render_chat(template, messages)

    family, prefix, found = ollama.find_family(render)
    assert family.name == "chatml" and prefix == ""
    if default is None:
        assert found == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    else:
        assert found == default
    go = go_render(ollama.go_template(family, prefix, found), CONVERSATIONS)
    assert go == [render(c) for c in CONVERSATIONS]


def test_unknown_chat_format_is_left_to_ollama():
    def render(messages):
        return "".join(f"### {m['role']}: {m['content']}\n" for m in messages) + "### assistant:"

    assert ollama.find_family(render) is None
    lines, info = ollama.modelfile_lines("m.gguf", "x", render, ["</s>"], "")
    assert info["template"] == "from-gguf" and not any(ln.startswith("TEMPLATE") for ln in lines)
