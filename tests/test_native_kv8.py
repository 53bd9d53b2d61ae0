"""The int8 KV cache of the C step (`FastDecoder.step_batch` with int8 pages and fp32 scales, the server's
`--kv-cache-dtype int8`).

(a) The rows the step quantises equal the engine's PyTorch reference quantisation of the K/V the float step writes.
(b) Its logits equal, bit for bit, the float step's over float pages that hold the dequantised rows (the float step
    in `int8_round_trip` mode, whose pages are checked to equal the reference dequantisation of the int8 pages).
(c) Greedy decoding with an int8 cache stays close to a float cache.
For dense and MoE models, fp32 and bf16, B = 1, 3, 8, block_size 4 and 16, 1 and 2 threads, at every ISA level this
machine executes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_native_batch import _decoder_or_skip, _layout, _model, _prompts

from ernie45 import native
from ernie45.checkpoint import build_model
from ernie45.config import preset
from ernie45.serve.kv import dequantize_rows as dequantize
from ernie45.serve.kv import quantize_rows as quantize

ISAS = native.levels()
STEPS = 8  # greedy tokens after each prompt
CASES = [(1, 4), (1, 16), (3, 4), (3, 16), (8, 4), (8, 16)]  # (B, block_size)


@functools.cache
def _gqa8(dtype: torch.dtype):
    """test_native_batch's dense tiny model with one kv head (8 query heads per kv head: the widest GQA group,
    attention's 8-accumulator P @ V loop), its weights copied where the shapes agree."""
    src = _model("tiny", dtype, None)
    cfg = preset("tiny", hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=1,
                 head_dim=32, num_hidden_layers=3, use_bias=True)
    m = build_model(cfg, dtype)
    m.init_weights(seed=1)
    theirs = src.state_dict()
    with torch.no_grad():
        for k, p in m.state_dict().items():
            if k in theirs and theirs[k].shape == p.shape:
                p.copy_(theirs[k])
    return m.eval()


def model(name: str, dtype: torch.dtype):
    return _gqa8(dtype) if name == "tiny-gqa8" else _model(name, dtype, None)


class Pages:
    """One layer set of page pools: float (model dtype, NaN where unwritten) or int8 (0) with fp32 scales (NaN
    where unwritten: reading a row that was never written shows as NaN in the logits)."""

    def __init__(self, model, n_blocks: int, block_size: int, int8: bool):
        cfg = model.config
        shape = (n_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim)
        n = cfg.num_hidden_layers
        if int8:
            self.k = [torch.zeros(shape, dtype=torch.int8) for _ in range(n)]
            self.v = [torch.zeros(shape, dtype=torch.int8) for _ in range(n)]
            self.ks = [torch.full(shape[:3], float("nan")) for _ in range(n)]
            self.vs = [torch.full(shape[:3], float("nan")) for _ in range(n)]
        else:
            self.k = [torch.full(shape, float("nan"), dtype=model.dtype) for _ in range(n)]
            self.v = [torch.full(shape, float("nan"), dtype=model.dtype) for _ in range(n)]
            self.ks = self.vs = None

    def step(self, dec, tokens, pos, tables, **kw):
        return dec.step_batch(tokens, pos, tables, self.k, self.v, self.ks, self.vs, **kw)


