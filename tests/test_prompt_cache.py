"""`PromptCache`: a chat's next turn prefills only what it added, and answers exactly as a cold call does."""

from __future__ import annotations

import io

from conftest import make_hf_model, save_hf

import ernie45
from ernie45.commands.chat import chat
from ernie45.generation import PromptCache, generate, stream_generate


def _model(tmp_path, tokenizer_dir, kind="dense"):
    path = save_hf(make_hf_model(kind, max_position_embeddings=2048), tmp_path / kind, tokenizer_dir)
    return ernie45.load(path, dtype="float32", device="cpu")


class Fed:
    """Counts the tokens each model call is fed (prefill length, then 1 per decode step)."""

    def __init__(self, model):
        self.sizes: list[int] = []
        inner = model.forward

        def forward(input_ids, *a, **kw):
            self.sizes.append(input_ids.shape[1])
            return inner(input_ids, *a, **kw)

        model.forward = forward


def greedy(model, ids, n, cache=None):
    out = generate(model, [ids], max_new_tokens=n, do_sample=False, eos_token_id=[], prompt_cache=cache)
    return out[0, len(ids) :].tolist()


def test_next_turn_prefills_only_new_tokens(tmp_path, tokenizer_dir):
    model, tok = _model(tmp_path, tokenizer_dir, "moe")
    cache = PromptCache()
    turn1 = tok.encode("春眠不觉晓，处处闻啼鸟。")
    out1 = greedy(model, turn1, 10, cache)
    assert cache.reused == 0 and cache.tokens == turn1 + out1[:-1]  # the last token was never fed
    turn2 = turn1 + out1 + tok.encode("夜来风雨声")
    fed = Fed(model)
    out2 = greedy(model, turn2, 10, cache)
    assert cache.reused == len(turn1) + len(out1) - 1
    assert fed.sizes[0] == len(turn2) - cache.reused and set(fed.sizes[1:]) == {1}
    model.forward = type(model).forward.__get__(model)
    assert out2 == greedy(model, turn2, 10)  # a cold call
    # an edited history reuses the common prefix only; a prompt already fully cached recomputes its last token
    edited = turn1[:5] + tok.encode("花落知多少")
    assert greedy(model, edited, 6, cache) == greedy(model, edited, 6) and cache.reused == 5
    same = cache.tokens[:8]
    assert greedy(model, same, 4, cache) == greedy(model, same, 4) and cache.reused == 7


def test_cache_grows_and_serves_one_caller_at_a_time(tmp_path, tokenizer_dir):
    model, tok = _model(tmp_path, tokenizer_dir)
    cache = PromptCache()
    ids = tok.encode("知识就是力量。")
    greedy(model, ids, 4, cache)
    small = cache._cache.max_len
    long_ = cache.tokens + tok.encode("白日依山尽，黄河入海流。" * 30)
    assert len(long_) + 8 > small
    assert greedy(model, long_, 8, cache) == greedy(model, long_, 8)  # reallocated, the prefix copied over
    assert cache.reused == len(ids) + 3 and cache._cache.max_len > small
    # a second caller while the first is streaming gets a fresh cache of its own, and the right answer
    first = stream_generate(model, tok, long_, max_new_tokens=5, do_sample=False, prompt_cache=cache)
    next(first)
    other = tok.encode("床前明月光")
    assert greedy(model, other, 5, cache) == greedy(model, other, 5)
    first.close()
    assert cache.tokens[: len(long_)] == long_  # the closed stream recorded what it left in the cache


def test_chat_reports_cached_turns(tmp_path, tokenizer_dir):
    """`ernie45 chat` keeps the conversation's cache: the second turn's prompt is mostly cached."""
    model, tok = _model(tmp_path, tokenizer_dir)
    err = io.StringIO()
    out = io.StringIO()
    chat(model, tok, stdin=io.StringIO("你好\n再说一遍\n"), out=out, err=err, verbose=True, max_new_tokens=8,
         do_sample=False)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("prompt:")]
    assert len(lines) == 2 and "cached" not in lines[0] and " cached)" in lines[1]
    assert out.getvalue().count("\n") == 2  # two replies
