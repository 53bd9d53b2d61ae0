"""Quantization (ernie45.quant): tensor quantizers, kernels, modules, calibration, model swap, checkpoints, CLI.

Error bounds stated here (relative Frobenius error against fp32; Gaussian weights, std 0.05):
- weights, per layer: wint8 <= 0.8 %, wint4 <= 9 % (g64) / 10 % (g128);
- Linear outputs: wint8 <= 1 %, llm.int8 <= 1.5 %, wint4 / nf4 <= 11 %;
- logits of the tiny random models below (3-4 layers, weights std 0.08, fp32) on text: wint8 / llm.int8 <= 5 %
  (7 % calibrated with KL), wint4 / nf4 <= 40 %, with top-1 agreement >= 90 % / 50 % (random nets amplify
  per-layer error; see docs/quantize.md for perplexity on a trained model);
- LLM.int8() vs bitsandbytes `Linear8bitLt(threshold=6.0)` on the same weights and inputs: <= 0.1 % with
  fp16-representable data and clean outlier columns, <= 1.5 % in general (bitsandbytes rounds through fp16 and
  keeps sub-threshold values of outlier columns in its row scales).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model, save_hf
from torch import nn

import ernie45
from ernie45.cli import main as cli_main
from ernie45.device import cpu_has_fast_bf16
from ernie45.errors import ErnieError
from ernie45.native_abi import qmm_simd
from ernie45.quant import MODES, kernels, prepare_for_load, quantizable_linears, quantize_model
from ernie45.quant.calibrate import collect_stats, kl_clip, load_calibration_samples, percentile_clip
from ernie45.quant.linear import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    LLMInt8Linear,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    rel_error,
)
from ernie45.quant.nf4 import nf4_linear_class

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
DOCS = Path(__file__).resolve().parents[1] / "docs"
CALIB_TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "ERNIE 4.5 is a family of large language models. Hello world!",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "Knowledge is power. 知识就是力量。 Time flies like an arrow.",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
]
# widths divisible by 64 everywhere, so every mode (wint4 g64 included) applies
DENSE_Q = dict(intermediate_size=128, head_dim=16)
MOE_Q = dict(intermediate_size=128, moe_intermediate_size=64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def gaussian_linear(n_in: int = 256, n_out: int = 96, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


def make_quant(mode: str, lin: nn.Linear, dtype: torch.dtype = torch.float32, group_size: int = 64):
    if mode == "wint8":
        return Int8Linear.from_float(lin, dtype)
    if mode == "wint4":
        return Int4Linear.from_float(lin, dtype, group_size)
    if mode == "llm.int8":
        return LLMInt8Linear.from_float(lin, dtype)
    return nf4_linear_class().from_float(lin, dtype)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("quant")
    return {
        "dense": save_hf(make_hf_model("dense", **DENSE_Q), root / "dense", tokenizer_dir),
        "moe": save_hf(make_hf_model("moe", bias_scale=0.3, **MOE_Q), root / "moe", tokenizer_dir),
    }


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


IDS = torch.tensor(
    [[5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 200, 33], [9, 8, 7, 6, 5, 4, 3, 100, 101, 102, 103, 1]]
)


# ---- tensor quantizers ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_per_channel_error_and_exact_scales(dtype):
    w = gaussian_linear().weight.detach()
    q, s = quantize_int8_per_channel(w, dtype)
    assert q.dtype == torch.int8 and s.dtype == dtype and s.shape == (96,)
    assert int(q.abs().amax(1).min()) >= 126  # every row uses the full range
    deq = q.float() * s.float()[:, None]
    assert rel(deq, w) <= 0.008
    assert ((deq - w).abs() <= 0.51 * s.float()[:, None]).all()  # round to nearest step of the stored scale


@pytest.mark.parametrize("group_size,bound", [(64, 0.09), (128, 0.10)])
def test_int4_groupwise_error_packing_and_clip_search(group_size, bound, monkeypatch):
    w = gaussian_linear(n_in=512).weight.detach()
    packed, scale, zero = quantize_int4_groupwise(w, group_size, torch.float32)
    assert (
        packed.shape == (96, 256) and packed.dtype == torch.uint8 and scale.shape == (96, 512 // group_size)
    )
    q = kernels.unpack_int4_rowmajor(packed)
    assert torch.equal(kernels.pack_int4_rowmajor(q), packed) and int(q.max()) <= 15
    deq = kernels.dequantize_int4(
        packed, scale, zero, group_size, kernels.ROWMAJOR_INT4_LAYOUT, torch.float32
    )
    assert rel(deq, w) <= bound
    # per group, the clip search is never worse than plain min/max
    import ernie45.quant.linear as qlin

    monkeypatch.setattr(qlin, "INT4_CLIP_RATIOS", (1.0,))
    p1, s1, z1 = quantize_int4_groupwise(w, group_size, torch.float32)
    plain = kernels.dequantize_int4(p1, s1, z1, group_size, kernels.ROWMAJOR_INT4_LAYOUT, torch.float32)
    err = (deq - w).square().view(96, -1, group_size).sum(-1)
    err_plain = (plain - w).square().view(96, -1, group_size).sum(-1)
    assert (err <= err_plain + 1e-12).all() and err.sum() < err_plain.sum()


@pytest.mark.skipif(
    not kernels.int4pack_usable(torch.device("cpu"), 64, 128, 64), reason="no CPU int4 kernel"
)
@pytest.mark.parametrize("n", [16, 48, 64, 80, 192])
def test_cpu_int4_layout_inverts(n):
    g = torch.Generator().manual_seed(n)
    packed = kernels.pack_int4_rowmajor(torch.randint(0, 16, (n, 128), generator=g))
    cpu = kernels.to_cpu_int4_layout(packed)
    assert cpu.shape == packed.shape and not torch.equal(cpu, packed)
    assert torch.equal(kernels.from_cpu_int4_layout(cpu), packed)


# ---- modules and kernels --------------------------------------------------------------------------
@pytest.mark.parametrize("mode,bound", [("wint8", 0.01), ("wint4", 0.11), ("llm.int8", 0.015), ("nf4", 0.11)])
def test_quantized_linear_output_error(mode, bound):
    lin = gaussian_linear()
    q = make_quant(mode, lin)
    assert (q.in_features, q.out_features) == (256, 96) and q.bias is not None
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == ref.shape and rel(y, ref) <= bound
    # the module computes with the weight dequantize() returns (up to activation rounding: int8 for llm.int8,
    # bf16 inside the CPU int4 kernel)
    with torch.no_grad():
        y_deq = F.linear(x, q.dequantize(torch.float32), lin.bias)
    assert rel(y, y_deq) <= {"llm.int8": 0.012, "wint4": 0.01}.get(mode, 2e-3)


def expected_kernel(mode: str, x: torch.Tensor, n: int, k: int, group_size: int) -> str:
    """The kernel `choose_kernel` must pick, from what this machine reports (no assumption about its ISA)."""
    rows = x.shape[0]
    # the integer prefill product where the fallback would multiply fp32 tiles and the machine vectorises it
    fallback = ("qmm" if rows > kernels.INT8PACK_MAX_ROWS and qmm_simd() > 0
                and (kernels.matmul_dtype(x) == torch.float32 or rows <= kernels.QMM_MAX_ROWS_FAST_BF16)
                else "dequant")
    if mode == "wint8":
        pack = x.dtype == torch.bfloat16 and kernels.cpu_vector_isa() and kernels._int8pack_probe(x.dtype)
        return "int8pack" if pack and rows <= kernels.INT8PACK_MAX_ROWS else fallback
    if mode == "wint4":
        # above INT4PACK_MAX_ROWS only a native bf16 dequant + matmul beats the int4 kernel
        native_bf16_fallback = x.dtype == torch.bfloat16 and cpu_has_fast_bf16()
        wins = rows <= kernels.INT4PACK_MAX_ROWS or not native_bf16_fallback
        return "int4pack" if kernels.int4pack_usable(x.device, n, k, group_size) and wins else fallback
    return "int_mm" if kernels._int_mm_probe("cpu") else "float"


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 80, 200])
def test_fast_kernels_agree_with_fallbacks(dtype, rows, isa, monkeypatch):
    monkeypatch.setenv("ERNIE45_ISA", isa)
    lin = gaussian_linear(n_in=256, n_out=128)
    x = torch.randn(rows, 256).to(dtype)
    # the fallback multiplies in fp32 wherever bf16 matmuls would be emulated
    assert kernels.matmul_dtype(x) == (dtype if cpu_has_fast_bf16() else torch.float32)
    for mode, fallback in (("wint8", "dequant"), ("wint4", "dequant"), ("llm.int8", "float")):
        q = make_quant(mode, lin, dtype)
        with torch.no_grad():
            with kernels.use_kernel(mode, fallback):
                y_ref = q(x)
            y = q(x)
            chosen = kernels.choose_kernel(mode, x, 128, 256, 64)
        assert chosen == expected_kernel(mode, x, 128, 256, 64), (mode, chosen)
        if mode == "llm.int8":  # integer products: exact whichever kernel
            assert torch.equal(y, y_ref)
        else:  # qmm rounds activations to int16 (int8 weights) / int8 per group (int4)
            exact = 1e-4 if chosen == "qmm" else 1e-5
            assert rel(y, y_ref) <= (2e-2 if dtype == torch.bfloat16 or mode == "wint4" else exact), (
                mode,
                chosen,
            )


def test_tiled_mm_holds_one_tile_of_float_weights():
    """`tiled_mm` asks for (and so holds in float) at most `rows` weight rows at a time, last tile short."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 96, generator=g), torch.randn(200, 96, generator=g)
    asked = []

    def weight_rows(i, j):
        asked.append((i, j))
        return w[i:j]

    y = kernels.tiled_mm(x, 200, weight_rows, torch.float32, rows=64)
    assert asked == [(0, 64), (64, 128), (128, 192), (192, 200)]
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-6, atol=1e-5)
    assert kernels.tile_rows(103_424, 1024) * 1024 <= kernels.TILE_WEIGHTS  # a 0.3B lm_head: 1024-row tiles
    assert kernels.tile_rows(48, 64) == 64 and kernels.tile_rows(5000, 1 << 20) == 64  # whole int4 blocks


