"""The integer prefill product (csrc/qmm.c): int4 / int8 weights times activations quantized per row, used where
prefill would otherwise multiply dequantised fp32 tiles (CPUs without fast bf16).

- every ISA level this machine runs gives the same bits (AVX2 VPMADDUBSW, VNNI VPDPBUSD/VPDPWSSD, the plain C loops);
- the result equals a PyTorch model of the documented arithmetic to fp32 rounding;
- its error against the exact product is what activation rounding allows (int4: int8 per group; int8: int16 per row);
- the kernel is chosen from what the machine reports, and a quantized model's prefill through it stays within the
  activation rounding of the dequantising path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model, save_hf

from ernie45 import native
from ernie45.checkpoint import load_checkpoint
from ernie45.device import cpu_has_fast_bf16
from ernie45.native_abi import W_I4, W_I8, qmm, qmm_simd
from ernie45.quant import kernels, quantize_model
from ernie45.quant.kernels import pack_int4_rowmajor
from ernie45.quant.linear import Int4Linear, Int8Linear

LEVELS = [lv for lv in native.levels() if lv != "neon"] or ["native"]
needs_c = pytest.mark.skipif(native.load("qmm") is None, reason="no C compiler for the kernels")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def int4_case(m: int, n: int, k: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[0, : min(k // 2, 40)] = 0.0  # zeros (a whole group where k allows): step 0, no division
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.02 + 0.005
    zero = torch.randn(n, k // g, generator=gen) * 0.01
    return x, q, scale, zero


def int4_model(x, q, scale, zero, g) -> torch.Tensor:
    """The documented arithmetic in float64: per group, x -> a = round(x * 127 / amax) (nearest even), then
    scale * d * sum((q - 8) * a) + zero * sum(x)."""
    m, k = x.shape
    n, ng = q.shape[0], k // g
    xg = x.view(m, ng, g)
    amax = xg.abs().amax(-1)
    inv = torch.full_like(amax, 127.0) / amax  # one rounding, as 127.f / amax (`127.0 / amax` is 127 * (1 / amax))
    a = torch.round(xg * torch.where(amax > 0, inv, torch.zeros_like(amax))[..., None])
    s = torch.einsum("mgk,ngk->mng", a.double(), q.view(n, ng, g).double() - 8)
    return (s * (scale.double()[None] * (amax.double() / 127)[:, None])).sum(-1) + xg.sum(-1).double() @ zero.double().t()


def int4_exact(x, q, scale, zero, g) -> torch.Tensor:
    n, k = q.shape
    w = ((q.double().view(n, k // g, g) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(n, k)
    return x.double() @ w.t()


@needs_c
@pytest.mark.parametrize("m,n,k,g", [(1, 3, 32, 32), (7, 50, 256, 32), (9, 96, 384, 128), (5, 49, 128, 64),
                                     (300, 100, 512, 256), (260, 97, 256, 128)])
def test_int4_levels_agree_bit_for_bit_and_match_the_arithmetic(m, n, k, g):
    x, q, scale, zero = int4_case(m, n, k, g, seed=m * 1000 + n)
    packed = pack_int4_rowmajor(q)
    ys = {lv: qmm(x, W_I4, packed, scale, zero, g, isa=lv) for lv in LEVELS}
    first = ys[LEVELS[0]]
    assert first.shape == (m, n) and first.dtype == torch.float32
    for lv, y in ys.items():
        assert torch.equal(y, first), lv
    ref = int4_model(x, q, scale, zero, g)
    assert float((first - ref).abs().max() / ref.abs().max()) < 2e-6
    # int8 activations per group: within ~1 % of the exact product (Gaussian x, groups of 32..256)
    assert rel(first, int4_exact(x, q, scale, zero, g)) < 0.015


@needs_c
@pytest.mark.parametrize("m,n,k,g", [(1, 5, 16, 0), (7, 50, 256, 0), (5, 40, 4608, 0), (10, 17, 8208, 0),
                                     (6, 49, 128, 32), (9, 33, 1024, 32)])
def test_int8_levels_agree_bit_for_bit_and_are_near_exact(m, n, k, g):
    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // 32, generator=gen) if g else torch.rand(n, generator=gen)
    ys = {lv: qmm(x, W_I8, w, scale, None, g, isa=lv) for lv in LEVELS}
    first = ys[LEVELS[0]]
    for lv, y in ys.items():
        assert torch.equal(y, first), lv
    wf = (w.double().view(n, -1, 32) * scale.double()[..., None]).view(n, k) if g else w.double() * scale.double()[:, None]
    exact = x.double() @ wf.t()
    # int16 activations with one step per row (blocks of 4096 columns summed exactly in int32: K 4608, 8208 cross it)
    assert float((first - exact).abs().max() / exact.abs().max()) < 1e-4


@needs_c
def test_shapes_it_does_not_take_fall_back():
    x = torch.randn(3, 96)
    q = pack_int4_rowmajor(torch.randint(0, 16, (8, 96)))
    s, z = torch.rand(8, 2), torch.zeros(8, 2)
    assert qmm(x, W_I4, q, s, z, 48) is None  # groups must be whole 32-byte vectors
    w = torch.randint(-127, 128, (8, 40), dtype=torch.int8)
    assert qmm(torch.randn(3, 40), W_I8, w, torch.rand(8), None, 0) is None  # K % 16
    assert qmm(torch.randn(0, 96), W_I4, q, torch.rand(8, 3), torch.zeros(8, 3), 32).shape == (0, 8)


def test_kernel_choice_follows_what_the_machine_reports(monkeypatch):
    """qmm takes prefill-sized products exactly where the fallback would multiply fp32 tiles and it is vectorised."""
    for isa in ("native", "avx2"):
        monkeypatch.setenv("ERNIE45_ISA", isa)
        if isa not in native.levels():
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, kernels.INT8PACK_MAX_ROWS, 16, kernels.QMM_MAX_ROWS_FAST_BF16, 64):
                x = torch.randn(rows, 256).to(dtype)
                # more rows than a decode step, vectorised, and either fp32 tiles or few enough rows that
                # dequantising the whole weight would cost more
                want = (rows > kernels.INT8PACK_MAX_ROWS and qmm_simd() > 0
                        and (kernels.matmul_dtype(x) == torch.float32 or rows <= kernels.QMM_MAX_ROWS_FAST_BF16))
                pack8 = kernels.choose_kernel("wint8", x, 128, 256) == "int8pack"
                assert (kernels.choose_kernel("wint8", x, 128, 256) == "qmm") == (want and not pack8), (isa, rows)
                int4pack = kernels.choose_kernel("wint4", x, 128, 256, 64) == "int4pack"
                assert (kernels.choose_kernel("wint4", x, 128, 256, 64) == "qmm") == (want and not int4pack)
                # a row-major int4 weight (the C decode step attached) never takes PyTorch's int4 kernel; on a fast-bf16
                # CPU its decode-shaped products are prefill pieces (decoding runs in C) and take qmm too
                few = cpu_has_fast_bf16() and qmm_simd() > 0 and rows <= kernels.INT8PACK_MAX_ROWS
                assert kernels.choose_kernel("wint4", x, 128, 256, 64, rowmajor=True) == (
                    "qmm" if want or few else "dequant")
                with kernels.use_kernel("wint4", "dequant"):
                    assert kernels.choose_kernel("wint4", x, 128, 256, 64) != "qmm"


@needs_c
@pytest.mark.parametrize("mode", ["wint4", "wint8"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_model_prefill_through_qmm_stays_near_the_dequantising_path(mode, kind, tmp_path):
    hf = make_hf_model(kind)
    save_hf(hf, tmp_path)
    model = load_checkpoint(tmp_path, dtype="float32")
    quantize_model(model, mode, group_size=32 if mode == "wint4" else None)
    quantized = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert quantized
    for m in quantized:  # the portable layout qmm reads (an AVX-512 CPU would switch to PyTorch's int4 kernel's)
        m.keep_rowmajor = True
    ids = torch.randint(3, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with kernels.use_kernel(mode, "dequant"):
            ref = model(ids).logits
        with kernels.use_kernel(mode, "qmm"):
            got = model(ids).logits
    assert got.shape == ref.shape
    assert rel(got, ref) < (0.03 if mode == "wint4" else 1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8  # random tiny nets: near-ties
