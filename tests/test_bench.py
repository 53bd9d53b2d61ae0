"""`ernie45 bench` on the tiny shape: the JSON rows and Markdown table it writes, the bytes-per-token floor, errors;
the a3b shape and its `--layers`, and the streaming random-checkpoint writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ernie45.bench import decode_bytes_per_token
from ernie45.bench import main as bench_main
from ernie45.bench_checkpoints import SHAPES
from ernie45.checkpoint import build_model
from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError

FIELDS = ("engine", "shape", "dtype", "prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb",
          "floor_decode_tok_s")


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
        assert 0 < r["load_s"] < 120
    assert "skipped" in rows[("transformers", "wint8")]  # transformers has no wint8
    assert data["meta"]["bandwidth_gbs"] > 0 and data["meta"]["prompt_len"] == 16 and data["meta"]["rounds"] == 2
    assert all(r["isa"] == "native" for r in data["rows"]) and rows[("ernie45", "fp32")]["env"]["ERNIE45_ISA"] == "native"
    table = out_md.read_text()
    ratio = rows[("ernie45", "fp32")]["decode_tok_s"] / rows[("transformers", "fp32")]["decode_tok_s"]
    assert "| tiny | fp32 | native | transformers |" in table and f"{ratio:.2f}×" in table
    assert "| TTFT ms | load s | peak RSS MB |" in table
    assert table in capsys.readouterr().out
    # the wint8 row loaded a checkpoint quantized once into the workdir, output head and token embedding included
    # (like q8_0 GGUF); the directory name is not the one of older caches, which kept the embedding in float
    qdir = tmp_path / "w" / "ernie45-bench-tiny-wint8e"
    qc = ErnieConfig.from_pretrained(qdir).quantization_config
    assert qc["mode"] == "wint8" and "lm_head" not in qc["modules_to_not_convert"] and qc["embedding"] == "int8"
    assert not (tmp_path / "w" / "ernie45-bench-tiny-wint8").exists()


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
    from ernie45.bench_checkpoints import make_checkpoint

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
    from ernie45.bench_isa import parse_llama_cpp

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
    from ernie45.bench_isa import isa_env, normalize_isa

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
                    ttft_s=0.001, load_s=2.5, peak_rss_mb=300.0, floor_decode_tok_s=1000.0, bandwidth_gbs=10.0,
                    **kw)

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
    assert "| load s | peak RSS MB |" in lines[3]
    assert next(ln for ln in lines if "| native | ernie45 |" in ln).endswith("| 1 | 2.5 | 300 |")  # TTFT, load, RSS
    assert "ISA levels: native = the best kernels this CPU runs; avx2 = x86-64-v3 kernels, AVX-512 off, on this CPU." in md
    assert next(ln for ln in lines if "| native | llama.cpp |" in ln).split(" | ")[6] == "2.00×"
    assert next(ln for ln in lines if "| avx2 | llama.cpp |" in ln).split(" | ")[6] == "1.50×"
    assert next(ln for ln in lines if "| generic | llama.cpp |" in ln).split(" | ")[6] == "—"  # never across levels
    assert "| tiny | wint4 (fp32 act) | avx2 | ernie45 |" in md and "| tiny | wint4 | native | ernie45 |" in md
    assert ("llama.cpp: llama-cpp-python 0.3.1 built for native; llama-cpp-python 0.3.36 built for avx2; "
            "llama-cpp-python 0.3.36 built for generic.") in md


# ---- the a3b shape and --layers --------------------------------------------------------------------------
def test_a3b_shape_is_ernie_45_21b_a3b():
    from ernie45.bench_checkpoints import shape_config

    cfg = shape_config("a3b")
    assert cfg.model_type == "ernie4_5_moe" and cfg.is_moe
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2560, 20, 4, 128)
    assert cfg.intermediate_size == 12288 and cfg.vocab_size == 103424 and cfg.tie_word_embeddings
    assert (cfg.moe_num_experts, cfg.moe_k, cfg.moe_intermediate_size, cfg.moe_num_shared_experts) == (64, 6, 1536, 2)
    assert cfg.rope_theta == 500000.0 and cfg.moe_layer_start_index == 1
    # default: 3 layers, one dense and two MoE
    assert cfg.num_hidden_layers == 3 and cfg.moe_layer_end_index == 2
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    # the same layer shapes as the library's 21B-A3B preset
    from ernie45.config import preset

    full = preset("21b-a3b")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts", "vocab_size"):
        assert getattr(cfg, key) == getattr(full, key), key


def test_layers_sets_depth_and_moe_end():
    from ernie45.bench_checkpoints import checkpoint_name, shape_config

    for n in (1, 2, 5, 28):
        cfg = shape_config("a3b", n)
        assert cfg.num_hidden_layers == n and cfg.moe_layer_end_index == n - 1
        assert [cfg.is_moe_layer(i) for i in range(n)] == [i >= 1 for i in range(n)]
    full = shape_config("a3b", 28)
    # the whole model: ~21.8B parameters, ~3B active per token
    model = build_model(full, torch.bfloat16, meta=True)
    total = sum(p.numel() for p in model.parameters())
    assert 21.7e9 < total < 21.9e9
    assert checkpoint_name("a3b") == "ernie45-bench-a3b-3l" and checkpoint_name("a3b", 28) == "ernie45-bench-a3b-28l"
    assert checkpoint_name("tiny") == "ernie45-bench-tiny"
    assert shape_config("tiny", 7).num_hidden_layers == SHAPES["tiny"]["num_hidden_layers"]  # a3b only


@pytest.mark.parametrize("argv, message", [
    (["--shape", "a3b", "--layers", "0"], r"--layers must be in 1\.\.28 for a3b, got 0"),
    (["--shape", "a3b", "--layers", "29"], r"--layers must be in 1\.\.28"),
    (["--shape", "tiny", "--layers", "4"], "--layers applies to --shape a3b only"),
])
def test_bad_layers_are_one_line_errors(argv, message):
    with pytest.raises(ErnieError, match=message):
        bench_main(argv + ["--vs", "none"])


def _small_a3b(**kw):
    """The a3b layout (dense first layer, routed + shared experts, tied head) at a tenth of the width."""
    from ernie45.bench_checkpoints import shape_config

    cfg = shape_config("a3b", 3)
    return cfg.replace(vocab_size=512, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, moe_num_experts=8, moe_k=2, moe_intermediate_size=32, **kw)


def test_streaming_generator_writes_a_loadable_bf16_checkpoint(tmp_path):
    from ernie45.bench_checkpoints import init_std, write_random_checkpoint
    from ernie45.checkpoint import load_checkpoint
    from ernie45.checkpoint_read import read_header

    cfg = _small_a3b()
    path = write_random_checkpoint(cfg, str(tmp_path / "ckpt"), "bfloat16", seed=3, max_shard_size="200KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()  # sharded on the way
    assert (tmp_path / "ckpt" / "tokenizer.model").is_file()
    saved = ErnieConfig.from_pretrained(path)
    assert saved.to_dict() == cfg.replace(torch_dtype="bfloat16").to_dict()
    # stored as the model holds it: bf16 weights, fp32 router and correction bias, no separate (tied) lm_head
    stored = {}
    for f in sorted((tmp_path / "ckpt").glob("*.safetensors")):
        header, _ = read_header(str(f))
        stored.update({k: v for k, v in header.items() if k != "__metadata__"})
    assert "lm_head.weight" not in stored
    assert stored["model.layers.1.mlp.gate.weight"]["dtype"] == "F32"
    assert stored["model.layers.2.mlp.moe_statics.e_score_correction_bias"]["dtype"] == "F32"
    assert stored["model.layers.1.mlp.experts.7.down_proj.weight"]["dtype"] == "BF16"
    assert stored["model.layers.1.mlp.shared_experts.up_proj.weight"]["shape"] == [64, 64]  # 2 shared x 32
    model = load_checkpoint(path, dtype="bfloat16", device="cpu")
    ref = build_model(cfg, torch.bfloat16, meta=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}
    sd = model.state_dict()
    assert torch.equal(sd["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert not sd["model.layers.1.mlp.moe_statics.e_score_correction_bias"].any()
    w = sd["model.layers.1.mlp.experts.0.gate_proj.weight"].float()
    assert abs(w.std().item() - init_std(cfg)) < 0.1 * init_std(cfg) and abs(w.mean().item()) < 0.005
    assert not torch.equal(w, sd["model.layers.1.mlp.experts.1.gate_proj.weight"].float())  # own stream each
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    # seeded: the same config and seed write the same bytes
    again = write_random_checkpoint(cfg, str(tmp_path / "again"), "bfloat16", seed=3, tokenizer=False,
                                    max_shard_size="200KB")
    for f in sorted((tmp_path / "ckpt").glob("*.safetensors")):
        assert (Path(again) / f.name).read_bytes() == f.read_bytes()


def test_streaming_generator_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Each tensor is produced, written and dropped (a 42 GB a3b must fit a 24 GB machine): when the next one is
    made, at most the previous one is still referenced (by the writer's loop variable)."""
    import gc
    import weakref

    import ernie45.bench_checkpoints as bench
    from ernie45.bench_checkpoints import write_random_checkpoint

    alive: list[weakref.ref] = []
    most = 0
    real = bench.random_tensor

    def tracked(spec, std, seed, chunk=1 << 22):
        nonlocal most
        gc.collect()
        most = max(most, sum(r() is not None for r in alive))
        t = real(spec, std, seed, chunk=64)  # a small chunk: the fill loop runs many times
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(bench, "random_tensor", tracked)
    write_random_checkpoint(_small_a3b(), str(tmp_path / "c"), "bfloat16", tokenizer=False)
    assert len(alive) > 50 and most <= 1