@pytest.fixture
def avx2_cpu(monkeypatch):
    """Act as an AVX2-only CPU: no fast bf16 (ERNIE45_ISA) and no CPU int4 kernel; tiles of 64 output rows."""
    monkeypatch.setenv("ERNIE45_ISA", "avx2")
    monkeypatch.setattr(kernels, "_int4pack_probe", lambda: False)
    monkeypatch.setattr(kernels, "TILE_WEIGHTS", 64 * 256)
    tiles = []
    real = kernels.tiled_mm

    def spy(x2, n, weight_rows, dtype, rows=None):
        def record(i, j):
            w = weight_rows(i, j)
            tiles.append((tuple(w.shape), w.dtype))
            return w

        return real(x2, n, record, dtype, rows)

    monkeypatch.setattr(kernels, "tiled_mm", spy)
    return tiles


@pytest.mark.parametrize("mode", ["wint8", "wint4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_without_fast_bf16_dequantises_fp32_tiles(mode, dtype, avx2_cpu):
    """Where bf16 is emulated, prefill runs the integer product (csrc/qmm.c) where it is vectorised; the
    dequantising fallback (forced here, as on a CPU the kernel does not vectorise) multiplies fp32 tiles."""
    assert not cpu_has_fast_bf16()
    lin = gaussian_linear(n_in=256, n_out=200)  # 200 output rows: three tiles of 64 and one of 8
    q = make_quant(mode, lin, dtype)
    x = torch.randn(2, 40, 256).to(dtype)  # 80 rows: prefill
    assert kernels.choose_kernel(mode, x.view(-1, 256), 200, 256, 64) == ("qmm" if qmm_simd() > 0 else "dequant")
    ref = F.linear(x.float(), q.dequantize(torch.float32), q.bias.float()).to(dtype)  # the whole weight, fp32
    with torch.no_grad():
        y_int = q(x)
        with kernels.use_kernel(mode, "dequant"):
            y = q(x)
    assert y.dtype == y_int.dtype == dtype and y.shape == y_int.shape == (2, 40, 200)
    tiles = avx2_cpu[-4:]
    assert tiles == [((64, 256), torch.float32)] * 3 + [((8, 256), torch.float32)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)  # one bf16 ulp
    torch.testing.assert_close(y, ref, **tol)
    # the integer product: int16 activations (int8 weights) / int8 per group (int4)
    assert rel(y_int, ref) <= (1e-4 if mode == "wint8" and dtype == torch.float32 else 2e-2)
    if mode == "wint4":
        assert q._layout == kernels.ROWMAJOR_INT4_LAYOUT  # no int4 kernel: the portable layout stays


def test_int8pack_guard_rejects_unaligned_weights():
    """`_weight_int8pack_mm` segfaults on unaligned weights; the wrapper must fall back instead."""
    lin = gaussian_linear(n_in=128, n_out=64)
    q, s = quantize_int8_per_channel(lin.weight, torch.bfloat16)
    buf = torch.empty(q.numel() + 64, dtype=torch.int8)
    start = (kernels.ALIGNMENT - buf.data_ptr() % kernels.ALIGNMENT) % kernels.ALIGNMENT + 8
    unaligned = buf[start : start + q.numel()].view(64, 128)
    unaligned.copy_(q)
    x = torch.randn(8, 128).bfloat16()
    assert rel(kernels.int8_weight_mm(x, unaligned, s), kernels.int8_weight_mm(x, q, s)) <= 1e-2


def test_llm_int8_agrees_with_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    k, n, m = 256, 128, 32
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(n, k) * 0.05).half().float())
    ref_mod = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=6.0)
    ref_mod.load_state_dict(lin.state_dict())
    ref_mod = ref_mod.to("cpu").eval()
    ours = LLMInt8Linear.from_float(lin, torch.float32, threshold=6.0)
    cols = [3, 77, 200]
    x = torch.randn(m, k).half().float()
    x[:, cols] = torch.sign(x[:, cols]) * (7 + x[:, cols].abs())  # clean outlier columns
    with torch.no_grad():
        y, y_bnb, y_fp = ours(x), ref_mod(x), lin(x)
    assert rel(y, y_bnb) <= 1e-3
    # mixed columns (some values under the threshold), arbitrary floats: close, and no worse than bitsandbytes
    lin2 = gaussian_linear(k, n, seed=1)
    ref2 = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=6.0)
    ref2.load_state_dict(lin2.state_dict())
    ref2 = ref2.to("cpu").eval()
    x2 = torch.randn(m, k)
    x2[:, cols] *= 8
    with torch.no_grad():
        y2, y2_bnb, y2_fp = LLMInt8Linear.from_float(lin2, torch.float32)(x2), ref2(x2), lin2(x2)
    assert rel(y2, y2_bnb) <= 0.015
    assert rel(y2, y2_fp) <= rel(y2_bnb, y2_fp) * 1.05 and rel(y2, y2_fp) <= 0.012
    assert rel(y, y_fp) <= 0.012


