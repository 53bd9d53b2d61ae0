"""The batched C decode step over a paged KV cache (`ernie_step_batch`, `FastDecoder.step_batch`).

Every row of a batch must give, bit for bit, what the single-sequence C step gives for that sequence alone on a
contiguous cache: the same logits, the same K/V rows (written into the row's pages) and the same greedy tokens, for
dense and MoE models, fp32 and bf16, float / int8 / int4 weights, at every ISA level this machine executes.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from test_fast import _textured

from ernie45 import native

ISAS = native.levels()
STEPS = 6  # greedy tokens after each prompt
# prompt lengths of the 16 sequences (a batch of B takes the first B): with block_size 4 or 16 most span pages
PROMPT_LENS = [5, 1, 9, 4, 17, 3, 12, 8, 2, 20, 7, 16, 11, 6, 14, 10]
MAX_LEN = 32  # the contiguous reference cache (longest history: 20 + STEPS)


def _decoder_or_skip(model, isa):
    from ernie45.fast import FastDecoder

    lib = native.load("decode", isa)
    if lib is None or (isa == "native" and lib.ernie_simd_width() < 128):
        pytest.skip(f"no C compiler, or no {isa} build: the C decode step is not built here")
    dec = FastDecoder.attach(model, isa=isa)
    assert dec is not None
    return dec


@functools.cache
def _model(name: str, dtype: torch.dtype, mode: str | None):
    """test_fast's textured model (biases, norms away from 1, a correction bias that changes which experts are
    picked; MoE: 8 experts top-2 + a shared one; GQA 4:1), at half its width."""
    return _textured(name, dtype, mode, 64 if name == "tiny" else 128, hidden=128, intermediate=256, head_dim=32)


def _layout(B: int, total: list[int], block_size: int, seed: int):
    """Shuffled block ids per row (-1 past its pages), each row starting 0-3 steps late."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 4, (B,), generator=g).tolist()
    need = [math.ceil(t / block_size) for t in total]
    n_blocks = sum(need) + 3
    ids = torch.randperm(n_blocks, generator=g).to(torch.int32)
    tables = torch.full((B, max(need) + 1), -1, dtype=torch.int32)
    at = 0
    for b, k in enumerate(need):
        tables[b, :k] = ids[at:at + k]
        at += k
    return start, tables, n_blocks


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (k,), generator=g).tolist() for k in PROMPT_LENS[:n]]


def _alone(dec, model, prompt: list[int]):
    """The sequence alone through the single-row C step on a contiguous cache: (tokens fed, logits after each,
    cache); the prompt is fed one token at a time, then STEPS greedy tokens."""
    cache = model.new_cache(1, MAX_LEN)
    toks, logits = list(prompt), []
    for i in range(len(prompt) + STEPS):
        if i >= len(prompt):
            toks.append(int(logits[-1].argmax()))
        logits.append(dec(torch.tensor([[toks[i]]]), cache)[0])
    return toks, logits, cache


