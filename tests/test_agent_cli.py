"""Structured output and reasoning display in the Python API and the `generate` / `chat` commands.

A Thinking-style checkpoint (random weights, tokenizer built at test time) is made to write an exact
reasoning/answer sequence with a Lark grammar naming the marker tokens, so what the commands print is known.
"""

from __future__ import annotations

import io
import json
import sys

import jsonschema
import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.cli import main as cli
from ernie45.commands import ReplyPrinter
from ernie45.commands.chat import chat
from ernie45.errors import ErnieError
from ernie45.generation import generate, stream_generate, structured
from ernie45.generation.generate import model_generation_config

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["title", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("dense", seed=3)
    path = save_hf(hf, tmp_path_factory.mktemp("cli_agent") / "tiny", tokenizer_dir)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    return path, model, tok


@pytest.fixture(scope="module")
def thinking(thinking_ckpt):
    model, tok = ernie45.load(thinking_ckpt[1], dtype="float32", device="cpu")
    return thinking_ckpt[1], model, tok, thinking_ckpt[2]


def _run(argv, capsys, stdin=""):
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        rc = cli([*argv, "--dtype", "float32"])
    finally:
        sys.stdin = old
    return (rc, *capsys.readouterr())


def _forced(ids, *parts) -> str:
    return "start: " + " ".join(f"<[{ids[p]}]>" if p in ids else json.dumps(p, ensure_ascii=False) for p in parts)


REPLY = ["先想一想。\n", "</think>", "\n\n", "<response>", "\n春眠不觉晓\n", "</response>", "\n"]


# ---- the Python API ---------------------------------------------------------------------------------------
def test_generate_follows_a_json_schema(plain):
    _, model, tok = plain
    ids = tok.encode("Answer in JSON:")
    grammar = structured.json_schema_grammar(SCHEMA)
    for seed in range(4):
        text = "".join(c.text for c in stream_generate(model, tok, ids, do_sample=True, seed=seed,
                                                        max_new_tokens=80, grammar=grammar))
        jsonschema.validate(json.loads(text), SCHEMA)
    # batched rows each follow it, and finish (EOS) when complete
    out = generate(model, [ids, ids], tokenizer=tok, do_sample=True, seed=1, max_new_tokens=80,
                   grammar=structured.regex_grammar("[a-c]{2,5}"))
    eos = set(model_generation_config(model).eos_token_ids)
    for row in out[:, len(ids):].tolist():
        body = [t for t in row if t not in eos and t != model_generation_config(model).pad_token_id]
        assert 2 <= len(tok.decode(body)) <= 5 and set(tok.decode(body)) <= set("abc")
    with pytest.raises(ErnieError, match="beam search"):
        generate(model, [ids], tokenizer=tok, num_beams=2, grammar=grammar)
    with pytest.raises(ErnieError, match="invalid grammar"):
        list(stream_generate(model, tok, ids, grammar=structured.lark_grammar("start: missing")))


def test_greedy_grammar_picks_the_best_allowed_token(plain):
    """With a grammar, greedy picks the highest-scoring allowed token: check one step against the logits."""
    _, model, tok = plain
    ids = tok.encode("x")
    grammar = structured.compile_grammar(tok, structured.regex_grammar("(ab|cd|ef)"), model_generation_config(model).eos_token_ids)
    guide = grammar.guide()
    allowed = guide.allowed(model.config.vocab_size)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    want = int(torch.where(allowed, logits, torch.tensor(float("-inf"))).argmax())
    step = next(iter(stream_generate(model, tok, ids, do_sample=False, max_new_tokens=4, grammar=grammar)))
    assert step.token == want and tok.decode([want]) in ("a", "ab", "c", "cd", "e", "ef")


# ---- the commands -----------------------------------------------------------------------------------------
def test_generate_cli_json_schema_and_regex(plain, capsys, tmp_path):
    path = plain[0]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    rc, out, err = _run(["generate", "--model", path, "--prompt", "JSON:", "--json-schema", str(schema),
                         "--temperature", "1", "--seed", "0", "--max-new-tokens", "80"], capsys)
    assert rc == 0, err
    jsonschema.validate(json.loads(out), SCHEMA)
    rc, out, err = _run(["generate", "--model", path, "--prompt", "n=", "--regex", "[0-9]{3}", "--max-new-tokens", "8"],
                        capsys)
    assert rc == 0 and out.rstrip("\n").isdigit() and len(out.rstrip("\n")) == 3


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--json-schema", "NOPE.json"], "cannot read"),
        (["--json-schema", "BAD"], "not valid JSON"),
        (["--json-schema", "WEIRD"], "invalid grammar"),
        (["--grammar", "LARK"], "invalid grammar"),
        (["--regex", "[0-9", "--num-beams", "2"], "beam search"),
    ],
)
def test_generate_cli_bad_grammar(plain, capsys, tmp_path, args, msg):
    (tmp_path / "BAD").write_text("{not json")
    (tmp_path / "WEIRD").write_text(json.dumps({"type": "nosuchtype"}))
    (tmp_path / "LARK").write_text("start: undefined_rule")
    args = [str(tmp_path / a) if a in ("NOPE.json", "BAD", "WEIRD", "LARK") else a for a in args]
    rc, out, err = _run(["generate", "--model", plain[0], "--prompt", "hi", *args], capsys)
    assert rc == 1 and out == "" and err.startswith("error: ") and msg in err and "Traceback" not in err