def test_nf4_is_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    lin = gaussian_linear()
    ref = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu").eval()
    ours = nf4_linear_class().from_float(lin, torch.float32).eval()
    assert isinstance(ours, bnb.nn.Linear4bit)
    assert torch.equal(ours.weight.data, ref.weight.data)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_the_input_of_a_frozen_base(mode):
    lin = gaussian_linear()
    q = make_quant(mode, lin)
    x = torch.randn(3, 256, requires_grad=True)
    g = torch.randn(3, 96)
    (q(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref, q.dequantize(torch.float32), lin.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in q.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_forward_matches_cpu_dequantised_product(mode):
    lin = gaussian_linear(256, 128)
    q = make_quant(mode, lin, torch.bfloat16)
    x = torch.randn(32, 256).bfloat16()
    with torch.no_grad():
        want = F.linear(x.float(), q.dequantize(torch.float32), lin.bias)
        got = q.to("cuda")(x.cuda()).float().cpu()
    assert rel(got, want) <= 0.02


# ---- calibration ----------------------------------------------------------------------------------
def _kl_reference(hist: torch.Tensor, levels: int) -> int:
    """Straightforward per-candidate loop of the same KL search (the vectorised one must match it)."""
    best, best_i = float("inf"), None
    h = hist.double()
    for i in range(levels, h.numel() + 1):
        p = h[:i].clone()
        p[-1] += h[i:].sum()
        q = torch.zeros(i, dtype=torch.float64)
        chunk = (torch.arange(i) * levels) // i
        for c in range(levels):
            sel = (chunk == c) & (h[:i] > 0)
            if sel.any():
                q[sel] = h[:i][chunk == c].sum() / sel.sum()
        pn, qn = p / p.sum(), q / q.sum()
        kl = sum(float(a * torch.log(a / max(float(b), 1e-12))) for a, b in zip(pn, qn) if a > 0)
        if kl < best:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize("shape", ["gauss", "laplace_tail"])
def test_kl_clip_matches_reference_loop(shape):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(20000, generator=g).abs()
    if shape == "laplace_tail":
        v = torch.distributions.Laplace(0.0, 1.0).sample((20000,)).abs()
        v[:5] = 40.0  # a few far values stretch the range
    edge = float(v.max())
    hist = torch.histc(v, bins=160, min=0, max=edge).double()
    i = _kl_reference(hist, levels=16)
    assert kl_clip(hist, edge, levels=16, stride=1) == pytest.approx(i * edge / 160)
    assert kl_clip(hist, edge, levels=16, stride=1) < edge
    assert percentile_clip(hist, edge, 100.0) == pytest.approx(edge)


def test_calibration_finds_outlier_columns_deterministically(ckpts, tokenizer_dir):
    model, tok = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
    hot_attn, hot_mlp = [5, 17, 40], [3, 60]
    with torch.no_grad():  # systematic outlier features, as large models have
        model.model.layers[0].input_layernorm.weight[hot_attn] *= 30
        model.model.layers[1].post_attention_layernorm.weight[hot_mlp] *= 30
    samples = load_calibration_samples(CALIB_TEXTS, tok, n_samples=4, max_length=32, bos_token_id=1)
    assert len(samples) == 4 and all(s[0] == 1 and len(s) <= 32 for s in samples)
    targets = quantizable_linears(model, ["lm_head"])
    s1 = collect_stats(model, samples, targets, "kl", 6.0, progress=False)
    s2 = collect_stats(model, samples, targets, "kl", 6.0, progress=False)
    for name in targets:
        assert torch.equal(s1[name].absmax, s2[name].absmax) and torch.equal(s1[name].hist, s2[name].hist)
    q0, up1 = s1["model.layers.0.self_attn.q_proj"], s1["model.layers.1.mlp.up_proj"]
    assert q0.outliers(6.0).tolist() == hot_attn and up1.outliers(6.0).tolist() == hot_mlp
    assert s1["model.layers.2.self_attn.q_proj"].outliers(6.0).numel() == 0
    absmax, pct, kl = (q0.clip(m, 6.0) for m in ("absmax", "percentile", "kl"))
    assert 0 < kl <= absmax and 0 < pct <= absmax and absmax < 6.0

    report = quantize_model(
        model,
        "llm.int8",
        calib=CALIB_TEXTS,
        tokenizer=tok,
        calib_samples=4,
        calib_max_length=32,
        progress=False,
    )
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].outliers == 3
    assert by_name["model.layers.0.self_attn.q_proj"].clip == pytest.approx(kl, rel=1e-2)
    qc = model.config.quantization_config
    assert qc["outlier_columns"]["model.layers.1.mlp.gate_proj"] == 2 and qc["calibration"]["method"] == "kl"
    assert model.model.layers[0].self_attn.q_proj.outlier_idx.tolist() == hot_attn


def test_calibration_file_errors(tmp_path, tokenizer_dir):
    from ernie45.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ErnieError, match="calibration file not found"):
        load_calibration_samples(tmp_path / "nope.jsonl", tok)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ErnieError, match="has no samples"):
        load_calibration_samples(tmp_path / "empty.txt", tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ErnieError, match=r"bad.jsonl:2: not valid JSON"):
        load_calibration_samples(tmp_path / "bad.jsonl", tok)
    (tmp_path / "nofield.jsonl").write_text('{"label": 1}\n', encoding="utf-8")
    with pytest.raises(ErnieError, match="no text field"):
        load_calibration_samples(tmp_path / "nofield.jsonl", tok)
    with pytest.raises(ErnieError, match="calib-samples must be >= 1"):
        load_calibration_samples(tmp_path / "empty.txt", tok, n_samples=0)
    recs = [
        {"text": "Hello world!"},
        {"prompt": "你好", "response": "世界"},
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
        "The fox",
    ]
    (tmp_path / "ok.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8"
    )
    got = load_calibration_samples(tmp_path / "ok.jsonl", tok, n_samples=3)
    assert got[0] == tok.encode("Hello world!") and got[1] == tok.encode("你好世界") and len(got) == 3
    chat = tok.apply_chat_template(recs[2]["messages"], add_generation_prompt=False)
    assert got[2] == tok.encode(chat)