def test_make_checkpoint_is_cached_per_shape_and_layers(tmp_path, monkeypatch):
    import ernie45.bench_checkpoints as bench

    calls = []
    monkeypatch.setattr(bench, "write_random_checkpoint",
                        lambda cfg, path, dtype, **kw: calls.append((cfg.num_hidden_layers, dtype))
                        or (Path(path).mkdir(parents=True) or (Path(path) / "config.json").write_text("{}")))
    a = bench.make_checkpoint("a3b", str(tmp_path), 2)
    assert bench.make_checkpoint("a3b", str(tmp_path), 2) == a  # cached
    b = bench.make_checkpoint("a3b", str(tmp_path), 4)
    t = bench.make_checkpoint("tiny", str(tmp_path))
    assert a != b and calls == [(2, "bfloat16"), (4, "bfloat16"), (2, "float32")]  # a3b is bf16 on disk
    assert Path(t).name == "ernie45-bench-tiny"


def test_bench_serve_table_and_bad_args():
    """`ernie45 bench serve`: its rows as Markdown (ratios computed, every section present) and one-line errors."""
    from ernie45.bench_serve import main as serve_main
    from ernie45.bench_serve import to_markdown as serve_markdown

    base = dict(shape="0.3b", dtype="bf16", threads=2)
    rows = [
        dict(base, kind="generate", decode_tok_s=50.0, peak_rss_mb=900.0),
        dict(base, kind="concurrency", concurrency=1, output_tok_s=45.0, per_stream_tok_s=47.5, ttft_p50_ms=30.0,
             ttft_p90_ms=40.0, itl_p50_ms=21.0, itl_p99_ms=25.0, generate_tok_s=50.0, server_peak_rss_mb=1000.0),
        dict(base, kind="stall", streams=4, long_prompt=4000, idle_itl_ms=20.0, max_itl_during_ms=50.0,
             prefill_s=3.0, ratio=2.5, server_peak_rss_mb=1000.0),
        dict(base, kind="multi-turn", turns=4, prefix=1500, turn_len=10, first_ttft_ms=1000.0, later_ttft_ms=40.0,
             hit_rate=0.9, prefix_caching=True, server_peak_rss_mb=1000.0),
        dict(base, kind="context", kv_dtype="int8", step_ms={"1024": 20.0, "131072": 60.0}, kv_bytes=2**30,
             peak_rss_mb=2000.0),
    ]
    table = serve_markdown(rows, dict(machine="m", threads=2, torch="2", date="d", input_len=128, output_len=128))
    assert "| 0.3b | bf16 | c1 | 45.0 | 47.5 | 0.95× | 30 / 40 | 21.0 / 25.0 | 1000 |" in table
    assert "| 0.3b | bf16 | 4000 | 3.0 | 20.0 | — | 50.0 | 2.5× |" in table
    assert "| 0.3b | bf16 | on | 1000 | 40 | 0.04 | 90% | 1000 |" in table
    assert "| 0.3b | bf16 | int8 | 20.0 | 60.0 | 1.00 GiB | 2000 |" in table
    for argv, msg in ((["--concurrency", "0"], "--concurrency"), (["--dtype", "int3"], "unknown dtype"),
                      (["--context", "1k"], "--context"), (["--output-len", "1"], "--output-len")):
        with pytest.raises(ErnieError, match=msg):
            serve_main(argv)