def _paged(dec, model, prompts: list[list[int]], block_size: int, seed: int):
    """The sequences as one batch over a paged cache: row b starts a few steps late (so one call mixes positions,
    prompts and greedy continuations, and the batch grows and shrinks), its pages are shuffled block ids, table
    entries past its pages are -1 and unused page memory is NaN (reading it would show in the logits)."""
    B = len(prompts)
    total = [len(p) + STEPS for p in prompts]
    start, tables, n_blocks = _layout(B, total, block_size, seed)
    cfg = model.config
    shape = (n_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim)
    kp = [torch.full(shape, float("nan"), dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
    vp = [torch.full(shape, float("nan"), dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
    toks, logits = [list(p) for p in prompts], [[] for _ in prompts]
    widest = 0
    for step in range(max(s + t for s, t in zip(start, total))):
        rows = [b for b in range(B) if start[b] <= step < start[b] + total[b]]
        if not rows:
            continue
        widest = max(widest, len(rows))
        pos = [step - start[b] for b in rows]
        for b, p in zip(rows, pos):
            if p >= len(prompts[b]):
                toks[b].append(int(logits[b][-1].argmax()))
        out = dec.step_batch([toks[b][p] for b, p in zip(rows, pos)], pos, tables[rows], kp, vp)
        assert out.shape == (len(rows), cfg.vocab_size) and out.dtype == torch.float32
        for j, b in enumerate(rows):
            logits[b].append(out[j])
    assert widest == B  # every row took part in one call at least
    return toks, logits, tables, kp, vp


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", [None, "wint8", "wint4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_batched_step_equals_single_rows(name, dtype, mode, isa, threads):
    """For B = 1, 2, 3, 8, 16: each row's logits after every step, its K/V rows in its pages and its greedy tokens
    equal the single-sequence C step's on a contiguous cache, bit for bit."""
    m = _model(name, dtype, mode)
    dec = _decoder_or_skip(m, isa)
    prompts = _prompts(16)
    with torch.inference_mode():
        ref = [_alone(dec, m, p) for p in prompts]
        for i, B in enumerate((1, 2, 3, 8, 16)):
            block_size = (4, 16)[i % 2]
            toks, logits, tables, kp, vp = _paged(dec, m, prompts[:B], block_size, seed=B)
            for b in range(B):
                ref_toks, ref_logits, cache = ref[b]
                assert toks[b] == ref_toks, (B, b)
                assert len(logits[b]) == len(ref_logits)
                for k, (got, want) in enumerate(zip(logits[b], ref_logits)):
                    assert torch.equal(got, want), (B, b, k)
                t = torch.arange(len(ref_toks))
                blocks, rows = tables[b, t // block_size].long(), t % block_size
                for layer in range(len(kp)):  # (T, n_kv, d) from the pages against the cache's (n_kv, T, d)
                    assert torch.equal(kp[layer][blocks, :, rows].transpose(0, 1), cache.k[layer][0, :, :len(t)])
                    assert torch.equal(vp[layer][blocks, :, rows].transpose(0, 1), cache.v[layer][0, :, :len(t)])


@functools.cache
def _wide_model(dtype: torch.dtype, mode: str | None, group_size: int, hidden: int, intermediate: int):
    return _textured("tiny", dtype, mode, group_size, hidden=hidden, intermediate=intermediate, head_dim=32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode, group_size, hidden, intermediate", [
    (None, 0, 128, 4224), ("wint8", 0, 128, 4224), ("wint4", 64, 128, 4224), ("wint4", 128, 128, 4224),
    ("wint4", 32, 128, 4224), ("wint4", 32, 128, 16448), ("wint8", 32, 128, 4224), ("wint8", 32, 160, 288),
    (None, 0, 144, 272), ("wint8", 0, 144, 272),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_step_other_widths(dtype, mode, group_size, hidden, intermediate, isa, threads):
    """The tiled GEMVs' other paths: rows longer than an int8 block (4,224 columns: more than 4,096 / 2,048 int8
    columns summed per int32 block) and with more int4 groups than a vector has lanes (33 of 128, 66 of 64, 132 of
    32: Q4_0's groups, several per chunk, each lane in its own; 514 of 32: more than the tiled kernel takes, row by
    row), int8 with
    one scale per 32 columns (Q8_0's groups: 132 of them, and widths of 5 and 9 groups, not whole 64-column lines),
    and widths that leave a partial vector (144, 272: row by row where a kernel needs whole vectors). Each row of a
    batch of B = 1, 3, 8 equals its sequence stepped alone, bit for bit."""
    m = _wide_model(dtype, mode, group_size, hidden, intermediate)
    dec = _decoder_or_skip(m, isa)
    prompts = _prompts(8, seed=1)
    with torch.inference_mode():
        ref = [_alone(dec, m, p) for p in prompts]
        for B in (1, 3, 8):
            toks, logits, _, _, _ = _paged(dec, m, prompts[:B], 4, seed=B)
            for b in range(B):
                assert toks[b] == ref[b][0], (B, b)
                assert all(torch.equal(got, want) for got, want in zip(logits[b], ref[b][1])), (B, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B", [256, 1100])
def test_a_wide_batch(isa, B, threads):
    """256 and 1,100 rows in one call (short histories, one page each of block_size 2 or more; past 1,024 rows a
    GEMV takes the batch in parts): every row still equals its sequence stepped alone."""
    m = _model("tiny", torch.bfloat16, None)
    dec = _decoder_or_skip(m, isa)
    bs = 2
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 4, (B,), generator=g).tolist()
    prompts = [torch.randint(3, 1000, (k,), generator=g).tolist() for k in lens]
    cfg = m.config
    tables = torch.randperm(3 * B, generator=g).to(torch.int32).view(B, 3)  # 2 pages used, 1 spare per row
    shape = (3 * B, cfg.num_key_value_heads, bs, cfg.head_dim)
    kp = [torch.zeros(shape, dtype=m.dtype) for _ in range(cfg.num_hidden_layers)]
    vp = [torch.zeros(shape, dtype=m.dtype) for _ in range(cfg.num_hidden_layers)]
    with torch.inference_mode():
        want = []
        for p in prompts:
            cache = m.new_cache(1, 8)
            for t in p:
                out = dec(torch.tensor([[t]]), cache)
            want.append(out[0])
        for i in range(max(lens)):  # prefill: rows whose prompt is longer than i
            rows = [b for b in range(B) if i < lens[b] - 1]
            if rows:
                dec.step_batch([prompts[b][i] for b in rows], [i] * len(rows), tables[rows], kp, vp)
        got = dec.step_batch([p[-1] for p in prompts], [k - 1 for k in lens], tables, kp, vp)
    assert all(torch.equal(got[b], want[b]) for b in range(B))


def test_step_batch_checks_its_arguments():
    m = _model("tiny", torch.float32, None)
    dec = _decoder_or_skip(m, "native")
    cfg = m.config
    shape = (4, cfg.num_key_value_heads, 4, cfg.head_dim)
    kp = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    vp = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    assert dec.step_batch([5, 6], [0, 3], tables, kp, vp).shape == (2, cfg.vocab_size)
    with pytest.raises(ValueError, match="tables"):
        dec.step_batch([5, 6], [0, 0], tables.long(), kp, vp)
    far = torch.tensor([[0, 1], [2, 4]], dtype=torch.int32)  # block 4 of 4: read by row 1 at position 4, not at 3
    assert dec.step_batch([5, 6], [0, 3], far, kp, vp).shape == (2, cfg.vocab_size)
    with pytest.raises(ValueError, match="block id 4 out of range"):
        dec.step_batch([5, 6], [0, 4], far, kp, vp)
    with pytest.raises(ValueError, match="tables"):
        dec.step_batch([5, 6], [0, 0], tables[:, ::2], kp, vp)  # not contiguous
    with pytest.raises(ValueError, match="page pool"):
        dec.step_batch([5, 6], [0, 0], tables, [p.bfloat16() for p in kp], vp)
    with pytest.raises(ValueError, match="pages must be"):
        dec.step_batch([5, 6], [0, 0], tables, [p[:, :1] for p in kp], vp)
    with pytest.raises(ValueError, match="layers"):
        dec.step_batch([5, 6], [0, 0], tables, kp[:1], vp)
    with pytest.raises(ValueError, match="positions"):
        dec.step_batch([5, 6], [0], tables, kp, vp)
    with pytest.raises(ValueError, match="block id"):
        dec.step_batch([5, 6], [0, 0], torch.tensor([[0, 1], [4, 3]], dtype=torch.int32), kp, vp)
    for tokens, pos, tab in (([5, 6], [0, 8], tables),  # past table_stride * block_size
                             ([5, 6], [-1, 0], tables),
                             ([5, cfg.vocab_size], [0, 0], tables),
                             ([5, 6], [0, 4], torch.tensor([[0, 1], [2, -1]], dtype=torch.int32))):  # page -1
        with pytest.raises(RuntimeError, match="-2"):
            dec.step_batch(tokens, pos, tab, kp, vp)


@pytest.mark.parametrize("mode", [None, "wint4"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_logit_rows_skip_the_head_for_unflagged_rows(name, mode):
    """`logit_rows`: only the flagged rows' logits come back, in row order, each (and every row's K/V) equal to a
    call computing every row, bit for bit (a server's prompt-chunk rows, whose lm_head would be wasted)."""
    m = _model(name, torch.float32, mode)
    dec = _decoder_or_skip(m, "native")
    prompts = _prompts(6, seed=3)
    cfg = m.config
    block_size = 4
    flat = [(b, t) for b, p in enumerate(prompts) for t in range(len(p))]  # every prompt token as a row
    start, tables, n_blocks = _layout(len(prompts), [len(p) for p in prompts], block_size, seed=7)
    shape = (n_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim)
    pools = []
    for _ in range(2):
        pools.append(([torch.zeros(shape) for _ in range(cfg.num_hidden_layers)],
                      [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]))
    toks = [prompts[b][t] for b, t in flat]
    pos = [t for _, t in flat]
    rows_tables = tables[[b for b, _ in flat]].contiguous()
    want = [t == len(prompts[b]) - 1 for b, t in flat]  # each prompt's last row
    with torch.inference_mode():
        full = dec.step_batch(toks, pos, rows_tables, *pools[0])
        sel = dec.step_batch(toks, pos, rows_tables, *pools[1], logit_rows=want)
    flags = torch.tensor(want)
    assert sel.shape == (int(flags.sum()), cfg.vocab_size) and torch.equal(sel, full[flags])
    for a, b in zip(pools[0][0] + pools[0][1], pools[1][0] + pools[1][1]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="logit_rows"):
        dec.step_batch(toks, pos, rows_tables, *pools[1], logit_rows=want[:-1])


def _int4_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int):
    """y = x W^T for w = (q - 8) * scale + zero, x quantised to int8 per group of `group` columns as decode.c and
    qmm.c do it: a = round_half_even(x * (127 / amax)), d = amax / 127 (fp32), and
    y = sum over groups of scale * d * sum(q * a) + zero * sum(x) - 8 * scale * d * sum(a), in float64."""
    B, n = x.shape
    xg = x.view(B, n // group, group)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    a = torch.round(xg * inv[..., None])  # fp32 product, then half to even: lrintf's
    d = (amax / 127).double()
    qg = q.view(q.shape[0], n // group, group).double()
    sums = torch.einsum("bgk,rgk->brg", a.double(), qg)  # exact integers
    sc, zr = scale.double(), zero.double()
    return ((sums - 8 * a.double().sum(-1)[:, None, :]) * sc[None] * d[:, None, :]).sum(-1) + (
        zr[None] * xg.double().sum(-1)[:, None, :]).sum(-1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_rows_multiply_x_quantised_to_int8_per_group(isa, group, threads):
    """Where the kernels multiply int4 rows by int8 x (every vector ISA: `ernie_int4_x8`), a batched GEMV's rows
    (B = 1, 3, 8, 16: every tile shape) equal the int8-per-group arithmetic computed in float64 up to fp32 summation
    order (relative 1e-5 of the largest |y|; the int16 arithmetic it replaced is ~1e-3 away), and each row equals
    the same x multiplied alone, bit for bit. Activations with outliers (one column 40x the rest) per group."""
    import ctypes

    from ernie45.native_abi import W_I4, _Linear, _Model

    lib = native.load("decode", isa)
    if lib is None or not lib.ernie_int4_x8():
        pytest.skip(f"the {isa} kernels have no int8 products (plain C), or are not built here")
    lib.ernie_gemv_batch.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Linear), ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_void_p]
    g = torch.Generator().manual_seed(group)
    out, n = 72, 1024  # 72 rows: whole tiles of 4 and a remainder per thread
    q = torch.randint(0, 16, (out, n), generator=g, dtype=torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scale = (torch.rand(out, n // group, generator=g) * 0.02 + 0.001).bfloat16()
    zero = (torch.randn(out, n // group, generator=g) * 0.01).bfloat16()
    m = _Model(hidden=n, n_layers=0, n_heads=1, n_kv=1, head_dim=n, vocab=1, n_threads=torch.get_num_threads(),
               max_width=out, max_experts=1)
    L = _Linear(kind=W_I4, out=out, in_=n, group=group, sdt=1, w=packed.data_ptr(), scale=scale.data_ptr(),
                zero=zero.data_ptr())
    try:
        for B in (1, 3, 8, 16):
            x = torch.randn(B, n, generator=g)
            x[:, 5::97] *= 40.0
            y = torch.empty(B, out)
            assert lib.ernie_gemv_batch(ctypes.byref(m), ctypes.byref(L), B, x.data_ptr(), y.data_ptr()) == 0
            want = _int4_reference(x, q, scale.float(), zero.float(), group)
            err = (y.double() - want).abs().max() / want.abs().max()
            assert err < 1e-5, (B, float(err))
            for b in range(B):
                alone = torch.empty(1, out)
                lib.ernie_gemv_batch(ctypes.byref(m), ctypes.byref(L), 1, x[b:b + 1].contiguous().data_ptr(),
                                     alone.data_ptr())
                assert torch.equal(alone[0], y[b]), (B, b)
    finally:
        lib.ernie_release(ctypes.byref(m))