# ---- whole models ---------------------------------------------------------------------------------
def test_swap_leaves_router_bias_norms_embeddings_and_head_alone(ckpts):
    from ernie45.model import MoE, RMSNorm, Router

    model, _ = ernie45.load(ckpts["moe"], dtype="bfloat16", device="cpu")
    before = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "gate.weight" in k
        or "norm" in k
        or "embed" in k
        or "correction_bias" in k
        or k.startswith("lm_head")
    }
    quantize_model(model, "wint4", progress=False)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE) and type(moe.gate) is Router and moe.gate.weight.dtype == torch.float32
    assert moe.moe_statics.e_score_correction_bias.dtype == torch.float32
    assert all(
        isinstance(e.gate_proj, Int4Linear) and isinstance(e.down_proj, Int4Linear) for e in moe.experts
    )
    assert isinstance(moe.shared_experts.up_proj, Int4Linear)
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.norm, RMSNorm)
    left = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert left == ["lm_head"]
    assert model.config.quantization_config["group_size"] == 64  # auto: 128 does not divide hidden 64
    with pytest.raises(ErnieError, match="already quantized"):
        quantize_model(model, "wint8", progress=False)


# (logits error, top-1 agreement) vs the fp32 model on text; "+kl": calibrated on that text (measured: dense /
# MoE 2.0/3.9 %, 28/29 %, 2.9/3.6 %, 4.5/5.2 %, 30/28 %)
E2E_BOUNDS = {
    "wint8": (0.05, 0.9),
    "wint4": (0.40, 0.5),
    "llm.int8": (0.05, 0.9),
    "llm.int8+kl": (0.07, 0.88),
    "nf4": (0.40, 0.5),
}


