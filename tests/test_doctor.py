"""`tuneline doctor` on llama.cpp: which CPU features the build has, and whether it only fits the
CPU it was built on or crashes on this one (native build + AMX, ggml-org/llama.cpp#20824)."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands import doctor

NATIVE = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
          "AVX512 = 1 | AVX512_VBMI = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
          "REPACK = 1 | ")
PORTABLE = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
            "AVX512 = 0 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AMX_CPU = {"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}


def test_compiled_features_lists_only_those_switched_on():
    assert doctor.compiled_features(PORTABLE) == ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA",
                                                  "BMI2", "LLAMAFILE", "OPENMP", "REPACK"]


def test_native_build_on_an_amx_cpu_is_a_fix_that_names_the_crash():
    check = doctor.check_llama(NATIVE, AMX_CPU)
    assert not check.ok
    assert "AVX512" in check.detail and "AMX_INT8" in check.detail and "crash" in check.detail
    assert "scripts/setup.sh" in check.fix


def test_native_build_without_amx_is_still_flagged_as_not_portable():
    check = doctor.check_llama(NATIVE, {"avx2", "avx512f"})
    assert not check.ok and "native build" in check.detail and "crash" not in check.detail


def test_portable_build_on_an_amx_cpu_passes_with_a_warning():
    check = doctor.check_llama(PORTABLE, AMX_CPU)
    assert check.ok and check.warn and "amx_tile" in check.detail
    assert "[warn] llama.cpp build" in doctor.render(doctor.DoctorReport(checks=[check]))


def test_portable_build_on_a_plain_cpu_is_ok_without_warning():
    check = doctor.check_llama(PORTABLE, {"avx2"})
    assert check.ok and not check.warn


def test_unloadable_llama_cpp_is_a_fix():
    assert not doctor.check_llama("", set()).ok


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_int8\nbugs\t\t: \n")
    assert doctor.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_tile", "amx_int8"}
    assert doctor.cpu_flags(tmp_path / "absent") == set()  # macOS: no /proc


def test_doctor_report_names_the_llama_cpp_build_features():
    report = doctor.run(Path(__file__).resolve().parents[1] / "params.yaml")
    assert "AVX2" in report.facts["llama.cpp build"] or "METAL" in report.facts["llama.cpp build"]
    assert "convert_hf_to_gguf.py ready" in report.facts["GGUF converter"]  # setup.sh --dev
    assert any(c.name == "llama.cpp build" for c in report.checks)
