"""CPUs without AVX512-BF16/AMX (acted out with ERNIE45_ISA): bf16 models multiply in fp32 (`UpcastLinear`),
dtype="auto" picks fp32, and nothing changes where the CPU has fast bf16."""

import pytest
import torch
from torch import nn

from ernie45.checkpoint import build_model, load_checkpoint, save_checkpoint
from ernie45.config import preset
from ernie45.device import cpu_has_fast_bf16, cpu_info, isa_level, resolve_dtype
from ernie45.errors import ErnieError
from ernie45.fast import UpcastLinear, optimize_for_inference
from ernie45.generation import generate

IDS = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny_bf16(name: str = "tiny") -> nn.Module:
    m = build_model(preset(name), torch.bfloat16)
    m.init_weights(seed=0)
    return m.eval()


@pytest.mark.parametrize(
    "value,level",
    [(None, "native"), ("native", "native"), ("avx2", "avx2"), ("x86-64-v3", "avx2"), ("generic", "generic"),
     ("x86-64-v2", "generic"), ("AVX2", "avx2")],
)
def test_isa_level(value, level, monkeypatch):
    if value is None:
        monkeypatch.delenv("ERNIE45_ISA", raising=False)
    else:
        monkeypatch.setenv("ERNIE45_ISA", value)
    assert isa_level() == level
    if level != "native":
        assert not cpu_has_fast_bf16()
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_unknown_isa_level_is_an_error(monkeypatch):
    monkeypatch.setenv("ERNIE45_ISA", "avx9000")
    with pytest.raises(ErnieError, match="ERNIE45_ISA.*native, avx2"):
        isa_level()


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_bf16_without_fast_bf16_upcasts_linears(name, monkeypatch):
    monkeypatch.setenv("ERNIE45_ISA", "avx2")
    m = tiny_bf16(name)
    plain = [mod for mod in m.modules() if type(mod) is nn.Linear]
    weights = {id(mod.weight) for mod in plain}
    with torch.no_grad():
        ref = m(IDS).logits.float()
        ref_tokens = generate(m, IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        n = optimize_for_inference(m, native=False)
        out = m(IDS).logits.float()
        tokens = generate(m, IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    upcast = [mod for mod in m.modules() if isinstance(mod, UpcastLinear)]
    assert n == len(upcast) == len(plain) > 0
    assert not any(type(mod) is nn.Linear for mod in m.modules())
    assert {id(mod.weight) for mod in upcast} == weights  # the same bf16 tensors, no copy
    assert all(mod.weight.dtype == torch.bfloat16 and mod.weight.is_contiguous() for mod in upcast)
    if m.config.tie_word_embeddings:
        assert m.lm_head.weight is m.model.embed_tokens.weight
    if m.config.is_moe:
        assert type(m.model.layers[1].mlp.gate).__name__ == "Router"  # the fp32 router stays
    # fp32 maths rounded once instead of bf16 products: within bf16 rounding of the reference
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    assert torch.equal(tokens, ref_tokens)


def test_upcast_linear_matches_fp32_product(monkeypatch):
    import ernie45.quant.kernels as kernels

    monkeypatch.setattr(kernels, "TILE_WEIGHTS", 64 * 32)  # tiles of 64 rows over 200 outputs
    lin = nn.Linear(32, 200).bfloat16()
    up = UpcastLinear(lin)
    for rows in (1, 4, 5, 37):
        x = torch.randn(rows, 32).bfloat16()
        with torch.no_grad():
            y = up(x)
            ref = nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16()
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 200)
        torch.testing.assert_close(y, ref, rtol=8e-3, atol=1e-3)


def test_nothing_upcast_with_native_isa(monkeypatch):
    monkeypatch.setenv("ERNIE45_ISA", "native")
    flags = cpu_info().get("flags", "").split()
    fast = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_fast_bf16() == fast
    m = tiny_bf16()
    optimize_for_inference(m, native=False)
    assert any(isinstance(mod, UpcastLinear) for mod in m.modules()) == (not fast)


def test_fp32_model_is_never_upcast(monkeypatch):
    monkeypatch.setenv("ERNIE45_ISA", "avx2")
    m = build_model(preset("tiny"), torch.float32)
    optimize_for_inference(m, native=False)
    assert not any(isinstance(mod, UpcastLinear) for mod in m.modules())


@pytest.mark.parametrize("mode", ["wint8", "wint4"])
def test_auto_dtype_keeps_quantized_bf16_checkpoints_as_stored(mode, tmp_path, monkeypatch):
    """Without fast bf16, `auto` loads float checkpoints in fp32 but a quantized bf16 one as stored: its float
    rest (embedding, head) is what decode streams, and no path multiplies in emulated bf16 (prefill widens
    quantized tiles to fp32, bf16 Linears are `UpcastLinear`s)."""
    from ernie45.quant import quantize_model

    m = tiny_bf16()
    quantize_model(m, mode, progress=False)
    save_checkpoint(m, tmp_path)
    monkeypatch.setenv("ERNIE45_ISA", "avx2")
    loaded = load_checkpoint(tmp_path, dtype="auto", device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.bfloat16
    assert load_checkpoint(tmp_path, dtype="float32", device="cpu").dtype == torch.float32
