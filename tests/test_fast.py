"""Inference-only module swaps: pre-packed bf16 Linears give bit-identical logits and greedy tokens."""

import pytest
import torch

from ernie45.checkpoint import build_model
from ernie45.config import preset
from ernie45.fast import PackedLinear, _can_pack, optimize_for_inference
from ernie45.generation import generate


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_packed_bf16_is_bit_identical(name):
    m = build_model(preset(name), torch.bfloat16)
    m.init_weights(seed=0)
    m.eval()
    if not _can_pack(m):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
        ref_tokens = generate(m, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        n = optimize_for_inference(m)
        out = m(ids).logits
        tokens = generate(m, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    linears = sum(isinstance(x, PackedLinear) for x in m.modules())
    assert n == linears > 0
    if m.config.is_moe:
        assert type(m.model.layers[1].mlp.gate).__name__ == "Router"  # the fp32 router is never packed
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_packed_fp32_matches_within_summation_order(name):
    m = build_model(preset(name), torch.float32)
    m.init_weights(seed=0)
    m.eval()
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
        ref_tokens = generate(m, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert optimize_for_inference(m) > 0
        out = m(ids).logits
        tokens = generate(m, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)


def test_noop_in_fp16():
    m = build_model(preset("tiny"), torch.float16)
    assert optimize_for_inference(m) == 0