def test_generate_cli_shows_reasoning_apart(thinking, capsys, tmp_path):
    path, _, tok, ids = thinking
    grammar = tmp_path / "forced.lark"
    grammar.write_text(_forced(ids, *REPLY))
    prompt = tok.apply_chat_template([{"role": "user", "content": "写诗"}])
    assert prompt.endswith("<think>\n")
    base = ["generate", "--model", path, "--prompt", prompt, "--grammar", str(grammar), "--max-new-tokens", "60"]
    rc, out, err = _run(base, capsys)
    assert rc == 0 and out == "先想一想。\n\n春眠不觉晓\n", err  # not a terminal: plain, then a blank line
    rc, out, _ = _run([*base, "--hide-reasoning"], capsys)
    assert out == "春眠不觉晓\n"
    rc, out, _ = _run([*base, "--json"], capsys)
    res = json.loads(out)
    assert (res["reasoning"], res["content"]) == ("先想一想。", "春眠不觉晓")
    assert res["text"] == "".join(REPLY)


def test_reply_printer_dims_reasoning_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = ReplyPrinter(out, reasoning=True)
    for piece in ["先想", "一想。\n</th", "ink>\n\n<response>\n春眠", "不觉晓\n</response>\n"]:
        p.write(piece)
    p.finish()
    assert out.getvalue() == "\x1b[2m先想一想。\x1b[0m\n\n春眠不觉晓\n"
    assert (p.reasoning, p.content) == ("先想一想。", "春眠不觉晓")
    out = Tty()
    p = ReplyPrinter(out, reasoning=True, hide=True)
    p.write("想\n</think>\n\n<response>\n答\n</response>\n")
    p.finish()
    assert out.getvalue() == "答\n"
    out = Tty()  # still thinking when the reply ends: the dim style is closed
    p = ReplyPrinter(out, reasoning=True)
    p.write("想啊想")
    p.finish()
    assert out.getvalue() == "\x1b[2m想啊想\x1b[0m\n"


def test_chat_keeps_only_the_answer_in_history(thinking, monkeypatch):
    """The Thinking chat prints reasoning apart and sends only the answer back in the next turn's prompt."""
    path, model, tok, ids = thinking
    import ernie45.commands.chat as chat_mod

    prompts = []
    real = chat_mod.fit_history

    def spy(tokenizer, messages, context, max_new):
        prompts.append([dict(m) for m in messages])
        return real(tokenizer, messages, context, max_new)

    monkeypatch.setattr(chat_mod, "fit_history", spy)
    grammar = structured.compile_grammar(tok, structured.lark_grammar(_forced(ids, *REPLY)),
                                         list(dict.fromkeys(model_generation_config(model).eos_token_ids + tok.stop_token_ids)))
    import ernie45.generation as gen_mod

    real_stream = gen_mod.stream_generate

    def forced_stream(*a, **kw):
        return real_stream(*a, grammar=grammar, **kw)

    monkeypatch.setattr(gen_mod, "stream_generate", forced_stream)
    out = io.StringIO()
    rc = chat(model, tok, stdin=io.StringIO("写诗\n再来\n"), out=out, err=io.StringIO(), max_new_tokens=60)
    assert rc == 0
    assert out.getvalue() == "先想一想。\n\n春眠不觉晓\n" * 2
    assert prompts[1][1] == {"role": "assistant", "content": "春眠不觉晓"}
