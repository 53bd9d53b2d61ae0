"""Incremental detokenisation (byte fallback, no U+FFFD on the way), stop strings, streamers."""

from __future__ import annotations

import io
import random

import pytest

from ernie45.generation import IncrementalDetokenizer, StopStringFilter, TextIteratorStreamer, TextStreamer
from ernie45.generation.streaming import ends_with_stop_string
from ernie45.tokenizer import Tokenizer

# Characters absent from the test tokenizer's training corpus, so they fall back to UTF-8 byte tokens.
CHINESE = "你好，世界！今天天气很好。我们一起去公园散步吧。知识就是力量，床前明月光。😀 ok"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


def _stream(tok, ids, skip_special_tokens=True):
    d = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [d.add(i) for i in ids]
    return deltas, d.flush()


def test_chinese_byte_fallback_streams_exactly(tok):
    ids = tok.encode(CHINESE)
    pieces = tok.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) >= 30  # really exercised byte fallback
    deltas, tail = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == CHINESE and tail == ""
    # a 3-byte character is emitted whole, at the token that completes it
    first = [d for d in deltas if d]
    assert first[0] == "你" and deltas.index("你") == 2


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("床前明月光") + [tok.eos_token_id]
    assert "".join(_stream(tok, ids)[0]) == "床前明月光"
    deltas, tail = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == "床前明月光</s>" == tok.decode(ids)


@pytest.mark.parametrize("seed", range(5))
def test_random_tokens_concatenate_to_decode(tok, seed):
    """Any id sequence, even broken UTF-8: the deltas plus flush equal decode(ids), and no delta ends
    inside an unfinished character."""
    rng = random.Random(seed)
    byte_ids = [
        i for i, p in enumerate(tok.convert_ids_to_tokens(range(tok.vocab_size))) if p.startswith("<0x")
    ]
    ids = tok.encode(CHINESE)
    ids = [rng.choice(byte_ids) if rng.random() < 0.1 else t for t in ids] + [rng.choice(byte_ids)]
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)
    assert all(not d.endswith("\ufffd") for d in deltas)


def _filter(chunks, stops):
    f = StopStringFilter(stops)
    out, hit = [], False
    for c in chunks:
        text, hit = f.add(c)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(f.flush())
    return out, hit


@pytest.mark.parametrize(
    "text,stops,expected,hit",
    [
        ("Hello STOP world", ["STOP"], "Hello ", True),
        ("Hello STOP world", ["world", "STOP"], "Hello ", True),  # the earliest stop string wins
        ("Hello STx STOx done", ["STOP"], "Hello STx STOx done", False),  # false starts are released
        ("end with ST", ["STOP"], "end with ST", False),  # held tail is released at the end
        ("床前明月光，疑是地上霜", ["地上"], "床前明月光，疑是", True),
        ("abc", [], "abc", False),
    ],
)
def test_stop_string_filter_every_split(text, stops, expected, hit):
    """One character at a time and all at once: the same text, and no emitted piece is part of a stop string."""
    for chunks in ([c for c in text], [text], [text[:5], text[5:]]):
        out, got_hit = _filter(chunks, stops)
        assert "".join(out) == expected and got_hit == hit
        emitted = ""
        for piece in out:
            emitted += piece
            assert not any(s in emitted for s in stops)


def test_ends_with_stop_string(tok):
    ids = tok.encode("床前明月光，疑是地上霜")
    text_upto = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    first = next(i for i, t in enumerate(text_upto) if "地上" in t)
    hits = [ends_with_stop_string(tok, ids[: i + 1], ["地上"]) for i in range(len(ids))]
    assert hits == [i == first for i in range(len(ids))]  # caught by the completing token only
    assert not ends_with_stop_string(tok, ids, [])


def test_text_streamer_prints_continuation(tok):
    buf = io.StringIO()
    s = TextStreamer(tok, skip_prompt=True, file=buf)
    prompt, gen = tok.encode("床前"), tok.encode(CHINESE)
    s.put([prompt])
    for t in gen:
        s.put([t])
    s.end()
    assert buf.getvalue() == CHINESE + "\n"


def test_iterator_streamer_with_stop_string(tok):
    s = TextIteratorStreamer(tok, skip_prompt=False, stop_strings=["公园"], timeout=5)
    for t in tok.encode(CHINESE):
        s.put(t)
    s.end()
    assert "".join(s) == CHINESE[: CHINESE.index("公园")]


def test_streamer_rejects_batches(tok):
    with pytest.raises(ValueError, match="batch size 1"):
        TextStreamer(tok).put([[1, 2], [3, 4]])
