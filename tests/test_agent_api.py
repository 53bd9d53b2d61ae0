"""The agent API of `ernie45 serve`: reasoning, tool calls and structured output, through the official `openai`
client against a real server on 127.0.0.1.

Models are random (a Thinking-style tokenizer built at test time, and the plain test tokenizer): what a random
model writes is noise, so every check is one the grammar or the parsers guarantee: forced calls name the
function and their arguments validate (`jsonschema`), JSON output validates, and an output forced token by
token (a Lark grammar with the markers' token ids) parses into exactly the reasoning / content / calls of
docs/THINKING_TOOLS_MTP.md §2, streamed or not.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from test_serve import client, make_app, running

from ernie45.chat_template import THINKING_CHAT_TEMPLATE

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"enum": ["UTC", "Asia/Shanghai"]}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "北京天气怎么样？"}]
SAMPLED = dict(temperature=1.0, seed=7, max_tokens=200)


@pytest.fixture(scope="module")
def thinking(thinking_ckpt):
    app, tok, _ = make_app(thinking_ckpt[1])
    with running(app) as base:
        yield base, tok, thinking_ckpt[2]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tokenizer_dir):
    from conftest import make_hf_model, save_hf

    hf = make_hf_model("dense", max_position_embeddings=4096, seed=1)
    path = save_hf(hf, tmp_path_factory.mktemp("agent") / "plain", tokenizer_dir)
    app, tok, _ = make_app(path)
    with running(app) as base:
        yield base, tok


def _args_valid(call, tools=TOOLS) -> dict:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return args


def _collect_stream(stream):
    """(reasoning, content, tool_calls as [{id, name, arguments}], finish_reason, chunks) of a streamed answer."""
    reasoning, content, calls, finish, n = "", "", {}, None, 0
    for chunk in stream:
        n += 1
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        d = ch.delta
        extra = d.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            reasoning += extra["reasoning_content"]
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.finish_reason or finish
    return reasoning, content, [calls[i] for i in sorted(calls)], finish, n


# ---- forced tool calls ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["thinking", "plain"])
def test_named_tool_choice_returns_a_valid_call(which, request):
    base = request.getfixturevalue(which)[0]
    c = client(base)
    for seed in range(3):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
            **{**SAMPLED, "seed": seed},
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", ch
        assert [tc.function.name for tc in ch.message.tool_calls] == ["get_weather"]  # named: exactly one call
        for tc in ch.message.tool_calls:
            assert tc.type == "function" and tc.id.startswith("chatcmpl-tool-")
            _args_valid(tc)
    # streamed: the same calls (greedy, so the same tokens), each sent whole with index, id, name, arguments
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
              temperature=0, max_tokens=200)
    whole = c.chat.completions.create(**kw).choices[0]
    reasoning, content, calls, finish, _ = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [
        (tc.function.name, json.loads(tc.function.arguments)) for tc in whole.message.tool_calls
    ]
    assert all(x["id"].startswith("chatcmpl-tool-") for x in calls)
    assert content == (whole.message.content or "")
    assert reasoning == ((whole.message.model_extra or {}).get("reasoning_content") or "")


def test_required_tool_choice_and_parallel_calls(thinking):
    c = client(thinking[0])
    for seed in range(3):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            **{**SAMPLED, "seed": seed},
        )
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
        _args_valid(calls[0])
        r = c.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", **{**SAMPLED, "seed": seed, "max_tokens": 600}
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert 1 <= len(r.choices[0].message.tool_calls) <= 4
        for tc in r.choices[0].message.tool_calls:
            _args_valid(tc)


def test_thinking_reasoning_is_split_off(thinking):
    """A Thinking prompt (it ends in <think>): the output's reasoning lands in reasoning_content / reasoning."""
    base, tok, ids = thinking
    c = client(base)
    r = c.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300
    )
    msg = r.choices[0].message
    extra = msg.model_extra or {}
    assert "reasoning_content" in extra and extra["reasoning"] == extra["reasoning_content"]
    # the raw output, re-parsed: reasoning then the call
    assert "</think>" not in (extra["reasoning_content"] or "") and not msg.content


def test_reasoning_max_tokens_bounds_reasoning_before_a_forced_call(thinking):
    """FastDeploy's reasoning_max_tokens: at most that many reasoning tokens before the forced call."""
    base, tok, _ = thinking
    c = client(base)
    for budget in (0, 5, 30):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=400, temperature=1.0,
            seed=budget, extra_body={"reasoning_max_tokens": budget},
        )
        msg = r.choices[0].message
        reasoning = (msg.model_extra or {}).get("reasoning_content") or ""
        assert len(tok.encode(reasoning)) <= budget + 1  # re-encoding may split a token's text differently
        assert msg.tool_calls and r.choices[0].finish_reason == "tool_calls"
    bad = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, "reasoning_max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_max_tokens"