def text_ids(tok) -> torch.Tensor:
    ids = [[1] + tok.encode(t) for t in CALIB_TEXTS]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])  # (6, n)


@pytest.mark.parametrize("kind,variant", [(k, v) for k in ("dense", "moe") for v in E2E_BOUNDS])
def test_end_to_end_error_and_reload_gives_identical_logits(kind, variant, ckpts, tmp_path):
    from ernie45.checkpoint import save_checkpoint

    ref, tok = ernie45.load(ckpts[kind], dtype="float32", device="cpu")
    x = text_ids(tok)
    ref_logits = logits_of(ref, x)
    model, _ = ernie45.load(ckpts[kind], dtype="float32", device="cpu")
    kw = {"calib": CALIB_TEXTS, "calib_max_length": 32} if variant.endswith("+kl") else {}
    quantize_model(model, variant.split("+")[0], tokenizer=tok, progress=False, **kw)
    logits = logits_of(model, x)
    max_err, min_top1 = E2E_BOUNDS[variant]
    assert rel(logits, ref_logits) <= max_err
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= min_top1
    save_checkpoint(model, tmp_path / "q", tokenizer=tok)
    loaded, _ = ernie45.load(tmp_path / "q", dtype="float32", device="cpu")  # no flag: config.json says how
    assert loaded.config.quantization_config == model.config.quantization_config
    assert torch.equal(logits_of(loaded, x), logits_of(model, x))
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


@pytest.mark.parametrize("mode", ["wint8", "wint4", "llm.int8"])
def test_bf16_reload_is_bit_identical(mode, ckpts, tmp_path):
    from ernie45.checkpoint import save_checkpoint

    model, tok = ernie45.load(ckpts["moe"], dtype="bfloat16", device="cpu")
    quantize_model(model, mode, progress=False)
    expected = logits_of(model, IDS)
    save_checkpoint(model, tmp_path / "q", tokenizer=tok)
    loaded, _ = ernie45.load(tmp_path / "q", dtype="bfloat16", device="cpu")
    assert torch.equal(logits_of(loaded, IDS), expected)


def test_quantized_tied_head_is_untied(ckpts, tmp_path):
    from ernie45.checkpoint import save_checkpoint

    model, tok = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
    assert model.config.tie_word_embeddings
    emb = model.model.embed_tokens.weight.detach().clone()
    report = quantize_model(model, "wint8", quantize_lm_head=True, progress=False)
    assert isinstance(model.lm_head, Int8Linear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, emb) and "lm_head" in {r.name for r in report.layers}
    save_checkpoint(model, tmp_path / "q", tokenizer=tok)
    loaded, _ = ernie45.load(tmp_path / "q", dtype="float32", device="cpu")
    assert isinstance(loaded.lm_head, Int8Linear) and not loaded.config.tie_word_embeddings
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


# ---- the int8 token embedding (quantize_embedding) ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_embedding_forward_equals_the_dequantized_lookup(dtype):
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(300, 96, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(300, 96, generator=g) * torch.rand(300, 1, generator=g))
        emb.weight[5] = 0  # an all-zero row: the scale clamps to `tiny`
        emb.weight[6, 3] = 40.0  # an outlier: that row alone gets a coarse scale
    emb = emb.to(dtype)
    stats: dict = {}
    m = Int8Embedding.from_float(emb, dtype, stats=stats)
    q, s = quantize_int8_per_channel(emb.weight, dtype)  # wint8's quantizer, one scale per vocabulary row
    assert m.weight.dtype == torch.int8 and torch.equal(m.weight, q) and torch.equal(m.weight_scale, s)
    assert (m.num_embeddings, m.embedding_dim, m.padding_idx, m.compute_dtype) == (300, 96, 0, dtype)
    table = m.dequantize()
    assert table.dtype == dtype and torch.equal(table, (q.float() * s.float()[:, None]).to(dtype))
    assert torch.equal(m.dequantize(torch.float32), q.float() * s.float()[:, None])
    ids = torch.randint(0, 300, (3, 11), generator=g)
    ids[0, :3] = torch.tensor([5, 6, 299])
    out = m(ids)
    assert out.shape == (3, 11, 96) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, table))
    assert torch.equal(m(ids[0, 4]), table[ids[0, 4]])  # a 0-d index
    assert torch.equal(out[0, 0], torch.zeros(96, dtype=dtype))
    w = emb.weight.detach().float()
    deq = m.dequantize(torch.float32)
    assert rel_error(stats) == pytest.approx(float((deq - w).norm() / w.norm()), rel=1e-4)
    assert rel_error(stats) < 0.02  # the outlier row dominates


