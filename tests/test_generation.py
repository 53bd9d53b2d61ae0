"""generate() gives transformers' exact token ids (greedy, beams, penalties, sampling from the same RNG),
per-row stopping, stop strings, generation_config.json defaults, the step iterator and bad input."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.errors import ErnieError
from ernie45.generation import TextIteratorStreamer, TextStreamer, generate, generate_step, stream_generate

N = 32  # new tokens in every parity test
PROMPTS = ["床前明月光，疑是", "Hello world! The quick brown"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread when the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory, tokenizer_dir):
    """(transformers model, ernie45 model, tokenizer) with the same random weights."""
    kind = request.param
    hf = make_hf_model(kind, bias_scale=0.3 if kind == "moe" else 0.0)
    path = save_hf(hf, tmp_path_factory.mktemp(kind) / "ckpt", tokenizer_dir)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    return hf, model, tok, path


@pytest.fixture(scope="module")
def moe(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("moe", seed=1, bias_scale=0.3)
    path = save_hf(hf, tmp_path_factory.mktemp("moe1") / "ckpt", tokenizer_dir)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    return hf, model, tok, path


def _batch(tok):
    """The prompts left padded with pad id 0, and their attention mask."""
    ids = [tok.encode(p) for p in PROMPTS]
    S = max(len(i) for i in ids)
    batch = torch.tensor([[0] * (S - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (S - len(i)) + [1] * len(i) for i in ids])
    return batch, mask


def _single(tok):
    return torch.tensor([tok.encode(PROMPTS[0])])


def _check(hf, model, ids, mask=None, **kw):
    ref = hf.generate(ids, attention_mask=mask, **kw)
    out = model.generate(ids, attention_mask=mask, **kw)
    assert out.shape == ref.shape and torch.equal(out, ref), (ref[:, ids.shape[1] :], out[:, ids.shape[1] :])
    return out


def test_greedy_matches_transformers(pair):
    hf, model, tok, _ = pair
    kw = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N)
    out = _check(hf, model, _single(tok), **kw)
    assert out.shape[1] == _single(tok).shape[1] + N
    ids, mask = _batch(tok)
    _check(hf, model, ids, mask, **kw)


def test_beam_search_matches_transformers(pair):
    hf, model, tok, _ = pair
    kw = dict(
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.7,
        early_stopping=True,
        max_new_tokens=N,
        min_new_tokens=N,
    )
    out = _check(hf, model, _single(tok), **kw)
    assert out.shape == (2, _single(tok).shape[1] + N)
    ids, mask = _batch(tok)
    _check(hf, model, ids, mask, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "early_stopping,length_penalty,num_beams,n_ret", [(False, 1.5, 3, 2), ("never", -0.5, 4, 4)]
)
def test_beam_search_with_finishing_beams(moe, early_stopping, length_penalty, num_beams, n_ret):
    """Frequent tokens as EOS, so hypotheses finish at different lengths and the early-stop rules matter."""
    hf, model, tok, _ = moe
    ids, mask = _batch(tok)
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)[:, ids.shape[1] :]
    eos = sorted({int(greedy[0, 4]), int(greedy[1, 7]), 2})
    out = _check(
        hf,
        model,
        ids,
        mask,
        num_beams=num_beams,
        num_return_sequences=n_ret,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        max_new_tokens=N,
    )
    assert out.shape[0] == 2 * n_ret
    assert any(t in eos for t in out[:, ids.shape[1] :].flatten().tolist())


def test_penalties_match_transformers(moe):
    hf, model, tok, _ = moe
    ids, mask = _batch(tok)
    _check(
        hf,
        model,
        ids,
        mask,
        do_sample=False,
        max_new_tokens=16,
        repetition_penalty=1.3,
        no_repeat_ngram_size=3,
    )


def test_per_row_stopping_pads_finished_rows(moe):
    hf, model, tok, _ = moe
    ids, mask = _batch(tok)
    S = ids.shape[1]
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, eos_token_id=[])[
        :, S:
    ]
    stop_token = int(greedy[0, 5])
    out = _check(hf, model, ids, mask, do_sample=False, max_new_tokens=16, eos_token_id=stop_token)
    gen = out[:, S:].tolist()
    first = gen[0].index(stop_token)
    assert all(t == 0 for t in gen[0][first + 1 :])  # the finished row is padded with pad_token_id (0)
    if stop_token not in gen[1]:
        assert len(gen[1]) == 16


def test_sampling_draws_what_transformers_draws(pair):
    hf, model, tok, _ = pair
    ids, mask = _batch(tok)
    kw = dict(do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=16, num_return_sequences=2)
    torch.manual_seed(11)
    ref = hf.generate(ids, attention_mask=mask, **kw)  # top_k=50 applies by default in both
    torch.manual_seed(11)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), ref)
    a = model.generate(ids, attention_mask=mask, seed=11, **kw)
    assert torch.equal(a, ref)  # seed= uses a private generator with the same stream as torch.manual_seed
    assert torch.equal(a, model.generate(ids, attention_mask=mask, seed=11, **kw))
    assert not torch.equal(a, model.generate(ids, attention_mask=mask, seed=12, **kw))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_stop_strings_match_transformers(moe, hf_tokenizer):
    """A stop string spanning two sampled tokens stops both implementations at the same token."""
    hf, model, tok, _ = moe
    ids = _single(tok)
    S = ids.shape[1]
    kw = dict(do_sample=True, top_k=0, max_new_tokens=N, eos_token_id=[])
    full = model.generate(ids, seed=0, **kw)[0, S:].tolist()
    cjk = [len(tok.decode([t])) == 1 and "\u4e00" <= tok.decode([t]) <= "\u9fff" for t in full]
    i = next(i for i in range(N // 2, N - 1) if cjk[i] and cjk[i + 1])  # two whole-character tokens
    stop = tok.decode(full[i : i + 2])
    torch.manual_seed(0)
    ref = hf.generate(ids, stop_strings=[stop], tokenizer=hf_tokenizer, **kw)
    out = model.generate(ids, seed=0, stop_strings=[stop], tokenizer=tok, **kw)
    assert torch.equal(out, ref) and out.shape[1] == S + i + 2
    chunks = list(stream_generate(model, tok, ids[0].tolist(), seed=0, stop_strings=stop, **kw))
    text = tok.decode(full, skip_special_tokens=True)
    assert "".join(c.text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].finish_reason == "stop" and [c.token for c in chunks] == full[: i + 2]


def test_beam_search_stop_strings(moe):
    """Beams that generate a stop string are finished there (ids end with the completing token)."""
    _, model, tok, _ = moe
    ids = _single(tok)
    S = ids.shape[1]
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=16, eos_token_id=[])
    text = tok.decode(model.generate(ids, **kw)[0, S:].tolist())
    stop = next(c for c in text[len(text) // 3 :] if c != "\ufffd")
    out = model.generate(ids, stop_strings=[stop], tokenizer=tok, **kw)
    stopped = 0
    for row in out[:, S:].tolist():
        gen = [t for t in row if t != -1]  # no EOS and pad 0: transformers fills ended beams with -1
        if stop in tok.decode(gen):
            assert stop not in tok.decode(gen[:-1])
            stopped += 1
        else:
            assert len(gen) == 16
    assert stopped >= 1


def test_generate_step_and_stream_generate(moe):
    _, model, tok, _ = moe
    ids, mask = _batch(tok)
    S = ids.shape[1]
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=[])
    steps = list(generate_step(model, ids, mask, do_sample=False, max_new_tokens=10, eos_token_id=[]))
    assert [s.tokens for s in steps] == out[:, S:].T.tolist()
    assert steps[-1].finish_reasons == ["length", "length"] and not any(steps[-2].finished)
    assert torch.equal(steps[-1].sequences, out)
    it = generate_step(model, ids, mask, max_new_tokens=10, output_scores=True, output_logits=True)
    first = next(it)
    assert first.scores.shape == first.logits.shape == (2, model.config.vocab_size)
    it.close()  # stopping early is fine

    prompt = tok.encode(PROMPTS[0])
    chunks = list(stream_generate(model, tok, PROMPTS[0], max_new_tokens=12, eos_token_id=[]))
    tokens = [c.token for c in chunks]
    assert tokens == model.generate([prompt], max_new_tokens=12, eos_token_id=[])[0, len(prompt) :].tolist()
    assert "".join(c.text for c in chunks) == tok.decode(tokens, skip_special_tokens=True)
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.generation_tokens) == ("length", len(prompt), 12)
    assert last.ttft > 0 and last.generation_tps > 0


def test_streamers_follow_the_transformers_protocol(moe):
    hf, model, tok, _ = moe
    ids = _single(tok)
    S = ids.shape[1]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    result = {}
    t = threading.Thread(
        target=lambda: result.update(out=model.generate(ids, max_new_tokens=12, streamer=streamer))
    )
    t.start()
    text = "".join(streamer)
    t.join()
    assert text == tok.decode(result["out"][0, S:], skip_special_tokens=True)
    # ernie45's TextStreamer also works inside transformers' generate
    import io

    buf = io.StringIO()
    ref = hf.generate(ids, max_new_tokens=12, streamer=TextStreamer(tok, skip_prompt=True, file=buf))
    assert buf.getvalue() == tok.decode(ref[0, S:], skip_special_tokens=True) + "\n"


def test_generation_config_json_sets_defaults(moe, tmp_path):
    _, model, tok, path = moe
    d = tmp_path / "ckpt"
    shutil.copytree(path, d)
    (d / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [], "pad_token_id": 0, "max_new_tokens": 7, "do_sample": True, "top_k": 1}
        )
    )
    m2, _ = ernie45.load(d, dtype="float32", device="cpu")
    ids = _single(tok)
    greedy = model.generate(ids, do_sample=False, max_new_tokens=7, eos_token_id=[])
    assert torch.equal(m2.generate(ids), greedy)  # top_k=1 sampling is greedy
    assert m2.generate(ids, max_new_tokens=3).shape[1] == ids.shape[1] + 3  # keywords win over the file
    # transformers' default: 20 new tokens when no length is given
    assert model.generate(ids, eos_token_id=[]).shape[1] == ids.shape[1] + 20


def test_bad_input(moe):
    _, model, tok, _ = moe
    ids = _single(tok)
    with pytest.raises(ErnieError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ErnieError, match="must lie in"):
        generate(model, [[5, 100000]])
    with pytest.raises(ErnieError, match="context window"):
        generate(model, torch.full((1, model.config.max_position_embeddings), 5))
    with pytest.raises(ErnieError, match="right padding"):
        generate(model, [[5, 6, 0]], attention_mask=[[1, 1, 0]])
    with pytest.raises(ErnieError, match="tokenizer"):
        generate(model, ids, stop_strings=["x"])
    with pytest.raises(ErnieError, match="beam search"):
        generate(model, ids, num_beams=2, streamer=TextStreamer(tok))
    with pytest.raises(ErnieError, match="beam search"):
        generate_step(model, ids, num_beams=2)
    with pytest.raises(ErnieError, match="num_return_sequences"):
        generate(model, ids, num_return_sequences=2)
    with pytest.raises(ErnieError, match="top_p"):
        stream_generate(model, tok, "hi", top_p=0.0)
    with pytest.raises(ErnieError, match="max_length"):
        generate(model, ids, max_length=2)
