"""Inference-only module swaps: pre-packed bf16 Linears give bit-identical logits and greedy tokens."""

import subprocess
import sys

import pytest
import torch

from ernie45 import native
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
        n = optimize_for_inference(m, native=False)  # packing is for where no C decoder runs
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
        assert optimize_for_inference(m, native=False) > 0
        out = m(ids).logits
        tokens = generate(m, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)


def test_no_packed_copy_beside_the_c_decoder():
    """The C decoder reads the plain weights: packing them too would hold a second copy."""
    _native_or_skip()
    m = build_model(preset("tiny"), torch.float32)
    m.init_weights(seed=0)
    w = m.model.layers[0].mlp.up_proj.weight
    assert optimize_for_inference(m) > 0
    assert m.fast_decoder is not None and not any(isinstance(x, PackedLinear) for x in m.modules())
    assert type(m.model.layers[0].mlp.up_proj).__name__ == "DnnLinear"
    assert m.model.layers[0].mlp.up_proj.weight is w  # the C decoder's weight, not a copy


def test_noop_in_fp16():
    m = build_model(preset("tiny"), torch.float16)
    assert optimize_for_inference(m) == 0


# ---- the C decode step (ernie45/csrc/decode.c) -------------------------------------------------------------
# every ISA level this machine can execute (native, and on x86-64 the AVX2 and generic builds): each kernel test
# runs once per level, so an AVX-512 machine also checks the AVX2 kernels and the plain C reference loops
ISAS = native.levels()


def _native_or_skip(isa="native"):
    lib = native.load("decode", isa)
    if lib is None or (isa == "native" and lib.ernie_simd_width() < 128):
        pytest.skip(f"no C compiler, or no {isa} build: the C decode step is not built here")
    return lib


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


