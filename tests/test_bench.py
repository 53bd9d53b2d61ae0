"""`ernie45 bench` on the tiny shape: the JSON rows and Markdown table it writes, the bytes-per-token floor, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ernie45.bench import SHAPES, decode_bytes_per_token
from ernie45.bench import main as bench_main
from ernie45.checkpoint import build_model
from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError

FIELDS = ("engine", "shape", "dtype", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "floor_decode_tok_s")


@pytest.mark.parametrize("shape", ["0.3b", "moe"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "wint8", "wint4"])
def test_floor_counts_every_weight_read_once(shape, dtype):
    """Dense: every Linear (the tied head once). MoE: attention, the dense layer, top-k + shared experts, router."""
    cfg = ErnieConfig(**SHAPES[shape])
    model = build_model(cfg, torch.float32, meta=True)
    per = {"fp32": 4.0, "bf16": 2.0, "wint8": 1.0, "wint4": 0.5}[dtype]
    expected = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        n = m.weight.numel()
        if ".experts." in name:
            n = n * cfg.moe_k / cfg.moe_num_experts  # only the routed top-k of E experts are read
        expected += n * (4.0 if name.endswith("mlp.gate") else per)  # the fp32 router
    assert decode_bytes_per_token(cfg, dtype) == pytest.approx(expected, rel=1e-3)


def test_bench_writes_rows_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ERNIE45_ISA", raising=False)  # no --isa: the level ernie45 runs at here, native
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = bench_main(["--shape", "tiny", "--dtype", "fp32,wint8", "--vs", "transformers", "--runs", "1", "--rounds", "2",
                     "--prompt-len", "16", "--gen-len", "4", "--threads", "1", "--workdir", str(tmp_path / "w"),
                     "--json", str(out_json), "--out", str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    rows = {(r["engine"], r["dtype"]): r for r in data["rows"]}
    assert set(rows) == {("ernie45", "fp32"), ("transformers", "fp32"), ("ernie45", "wint8"), ("transformers", "wint8")}
    for key in [("ernie45", "fp32"), ("transformers", "fp32"), ("ernie45", "wint8")]:
        r = rows[key]
        assert all(f in r for f in FIELDS), r
        assert r["shape"] == "tiny" and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["ttft_s"] < 60 and r["rounds"] == 2  # engines took turns twice; the row is the median
    assert "skipped" in rows[("transformers", "wint8")]  # transformers has no wint8
    assert data["meta"]["bandwidth_gbs"] > 0 and data["meta"]["prompt_len"] == 16 and data["meta"]["rounds"] == 2
    assert all(r["isa"] == "native" for r in data["rows"]) and rows[("ernie45", "fp32")]["env"]["ERNIE45_ISA"] == "native"
    table = out_md.read_text()
    ratio = rows[("ernie45", "fp32")]["decode_tok_s"] / rows[("transformers", "fp32")]["decode_tok_s"]
    assert "| tiny | fp32 | native | transformers |" in table and f"{ratio:.2f}×" in table
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--shape", "7b"], "unknown shape '7b'"),
    (["--vs", "vllm"], "unknown peer 'vllm'"),
    (["--gen-len", "1"], "--gen-len"),
    (["--rounds", "0"], "--rounds"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ErnieError, match=message):
        bench_main(argv + ["--vs", "none"] if "--vs" not in argv else argv)


# ---- ISA levels ---------------------------------------------------------------------------------------
def _cpu_runs(level: str) -> bool:
    from ernie45 import native

    return native.can_execute(level)


_FAKE_LLAMA = '''
__version__ = "0.0.0-fake"


class Llama:
    def __init__(self, model_path, **kw):
        assert model_path.endswith(".gguf")

    def reset(self):
        pass

    def eval(self, ids):
        pass

    def sample(self, temp=0.0):
        return 3
'''


def test_isa_avx2_rows_run_at_avx2(tmp_path, monkeypatch):
    """Every row of --isa avx2 runs in a worker whose ernie45 and PyTorch kernels are capped at AVX2; llama.cpp
    comes from the --llama-cpp avx2=DIR build (here a stand-in package), never from the native one."""
    if not _cpu_runs("avx2"):
        pytest.skip("this CPU cannot execute AVX2")
    fake = tmp_path / "llama-avx2"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(_FAKE_LLAMA)
    from ernie45.bench import make_checkpoint

    # the stand-in never reads its GGUF (and the tiny shape's vocabulary is smaller than the bundled tokenizer's)
    (Path(make_checkpoint("tiny", str(tmp_path / "w"))) / "bench-q8_0.gguf").write_bytes(b"")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = bench_main(["--shape", "tiny", "--dtype", "wint8", "--vs", "llama.cpp", "--isa", "x86-64-v3",
                     "--llama-cpp", f"avx2={fake}", "--runs", "1", "--prompt-len", "8", "--gen-len", "3",
                     "--threads", "1", "--workdir", str(tmp_path / "w"), "--json", str(out_json), "--out", str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    rows = {r["engine"]: r for r in data["rows"]}
    assert set(rows) == {"ernie45", "llama.cpp"} and all(r["isa"] == "avx2" for r in rows.values())
    for r in rows.values():
        assert "skipped" not in r, r
        assert r["env"] == {"ERNIE45_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
        assert r["aten_capability"] == "AVX2" and r["peak_rss_mb"] > 0
    assert rows["llama.cpp"]["llama_cpp_version"] == "0.0.0-fake"
    # the activation dtype is what dtype="auto" resolves to at that level, in the worker
    monkeypatch.setenv("ERNIE45_ISA", "avx2")
    from ernie45.device import resolve_dtype

    act = {torch.float32: "fp32", torch.bfloat16: "bf16"}[resolve_dtype("auto", torch.device("cpu"))]
    assert rows["ernie45"]["act_dtype"] == act
    assert data["meta"]["isa"]["avx2"] == "x86-64-v3 kernels, AVX-512 off, on this CPU"
    table = out_md.read_text()
    assert "avx2 = x86-64-v3 kernels, AVX-512 off, on this CPU" in table
    assert "| tiny | wint8" in table and "| avx2 | llama.cpp |" in table
    assert "llama-cpp-python 0.0.0-fake built for avx2" in table and str(tmp_path) not in table


def test_non_native_level_without_llama_build_is_skipped(tmp_path):
    level = next((v for v in ("avx2", "generic") if _cpu_runs(v)), None)
    if level is None:
        pytest.skip("this CPU runs neither the avx2 nor the generic level")
    out_json = tmp_path / "r.json"
    bench_main(["--shape", "tiny", "--dtype", "fp32", "--vs", "llama.cpp", "--isa", level, "--runs", "1",
                "--prompt-len", "8", "--gen-len", "2", "--threads", "1", "--workdir", str(tmp_path / "w"),
                "--json", str(out_json)])
    rows = {r["engine"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["llama.cpp"]["isa"] == level
    assert rows["llama.cpp"]["skipped"] == f"no llama.cpp built for {level}: pass --llama-cpp {level}=DIR"
    assert rows["ernie45"]["env"]["ERNIE45_ISA"] == level and "skipped" not in rows["ernie45"]


@pytest.mark.parametrize("level, flags", [("avx2", "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx"),
                                          ("x86-64-v3", "fpu sse sse2 avx avx2 f16c"),
                                          ("generic", "fpu sse sse2")])
def test_level_the_cpu_cannot_execute_is_refused(monkeypatch, level, flags):
    import ernie45.device

    monkeypatch.setattr(ernie45.device, "cpu_info", lambda: {"flags": flags})
    with pytest.raises(ErnieError, match=r"this CPU cannot run the (avx2|generic) level .*missing: "):
        bench_main(["--shape", "tiny", "--vs", "none", "--isa", f"native,{level}"])


def test_llama_cpp_dir_is_validated(tmp_path):
    from ernie45.bench import parse_llama_cpp

    with pytest.raises(ErnieError, match="--llama-cpp avx2=/nonexistent: /nonexistent does not exist"):
        bench_main(["--shape", "tiny", "--vs", "llama.cpp", "--isa", "native", "--llama-cpp", "avx2=/nonexistent"])
    with pytest.raises(ErnieError, match="holds no llama_cpp/ package"):
        parse_llama_cpp([f"avx2={tmp_path}"])
    with pytest.raises(ErnieError, match="LEVEL=DIR"):
        parse_llama_cpp([str(tmp_path)])
    with pytest.raises(ErnieError, match="unknown ISA level 'avx512'"):
        parse_llama_cpp([f"avx512={tmp_path}"])
    (tmp_path / "llama_cpp").mkdir()
    assert parse_llama_cpp([f"x86-64-v3={tmp_path}"]) == {"avx2": str(tmp_path)}


def test_isa_names_and_worker_environment():
    from ernie45.bench import isa_env, normalize_isa

    assert [normalize_isa(v) for v in ("native", "AVX2", "x86-64-v3", "generic", "x86-64-v2")] == [
        "native", "avx2", "avx2", "generic", "generic"]
    with pytest.raises(ErnieError, match="unknown ISA level"):
        bench_main(["--isa", "avx512", "--vs", "none"])
    base = {"PATH": "/bin", "ATEN_CPU_CAPABILITY": "avx2"}
    assert isa_env("native", base) == {"PATH": "/bin", "ERNIE45_ISA": "native"}  # native drops inherited caps
    assert isa_env("generic", base) == {"PATH": "/bin", "ERNIE45_ISA": "generic", "ATEN_CPU_CAPABILITY": "default",
                                        "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def test_markdown_compares_within_one_isa():
    from ernie45.bench import to_markdown

    def row(engine, isa, decode, dtype="fp32", **kw):
        return dict(engine=engine, shape="tiny", dtype=dtype, isa=isa, prefill_tok_s=100.0, decode_tok_s=decode,
                    ttft_s=0.01, peak_rss_mb=300.0, floor_decode_tok_s=1000.0, bandwidth_gbs=10.0, **kw)

    rows = [row("ernie45", "native", 100.0), row("llama.cpp", "native", 50.0, llama_cpp_version="0.3.1"),
            row("ernie45", "avx2", 60.0), row("llama.cpp", "avx2", 40.0, llama_cpp_version="0.3.36"),
            row("llama.cpp", "generic", 30.0, llama_cpp_version="0.3.36"),  # no ernie45 row at generic
            row("ernie45", "avx2", 80.0, dtype="wint4", act_dtype="fp32"),
            row("ernie45", "native", 90.0, dtype="wint4", act_dtype="bf16")]
    meta = dict(machine="Test CPU (avx512f), 2 cores", threads=2, torch="2.x", bandwidth_gbs=10.0, prompt_len=8,
                gen_len=4, runs=1, rounds=1, date="2026-01-01",
                isa={"native": "the best kernels this CPU runs", "avx2": "x86-64-v3 kernels, AVX-512 off, on this CPU"})
    md = to_markdown(rows, meta)
    lines = md.splitlines()
    assert "| shape | dtype | isa | engine |" in md
    assert "ISA levels: native = the best kernels this CPU runs; avx2 = x86-64-v3 kernels, AVX-512 off, on this CPU." in md
    assert next(ln for ln in lines if "| native | llama.cpp |" in ln).split(" | ")[6] == "2.00×"
    assert next(ln for ln in lines if "| avx2 | llama.cpp |" in ln).split(" | ")[6] == "1.50×"
    assert next(ln for ln in lines if "| generic | llama.cpp |" in ln).split(" | ")[6] == "—"  # never across levels
    assert "| tiny | wint4 (fp32 act) | avx2 | ernie45 |" in md and "| tiny | wint4 | native | ernie45 |" in md
    assert ("llama.cpp: llama-cpp-python 0.3.1 built for native; llama-cpp-python 0.3.36 built for avx2; "
            "llama-cpp-python 0.3.36 built for generic.") in md