# ---- structured output ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["thinking", "plain"])
def test_json_schema_and_json_object(which, request):
    base = request.getfixturevalue(which)[0]
    c = client(base)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = c.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, **{**SAMPLED, "seed": seed})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    kw = dict(model="tiny", messages=ASK, response_format=fmt, temperature=0, max_tokens=200)
    whole = c.chat.completions.create(**kw).choices[0].message
    reasoning, content, calls, finish, _ = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert content == whole.content and finish == "stop" and not calls
    jsonschema.validate(json.loads(content), PERSON)
    # any JSON object
    r = c.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=300
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an unbounded object may run to max_tokens; what was written is still a JSON prefix
        assert r.choices[0].message.content.startswith("{")


def test_completions_structured_output(plain):
    base, _ = plain
    c = client(base)
    for fmt, check in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
         lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: __import__("re").fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
    ]:
        r = c.completions.create(model="tiny", prompt="Answer:", max_tokens=100, temperature=1.0, seed=3, extra_body=fmt)
        assert check(r.choices[0].text), (fmt, r.choices[0].text)
        assert r.choices[0].finish_reason == "stop"


# ---- the exact token sequences of the shared doc §2, forced token by token ---------------------------------
def _forced(ids: dict[str, int], *parts) -> str:
    """A Lark grammar whose only sentence is `parts`: text, or a marker (its token id)."""
    items = [f"<[{ids[p]}]>" if p in ids else json.dumps(p, ensure_ascii=False) for p in parts]
    return "start: " + " ".join(items)


DOC_CASES = {
    "reasoning_then_content": (
        ["用户在打招呼。\n", "</think>", "\n\n", "<response>", "\nHello! 你好！\n", "</response>", "\n"],
        "用户在打招呼。", "Hello! 你好！", [],
    ),
    "reasoning_then_one_call": (
        ["查天气。\n", "</think>", "\n\n\n", "<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}}\n',
         "</tool_call>", "\n"],
        "查天气。", None, [("get_weather", {"city": "北京", "unit": "celsius"})],
    ),
    "reasoning_then_two_calls": (
        ["两件事。\n", "</think>", "\n\n\n", "<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "上海", "unit": "celsius"}}\n',
         "</tool_call>", "\n", "<tool_call>", '\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n', "</tool_call>", "\n"],
        "两件事。", None, [("get_weather", {"city": "上海", "unit": "celsius"}), ("get_time", {"tz": "UTC"})],
    ),
    "no_think_end": (["还在想……"], "还在想……", None, []),
    "malformed_call_is_content": (
        ["想。\n", "</think>", "\n\n\n", "<tool_call>", '\n{"name": "get_weather", "arguments": {"city": }\n', "</tool_call>", "\n"],
        "想。", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>\n', [],
    ),
}


@pytest.mark.parametrize("case", list(DOC_CASES))
def test_doc_token_sequences_parse(thinking, case):
    base, tok, ids = thinking
    parts, reasoning, content, calls = DOC_CASES[case]
    c = client(base)
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=400, temperature=1.0,
              extra_body={"guided_grammar": _forced(ids, *parts)})
    msg = c.chat.completions.create(**kw).choices[0].message
    extra = msg.model_extra or {}
    assert extra.get("reasoning_content") == reasoning and extra.get("reasoning") == reasoning
    assert msg.content == content
    got = [(tc.function.name, json.loads(tc.function.arguments)) for tc in msg.tool_calls or []]
    assert got == calls
    s_reasoning, s_content, s_calls, finish, n = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert (s_reasoning, s_content or None) == (reasoning, content)
    assert [(x["name"], json.loads(x["arguments"])) for x in s_calls] == calls
    assert finish == ("tool_calls" if calls else "stop")


def test_reasoning_parser_flag(thinking_ckpt):
    """--reasoning-parser none leaves the raw text in content (the markers too, with skip_special_tokens false)."""
    import ernie45
    from ernie45.serve import server as server_mod
    from ernie45.serve.engine import EngineArgs
    from ernie45.serve.server import ModelSource, ServerConfig

    model, tok = ernie45.load(thinking_ckpt[1], dtype="float32", device="cpu")
    cfg = ServerConfig("tiny", None, EngineArgs(max_num_seqs=2, max_model_len=1024), reasoning_parser="none")
    app = server_mod.create_app(ModelSource(model=model, tokenizer=tok), cfg)
    ids = thinking_ckpt[2]
    with running(app) as base:
        grammar = _forced(ids, "想。\n", "</think>", "\n\n", "<response>", "\n答\n", "</response>", "\n")
        for skip, want in [(False, "想。\n</think>\n\n<response>\n答\n</response>\n"), (True, "想。\n\n\n\n答\n\n")]:
            msg = client(base).chat.completions.create(
                model="tiny", messages=ASK, max_tokens=50,
                extra_body={"guided_grammar": grammar, "skip_special_tokens": skip},
            ).choices[0].message
            assert "reasoning_content" not in (msg.model_extra or {})
            assert msg.content == want