def test_bench_grammar_mask_rows_and_errors(tmp_path):
    """`ernie45 bench grammar`: one mask row per vocabulary and grammar (the walks stay inside each grammar), the
    table and JSON written; bad arguments are one-line errors."""
    out, js = tmp_path / "g.md", tmp_path / "g.json"
    assert bench_main(["grammar", "--steps", "30", "--shape", "none", "--out", str(out), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["vocab"].split()[0], r["grammar"]) for r in rows] == [
        (v, g) for v in ("4,096", "103,424")
        for g in ("json_schema (16 records)", "forced tool call (2 tools)", "json_object", "regex (date)")
    ]
    assert all(r["mean_us"] > 0 and r["p99_us"] > 0 and r["compile_ms"] > 0 and r["steps"] == 30 for r in rows)
    assert "| 103,424 (ERNIE 4.5 size) | json_schema (16 records) |" in out.read_text()
    with pytest.raises(ErnieError, match="--steps must be at least 10"):
        bench_main(["grammar", "--steps", "3", "--shape", "none"])


@pytest.mark.parametrize("argv", [["--speculative", "nope"], ["speculative", "--speculative", "nope"]])
def test_speculative_bench_is_reached_by_both_spellings(argv):
    """`ernie45 bench --speculative M` and `ernie45 bench speculative --speculative M` are the same command: both
    reach its own argument check (a bad method is a one-line error, before any model is built)."""
    from ernie45.errors import ErnieError

    with pytest.raises(ErnieError, match="unknown speculative method 'nope'"):
        bench_main(argv)