def test_quantize_embedding_needs_the_tied_head_quantized(ckpts, tmp_path):
    """Tied embeddings: the head must be quantized too (from the float embedding, then untied), else ErnieError;
    nf4 is refused; untied embeddings need no head."""
    from ernie45.checkpoint import save_checkpoint
    from ernie45.quant.cli import quantize_checkpoint

    model, tok = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
    assert model.config.tie_word_embeddings
    for kw in ({}, {"quantize_lm_head": True, "skip": ["lm_head"]}):
        with pytest.raises(ErnieError, match=r"tied to the output head.*quantize_lm_head=True"):
            quantize_model(model, "wint8", quantize_embedding=True, progress=False, **kw)
    assert not model.config.quantization_config and type(model.model.embed_tokens) is nn.Embedding
    with pytest.raises(ErnieError, match="not nf4"):
        quantize_model(model, "nf4", quantize_embedding=True, quantize_lm_head=True, progress=False)
    with pytest.raises(ErnieError, match="needs quantize_lm_head"):
        quantize_checkpoint(ckpts["dense"], tmp_path / "x", "wint4", quantize_embedding=True, progress=False)
    assert not (tmp_path / "x").exists()

    emb = model.model.embed_tokens.weight.detach().clone()
    ref = logits_of(model, IDS)
    head_only, _ = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
    report0 = quantize_model(head_only, "wint8", quantize_lm_head=True, progress=False)
    report = quantize_model(model, "wint8", quantize_lm_head=True, quantize_embedding=True, progress=False)
    e = model.model.embed_tokens
    assert type(e) is Int8Embedding and not model.config.tie_word_embeddings
    assert model.config.quantization_config["embedding"] == "int8"
    assert torch.equal(e.weight, quantize_int8_per_channel(emb, torch.float32)[0])
    assert torch.equal(model.lm_head.weight, head_only.lm_head.weight)  # the head as without the embedding
    assert torch.equal(model.lm_head.weight_scale, head_only.lm_head.weight_scale)
    assert report.embedding.name == "model.embed_tokens" and report.embedding.shape == tuple(emb.shape)
    assert report.embedding.rel_error < 0.01 and "token embedding" in report.summary()
    assert report.layers == report0.layers
    assert report.bytes_before == report0.bytes_before + emb.numel() * 4  # the fp32 table
    assert report.bytes_after == report0.bytes_after + emb.numel() + 4 * emb.shape[0]  # int8 + fp32 scale per row
    logits = logits_of(model, IDS)
    assert rel(logits, ref) < 0.05
    save_checkpoint(model, tmp_path / "q", tokenizer=tok)
    loaded, _ = ernie45.load(tmp_path / "q", dtype="float32", device="cpu")  # no flag
    assert type(loaded.model.embed_tokens) is Int8Embedding and not loaded.config.tie_word_embeddings
    assert torch.equal(logits_of(loaded, IDS), logits)

    moe, _ = ernie45.load(ckpts["moe"], dtype="bfloat16", device="cpu")  # untied: the head may stay float
    assert not moe.config.tie_word_embeddings
    quantize_model(moe, "llm.int8", quantize_embedding=True, progress=False)
    assert type(moe.model.embed_tokens) is Int8Embedding and type(moe.lm_head) is nn.Linear
    assert moe.model.embed_tokens.weight_scale.dtype == torch.bfloat16
    save_checkpoint(moe, tmp_path / "moe", tokenizer=tok)
    again, _ = ernie45.load(tmp_path / "moe", dtype="bfloat16", device="cpu")
    assert torch.equal(logits_of(again, IDS), logits_of(moe, IDS))


def _greedy_no_cache(model, ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1].float()
            logits[eos] = float("-inf")
            out.append(int(logits.argmax()))
    return out[len(ids) :]


