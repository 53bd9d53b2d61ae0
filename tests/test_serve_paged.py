"""The serving engine's paged KV cache: block bookkeeping, prefix caching, chunked prefill and preemption.

Every engine answer is checked token for token against `ernie45.generation.generate` (greedy) on the same
model with its contiguous cache, over block boundaries (tiny blocks), dense and MoE, float and int8.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.generation import generate
from ernie45.serve.blocks import BlockManager, block_hashes
from ernie45.serve.engine import Engine, EngineArgs, SamplingParams
from ernie45.serve.kv import PagedKVCache, kv_bytes_per_token

LONG = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 6


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("paged")
    return {
        "dense": save_hf(make_hf_model("dense", max_position_embeddings=4096), d / "dense", tokenizer_dir),
        "moe": save_hf(make_hf_model("moe", bias_scale=0.3), d / "moe", tokenizer_dir),
    }


def load(path: str, quantize: str | None = None):
    model, tok = ernie45.load(path, dtype="float32", device="cpu", quantize=quantize)
    return model, tok


def reference(model, prompt: list[int], n: int) -> list[int]:
    out = generate(model, torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


def run(engine: Engine, prompts: list[list[int]], n: int | list[int]):
    """Submit every prompt at once (greedy, `n` tokens each); returns (token ids, cached tokens) per prompt."""
    ns = n if isinstance(n, list) else [n] * len(prompts)

    async def go():
        groups = [
            engine.submit([p], [SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)])
            for p, k in zip(prompts, ns)
        ]

        async def collect(g):
            ids, cached = [], 0
            async for _, out in g:
                ids += out.token_ids
                cached = out.num_cached_tokens
            return ids, cached

        return await asyncio.gather(*(collect(g) for g in groups))

    return asyncio.run(go())


class Calls:
    """Records the engine's model calls: ("prefill", [tokens per row]) and ("decode", rows)."""

    def __init__(self, engine: Engine):
        self.log: list[tuple[str, object]] = []
        self.want: list[list[bool] | None] = []  # decode calls' logit-row flags
        runner = engine.runner
        prefill, decode = runner.prefill, runner.decode

        def p(tokens, past, tables):
            self.log.append(("prefill", [len(t) for t in tokens]))
            return prefill(tokens, past, tables)

        def d(tokens, positions, tables, want=None):
            self.log.append(("decode", len(tokens)))
            self.want.append(want)
            return decode(tokens, positions, tables, want)

        runner.prefill, runner.decode = p, d


def started(args: EngineArgs, model, tok) -> Engine:
    engine = Engine(model, tok, args)
    engine.start()
    return engine


# ---- block bookkeeping ----------------------------------------------------------------------------
def test_block_manager_sharing_and_lru_eviction():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_available == 1
    h = block_hashes([1, 2, 3, 4, 5, 6], 2)
    assert len(h) == 3 and h == block_hashes([1, 2, 3, 4, 5, 6, 7], 2)  # only full blocks
    assert block_hashes([9, 2, 3, 4], 2)[1] != h[1]  # chained: the same block after another prefix differs
    assert block_hashes([1, 2, 3, 4], 2, salt=b"adapter")[0] != h[0]
    for b, x in zip(a, h):
        bm.register(b, x)
    assert bm.match(h, limit=2) == [0, 1]  # shared: now two references each
    bm.free(a)
    assert bm.num_available == 2  # block 2 is evictable, 0 and 1 still used by the matcher
    bm.free([0, 1])
    assert bm.num_available == 4 and bm.num_used == 0
    assert bm.match([h[0], b"unknown", h[2]], limit=3) == [0]  # stops at the first miss
    bm.free([0])
    # eviction order: never-used blocks first, then least recently used, a sequence's tail before its head
    assert bm.allocate(1) == [3]
    assert bm.allocate(1) == [2] and bm.match(h, 3) == [0, 1]  # block 2 (the tail) was evicted
    assert bm.allocate(1) is None  # nothing left: the caller waits or preempts
    bm.free([0, 1])
    assert bm.allocate(2) == [1, 0] and bm.match(h, 3) == []  # the freed pair is reused, hashes forgotten


