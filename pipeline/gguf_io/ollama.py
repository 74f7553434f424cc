"""Ollama's Modelfile: a Go-template TEMPLATE that renders conversations exactly like the
model's chat template, for the chat formats people tune (ChatML, Llama 2 and Mistral [INST],
Llama 3, Gemma, Phi-3).

Each format is one `Family` of text pieces; the Go template and its Python mirror are both made
from those pieces, the mirror is compared with the chat template (jinja2) on probe conversations
at export, and tests/test_ollama_template.py renders the Go template with Go's text/template as
Ollama does and compares again. Templates that refuse a system role (Mistral, Gemma) get the
system prompt merged into the first user turn, as the train stage encodes it
(pipeline/training/model.py `fit_system_turn`). A format none of these families reproduce gets
no TEMPLATE (Ollama then guesses from the GGUF's chat template) and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Messages = Sequence[dict[str, str]]
# Probe conversations: the Ollama TEMPLATE must render them exactly like the chat template.
PROBES = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
     {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
)
S, C = "\x00S\x00", "\x00C\x00"  # placeholders for the system prompt and a message's content


@dataclass(frozen=True)
class Family:
    name: str
    user: str  # a user turn, C = its content
    assistant: str  # an assistant turn
    generation: str  # what opens the assistant's answer
    system: str | None  # the system block (S = prompt); None: merged into the first user turn
    merge: str = f"{S}\n\n{C}"  # first user content when the system is merged
    next_user_prefix: str = ""  # before every user turn but the first (Llama 2's <s>)


def _chatml(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def _header(role: str, text: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"


FAMILIES = (
    Family("chatml", _chatml("user", C), _chatml("assistant", C), "<|im_start|>assistant\n",
           _chatml("system", S)),
    Family("llama3", _header("user", C), _header("assistant", C),
           "<|start_header_id|>assistant<|end_header_id|>\n\n", _header("system", S)),
    Family("mistral", f"[INST] {C} [/INST]", f"{C}</s>", "", None),
    Family("llama2", f"[INST] {C} [/INST]", f" {C} </s>", "", None,
           merge=f"<<SYS>>\n{S}\n<</SYS>>\n\n{C}", next_user_prefix="<s>"),
    Family("gemma", f"<start_of_turn>user\n{C}<end_of_turn>\n",
           f"<start_of_turn>model\n{C}<end_of_turn>\n", "<start_of_turn>model\n", None),
    Family("phi3", f"<|user|>\n{C}<|end|>\n", f"<|assistant|>\n{C}<|end|>\n", "<|assistant|>\n",
           f"<|system|>\n{S}<|end|>\n"),
)


def go_template(family: Family, prefix: str = "", default_system: str = "") -> str:
    """The family as an Ollama TEMPLATE (Go text/template over .System and .Messages)."""
    def go(piece: str) -> str:
        return piece.replace(S, "{{ $.System }}").replace(C, "{{ .Content }}")

    out = prefix
    if family.system is not None:
        fallback = f"{{{{ else }}}}{family.system.replace(S, default_system)}" if default_system else ""
        out += f"{{{{ if .System }}}}{go(family.system)}{fallback}{{{{ end }}}}"
        user = go(family.user)
    else:
        merged = family.merge.replace(S, "{{ $.System }}").replace(C, "{{ .Content }}")
        user = (f"{{{{ if and $first $.System }}}}{go(family.user.replace(C, merged))}"
                f"{{{{ else }}}}{go(family.user)}{{{{ end }}}}")
    if family.next_user_prefix:
        user = f"{{{{ if not $first }}}}{family.next_user_prefix}{{{{ end }}}}{user}"
    return (f"{out}{{{{ $first := true }}}}{{{{ range .Messages }}}}"
            f"{{{{ if eq .Role \"user\" }}}}{user}{{{{ $first = false }}}}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{go(family.assistant)}{{{{ end }}}}"
            f"{{{{ end }}}}{family.generation}")


def render_family(family: Family, messages: Messages, prefix: str = "",
                  default_system: str = "") -> str:
    """What Ollama renders from `go_template`: .System is the system messages joined."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text, first = prefix, True
    if family.system is not None and (system or default_system):
        text += family.system.replace(S, system or default_system)
    for m in messages:
        if m["role"] == "user":
            user = family.user
            if family.system is None and first and system:
                user = user.replace(C, family.merge.replace(S, system))
            text += ("" if first else family.next_user_prefix) + user.replace(C, m["content"])
            first = False
        elif m["role"] == "assistant":
            text += family.assistant.replace(C, m["content"])
    return text + family.generation


def find_family(render: Callable[[Messages], str]) -> tuple[Family, str, str] | None:
    """The family (with the text before it, e.g. a BOS the tokenizer does not add, and the
    default system prompt the template inserts) that renders every probe like `render`."""
    first = render(list(PROBES[0]))
    for family in FAMILIES:
        user_head = family.user.split(C)[0]
        system_head = family.system.split(S)[0] if family.system is not None else None
        default = ""
        if system_head is not None and system_head in first:
            at = first.find(system_head)
            tail = family.system.split(S)[1]  # type: ignore[union-attr]
            end = first.find(tail, at + len(system_head))
            default = first[at + len(system_head):end] if end >= 0 else ""
        elif user_head in first:
            at = first.find(user_head)
        else:
            continue
        prefix = first[:at]
        for candidate in {default, ""}:
            if all(render(list(p)) == render_family(family, p, prefix, candidate) for p in PROBES):
                return family, prefix, candidate
    return None


def render_chat(template: str, messages: Messages, bos: str = "", eos: str = "") -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


def modelfile_lines(gguf_name: str, name: str, render: Callable[[Messages], str],
                    stops: list[str], system_prompt: str) -> tuple[list[str], dict[str, Any]]:
    """The Modelfile's lines and what the report records about them."""
    lines = [f"# Ollama: ollama create {name} -f Modelfile && ollama run {name}",
             f"FROM ./{gguf_name}"]
    found = find_family(render)
    if found is not None:
        family, prefix, default = found
        lines.append(f'TEMPLATE """{go_template(family, prefix, default)}"""')
        kind = family.name
    else:
        lines.append("# TEMPLATE: taken by Ollama from the GGUF's tokenizer.chat_template")
        kind = "from-gguf"
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return lines, {"from": gguf_name, "template": kind, "stop": stops}
