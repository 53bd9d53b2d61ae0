"""`ernie45.langchain.ChatErnie`: replies against transformers' greedy `generate`, streaming (sync, async, callbacks)
equal to invoke, stop sequences, usage_metadata, per-call parameters, an LCEL chain, the documented snippets, and
the ChatOpenAI recipe against a real `ernie45 serve`. (langchain-tests' standard suite: tests/langchain_standard.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
import time
from typing import Literal

import pytest
import torch
from conftest import make_hf_model, save_hf
from pydantic import BaseModel, Field

pytest.importorskip("langchain_core")
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from ernie45.errors import ErnieError  # noqa: E402
from ernie45.langchain import ChatErnie, to_chat_messages  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
QUESTION = "写一首关于春天的诗"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads spin badly when the CPUs are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("dense", seed=1, vocab_size=400)
    return hf, save_hf(hf, tmp_path_factory.mktemp("lc") / "tiny-chat", tokenizer_dir)


@pytest.fixture(scope="module")
def llm(ckpt):
    # The penalty keeps the random model's greedy reply from repeating one token.
    return ChatErnie(
        model=ckpt[1], temperature=0, max_tokens=24, repetition_penalty=1.5, dtype="float32", device="cpu"
    )


def hf_reply(ckpt, llm, messages: list[dict[str, str]], max_new: int) -> tuple[str, int, int]:
    """transformers' greedy generate on the chat template: (text, prompt tokens, new tokens)."""
    hf, _ = ckpt
    model, tok = llm._loaded()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    eos = list(dict.fromkeys(model.config.eos_token_ids + tok.stop_token_ids))
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            repetition_penalty=llm.repetition_penalty,
        )
    new = out[0, len(ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True), len(ids), len(new)


def test_invoke_equals_transformers_greedy(ckpt, llm):
    msg = llm.invoke([SystemMessage("你是诗人。"), HumanMessage(QUESTION)])
    text, n_in, n_out = hf_reply(
        ckpt, llm, [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": QUESTION}], 24
    )
    assert isinstance(msg, AIMessage) and msg.content == text and len(text) > 5
    assert msg.usage_metadata == {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}
    assert msg.response_metadata["finish_reason"] == ("length" if n_out == 24 else "stop")
    assert msg.response_metadata["model_name"] == "tiny-chat"


def test_stream_equals_invoke(llm):
    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:
            self.tokens.append(token)

    full = llm.invoke(QUESTION)
    handler = Tokens()
    chunks = list(llm.stream(QUESTION, config={"callbacks": [handler]}))
    assert sum(1 for c in chunks if c.content) >= 5  # really streamed
    assert "".join(c.content for c in chunks) == full.content == "".join(handler.tokens)
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.usage_metadata == full.usage_metadata  # usage arrives once, on the last chunk
    assert merged.response_metadata["finish_reason"] == full.response_metadata["finish_reason"]


def test_async(llm):
    async def run():
        full = await llm.ainvoke(QUESTION)
        pieces = [c.content async for c in llm.astream(QUESTION)]
        return full, pieces

    full, pieces = asyncio.run(run())
    assert full.content == llm.invoke(QUESTION).content == "".join(pieces)


def test_stop_sequences(llm):
    reference = llm.invoke(QUESTION).content
    stop = reference[6:8]
    cut = reference.find(stop)
    assert cut >= 3
    for msg in (
        llm.invoke(QUESTION, stop=[stop]),
        ChatErnie.from_model(
            *llm._loaded(), temperature=0, max_tokens=24, repetition_penalty=1.5, stop=[stop]
        ).invoke(QUESTION),
    ):
        assert msg.content == reference[:cut]
        assert msg.response_metadata["finish_reason"] == "stop"
    streamed = list(llm.stream(QUESTION, stop=[stop]))
    assert "".join(c.content for c in streamed) == reference[:cut]
    merged = streamed[0]
    for c in streamed[1:]:
        merged += c
    assert merged.usage_metadata == llm.invoke(QUESTION, stop=[stop]).usage_metadata


def test_per_call_parameters_and_sampling(llm):
    short = llm.bind(max_tokens=3).invoke(QUESTION)
    assert short.usage_metadata["output_tokens"] == 3 and short.response_metadata["finish_reason"] == "length"
    assert short.content == llm.invoke(QUESTION).content[: len(short.content)]
    a = llm.invoke(QUESTION, temperature=1.0, top_p=0.9, seed=7)
    b = "".join(c.content for c in llm.stream(QUESTION, temperature=1.0, top_p=0.9, seed=7))
    assert a.content == b  # same seed, same draw, either path
    with pytest.raises(ValueError, match="does not accept frequency"):
        llm.invoke(QUESTION, frequency=1)


def test_lcel_chain(llm):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages(
        [("system", "你是{role}。"), ("human", "写一首关于{topic}的诗")]
    )
    chain = prompt | llm | StrOutputParser()
    out = chain.invoke({"role": "诗人", "topic": "春天"})
    assert out == llm.invoke([SystemMessage("你是诗人。"), HumanMessage(QUESTION)]).content
    assert [s for s in chain.stream({"role": "诗人", "topic": "春天"})] and "".join(
        chain.stream({"role": "诗人", "topic": "春天"})
    ) == out


def test_messages_and_errors(tmp_path):
    assert to_chat_messages(
        [SystemMessage("s"), HumanMessage([{"type": "text", "text": "a"}, "b"]), AIMessage("c")]
    ) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    ]
    call = {"name": "f", "args": {"x": "北京"}, "id": "call_1", "type": "tool_call"}
    assert to_chat_messages([AIMessage("", tool_calls=[call]), ToolMessage("25", tool_call_id="call_1")]) == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": "北京"}'}}]},
        {"role": "tool", "content": "25", "tool_call_id": "call_1"},
    ]
    with pytest.raises(ValueError, match="cannot send a ChatMessage"):
        to_chat_messages([ChatMessage(role="narrator", content="x")])
    with pytest.raises(ErnieError, match="model path not found"):
        ChatErnie(model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ChatErnie.from_model(None, None, temperature=-1)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        ChatErnie.from_model(None, None, top_p=2)


def test_prompt_too_long_is_a_clear_error(llm):
    with pytest.raises(ErnieError, match="context window"):
        llm.invoke("床前明月光" * 300)


def test_documented_snippets_run(long_ckpt, capsys):
    """The in-process ```python blocks of docs/langchain.md run with a tiny checkpoint swapped in."""
    ckpt = long_ckpt
    with open(os.path.join(ROOT, "docs", "langchain.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    local = [b for b in blocks if "ChatOpenAI" not in b]
    assert len(local) >= 3
    scope: dict = {}  # the blocks build on each other, as in a notebook
    for block in local:
        exec(compile(block.replace("ERNIE-4.5-0.3B-PT", ckpt[1]), "docs/langchain.md", "exec", dont_inherit=True), scope)
    assert capsys.readouterr().out.strip()


@contextlib.contextmanager
def serving(path: str):
    uvicorn = pytest.importorskip("uvicorn")
    import ernie45
    from ernie45.serve.engine import EngineArgs
    from ernie45.serve.server import ModelSource, ServerConfig, create_app

    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    app = create_app(
        ModelSource(model=model, tokenizer=tok),
        ServerConfig("ERNIE-4.5-0.3B-PT", None, EngineArgs(max_num_seqs=2, max_model_len=256)),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while not (server.started and app.state.server.engine is not None):
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def test_chatopenai_recipe_against_ernie45_serve(ckpt, llm, capsys):
    """The documented ChatOpenAI block, pointed at a real server, answers like ChatErnie (both greedy)."""
    pytest.importorskip("langchain_openai")
    with open(os.path.join(ROOT, "docs", "langchain.md"), encoding="utf-8") as f:
        block = next(b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "ChatOpenAI" in b)
    with serving(ckpt[1]) as base:
        scope: dict = {}
        exec(compile(block.replace("http://127.0.0.1:8000", base), "docs/langchain.md", "exec", dont_inherit=True), scope)
        remote = scope["reply"]
        local = llm.invoke(QUESTION, max_tokens=64, repetition_penalty=1.0)
        assert remote.content == local.content
        assert remote.usage_metadata["input_tokens"] == local.usage_metadata["input_tokens"]
        assert remote.usage_metadata["output_tokens"] == local.usage_metadata["output_tokens"]
        # The example chain takes the same route with --server-url and answers like it does in-process.
        capsys.readouterr()
        assert run_example(["--server-url", base + "/v1", "--max-tokens", "16"], capsys) == run_example(
            ["--model", ckpt[1], "--dtype", "float32", "--max-tokens", "16"], capsys
        )


def run_example(argv: list[str], capsys) -> str:
    import runpy
    import sys

    script = os.path.join(ROOT, "examples", "langchain_demo.py")
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip()
    return out


def test_chinese_guide_has_the_same_code():
    def code(doc: str) -> list[str]:
        with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
            return re.findall(r"```(?:python|bash)\n(.*?)```", f.read(), re.S)

    assert code("langchain_zh.md") == code("langchain.md")


# ---- tools, structured output, reasoning ------------------------------------------------------------------
class GetWeather(BaseModel):
    """Current weather of a city."""

    city: str = Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, tokenizer_dir):
    """Tool lists make long prompts for the 400-token test vocabulary: a model with a longer context."""
    hf = make_hf_model("dense", seed=4, vocab_size=400, max_position_embeddings=4096)
    return hf, save_hf(hf, tmp_path_factory.mktemp("lc_long") / "tiny-tools", tokenizer_dir)


def test_bind_tools_forced_call_invoke_and_stream(long_ckpt):
    ckpt = long_ckpt
    llm = ChatErnie(model=ckpt[1], temperature=1.0, seed=3, max_tokens=120, dtype="float32", device="cpu")
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    msg = bound.invoke("北京天气？")
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert [c["name"] for c in msg.tool_calls] == ["GetWeather"] and msg.tool_calls[0]["id"].startswith("chatcmpl-tool-")
    GetWeather.model_validate(msg.tool_calls[0]["args"])
    chunks = list(bound.stream("北京天气？"))
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(c["name"], c["args"]) for c in msg.tool_calls]
    assert total.response_metadata["finish_reason"] == "tool_calls"
    # "any" forces some call; a history with the call and its result renders and runs
    msg = llm.bind_tools([GetWeather], tool_choice="any").invoke("天气")
    assert len(msg.tool_calls) >= 1
    follow = llm.invoke([HumanMessage("天气"), msg, *[ToolMessage("25度", tool_call_id=c["id"]) for c in msg.tool_calls]])
    assert isinstance(follow, AIMessage)
    with pytest.raises(ValueError, match="not among the tools"):
        llm.bind_tools([GetWeather], tool_choice="nope").invoke("x")


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_with_structured_output(long_ckpt, method):
    ckpt = long_ckpt
    llm = ChatErnie(model=ckpt[1], temperature=1.0, seed=5, max_tokens=120, dtype="float32", device="cpu")
    out = llm.with_structured_output(GetWeather, method=method).invoke("北京天气？")
    assert isinstance(out, GetWeather)
    raw = llm.with_structured_output(GetWeather.model_json_schema(), method=method, include_raw=True).invoke("天气")
    GetWeather.model_validate(raw["parsed"])
    assert raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)


def test_thinking_reasoning_in_additional_kwargs(thinking_ckpt):
    """On a Thinking checkpoint the reasoning goes to additional_kwargs["reasoning_content"], the JSON answer to
    content (both whole and streamed)."""
    llm = ChatErnie(model=thinking_ckpt[1], temperature=0, max_tokens=400, dtype="float32", device="cpu")
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": GetWeather.model_json_schema()}}
    msg = llm.invoke("天气", response_format=fmt)
    assert isinstance(msg.additional_kwargs.get("reasoning_content"), str)
    GetWeather.model_validate_json(msg.content)
    chunks = list(llm.stream("天气", response_format=fmt))
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.content == msg.content
    assert total.additional_kwargs.get("reasoning_content", "") == msg.additional_kwargs["reasoning_content"]
