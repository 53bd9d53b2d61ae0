"""The C decode step (csrc/decode.c, a separate implementation by design) against model.py's full forward.

Random models whose every part matters (test_fast's `_textured`: norms away from 1, non-zero Linear biases; MoE:
8 experts top-2 plus a shared one, with a correction bias large enough to change which experts are picked), a
1,100-token prompt, then 20 tokens fed one at a time to `FastDecoder` at positions 1,100-1,119 (past the 1,024
positions its attention scratch first holds). Each step's logits are compared with those of one uncached forward
over the whole sequence, at every ISA level this machine executes.

Tolerances, relative to the largest |logit|:
- fp32, 1e-5: both sides compute in fp32 and differ only in summation order (the C kernels' SIMD dot products and
  sums against oneDNN/MKL GEMMs and SDPA over all 1,120 positions); measured <= 1e-6.
- bf16, 1.5e-2: each side rounds to bf16 (2^-8 relative) where its own PyTorch path does, and those places differ
  (the C step follows the cached decode path, the reference is a prefill: SDPA's bf16 output, 1,120-row GEMMs), so
  the logits of the bf16 lm_head differ by about one bf16 step of the largest logit; measured <= 7e-3.
A C step that ignored any of the textures would be off by far more: the test checks that zeroing the correction
bias alone (the subtlest: it only changes some expert choices) moves the reference logits by over twice the
tolerance (measured: 4e-2).
"""

from __future__ import annotations

import pytest
import torch
from test_fast import _textured

from ernie45 import native
from ernie45.device import cpu_has_fast_bf16

PROMPT, STEPS = 1100, 20
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def two_threads():
    """The C kernels split their work over threads: run them as a 2-core machine does."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


def _corrections(m) -> list[torch.Tensor]:
    return [layer.mlp.moe_statics.e_score_correction_bias for layer in m.model.layers if layer.is_moe]


def _model(name: str, dtype: torch.dtype):
    m = _textured(name, dtype, None)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bias in _corrections(m):
            bias.copy_(0.3 * torch.randn(bias.shape, generator=g))
    return m


def _full_forward(m, ids: torch.Tensor):
    """Logits (T, V) fp32 of one uncached forward, and a cache holding its K/V rows of every position."""
    cache = m.new_cache(1, ids.shape[1])
    with torch.inference_mode():
        logits = m(ids, cache=cache).logits[0].float()  # no mask, nothing cached before: plain causal SDPA
    return logits, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_c_step_matches_the_full_forward_past_1024_positions(name, dtype):
    from ernie45.fast import FastDecoder

    if dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX): the bf16 reference forward would be emulated")
    isas = [isa for isa in native.levels() if native.load("decode", isa) is not None]
    if not isas:
        pytest.skip("no C compiler: the C decode step is not built here")
    m = _model(name, dtype)
    ids = torch.randint(3, 1000, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(4))
    ref, cache = _full_forward(m, ids)
    ref = ref[PROMPT:]  # (STEPS, V): the next-token logits after each fed token
    tol = TOL[dtype] * ref.abs().max().item()
    for isa in isas:
        dec = FastDecoder.attach(m, isa=isa)
        assert dec is not None
        cache.length = PROMPT  # the prompt's rows stay; each step writes its own row, then reads rows <= it
        with torch.inference_mode():
            out = torch.cat([dec(ids[:, PROMPT + i : PROMPT + i + 1], cache) for i in range(STEPS)])
        torch.testing.assert_close(out, ref, rtol=0, atol=tol, msg=lambda msg, isa=isa: f"{isa}: {msg}")

    if name == "tiny-moe":  # the tolerance would catch a C step that ignored the correction bias
        with torch.no_grad():
            for bias in _corrections(m):
                bias.zero_()
        unbiased = _full_forward(m, ids)[0][PROMPT:]
        assert (unbiased - ref).abs().max().item() > 2 * tol