def _stepped_and_full_logits(model, seq: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits for positions prompt_len - 1 .. end - 1 of `seq` (1, T): a prefill then one cached step per
    token, and one uncached forward over the whole sequence."""
    with torch.inference_mode():
        cache = model.new_cache(1, seq.shape[1])
        steps = [model(seq[:, :prompt_len], cache=cache).logits[0, -1]]
        steps += [model(seq[:, i : i + 1], cache=cache).logits[0, -1] for i in range(prompt_len, seq.shape[1] - 1)]
        full = model(seq).logits[0, prompt_len - 1 : -1]
    return torch.stack(steps).float(), full.float()


def test_greedy_generation_on_quantized_models(ckpts):
    """Cached decoding equals full recomputation: the same greedy tokens, and logits within fp32 summation order.

    fp32 activations take the same kernel both ways (wint8: the dequantising fallback, int8pack being bf16/fp16
    only; wint4: int4pack up to 128 rows on CPUs that have it, else the fallback; llm.int8: `_int_mm`; nf4:
    bitsandbytes), so a step and the full forward differ only in how many rows each product has (GEMM blocking,
    decode attention against SDPA): ~5e-7 of the largest logit measured, bounded at 1e-5. llm.int8 would also
    differ by its per-batch outlier columns, but no activation of this model reaches its threshold."""
    from ernie45.generation import generate

    prompts = [
        [5, 17, 99, 3, 250, 41],
        [300, 12, 64, 200, 33, 9],
        [120, 121, 7, 7, 8, 390],
        [44, 2, 45, 46, 47, 3],
    ]
    ref, _ = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
    eos = ref.config.eos_token_ids
    ref_tokens = [_greedy_no_cache(ref, p, 8, eos) for p in prompts]
    for mode in MODES:
        model, _ = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
        quantize_model(model, mode, progress=False)
        agree_ref = 0
        # one kernel for every row count (the integer prefill product rounds activations, a decode step does not)
        same_kernel = kernels.use_kernel(mode, "dequant") if mode in ("wint8", "wint4") else contextlib.nullcontext()
        with same_kernel:
            for p, want in zip(prompts, ref_tokens):
                with torch.inference_mode():
                    out = generate(model, torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
                got = out[0, len(p) :].tolist()
                assert got == _greedy_no_cache(model, p, 8, eos), mode
                stepped, full = _stepped_and_full_logits(model, out, len(p))
                torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5 * full.abs().max().item(), msg=mode)
                agree_ref += sum(a == b for a, b in zip(got, want))
        if mode in ("wint8", "llm.int8"):
            assert agree_ref >= 0.75 * 32, mode  # close to the float model's own greedy output


def _quantized_tensor_bytes(path: str, names: set[str]) -> tuple[int, int]:
    from ernie45.checkpoint_read import read_header

    header, _ = read_header(os.path.join(path, "model.safetensors"))
    q = other = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        nbytes = v["data_offsets"][1] - v["data_offsets"][0]
        if k.rsplit(".", 1)[0] in names and not k.endswith(".bias"):
            q += nbytes
        else:
            other += nbytes
    return q, other


def test_checkpoint_sizes(tmp_path, tokenizer_dir):
    from ernie45.checkpoint import save_checkpoint

    hf = make_hf_model("dense", hidden_size=128, intermediate_size=256, head_dim=32, num_hidden_layers=2)
    src = save_hf(hf, tmp_path / "src", tokenizer_dir)
    base, tok = ernie45.load(src, dtype="bfloat16", device="cpu")
    shapes = {n: (m.out_features, m.in_features) for n, m in quantizable_linears(base, ["lm_head"]).items()}
    save_checkpoint(base, tmp_path / "bf16", tokenizer=tok)
    bf16_q, bf16_other = _quantized_tensor_bytes(str(tmp_path / "bf16"), set(shapes))
    assert bf16_q == sum(2 * n * k for n, k in shapes.values())
    # int8: 1 byte per weight + a bf16 scale per row; int4: half a byte + a bf16 scale and zero per group;
    # nf4: half a byte + a uint8 absmax per 64 weights + a bf16 nested absmax per 256 blocks + the offset
    expected = {
        "wint8": sum(n * k + 2 * n for n, k in shapes.values()),
        "wint4": sum(n * k // 2 + 4 * n * k // 128 for n, k in shapes.values()),
        "wint4-g64": sum(n * k // 2 + 4 * n * k // 64 for n, k in shapes.values()),
        "nf4": sum(
            n * k // 2 + math.ceil(n * k / 64) + 2 * math.ceil(n * k / 64 / 256) + 2
            for n, k in shapes.values()
        ),
    }
    ratios = {}
    for mode, kw in (
        ("wint8", {}),
        ("wint4", {"group_size": 128}),
        ("wint4-g64", {"group_size": 64}),
        ("nf4", {}),
    ):
        model, _ = ernie45.load(src, dtype="bfloat16", device="cpu")
        quantize_model(model, mode.split("-")[0], progress=False, **kw)
        save_checkpoint(model, tmp_path / mode, tokenizer=tok)
        q, other = _quantized_tensor_bytes(str(tmp_path / mode), set(shapes))
        assert other == bf16_other  # embeddings, norms and biases untouched
        assert q == expected[mode]
        ratios[mode] = bf16_q / q
    assert 1.96 <= ratios["wint8"] <= 2.0
    assert 3.7 <= ratios["wint4"] <= 3.8 and 3.5 <= ratios["wint4-g64"] <= 3.6 and 3.8 <= ratios["nf4"] <= 3.9


def test_prepare_for_load_rejects_foreign_or_future_configs(ckpts):
    from ernie45.checkpoint import build_model
    from ernie45.config import ErnieConfig

    model = build_model(ErnieConfig.from_pretrained(ckpts["dense"]), torch.float32, meta=True)
    with pytest.raises(ErnieError, match="not an ernie45 format"):
        prepare_for_load(model, {"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(ErnieError, match="format 2"):
        prepare_for_load(model, {"quant_method": "ernie45", "format_version": 2, "mode": "wint8"})
    with pytest.raises(ErnieError, match="unknown quantization mode"):
        prepare_for_load(model, {"quant_method": "ernie45", "mode": "int3"})
    with pytest.raises(ErnieError, match="unknown embedding quantization 'int2'"):
        prepare_for_load(model, {"quant_method": "ernie45", "mode": "wint8", "embedding": "int2"})
    with pytest.raises(ErnieError, match="an int4 embedding needs wint4 weights"):
        prepare_for_load(model, {"quant_method": "ernie45", "mode": "wint8", "embedding": "int4"})
    with pytest.raises(ErnieError, match="an int4 head where it is tied"):  # the tied head left float
        prepare_for_load(model, {"quant_method": "ernie45", "mode": "wint4", "group_size": 32, "embedding": "int4"})
    assert model.config.tie_word_embeddings
    with pytest.raises(ErnieError, match="cannot be tied to the output head"):
        prepare_for_load(model, {"quant_method": "ernie45", "mode": "wint8", "embedding": "int8"})
    prepare_for_load(
        model,
        {
            "quant_method": "ernie45",
            "mode": "wint4",
            "group_size": 64,
            "modules_to_not_convert": ["lm_head", "down_proj"],
        },
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear


def test_prepare_for_load_int8_groups_and_module_overrides(ckpts):
    """wint8 checkpoints without a group size load per row as before; `"group_size": 32` (a GGUF's Q8_0) gives
    int8 groups, `module_overrides` other modes per Linear, and an int8 embedding with groups may be tied to an int8
    head of the same groups (only to such a head)."""
    from ernie45.checkpoint import build_model
    from ernie45.config import ErnieConfig
    from ernie45.quant.linear import Int8Embedding, Int8Linear

    config = ErnieConfig.from_pretrained(ckpts["dense"])
    assert config.tie_word_embeddings
    model = build_model(config, torch.float32, meta=True)
    prepare_for_load(model, {"quant_method": "ernie45", "mode": "wint8", "modules_to_not_convert": ["lm_head"]})
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is Int8Linear and q.group_size == 0 and q.weight_scale.shape == (q.out_features,)

    model = build_model(config, torch.float32, meta=True)
    grouped = {"quant_method": "ernie45", "mode": "wint8", "embedding": "int8", "embedding_group_size": 32}
    with pytest.raises(ErnieError, match="cannot be tied to the output head"):  # the head's int8 is per row
        prepare_for_load(model, {**grouped, "modules_to_not_convert": []})
    with pytest.raises(ErnieError, match="module_overrides must map"):
        prepare_for_load(model, {**grouped, "module_overrides": {"lm_head": {"mode": "nf4"}}})
    prepare_for_load(model, {**grouped, "mode": "wint4", "group_size": 32, "modules_to_not_convert": [],
                             "module_overrides": {n: {"mode": "wint8", "group_size": 32}
                                                  for n in ("lm_head", "model.layers.0.mlp.up_proj")}})
    up, emb = model.model.layers[0].mlp.up_proj, model.model.embed_tokens
    assert type(up) is Int8Linear and up.group_size == 32 and up.weight_scale.shape == (up.out_features,
                                                                                         up.in_features // 32)
    assert isinstance(model.model.layers[0].mlp.gate_proj, Int4Linear) and model.lm_head.group_size == 32
    assert type(emb) is Int8Embedding and emb.weight_scale.shape == (emb.num_embeddings, emb.embedding_dim // 32)
    model.tie_weights()
    assert model.lm_head.weight is emb.weight and model.lm_head.weight_scale is emb.weight_scale


# ---- command line ---------------------------------------------------------------------------------
def test_cli_errors_and_interrupted_run(ckpts, tmp_path, tokenizer_dir, monkeypatch, capsys):
    dense = ckpts["dense"]
    odd = save_hf(make_hf_model("dense"), tmp_path / "odd", tokenizer_dir)  # intermediate 96
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", "--model", dense, "--mode", "int3", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    cases = [
        (["--mode", "wint4", "--group-size", "100"], "group size must be one of 32, 64, 128, got 100"),
        (["--mode", "llm.int8", "--calib", str(tmp_path / "none.jsonl")], "calibration file not found"),
        (["--mode", "wint8", "--calib", dense + "/config.json"], "--calib is only used by --mode llm.int8"),
        (["--mode", "llm.int8", "--threshold", "0"], "outlier threshold must be > 0"),
        (["--mode", "wint4", "--group-size", "128"], "input width 64 is not divisible by the group size 128"),
    ]
    for args, msg in cases:
        assert cli_main(["quantize", "--model", dense, "--out", str(tmp_path / "o"), *args]) == 1
        assert msg in capsys.readouterr().err
    assert cli_main(["quantize", "--model", odd, "--mode", "wint4", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert (
        "self_attn.o_proj: input width 96 is not divisible by the group size 64" in err
        and "--skip o_proj" in err
    )
    assert cli_main(["quantize", "--model", dense, "--mode", "wint8", "--out", dense]) == 1
    assert "--out must differ from --model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    import ernie45.convert.safetensors_io

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ernie45.convert.safetensors_io, "write_shards", interrupted)  # both paths write with it
    for mode in ("wint8", "nf4"):  # streamed, in memory
        assert (
            cli_main(["quantize", "--model", dense, "--mode", mode, "--out", str(tmp_path / "o"), "--quiet"])
            == 130
        )
    assert sorted(os.listdir(tmp_path)) == ["odd"]  # no output, no temporary directory left behind


def test_docs_commands_run(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """Run the ```bash and ```python blocks of docs/quantize.md on a tiny model named as in the guide."""
    guide = (DOCS / "quantize.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", guide, flags=re.S)
    zh = (DOCS / "quantize_zh.md").read_text(encoding="utf-8")
    assert re.findall(r"```bash\n(.*?)```", zh, flags=re.S) == blocks
    assert re.findall(r"```python\n(.*?)```", zh, flags=re.S) == re.findall(
        r"```python\n(.*?)```", guide, flags=re.S
    )
    hf = make_hf_model("dense", hidden_size=128, intermediate_size=256, head_dim=32, num_hidden_layers=2)
    save_hf(hf, tmp_path / "ERNIE-4.5-0.3B-PT", tokenizer_dir)
    (tmp_path / "calib.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in CALIB_TEXTS), encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in (ln.strip() for b in blocks for ln in b.splitlines()):
        if not line:
            continue
        argv = shlex.split(line)
        assert argv[0] == "ernie45", line
        if argv[1] == "quantize":
            argv.append("--quiet")
        assert cli_main(argv[1:]) == 0, line
        out = capsys.readouterr().out
        if argv[1] == "quantize":
            assert "wrote" in out and "checkpoint weights:" in out
        ran += 1
    assert ran == 6
    for code in re.findall(r"```python\n(.*?)```", guide, flags=re.S):
        exec(compile(code, "docs/quantize.md", "exec"), {})
    loaded, _ = ernie45.load(tmp_path / "ERNIE-4.5-0.3B-llm-int8-py", device="cpu")
    assert loaded.config.quantization_config["calibration"]["samples"] == len(CALIB_TEXTS)
    for d in (
        "ERNIE-4.5-0.3B-wint8",
        "ERNIE-4.5-0.3B-wint4",
        "ERNIE-4.5-0.3B-llm-int8",
        "ERNIE-4.5-0.3B-nf4",
    ):
        report = json.loads((tmp_path / d / "quantization_report.json").read_text(encoding="utf-8"))
        assert report["layers"] and report["mode"] in d.replace("llm-int8", "llm.int8")