def _quantized(name, dtype, mode, quantize_embedding=False):
    m = build_model(preset(name), dtype)
    m.init_weights(seed=0)
    m.eval()
    if mode:
        from ernie45.quant import quantize_model

        kw = {"group_size": 64, "skip": ["down_proj"] if name == "tiny-moe" else []} if mode == "wint4" else {}
        quantize_model(m, mode, progress=False, quantize_lm_head=True, quantize_embedding=quantize_embedding, **kw)
    return m


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", [None, "wint8", "wint4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_c_decode_step_matches_pytorch(name, dtype, mode, isa, two_threads):
    """Same K/V rows, logits and greedy tokens as the PyTorch forward, for dense/MoE, fp32/bf16, float/int8/int4,
    with the kernels of every ISA level the machine runs."""
    from ernie45.fast import FastDecoder

    _native_or_skip(isa)
    m = _quantized(name, dtype, mode)
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_tokens = generate(m, ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        ref_cache = m.new_cache(1, 12)
        m(ids, cache=ref_cache)
        step = torch.tensor([[17]])
        ref = m(step, cache=ref_cache).logits[:, -1].float()
        dec = FastDecoder.attach(m, isa=isa)
        assert dec is not None and m.fast_decoder is dec
        cache = m.new_cache(1, 12)
        m(ids, cache=cache)
        out = dec(step, cache)
        tokens = generate(m, ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert cache.length == ref_cache.length == 8
    # fp32: summation order only. bf16: PyTorch's bf16 roundings are reproduced, so at most one bf16 step apart.
    # fp32 int8: the kernels quantise x to int16 (|error| <= max|x| / 65534); int4: to int8 per group (~0.5 % of
    # a product's largest output), and PyTorch's int4 kernel rounds activations to bf16.
    tol = {(torch.float32, None): 1e-5, (torch.float32, "wint8"): 1e-4, (torch.float32, "wint4"): 5e-3}.get(
        (dtype, mode), 1e-2)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for layer in range(len(cache.k)):
        torch.testing.assert_close(cache.k[layer][:, :, :8], ref_cache.k[layer][:, :, :8], atol=tol, rtol=tol)
        torch.testing.assert_close(cache.v[layer][:, :, :8], ref_cache.v[layer][:, :, :8], atol=tol, rtol=tol)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["wint8", "wint4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_c_decode_step_with_an_int8_embedding(name, dtype, mode, isa, two_threads):
    """`quantize_embedding`: the C step reads the int8 rows and per-row scales in place. Greedy tokens, K/V rows and
    logits match the PyTorch forward, and its embedding values are `Int8Embedding`'s bit for bit: the logits equal
    those of the same model with a float embedding holding the dequantized table (bf16: q * s rounded once)."""
    from torch import nn

    from ernie45.fast import FastDecoder
    from ernie45.quant.linear import Int8Embedding

    _native_or_skip(isa)
    m = _quantized(name, dtype, mode, quantize_embedding=True)
    emb = m.model.embed_tokens
    assert type(emb) is Int8Embedding and emb.weight_scale.dtype == dtype
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    step = torch.tensor([[17]])
    with torch.inference_mode():
        ref_tokens = generate(m, ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        ref_cache = m.new_cache(1, 12)
        m(ids, cache=ref_cache)
        ref = m(step, cache=ref_cache).logits[:, -1].float()
        dec = FastDecoder.attach(m, isa=isa)
        assert dec is not None and m.fast_decoder is dec and dec._m.embed_kind == 2  # W_I8
        cache = m.new_cache(1, 12)
        m(ids, cache=cache)
        out = dec(step, cache)
        tokens = generate(m, ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    tol = {(torch.float32, "wint8"): 1e-4, (torch.float32, "wint4"): 5e-3}.get((dtype, mode), 1e-2)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for layer in range(len(cache.k)):
        torch.testing.assert_close(cache.k[layer][:, :, :8], ref_cache.k[layer][:, :, :8], atol=tol, rtol=tol)
    assert torch.equal(tokens, ref_tokens)

    table = emb.dequantize()  # what Int8Embedding.forward looks rows up in
    assert torch.equal(emb(ids), table[ids])
    m.model.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True)
    with torch.inference_mode():
        twin = FastDecoder.attach(m, isa=isa)
        assert twin is not None and twin._m.embed_kind == 0
        twin_cache = m.new_cache(1, 12)
        m(ids, cache=twin_cache)
        for layer in range(len(cache.k)):  # the PyTorch prefill: the same values from either embedding
            assert torch.equal(twin_cache.k[layer][:, :, :7], cache.k[layer][:, :, :7])
        assert torch.equal(twin(step, twin_cache), out)  # the C step's embedding rows: the same bits
        for layer in range(len(cache.k)):
            assert torch.equal(twin_cache.k[layer], cache.k[layer])
            assert torch.equal(twin_cache.v[layer], cache.v[layer])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_decode_step_with_an_int8_group_embedding_tied_to_the_head(dtype, isa, two_threads):
    """A GGUF Q8_0 token_embd: an Int8Embedding with a scale per 32 columns, the head an Int8Linear over its tensors.
    The C step reads both in place; greedy tokens and logits match the PyTorch forward, and its embedding rows are
    Int8Embedding's bit for bit (the logits equal those with a float table of the dequantized rows)."""
    from torch import nn

    from ernie45.fast import FastDecoder
    from ernie45.native_abi import W_I8
    from ernie45.quant.linear import Int8Embedding, Int8Linear

    _native_or_skip(isa)
    m = _textured("tiny", dtype, "wint8", 32)
    table = m.model.embed_tokens.weight.detach()
    emb = Int8Embedding(*table.shape, dtype, group_size=32)
    src = Int8Linear.from_float(_as_linear(table), dtype, group_size=32)
    emb.weight, emb.weight_scale = src.weight, src.weight_scale
    m.model.embed_tokens, m.config.tie_word_embeddings = emb, True
    m.tie_weights()
    assert m.lm_head.weight is emb.weight and m.lm_head.weight_scale is emb.weight_scale
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    step = torch.tensor([[17]])
    with torch.inference_mode():
        ref_tokens = generate(m, ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        ref_cache = m.new_cache(1, 12)
        m(ids, cache=ref_cache)
        ref = m(step, cache=ref_cache).logits[:, -1].float()
        dec = FastDecoder.attach(m, isa=isa)
        assert dec is not None and (dec._m.embed_kind, dec._m.embed_group) == (W_I8, 32)
        cache = m.new_cache(1, 12)
        m(ids, cache=cache)
        out = dec(step, cache)
        tokens = generate(m, ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
    assert torch.equal(tokens, ref_tokens)
    m.model.embed_tokens, m.config.tie_word_embeddings = nn.Embedding.from_pretrained(emb.dequantize()), False
    with torch.inference_mode():
        twin = FastDecoder.attach(m, isa=isa)
        assert twin is not None and twin._m.embed_kind == 0
        twin_cache = m.new_cache(1, 12)
        m(ids, cache=twin_cache)
        assert torch.equal(twin(step, twin_cache), out)


def _as_linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_c_decoder_rejects_an_int8_embedding_it_cannot_read():
    from ernie45.fast import FastDecoder

    _native_or_skip()
    m = _quantized("tiny", torch.bfloat16, "wint8", quantize_embedding=True)
    m.model.embed_tokens.weight_scale = m.model.embed_tokens.weight_scale.half()  # not fp32 / the model dtype
    assert FastDecoder.attach(m) is None


def test_c_decode_on_the_bundled_model_gives_the_same_answer():
    """The trained bundled model: 64 greedy tokens identical with and without the C step (bf16 and fp32)."""
    from ernie45.checkpoint import load_checkpoint
    from ernie45.models import bundled_path

    _native_or_skip()
    for dtype in ("bfloat16", "float32"):
        m = load_checkpoint(bundled_path(), dtype=dtype, device="cpu")
        ids = torch.tensor([[1, 100, 200, 300, 400, 500]])
        ref = generate(m, ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        optimize_for_inference(m)
        assert getattr(m, "fast_decoder", None) is not None
        assert torch.equal(generate(m, ids, max_new_tokens=64, min_new_tokens=64, do_sample=False), ref)


def test_c_decode_is_skipped_where_it_does_not_apply():
    """Batches, left padding and sampling-free beam search go through PyTorch and still give its results."""
    from ernie45.fast import FastDecoder

    _native_or_skip()
    m = _quantized("tiny", torch.float32, None)
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    ref = generate(m, ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref_beam = generate(m, ids[1:], max_new_tokens=6, num_beams=3, do_sample=False)
    dec = FastDecoder.attach(m)
    cache = m.new_cache(2, 8)
    assert not dec.accepts(ids[:, :1], cache, None, None)
    one = m.new_cache(1, 8)
    assert not dec.accepts(ids[:1, :1], one, torch.tensor([[0, 1]]), None)
    assert dec.accepts(ids[:1, :1], one, None, None)
    assert torch.equal(generate(m, ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)
    assert torch.equal(generate(m, ids[1:], max_new_tokens=6, num_beams=3, do_sample=False), ref_beam)


def test_c_decoder_exits_cleanly():
    """At interpreter exit the decoder's C scratch is released with no "Exception ignored" (a `__del__` that
    looked up module globals found them torn down)."""
    _native_or_skip()
    code = (
        "import torch\n"
        "import ernie45\n"
        "from ernie45.fast import optimize_for_inference\n"
        "m, _ = ernie45.load('ernie-tiny', dtype='float32', device='cpu')\n"
        "optimize_for_inference(m)\n"
        "assert m.fast_decoder is not None\n"
        "print(m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).tolist())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr


def test_relocated_weights_keep_values_and_ties():
    from ernie45.fast import relocate_weights

    m = _quantized("tiny", torch.bfloat16, None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    relocate_weights(m)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_native_can_be_turned_off(monkeypatch):
    from ernie45 import native

    monkeypatch.setenv("ERNIE45_NATIVE", "0")
    native.cache_clear()
    try:
        m = _quantized("tiny", torch.float32, None)
        assert optimize_for_inference(m) > 0  # packing only
        assert getattr(m, "fast_decoder", None) is None
    finally:
        monkeypatch.delenv("ERNIE45_NATIVE")
        native.cache_clear()


def test_without_a_compiler_decoding_falls_back_to_pytorch(monkeypatch, tmp_path, caplog):
    """No compiler, or one that fails: no C step, no exception, the oneDNN path, same tokens."""
    from ernie45 import native

    monkeypatch.setenv("ERNIE45_CACHE", str(tmp_path))  # nothing cached: every load must build
    ids = torch.tensor([[5, 6, 7]])
    ref = generate(_quantized("tiny", torch.float32, None), ids, max_new_tokens=6, do_sample=False)
    try:
        monkeypatch.setattr(native, "_compiler", lambda: None)
        native.cache_clear()
        assert native.load("decode") is None
        monkeypatch.setattr(native, "_compiler", lambda: "cc")
        monkeypatch.setattr(native, "CFLAGS", [*native.CFLAGS, "-fno-such-flag-for-the-test"])
        native.cache_clear()
        with caplog.at_level("WARNING", logger="ernie45"):
            m = _quantized("tiny", torch.float32, None)
            assert optimize_for_inference(m) > 0
        assert getattr(m, "fast_decoder", None) is None
        assert "could not build the C decode kernels" in caplog.text
        assert not list(tmp_path.rglob("*.so"))  # nothing half-written left in the cache
        assert torch.equal(generate(m, ids, max_new_tokens=6, do_sample=False), ref)
    finally:
        native.cache_clear()


def test_kernels_build_from_an_empty_cache(monkeypatch, tmp_path):
    """First use compiles csrc/decode.c into the cache (atomically), later loads reuse the file."""
    from ernie45 import native

    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("ERNIE45_CACHE", str(tmp_path))
    native.cache_clear()
    try:
        lib = native.load("decode")
        assert lib is not None and lib.ernie_simd_width() in (0, 128, 256, 512)
        built = list((tmp_path / "native").glob("decode-*.so"))
        assert len(built) == 1 and not [p for p in (tmp_path / "native").iterdir() if p not in built]
        mtime = built[0].stat().st_mtime_ns
        native.cache_clear()
        assert native.load("decode") is not None and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        native.cache_clear()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv, head_dim", [(32, 1, 16), (4, 2, 24), (6, 3, 32)])
def test_c_decode_other_attention_shapes(dtype, heads, kv, head_dim, isa):
    """Groups wider than 16 query heads, head_dim not a multiple of 16, odd GQA ratios: same greedy tokens."""
    from ernie45.fast import FastDecoder

    _native_or_skip(isa)
    cfg = preset("tiny")
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv, head_dim
    m = build_model(cfg, dtype)
    m.init_weights(seed=0)
    m.eval()
    ids = torch.randint(3, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = generate(m, ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert FastDecoder.attach(m, isa=isa) is not None
    assert torch.equal(generate(m, ids, max_new_tokens=20, min_new_tokens=20, do_sample=False), ref)


def _int8_groups(m, group_size=32):
    """Every quantizable Linear (the head too) as an Int8Linear with one scale per `group_size` columns, as a GGUF's
    Q8_0 weights load (the quantizer writes one scale per row)."""
    from ernie45.quant import _swap, quantizable_linears, quantization_config
    from ernie45.quant.linear import Int8Linear

    with torch.no_grad():
        for lname, lin in quantizable_linears(m).items():
            _swap(m, lname, Int8Linear.from_float(lin, m.dtype, group_size=group_size))
    m.config.tie_word_embeddings = False
    m.config.quantization_config = quantization_config("wint8", [], int8_group_size=group_size)
    return m


def _textured(name, dtype, mode, group_size=64, hidden=256, intermediate=512, head_dim=64):
    """A random model whose every part matters: norms away from 1, Linear biases, a correction bias that changes
    which experts are selected, widths that fill whole vectors (hidden 256, head_dim 64, GQA 4:1). wint8 with
    `group_size` 32: int8 with one scale per 32 columns (GGUF Q8_0's layout); other group sizes: per row."""
    moe = dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=128, moe_num_shared_experts=1,
               moe_layer_start_index=1) if name == "tiny-moe" else {}
    cfg = preset(name, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=head_dim, num_hidden_layers=3, use_bias=True, **moe)
    m = build_model(cfg, dtype)
    m.init_weights(seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif pname.endswith((".bias", "e_score_correction_bias")):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    m.eval()
    if mode == "wint8" and group_size == 32:
        return _int8_groups(m, group_size)
    if mode:
        from ernie45.quant import quantize_model

        kw = {"group_size": group_size} if mode == "wint4" else {}
        quantize_model(m, mode, progress=False, quantize_lm_head=True, **kw)
    return m


@pytest.mark.parametrize("mode, group_size", [(None, 0), ("wint8", 0), ("wint8", 32), ("wint4", 32), ("wint4", 64),
                                              ("wint4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_c_decode_long_context(name, dtype, mode, group_size, two_threads):
    """Past 1,024 cached positions, with biases, non-trivial norms and correction biases, 2 threads: the C step's
    logits equal the PyTorch forward's and greedy decoding gives the same tokens, at every ISA level."""
    from ernie45.fast import FastDecoder

    m = _textured(name, dtype, mode, group_size)
    if name == "tiny-moe":
        assert m.model.layers[1].mlp.moe_statics.e_score_correction_bias.abs().sum() > 0
    ids = torch.randint(3, 1000, (1, 1040), generator=torch.Generator().manual_seed(4))
    step = torch.tensor([[29]])
    with torch.inference_mode():
        ref_tokens = generate(m, ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        prefilled = m.new_cache(1, 1100)
        m(ids, cache=prefilled)
        ref = m(step, cache=prefilled).logits[:, -1].float()
    tol = {(torch.float32, None): 1e-4, (torch.float32, "wint8"): 1e-3}.get((dtype, mode), 2e-2)
    ran = 0
    for isa in ISAS:
        if native.load("decode", isa) is None:
            continue
        dec = FastDecoder.attach(m, isa=isa)
        assert dec is not None
        with torch.inference_mode():
            cache = m.new_cache(1, 1100)
            m(ids, cache=cache)  # the forward is PyTorch; only generate() hands decode steps to the decoder
            out = dec(step, cache)
            tokens = generate(m, ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        torch.testing.assert_close(out, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol, msg=isa)
        assert torch.equal(tokens, ref_tokens), isa
        ran += 1
    if not ran:
        pytest.skip("no C compiler: the C decode step is not built here")


def test_isa_levels_follow_the_machine():
    """The levels offered are the ones this CPU executes, and each library says what it was built for."""
    from ernie45.device import cpu_info

    flags = set(cpu_info().get("flags", "").split())
    assert ISAS[0] == "native"
    assert ("avx2" in ISAS) == ({"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags)
    for isa in ISAS:
        lib = native.load("decode", isa)
        if lib is None:
            continue
        name = lib.ernie_isa().decode()
        if isa == "avx2":
            assert lib.ernie_simd_width() == 256 and name.startswith("avx2+fma")
        elif isa == "generic":
            assert lib.ernie_simd_width() == 0 and name == "generic"
        elif native.arch() == "aarch64":  # native and neon: the NEON kernels (+bf16: BFDOT where targeted)
            assert lib.ernie_simd_width() == 128 and name.startswith("neon")
        else:
            assert name.startswith("avx512") == ("avx512f" in flags)
            assert ("+bf16" in name) == ("avx512_bf16" in flags)


def test_isa_env_var_picks_the_build(monkeypatch):
    """ERNIE45_ISA=avx2 makes the process use the x86-64-v3 kernels; an unknown level is a clear error."""
    from ernie45.errors import ErnieError
    from ernie45.fast import FastDecoder

    if "avx2" not in ISAS or native.load("decode", "avx2") is None:
        pytest.skip("this CPU does not execute x86-64-v3 code (or no compiler)")
    monkeypatch.setenv("ERNIE45_ISA", "x86-64-v3")
    m = _quantized("tiny", torch.float32, None)
    dec = FastDecoder.attach(m)
    assert dec is not None and dec.isa.startswith("avx2")
    monkeypatch.setenv("ERNIE45_ISA", "avx3000")
    with pytest.raises(ErnieError, match="ERNIE45_ISA"):
        native.load("decode")


# ---- quantization scales read in place (one copy of the weights) ----------------------------------------------
def _c_linears(dec):
    """Every `_Linear` struct the decoder hands the C step: per layer's attention, MLP / experts, and lm_head."""
    import ctypes

    from ernie45.native_abi import _Layer, _Linear

    n = dec._m.n_layers
    layers = ctypes.cast(dec._m.layers, ctypes.POINTER(_Layer * n)).contents
    out = [dec._m.head]
    for L in layers:
        out += [L.q, L.k, L.v, L.o]
        if L.is_moe:
            experts = ctypes.cast(L.experts, ctypes.POINTER(_Linear * (3 * L.n_experts))).contents
            out += list(experts)
            if L.has_shared:
                out += [L.sgate, L.sup, L.sdown]
        else:
            out += [L.gate, L.up, L.down]
    return out


@pytest.mark.parametrize("dtype, mode", [(torch.bfloat16, "wint4"), (torch.float32, "wint4"),
                                         (torch.bfloat16, "wint8"), (torch.float32, "wint8")])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_c_decoder_reads_quantization_scales_in_place(name, dtype, mode):
    """The C step reads each Int8Linear / Int4Linear's own weight_scale and weight_zero (no fp32 copies of them,
    no zero - 8 * scale tensor), in the model's dtype."""
    from ernie45.fast import FastDecoder
    from ernie45.native_abi import W_I4, W_I8
    from ernie45.quant.linear import Int4Linear, Int8Linear

    _native_or_skip()
    m = _quantized(name, dtype, mode)
    dec = FastDecoder.attach(m)
    assert dec is not None
    qtype, kind = (Int4Linear, W_I4) if mode == "wint4" else (Int8Linear, W_I8)
    mods = [x for x in m.modules() if type(x) is qtype]
    want = {(x.weight_scale.data_ptr(), x.weight_zero.data_ptr() if mode == "wint4" else None) for x in mods}
    structs = [L for L in _c_linears(dec) if L.kind == kind]
    assert len(structs) == len(mods) > 0
    assert {(L.scale, L.zero) for L in structs} == want
    assert all(L.sdt == (dtype == torch.bfloat16) for L in structs)
    for x in mods:
        assert x.weight_scale.dtype == dtype
    # nothing the decoder keeps alive is a widened copy of the scales or a zero - 8 * scale tensor
    own = {p for pair in want for p in pair if p}
    kept = [t for t in dec._keep if isinstance(t, torch.Tensor)]
    assert own <= {t.data_ptr() for t in kept}
    for x in mods:
        s = x.weight_scale.float()
        derived = [s] + ([x.weight_zero.float() - 8 * s] if mode == "wint4" else [])
        assert not any(t.data_ptr() not in own and t.shape == d.shape and torch.equal(t.float(), d)
                       for t in kept for d in derived)


def _random_quantized(mode, dtype, out_features=40, in_features=256, group_size=64):
    """An Int8Linear / Int4Linear (row-major) with random codes, scales over a wide range and zeros of both signs,
    so zero - 8 * scale needs its fp32 rounding. wint8: `group_size` 0 one scale per row, 32 per 32 columns."""
    from ernie45.quant.linear import Int4Linear, Int8Linear

    g = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    if mode == "wint4":
        q = Int4Linear.from_float(lin, dtype, group_size=group_size)
        q._to_rowmajor()
        q.weight = torch.randint(0, 256, q.weight.shape, generator=g, dtype=torch.uint8)
        shape = q.weight_scale.shape
        q.weight_scale = (torch.rand(shape, generator=g) * 10 ** torch.randint(-4, 2, shape, generator=g)).to(dtype)
        q.weight_zero = (torch.randn(shape, generator=g) * 0.3).to(dtype)
    else:
        q = Int8Linear.from_float(lin, dtype, group_size=group_size)
        q.weight = torch.randint(-127, 128, q.weight.shape, generator=g, dtype=torch.int8)
        shape = q.weight_scale.shape
        q.weight_scale = (torch.rand(shape, generator=g) * 10 ** torch.randint(-4, 2, shape, generator=g)).to(dtype)
    return q


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode, group_size", [("wint8", 0), ("wint8", 32), ("wint4", 32), ("wint4", 64),
                                              ("wint4", 128)])
def test_dequant_rows_is_bit_identical_to_pytorch(mode, group_size, dtype, isa):
    """`dequant_rows` (the C kernel, scales and zeros read in their own dtype) gives the module's
    `dequantize(torch.float32)` bit for bit, for all rows and for a tile of rows (int8: one scale per row, and per
    32 columns as GGUF's Q8_0)."""
    from ernie45.native_abi import W_I4, W_I8, dequant_rows

    _native_or_skip(isa)
    q = _random_quantized(mode, dtype, group_size=group_size)
    n, k = q.out_features, q.in_features
    if mode == "wint4":
        rows = dequant_rows(W_I4, q.weight, n, k, q.weight_scale, q.weight_zero, group_size, isa=isa)
    else:
        rows = dequant_rows(W_I8, q.weight, n, k, q.weight_scale, None, group_size, isa=isa)
    assert rows is not None
    ref = q.dequantize(torch.float32)
    assert torch.equal(rows(0, n), ref)
    assert torch.equal(rows(3, 17), ref[3:17])
    if dtype == torch.bfloat16:  # other dtypes are widened to fp32 first (exact): the same values
        half = (q.weight_scale.half(), q.weight_zero.half()) if mode == "wint4" else (q.weight_scale.half(), None)
        rows = dequant_rows(W_I4 if mode == "wint4" else W_I8, q.weight, n, k, *half, group_size, isa=isa)
        q.weight_scale = half[0]
        if mode == "wint4":
            q.weight_zero = half[1]
        assert torch.equal(rows(0, n), q.dequantize(torch.float32))