def test_block_manager_without_caching_never_shares():
    bm = BlockManager(num_blocks=2, block_size=2, caching=False)
    (b,) = bm.allocate(1)
    bm.register(b, block_hashes([1, 2], 2)[0])
    assert bm.match(block_hashes([1, 2], 2), 1) == []
    bm.free([b])
    assert bm.num_available == 2


def test_paged_forward_equals_contiguous_cache(ckpts):
    """A prefill in chunks through shuffled, non-contiguous pages gives the logits of the contiguous cache."""
    model, tok = load(ckpts["moe"])
    ids = tok.encode(LONG)[:37]
    cache = PagedKVCache(model, num_blocks=16, block_size=4)
    table = torch.randperm(16)[:10]
    ref = model(torch.tensor([ids])).logits[0]
    past = 0
    with torch.inference_mode():
        for n in (5, 13, 1, 18):
            cache.touch(table[None])
            batch = cache.batch(table[None], [past], [n])
            out = model(torch.tensor([ids[past : past + n]]), attention_mask=batch.mask(model.dtype),
                        position_ids=batch.position_ids(), cache=batch)
            torch.testing.assert_close(out.logits[0], ref[past : past + n], rtol=1e-4, atol=1e-4)
            past += n
    k = cache.k[1][table].transpose(0, 1).reshape(cache.n_kv, -1, model.config.head_dim)[:, :37]
    full = model.new_cache(1, 64)
    model(torch.tensor([ids]), cache=full)
    torch.testing.assert_close(k, full.k[1][0, :, :37], rtol=1e-5, atol=1e-5)


# ---- engine against generate ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,quantize,native",
    [("dense", None, False), ("moe", None, False), ("dense", "wint8", False), ("dense", None, True),
     ("moe", "wint8", True)],
)
def test_engine_matches_generate_over_block_boundaries(ckpts, kind, quantize, native):
    """Native: decode steps run in C (`FastDecoder.step_batch` over the pages) against generate's batch-1 C
    step; otherwise the PyTorch forward over gathered pages against generate's contiguous cache."""
    model, tok = load(ckpts[kind], quantize)
    if native:
        from ernie45.fast import optimize_for_inference

        optimize_for_inference(model)
        if getattr(model, "fast_decoder", None) is None:
            pytest.skip("no C decode step on this machine")
    prompts = [tok.encode(t) for t in ("床前明月光", LONG[:40], "The quick brown fox jumps", LONG)]
    want = [reference(model, p, 21) for p in prompts]
    engine = started(EngineArgs(max_num_seqs=3, max_model_len=512, block_size=4, max_num_batched_tokens=40),
                     model, tok)
    assert engine.runner.native == native
    try:
        got = run(engine, prompts, 21)
    finally:
        engine.shutdown(0.0)
    assert [ids for ids, _ in got] == want
    assert engine.blocks.num_used == 0


def test_prefix_cache_second_turn_prefills_only_new_tokens(ckpts):
    """An agent's next turn (the whole conversation again plus a few tokens) reuses the cached blocks: only the
    uncached tail is prefilled, `cached_tokens` says how much was reused, and the answer equals a cold run."""
    model, tok = load(ckpts["dense"])
    bs = 8
    engine = started(EngineArgs(max_num_seqs=2, max_model_len=1024, block_size=bs), model, tok)
    calls = Calls(engine)
    try:
        turn1 = tok.encode(LONG)
        ((out1, cached1),) = run(engine, [turn1], 12)
        assert cached1 == 0
        turn2 = turn1 + out1 + tok.encode("还有吗？")
        calls.log.clear()
        ((out2, cached2),) = run(engine, [turn2], 12)
        # every full block of turn 1's prompt and answer is reused, except what the last token needs
        assert cached2 == (len(turn1) + len(out1) - 1) // bs * bs
        assert [c for c in calls.log if c[0] == "prefill"] == [("prefill", [len(turn2) - cached2])]
        stats = engine.stats()
        assert stats["prefix_cache_hits"] == cached2 and stats["prefix_cache_queries"] == len(turn1) + len(turn2)
        metric = engine.metrics.registry.get_sample_value
        assert metric("ernie45_prefix_cache_hits_total") == cached2
    finally:
        engine.shutdown(0.0)
    cold = started(EngineArgs(max_num_seqs=2, max_model_len=1024, block_size=bs, enable_prefix_caching=False),
                   model, tok)
    try:
        ((cold2, cached_cold),) = run(cold, [turn2], 12)
    finally:
        cold.shutdown(0.0)
    assert cached_cold == 0 and out2 == cold2 == reference(model, turn2, 12)