# ---- conversations with tool results ----------------------------------------------------------------------
def test_tool_results_round_trip(thinking):
    base, tok, _ = thinking
    messages = [
        {"role": "system", "content": "你是助手。"},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "北京", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 25}'},
    ]
    want = tok.apply_chat_template(
        [{**m, "tool_calls": [{**tc, "function": {**tc["function"], "arguments": json.loads(tc["function"]["arguments"])}}
                              for tc in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages],
        tools=TOOLS, tokenize=True,
    )
    got = httpx.post(f"{base}/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    assert got == want
    text = tok.decode(want)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temp\": 25}\n</tool_response>" in text and text.endswith("<think>\n")
    r = client(base).chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=5)
    assert r.usage.prompt_tokens == len(want)


def test_plain_template_falls_back_to_thinking_format_for_tools(plain):
    base, tok = plain
    assert "tool" not in tok.chat_template
    got = httpx.post(f"{base}/tokenize", json={"messages": ASK, "tools": [WEATHER]}).json()["tokens"]
    from ernie45.chat_template import render_chat_template

    assert tok.decode(got) == render_chat_template(THINKING_CHAT_TEMPLATE, ASK, tools=[WEATHER])
    # without tools the checkpoint's own template is used
    got = httpx.post(f"{base}/tokenize", json={"messages": ASK}).json()["tokens"]
    assert got == tok.apply_chat_template(ASK, tokenize=True)


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"guided_regex": "[a-", "guided_json": {"type": "object"}}, "guided_regex"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"guided_grammar": "start: nosuchrule"}, "response_format"),
        ({"guided_grammar": "::= not gbnf either"}, "response_format"),  # the GBNF converter's own error
    ],
)
def test_bad_agent_requests(plain, body, param):
    base, _ = plain
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is None or err["param"].startswith(param.split(".")[0]), err
    assert httpx.get(f"{base}/health").status_code == 200


# ---- the end-to-end example ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", [[], ["--langchain"]], ids=["openai", "langchain"])
def test_agent_example_runs(thinking, flavour):
    """examples/agent_tools.py against the server: a forced call, the tool's result fed back, a final answer."""
    import os
    import subprocess
    import sys

    base = thinking[0]
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "agent_tools.py")
    r = subprocess.run(
        [sys.executable, script, "--url", f"{base}/v1", "--force", "--max-tokens", "400", *flavour],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    call = next(line for line in r.stdout.splitlines() if line.startswith("tool call: get_weather("))
    assert '"temperature"' in call and "answer:" in r.stdout


# ---- docs/agents.md, run as written ------------------------------------------------------------------------
def _blocks(path: str, lang: str) -> list[str]:
    import re

    with open(path, encoding="utf-8") as f:
        return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)]


DOC = __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "docs", "agents.md")


def test_agents_guide_zh_has_the_same_commands():
    zh = DOC.replace("agents.md", "agents_zh.md")
    for lang in ("bash", "python", "shell"):
        assert _blocks(zh, lang) == _blocks(DOC, lang)


def test_agents_guide_commands_run(thinking_ckpt, tmp_path, monkeypatch):
    """docs/agents.md: serve (a subprocess on a free port) a Thinking checkpoint, run the curl calls, the Python
    blocks and the generate commands; the forced call and the JSON validate."""
    import os
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    from test_serve import cli_server

    serve_cmd, curls, cli = _blocks(DOC, "bash")
    client_py, local_py = _blocks(DOC, "python")
    shutil.copytree(thinking_ckpt[1], tmp_path / "ERNIE-4.5-21B-A3B-Thinking")
    monkeypatch.chdir(tmp_path)
    with cli_server(serve_cmd) as server:
        port = server.port
        outs, bodies = [], []
        for line in curls.replace("8000", port).splitlines():
            bodies.append(json.loads(shlex.split(line)[-1]))
            r = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            outs.append(json.loads(r.stdout))
        call = outs[0]["choices"][0]["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and outs[0]["choices"][0]["finish_reason"] == "tool_calls"
        jsonschema.validate(json.loads(call["arguments"]), bodies[0]["tools"][0]["function"]["parameters"])
        person = json.loads(outs[1]["choices"][0]["message"]["content"])
        jsonschema.validate(person, bodies[1]["response_format"]["json_schema"]["schema"])
        exec(compile(client_py.replace("8000", port), "agents.md", "exec"), {})
    scope: dict = {}
    exec(compile(local_py, "agents.md", "exec"), scope)
    assert set(json.loads(scope["text"])) == {"city"}
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    r = subprocess.run(["bash", "-c", cli], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    jsonschema.validate(json.loads(first), json.loads((tmp_path / "person.json").read_text()))
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", second)