def test_speculative_bench_rows_per_draft_vocabulary(tmp_path):
    """`--draft-vocab-size all,N`: a cost row per size on each shape (the MTP layer over the head's first N rows),
    an mtp acceptance row per size on the bundled model at the same fraction of its vocabulary (1,298 of 4,096 for
    32,768 of ERNIE's 103,424), greedy tokens unchanged, and the projection read from the matching cost row."""
    import json

    from ernie45.errors import ErnieError

    js, out = tmp_path / "s.json", tmp_path / "s.md"
    bench_main(["speculative", "--shape", "tiny", "--speculative", "mtp", "--num-speculative-tokens", "1",
                "--draft-vocab-size", "all,32768", "--steps", "2", "--max-new-tokens", "8",
                "--workdir", str(tmp_path / "w"), "--json", str(js), "--out", str(out)])
    rows = json.loads(js.read_text())["rows"]
    cost = [r for r in rows if r["kind"] == "cost"]
    acc = [r for r in rows if r["kind"] == "acceptance"]
    assert [r["draft_vocab"] for r in cost] == ["all", "32768"] and all(r["draft_ms"] > 0 for r in cost)
    assert [(r["draft_vocab"], r["model_draft_vocab"]) for r in acc] == [("all", 4096), ("32768", 1298)]
    assert all(r["server_drafted"] > 0 and 0 <= r["server_accepted"] <= r["server_drafted"] for r in acc)
    text = out.read_text()
    assert "The same drafts through the serving engine" in text and "| mtp | ernie-tiny-moe | 1 | 32768 |" in text
    assert "| mtp | ernie-tiny-moe | 1 | 32768 (1298) |" in text and "| tiny | bf16 | C | 1 | 32768 |" in text \
        or "| tiny | bf16 | PyTorch | 1 | 32768 |" in text
    with pytest.raises(ErnieError, match="--draft-vocab-size"):
        bench_main(["speculative", "--shape", "none", "--draft-vocab-size", "all,x"])


def test_speculative_bench_quantized_rows_time_a_quantized_mtp_layer(tmp_path):
    """`--dtype bf16,wint4`: rows per dtype, the wint4 ones on the checkpoint `quantized_checkpoint` writes with the
    random MTP layer quantized as `ernie45 quantize` quantizes a checkpoint's (int4 Linears the C GEMV reads), and a
    projection per shape and dtype."""
    import json

    from ernie45.bench_speculative import _bench_model, attach_random_mtp
    from ernie45.quant.linear import Int4Linear

    js, out = tmp_path / "s.json", tmp_path / "s.md"
    bench_main(["speculative", "--shape", "tiny", "--dtype", "bf16,wint4", "--speculative", "ngram",
                "--num-speculative-tokens", "1", "--steps", "2", "--max-new-tokens", "8",
                "--workdir", str(tmp_path / "w"), "--json", str(js), "--out", str(out)])
    rows = json.loads(js.read_text())["rows"]
    assert [(r["kind"], r["dtype"]) for r in rows if r["kind"] != "acceptance"] == [
        ("cost", "bf16"), ("cost", "wint4"), ("measured", "bf16"), ("measured", "wint4")]
    assert "| projected on tiny bf16 | projected on tiny wint4 |" in out.read_text()
    model = _bench_model("tiny", "wint4", str(tmp_path / "w"))
    attach_random_mtp(model)
    assert type(model.model.mtp_block[0].mlp.up_proj) is Int4Linear
    assert type(model.model.mtp_linear_proj[0]) is Int4Linear
    # the quantized checkpoint alone is enough (the whole 21B-A3B's 44 GB bf16 source is deleted after quantizing)
    import shutil

    from ernie45.errors import ErnieError

    shutil.rmtree(tmp_path / "w" / "ernie45-bench-tiny")
    assert _bench_model("tiny", "wint4", str(tmp_path / "w")).config.num_hidden_layers == 2
    assert not (tmp_path / "w" / "ernie45-bench-tiny").exists()
    with pytest.raises(ErnieError, match="--layers must be in 1..28"):
        bench_main(["speculative", "--shape", "none", "--layers", "29"])


def test_results_record_the_command_without_local_paths():
    """A results file records how to rerun it, not this machine's work directory."""
    from ernie45.bench import recorded_command

    assert recorded_command("speculative", ["--shape", "0.3b", "--workdir", "/somewhere", "--workdir=/x", "--out",
                                            "o.md"]) == "ernie45 bench speculative --shape 0.3b --out o.md"