def test_chunked_prefill_interleaves_decode_steps(ckpts):
    """While a long prompt is prefilled, the running stream decodes between its chunks; each step stays
    within max_num_batched_tokens."""
    model, tok = load(ckpts["dense"])
    engine = started(EngineArgs(max_num_seqs=2, max_model_len=1024, block_size=4, max_num_batched_tokens=24),
                     model, tok)
    calls = Calls(engine)
    short, long_ = tok.encode("床前明月光"), tok.encode(LONG * 2)
    assert len(long_) > 150
    try:
        got = run(engine, [short, long_], [60, 4])
    finally:
        engine.shutdown(0.0)
    assert [ids for ids, _ in got] == [reference(model, short, 60), reference(model, long_, 4)]
    log = calls.log
    chunks = [i for i, (op, _) in enumerate(log) if op == "prefill"]
    assert sum(sum(log[i][1]) for i in chunks) == len(short) + len(long_)
    assert len(chunks) >= (len(short) + len(long_)) // 24
    for a, b in zip(chunks[1:], chunks[2:]):  # after the step that admitted both: a decode between chunks
        assert ("decode", 1) in log[a + 1 : b]
    for i in chunks:
        decoding = 1 if ("decode", 1) in log[i + 1 : i + 2] else 0
        assert sum(log[i][1]) + decoding <= 24


def test_mixed_steps_prefill_as_extra_c_rows(ckpts):
    """With the C decode step, a prompt that arrives while a stream decodes is prefilled as extra rows of the
    decode steps (a few tokens each, sized from measured step times), not by separate PyTorch forwards: the
    stream gets a token every step, and both answers equal their greedy runs. The first, short prompt, with
    nothing decoding, is one C step of its own (`ROWS_PREFILL_MAX`), whose last row alone computes logits."""
    from ernie45.fast import optimize_for_inference

    model, tok = load(ckpts["dense"])
    optimize_for_inference(model)
    if getattr(model, "fast_decoder", None) is None:
        pytest.skip("no C decode step on this machine")
    engine = started(EngineArgs(max_num_seqs=2, max_model_len=1024, block_size=4), model, tok)
    short, long_ = tok.encode("床前明月光"), tok.encode(LONG * 2)
    calls = Calls(engine)

    async def go():
        first = engine.submit([short], [SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)])
        it = aiter(first)
        ids = (await anext(it))[1].token_ids
        second = engine.submit([long_], [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)])

        async def rest(it, ids):
            async for _, out in it:
                ids = ids + out.token_ids
            return ids

        async def collect(g):
            return await rest(aiter(g), [])

        return await asyncio.gather(rest(it, ids), collect(second))

    try:
        a, b = asyncio.run(go())
    finally:
        engine.shutdown(0.0)
    assert a == reference(model, short, 80)
    assert len(b) == 4 and b == reference(model, long_, 4)
    log = calls.log
    assert [op for op, _ in log].count("prefill") == 0
    assert log[0] == ("decode", len(short)) and calls.want[0] == [False] * (len(short) - 1) + [True]
    mixed = [rows for op, rows in log[1:] if op == "decode" and rows > 1]
    assert sum(mixed) - len(mixed) >= len(long_) - 4 and max(mixed) < len(long_)  # in several chunks
    # chunk rows skip the lm_head: logits for the decoding stream and the prompt's last row only
    flags = [w for w in calls.want[1:] if w is not None]
    assert flags and all(w[0] for w in flags)  # calls with prompt rows (the others compute every row)
    assert sum(sum(w[1:]) for w in flags) == 1 and flags[-1][-1]