def _rows(pages: list[torch.Tensor], tables: torch.Tensor, b: int, n: int, block_size: int) -> torch.Tensor:
    """Row b's first n positions of a pool, (n, n_kv, ...)."""
    t = torch.arange(n)
    return pages[tables[b, t // block_size].long(), :, t % block_size]


def _run(dec, model, prompts, block_size, seed, runs):
    """Step `runs` (name -> (Pages, step kwargs)) side by side over one batch schedule: rows start a few steps late,
    prompts are fed one token at a time, then STEPS greedy tokens, each run choosing from its own logits
    (`greedy` True) or taking the first run's tokens. Returns tokens and logits per run, and the tables."""
    B = len(prompts)
    total = [len(p) + STEPS for p in prompts]
    start, tables, n_blocks = _layout(B, total, block_size, seed)
    pages = {name: Pages(model, n_blocks, block_size, int8) for name, (int8, _, _) in runs.items()}
    toks = {name: [list(p) for p in prompts] for name in runs}
    logits = {name: [[] for _ in prompts] for name in runs}
    first = next(iter(runs))
    for step in range(max(s + t for s, t in zip(start, total))):
        rows = [b for b in range(B) if start[b] <= step < start[b] + total[b]]
        if not rows:
            continue
        pos = [step - start[b] for b in rows]
        for name, (_, greedy, _) in runs.items():  # every run's next tokens, then the steps
            for b, p in zip(rows, pos):
                if p >= len(prompts[b]):
                    toks[name][b].append(int(logits[name if greedy else first][b][-1].argmax()))
        for name, (_, _, kw) in runs.items():
            out = pages[name].step(dec, [toks[name][b][p] for b, p in zip(rows, pos)], pos, tables[rows], **kw)
            assert out.shape == (len(rows), model.config.vocab_size)
            for j, b in enumerate(rows):
                logits[name][b].append(out[j])
    return toks, logits, pages, tables, total


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-gqa8"])
def test_int8_cache_equals_float_on_dequantized_rows(name, dtype, isa, threads):
    """(a) + (b): the int8 run, the float run on the round-tripped rows and the plain float run, all fed the int8
    run's tokens: logits of the first two equal bit for bit at every step; the round-trip run's pages equal the
    reference dequantisation of the int8 pages (every layer); the int8 pages of layer 0 (whose K/V depend on the
    token and position only) equal the reference quantisation of the plain float run's K/V."""
    m = model(name, dtype)
    dec = _decoder_or_skip(m, isa)
    prompts = _prompts(8, seed=1)
    runs = {"int8": (True, True, {}), "rt": (False, False, {"int8_round_trip": True}), "float": (False, False, {})}
    with torch.inference_mode():
        for B, bs in CASES:
            toks, logits, pages, tables, total = _run(dec, m, prompts[:B], bs, seed=B * bs, runs=runs)
            q8, rt, fl = pages["int8"], pages["rt"], pages["float"]
            for b in range(B):
                assert toks["rt"][b] == toks["int8"][b] == toks["float"][b]
                for k, (got, want) in enumerate(zip(logits["int8"][b], logits["rt"][b])):
                    assert torch.isfinite(got).all(), (B, bs, b, k)
                    assert torch.equal(got, want), (B, bs, b, k)
                n = total[b]
                for layer in range(len(q8.k)):
                    for qp, sp, fp in ((q8.k, q8.ks, rt.k), (q8.v, q8.vs, rt.v)):
                        q, s = _rows(qp[layer], tables, b, n, bs), _rows(sp[layer], tables, b, n, bs)
                        assert torch.equal(_rows(fp[layer], tables, b, n, bs), dequantize(q, s, dtype))
                        assert (s > 0).all() and (q.abs().amax(-1) == 127).all()  # the largest |x| maps to 127
                        if layer == 0:
                            want_q, want_s = quantize(_rows((fl.k if qp is q8.k else fl.v)[0], tables, b, n, bs))
                            assert torch.equal(q, want_q) and torch.equal(s, want_s), (B, bs, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-gqa8"])
def test_int8_greedy_stays_close_to_float(name, dtype, isa):
    """(c): 8 sequences decoded greedily with an int8 cache and with a float cache, each from its own logits: the
    first token always the same, all STEPS tokens for most rows, the logits on the prompts within a few %."""
    m = model(name, dtype)
    dec = _decoder_or_skip(m, isa)
    prompts = _prompts(8, seed=1)
    runs = {"int8": (True, True, {}), "float": (False, True, {})}
    with torch.inference_mode():
        toks, logits, *_ = _run(dec, m, prompts, 16, seed=7, runs=runs)
    same = 0
    for b, p in enumerate(prompts):
        a, f = toks["int8"][b][len(p):], toks["float"][b][len(p):]
        assert a[0] == f[0], (b, a, f)
        same += a == f
        lp, lf = logits["int8"][b][:len(p)], logits["float"][b][:len(p)]  # the same tokens fed: logits close
        for x, y in zip(lp, lf):  # (seen: at most 0.3 % of the largest logit in fp32, 1 % in bf16)
            assert (x - y).abs().max() <= 0.03 * y.abs().max(), b
    assert same >= 6  # (seen: all 8 continuations identical, at every level)


def test_int8_step_checks_its_arguments():
    m = _model("tiny", torch.float32, None)
    dec = _decoder_or_skip(m, "native")
    cfg = m.config
    shape = (4, cfg.num_key_value_heads, 4, cfg.head_dim)
    n = cfg.num_hidden_layers
    kp = [torch.zeros(shape, dtype=torch.int8) for _ in range(n)]
    vp = [torch.zeros(shape, dtype=torch.int8) for _ in range(n)]
    ks = [torch.zeros(shape[:3]) for _ in range(n)]
    vs = [torch.zeros(shape[:3]) for _ in range(n)]
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    assert dec.step_batch([5, 6], [0, 3], tables, kp, vp, ks, vs).shape == (2, cfg.vocab_size)
    assert (ks[0][0, :, 0] > 0).all() and (ks[0][2, :, 3] > 0).all()  # row 1: position 3 in block 2
    with pytest.raises(ValueError, match="page pool"):
        dec.step_batch([5, 6], [0, 0], tables, kp, vp)  # int8 pages without scales
    with pytest.raises(ValueError, match="both"):
        dec.step_batch([5, 6], [0, 0], tables, kp, vp, ks)
    with pytest.raises(ValueError, match="page pool"):
        dec.step_batch([5, 6], [0, 0], tables, [p.float() for p in kp], vp, ks, vs)
    with pytest.raises(ValueError, match="scale pool"):
        dec.step_batch([5, 6], [0, 0], tables, kp, vp, [s.bfloat16() for s in ks], vs)
    with pytest.raises(ValueError, match="scale pool"):
        dec.step_batch([5, 6], [0, 0], tables, kp, vp, ks, [s[:, :, :2] for s in vs])
    with pytest.raises(ValueError, match="layers of scales"):
        dec.step_batch([5, 6], [0, 0], tables, kp, vp, ks[:1], vs)
    with pytest.raises(ValueError, match="round_trip"):
        dec.step_batch([5, 6], [0, 0], tables, kp, vp, ks, vs, int8_round_trip=True)
    with pytest.raises(RuntimeError, match="-2"):
        dec.step_batch([5, 6], [0, 4], torch.tensor([[0, 1], [2, -1]], dtype=torch.int32), kp, vp, ks, vs)