def test_short_prompts_alone_prefill_as_one_c_step_and_many_as_a_pytorch_batch(ckpts):
    """With nothing decoding and the C step attached, prompts ending within `ROWS_PREFILL_MAX` positions and
    totalling at most that many tokens are prefilled as the rows of one C step (only their last rows compute
    logits); more prompt tokens at once go to one batched PyTorch prefill. Answers equal their greedy runs."""
    from ernie45.fast import ROWS_PREFILL_MAX, optimize_for_inference

    model, tok = load(ckpts["dense"])
    optimize_for_inference(model)
    if getattr(model, "fast_decoder", None) is None:
        pytest.skip("no C decode step on this machine")
    text = tok.encode(LONG * 4)
    for count, length in ((2, 40), (3, ROWS_PREFILL_MAX // 3 + 10)):
        prompts = [text[i * 7 : i * 7 + length] for i in range(count)]
        engine = Engine(model, tok, EngineArgs(max_num_seqs=4, max_model_len=1024, block_size=4))
        calls = Calls(engine)

        async def go(engine=engine, prompts=prompts):
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            groups = [engine.submit([p], [params]) for p in prompts]
            engine.start()  # after every submission: the first step sees them all

            async def collect(g):
                return [t for _, out in [x async for x in g] for t in out.token_ids]

            return await asyncio.gather(*(collect(g) for g in groups))

        try:
            got = asyncio.run(go())
        finally:
            engine.shutdown(0.0)
        assert got == [reference(model, p, 4) for p in prompts]
        first = calls.log[0]
        if count * length <= ROWS_PREFILL_MAX:
            assert first == ("decode", count * length)
            assert calls.want[0] == ([False] * (length - 1) + [True]) * count
        else:
            assert first == ("prefill", [length] * count)


def test_engine_lets_the_event_loop_send_a_steps_tokens_before_the_next_step(ckpts):
    """After each step the engine waits (the GIL released) until the event loop has taken the step's tokens:
    otherwise the loop's per-token work runs during the next step and pre-empts one of its threads. Every decode
    call finds the consumer holding every token emitted before it (the deadline is lifted so the order is exact)."""
    model, tok = load(ckpts["dense"])
    engine = Engine(model, tok, EngineArgs(max_num_seqs=1, max_model_len=256, block_size=4))
    engine._settle_s = 60.0
    got: list[int] = []
    seen: list[int] = []
    decode = engine.runner.decode

    def d(tokens, positions, tables, want=None):
        seen.append(len(got))
        return decode(tokens, positions, tables, want)

    engine.runner.decode = d
    engine.start()

    async def go():
        g = engine.submit([tok.encode("床前明月光")], [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)])
        async for _, out in g:
            got.extend(out.token_ids)

    try:
        asyncio.run(go())
    finally:
        engine.shutdown(0.0)
    assert len(got) == 12 and seen == list(range(1, 12))  # the prompt's pass gives token 1, decode call i token i + 2


def test_small_pool_preempts_and_never_corrupts(ckpts):
    """A pool smaller than the requests' total: sequences are preempted and recomputed (mostly from the
    prefix cache) or wait, and every answer still equals its own greedy run."""
    model, tok = load(ckpts["moe"])
    bs, max_len = 4, 160
    per_block = kv_bytes_per_token(model) * bs
    args = EngineArgs(max_num_seqs=4, max_model_len=max_len, block_size=bs, kv_cache_memory=per_block * 48)
    engine = started(args, model, tok)
    prompts = [tok.encode(t) for t in (LONG[:30], "床前明月光", "The quick brown fox", LONG[10:50])]
    want = [reference(model, p, 60) for p in prompts]
    try:
        got = run(engine, prompts, 60)
    finally:
        engine.shutdown(0.0)
    assert engine.blocks.num_blocks == 48
    assert [ids for ids, _ in got] == want
    assert engine.metrics.registry.get_sample_value("ernie45_num_preemptions_total") > 0
    assert engine.blocks.num_used == 0


def test_pool_too_small_for_one_sequence_is_a_clear_error(ckpts):
    from ernie45.errors import ErnieError

    model, tok = load(ckpts["dense"])
    with pytest.raises(ErnieError, match="cannot hold one sequence of --max-model-len 512"):
        Engine(model, tok, EngineArgs(max_model_len=512, kv_cache_memory=kv_bytes_per_token(model) * 100))


# ---- 8-bit KV cache -----------------------------------------------------------------------------------
POEMS = (
    "《静夜思》李白\n床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    "《登鹳雀楼》王之涣\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "《春晓》孟浩然\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n"
    "《相思》王维\n红豆生南国，春来发几枝。愿君多采撷，此物最相思。\n"
    "《江雪》柳宗元\n千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。\n"
    "《悯农》李绅\n锄禾日当午，汗滴禾下土。谁知盘中餐，粒粒皆辛苦。\n"
)


def test_quantize_rows_error_is_bounded():
    from ernie45.serve.kv import dequantize_rows, quantize_rows

    x = torch.randn(5, 3, 64) * torch.tensor([0.01, 1.0, 30.0])[None, :, None]
    x[0, 0] = 0  # an all-zero row: scale 0, values 0
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (5, 3) and q.abs().max() <= 127
    y = dequantize_rows(q, s, torch.float32)
    assert torch.equal(y[0, 0], torch.zeros(64)) and s[0, 0] == 0
    assert ((y - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 * 1.0001).all()


def _prompt_ppl(engine: Engine, ids: list[int]) -> float:
    async def go():
        g = engine.submit([ids], [SamplingParams(max_tokens=0, prompt_logprobs=0)])
        async for _, out in g:
            return out.prompt_logprobs

    lps = asyncio.run(go())
    return math.exp(-sum(t.logprob for t in lps[1:]) / (len(lps) - 1))


def test_int8_kv_cache_perplexity_within_half_a_percent():
    """The bundled model on held-out poems, prefilled in chunks so that attention reads the cached (int8)
    keys/values: perplexity changes by at most 0.5 %, in half the KV memory of bf16."""
    model, tok = ernie45.load(dtype="bfloat16", device="cpu")
    ids = tok.encode(POEMS)
    assert len(ids) > 150
    ppl = {}
    for kv in ("auto", "int8"):
        args = EngineArgs(max_num_seqs=1, max_model_len=512, block_size=16, max_num_batched_tokens=32,
                          kv_cache_dtype=kv)
        engine = started(args, model, tok)
        try:
            ppl[kv] = _prompt_ppl(engine, ids)
        finally:
            engine.shutdown(0.0)
    print(f"held-out perplexity: bf16 KV {ppl['auto']:.3f}, int8 KV {ppl['int8']:.3f}")
    assert abs(ppl["int8"] / ppl["auto"] - 1) <= 0.005, ppl
    cfg = model.config
    rows = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads  # keys and values, per layer and kv head
    assert kv_bytes_per_token(model) == rows * cfg.head_dim * 2  # bf16
    assert kv_bytes_per_token(model, "int8") == rows * (cfg.head_dim + 4)  # int8 values + an fp32 scale


def test_int8_kv_cache_c_step_matches_pytorch_path(ckpts):
    """The C step reads the int8 pages the PyTorch prefill wrote, exactly as the PyTorch path dequantises them:
    greedy answers agree between the two decode paths."""
    from ernie45.fast import optimize_for_inference

    prompts = None
    got = {}
    for native in (False, True):
        model, tok = load(ckpts["moe"])
        if native:
            optimize_for_inference(model)
            if getattr(model, "fast_decoder", None) is None:
                pytest.skip("no C decode step on this machine")
        prompts = prompts or [tok.encode(t) for t in ("床前明月光", LONG[:40], "The quick brown fox jumps")]
        args = EngineArgs(max_num_seqs=3, max_model_len=256, block_size=4, kv_cache_dtype="int8")
        engine = started(args, model, tok)
        assert engine.runner.native == native and engine.runner.cache.k[0].dtype == torch.int8
        try:
            got[native] = [ids for ids, _ in run(engine, prompts, 16)]
        finally:
            engine.shutdown(0.0)
    assert got[True] == got[False]
