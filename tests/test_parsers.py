"""Reasoning / tool-call parsers (ernie45.serve.parsers) and the Thinking chat template (ernie45.chat_template).

Every output is parsed whole and streamed cut at every character position (and in random multi-cut patterns,
and one character at a time): the streamed pieces must concatenate to the whole-text result, and no marker
may be cut across two pieces.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from ernie45.chat_template import THINKING_CHAT_TEMPLATE, is_thinking_template, render_chat_template
from ernie45.serve.parsers import (
    MARKERS,
    OutputStream,
    ReasoningParser,
    StreamEvent,
    ToolCallParser,
    parse_output,
)

CALL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{24}")
WEATHER = '{"name": "get_weather", "arguments": {"city": "北京"}}'
TIME = '{"name": "get_time", "arguments": {"timezone": "Asia/Shanghai", "format": "24小时"}}'
BAD_JSON = '{"name": "get_weather", "arguments": {"city": }'

# (output text, reasoning, content, [(name, arguments)]) for a Thinking model with tools
CASES = {
    "reasoning_then_content": (
        "用户在打招呼。\nI should greet back.\n</think>\n\n<response>\nHello! 你好！\nHow can I help?\n</response>\n",
        "用户在打招呼。\nI should greet back.",
        "Hello! 你好！\nHow can I help?",
        [],
    ),
    "reasoning_then_one_call": (
        f"Need the weather.\n</think>\n\n\n<tool_call>\n{WEATHER}\n</tool_call>\n",
        "Need the weather.",
        "",
        [("get_weather", '{"city": "北京"}')],
    ),
    "reasoning_then_two_calls": (
        f"Weather and time.\n</think>\n\n\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n",
        "Weather and time.",
        "",
        [
            ("get_weather", '{"city": "北京"}'),
            ("get_time", '{"timezone": "Asia/Shanghai", "format": "24小时"}'),
        ],
    ),
    "think_end_missing": (
        "Still thinking about <this>\nand that <thi\n",
        "Still thinking about <this>\nand that <thi\n",
        "",
        [],
    ),
    "think_end_missing_tool_call": (
        f"Call the tool directly.\n<tool_call>\n{WEATHER}\n</tool_call>\n",
        "Call the tool directly.",
        "",
        [("get_weather", '{"city": "北京"}')],
    ),
    "malformed_json": (
        f"Try.\n</think>\n\n\n<tool_call>\n{BAD_JSON}\n</tool_call>\n",
        "Try.",
        f"<tool_call>\n{BAD_JSON}\n</tool_call>\n",
        [],
    ),
    "call_without_name_then_good_call": (
        f'x\n</think>\n\n<tool_call>{{"arguments": {{}}}}</tool_call>\n<tool_call>{WEATHER}</tool_call>',
        "x",
        '<tool_call>{"arguments": {}}</tool_call>',
        [("get_weather", '{"city": "北京"}')],
    ),
    "unterminated_call": (
        f"y\n</think>\n\nLet me check.\n\n<tool_call>\n{WEATHER}\n",
        "y",
        f"Let me check.\n\n<tool_call>\n{WEATHER}\n",
        [],
    ),
    "reopened_call": (
        f"z\n</think>\n<tool_call>\n{{oops\n<tool_call>{WEATHER}</tool_call>",
        "z",
        "<tool_call>\n{oops",
        [("get_weather", '{"city": "北京"}')],
    ),
    "content_then_call_string_arguments": (
        'r\n</think>\n\n<response>\nOK.\n</response>\n<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        "r",
        "OK.",
        [("f", '{"a": 1}')],
    ),
    "no_reasoning": (
        "</think>\n\n<response>\nJust this.\n</response>\n",
        None,
        "Just this.",
        [],
    ),
    "think_start_and_stray_markers": (
        "<think>\nhmm </tool_call> <response\n</think>\n\n<response>\na </think> b\n\n</response>\n\n",
        "hmm </tool_call> <response",
        "a </think> b",
        [],
    ),
}


def _splits(text: str):
    """Every one-cut split, every-character, and some seeded random multi-cut patterns."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(25):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _stream(parser, pieces: list[str]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for p in pieces:
        events += parser.feed(p)
    return events + parser.finish()


def _joined(events, kind: str) -> str:
    return "".join(e.value for e in events if e.kind == kind)


def _assert_markers_whole(events) -> None:
    """No marker text is cut between two pieces of the same kind, and no piece is empty."""
    for kind in ("reasoning", "content"):
        pieces = [e.value for e in events if e.kind == kind]
        assert all(pieces), events
        bounds, pos = set(), 0
        for p in pieces[:-1]:
            pos += len(p)
            bounds.add(pos)
        text = "".join(pieces)
        for m in MARKERS:
            for hit in re.finditer(re.escape(m), text):
                assert not any(hit.start() < b < hit.end() for b in bounds), (m, pieces)


def _check_calls(deltas, calls):
    assert [d["index"] for d in deltas] == list(range(len(calls)))
    for d in deltas:
        assert set(d) == {"index", "id", "type", "function"} and d["type"] == "function"
        assert CALL_ID.fullmatch(d["id"])
        json.loads(d["function"]["arguments"])
    assert [(d["function"]["name"], d["function"]["arguments"]) for d in deltas] == calls


@pytest.mark.parametrize("name", list(CASES))
def test_whole_output(name):
    text, reasoning, content, calls = CASES[name]
    out = parse_output(text, reasoning=True, tools=True, finish_reason="stop")
    assert out.reasoning == reasoning
    assert out.content == content
    assert [(c.name, c.arguments) for c in out.tool_calls] == calls
    assert all(CALL_ID.fullmatch(c.id) for c in out.tool_calls)
    assert out.finish_reason == ("tool_calls" if calls else "stop")
    msg = out.message()
    assert msg["content"] == (content or None)
    assert msg.get("reasoning_content") == reasoning and msg.get("reasoning") == reasoning
    assert [c["function"]["name"] for c in msg.get("tool_calls", [])] == [c[0] for c in calls]


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_equals_whole(name):
    text, reasoning, content, calls = CASES[name]
    whole_r, whole_c = ReasoningParser.extract(text)
    whole_tc, whole_calls = ToolCallParser.extract(whole_c)
    for pieces in _splits(text):
        # the reasoning parser alone
        events = _stream(ReasoningParser(), pieces)
        assert {e.kind for e in events} <= {"reasoning", "content"}
        assert _joined(events, "reasoning") == (whole_r or "")
        assert _joined(events, "content") == whole_c
        _assert_markers_whole(events)
        # the tool parser alone, on the same pieces of raw text
        tp = ToolCallParser()
        events = _stream(tp, pieces)
        raw_c, raw_calls = ToolCallParser.extract(text)
        assert _joined(events, "content") == raw_c
        _check_calls(
            [e.value for e in events if e.kind == "tool_call"], [(c.name, c.arguments) for c in raw_calls]
        )
        _assert_markers_whole(events)
        # both, as the server drives them
        stream = OutputStream(reasoning=True, tools=True)
        events = _stream(stream, pieces)
        assert _joined(events, "reasoning") == (reasoning or "")
        assert _joined(events, "content") == content == whole_tc
        _check_calls([e.value for e in events if e.kind == "tool_call"], calls)
        assert [(c.name, c.arguments) for c in whole_calls] == calls
        assert [(c.name, c.arguments) for c in stream.tool_calls] == calls
        assert stream.finish_reason("stop") == ("tool_calls" if calls else "stop")
        kinds = [e.kind for e in events]
        assert kinds[: kinds.count("reasoning")] == ["reasoning"] * kinds.count(
            "reasoning"
        )  # reasoning first
        _assert_markers_whole(events)


def _fuzz_text(rng: random.Random) -> str:
    """Random mixes of markers, newlines, text and (good, bad, unterminated, reopened) tool-call blocks."""
    out = []
    for _ in range(rng.randint(0, 10)):
        if rng.random() < 0.35:
            ws = ["", "\n", "\n\n", " "]
            body = rng.choice([WEATHER, TIME, BAD_JSON, '{"x": 1}', "{"])
            end = rng.choice(["</tool_call>", "</tool_call>", "", "<tool_call>"])
            out.append("<tool_call>" + rng.choice(ws) + body + rng.choice(ws) + end)
        else:
            out.append(rng.choice([*MARKERS, "\n", "\n\n", "a", "好 ", "<", "</", "<tool", "</think", "{"]))
    return "".join(out)


@pytest.mark.parametrize("reasoning", [True, False])
def test_fuzz_streamed_equals_whole(reasoning):
    rng = random.Random(0)
    for _ in range(400):
        text = _fuzz_text(rng)
        want = parse_output(text, reasoning=reasoning, tools=True)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 10))))
        for pieces in ([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], list(text)):
            stream = OutputStream(reasoning=reasoning, tools=True)
            events = _stream(stream, pieces)
            assert _joined(events, "reasoning") == (want.reasoning or ""), text
            assert _joined(events, "content") == want.content, text
            calls = [(c.name, c.arguments) for c in want.tool_calls]
            _check_calls([e.value for e in events if e.kind == "tool_call"], calls)
            _assert_markers_whole(events)


def test_partial_marker_held_back():
    p = ReasoningParser()
    assert p.feed("abc\n</thi") == [("reasoning", "abc")]
    assert p.feed("nk>\n") == []
    assert p.feed("\n<resp") == []
    assert p.feed("onse>\nHel") == [("content", "Hel")]
    assert p.feed("lo\n</response") == [("content", "lo")]
    assert p.feed(">\n") == [] and p.finish() == []
    # a held-back tail that turns out not to be a marker is emitted as soon as that is certain
    p = ReasoningParser()
    assert p.feed("a </th") == [("reasoning", "a ")]
    assert p.feed("ings") == [("reasoning", "</things")]
    assert p.feed("\n\n") == [] and p.finish() == [("reasoning", "\n\n")]

    t = ToolCallParser()
    assert t.feed("Sure.\n<tool_") == [("content", "Sure.")]
    assert t.feed("call>" + WEATHER[:20]) == []
    (event,) = t.feed(WEATHER[20:] + "\n</tool_call>\n")
    assert event.kind == "tool_call" and event.value["function"]["name"] == "get_weather"
    assert event.value["index"] == 0 and event.delta() == {"tool_calls": [event.value]}
    assert t.finish() == []


def test_stream_event_deltas():
    assert StreamEvent("reasoning", "r").delta() == {"reasoning_content": "r", "reasoning": "r"}
    assert StreamEvent("content", "c").delta() == {"content": "c"}


def test_non_thinking_and_no_tools():
    text = f"Hello\n<tool_call>{WEATHER}</tool_call>"
    out = parse_output(text, reasoning=False, tools=False)
    assert (out.reasoning, out.content, out.tool_calls, out.finish_reason) == (None, text, [], None)
    out = parse_output(text, reasoning=False, tools=True, finish_reason="length")
    assert (out.reasoning, out.content, out.finish_reason) == (None, "Hello", "tool_calls")
    for pieces in _splits(text):
        events = _stream(OutputStream(reasoning=False, tools=True), pieces)
        assert _joined(events, "content") == "Hello" and _joined(events, "reasoning") == ""
        assert [e.value["function"]["name"] for e in events if e.kind == "tool_call"] == ["get_weather"]
        events = _stream(OutputStream(reasoning=False, tools=False), pieces)
        assert _joined(events, "content") == text
    # a tool block in a Thinking answer without tools enabled stays text, but still ends the reasoning
    out = parse_output(f"think\n<tool_call>{WEATHER}</tool_call>", reasoning=True, tools=False)
    assert (out.reasoning, out.content) == ("think", f"<tool_call>{WEATHER}</tool_call>")


@pytest.mark.parametrize(
    "block",
    [
        "",
        "{}",
        "[1]",
        '{"name": ""}',
        '{"name": 3}',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "not json"}',
        '{"name": "f"} trailing',
        "{" * 5000 + "}" * 5000,
    ],
)
def test_invalid_blocks_stay_text(block):
    text = f"a\n<tool_call>{block}</tool_call>\nb"
    content, calls = ToolCallParser.extract(text)
    assert (content, calls) == (text, [])


def test_arguments_default_and_parameters_alias():
    _, calls = ToolCallParser.extract(
        '<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g", "parameters": {"x": "é"}}</tool_call>'
    )
    assert [(c.name, c.arguments) for c in calls] == [("f", "{}"), ("g", '{"x": "é"}')]
    assert calls[0].id != calls[1].id


# --- chat template ----------------------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
]
# §1 of docs/THINKING_TOOLS_MTP.md, piece by piece
SYS_WITH = (
    f"<|im_start|>system\n<system_setting>\n{SYSTEM}\n</system_setting>\n\n"
    "<global_setting>\nthink_mode=True\n</global_setting>{tools}<|im_end|>\n\n"
)
SYS_WITHOUT = "<|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting>{tools}<|im_end|>\n\n"


def _tools_block(tools):
    wrapped = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return (
        "\n<tool_list>\n["
        + ", ".join(json.dumps(t, ensure_ascii=False) for t in wrapped)
        + "]\n</tool_list>\n"
    )


TOOLS_BLOCK = _tools_block(TOOLS)


def _user(c):
    return f"<|im_start|>user\n{c}<|im_end|>\n\n<|im_start|>assistant\n"


def _assistant(c):
    return f"<response>\n{c}\n</response>\n<|im_end|>\n\n"


def _tool_turn(c):
    return f"<|im_start|>user\n<tool_response>\n{c}\n</tool_response><|im_end|>\n\n"


def _tool_result(c):
    return _tool_turn(c) + "<|im_start|>assistant\n"


GEN = "<think>\n"


def test_template_plain_turns():
    msgs = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    got = render_chat_template(THINKING_CHAT_TEMPLATE, msgs)
    assert (
        got == SYS_WITHOUT.format(tools="") + _user("你好") + _assistant("Hi!") + _user("What is 2+2?") + GEN
    )
    got = render_chat_template(THINKING_CHAT_TEMPLATE, [{"role": "system", "content": SYSTEM}, *msgs])
    assert got == SYS_WITH.format(tools="") + _user("你好") + _assistant("Hi!") + _user("What is 2+2?") + GEN
    # no generation prompt; earlier reasoning is dropped from history; content given as parts
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "thought\n</think>\n\nanswer"},
    ]
    got = render_chat_template(THINKING_CHAT_TEMPLATE, msgs, add_generation_prompt=False)
    assert got == SYS_WITHOUT.format(tools="") + _user("ab") + _assistant("answer")


def test_template_tools_call_and_result():
    call = {"name": "get_weather", "arguments": {"city": "北京"}}
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "北京天气？"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": call},
                # arguments as the API sends them: a JSON string
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {
                        "name": "get_time",
                        "arguments": json.dumps({"tz": "东八区"}, ensure_ascii=False),
                    },
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 25}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]
    calls = (
        f"<tool_call>{json.dumps(call, ensure_ascii=False)}\n</tool_call>\n"
        f"<tool_call>{json.dumps({'name': 'get_time', 'arguments': {'tz': '东八区'}}, ensure_ascii=False)}"
        "\n</tool_call>\n"
    )
    want = (
        SYS_WITH.format(tools=TOOLS_BLOCK)
        + _user("北京天气？")
        + calls
        + "<|im_end|>\n\n"
        + _tool_turn('{"temp": 25}')  # each result is its own user turn; one assistant header follows them
        + _tool_result("12:00")
        + GEN
    )
    assert render_chat_template(THINKING_CHAT_TEMPLATE, msgs, tools=TOOLS) == want
    got = render_chat_template(THINKING_CHAT_TEMPLATE, msgs[1:2], tools=TOOLS)
    assert got == SYS_WITHOUT.format(tools=TOOLS_BLOCK) + _user("北京天气？") + GEN
    one = [msgs[1], {**msgs[2], "tool_calls": msgs[2]["tool_calls"][:1]}, msgs[3]]
    got = render_chat_template(THINKING_CHAT_TEMPLATE, one, tools=TOOLS[:1])
    assert got == (
        SYS_WITHOUT.format(tools=_tools_block(TOOLS[:1]))
        + _user("北京天气？")
        + f"<tool_call>{json.dumps(call, ensure_ascii=False)}\n</tool_call>\n<|im_end|>\n\n"
        + _tool_result('{"temp": 25}')
        + GEN
    )
    # transformers renders it the same way
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = ctu.render_jinja_template(
        [msgs], tools=TOOLS, chat_template=THINKING_CHAT_TEMPLATE, add_generation_prompt=True
    )
    assert rendered == [want]
    # the template's own output parses back to the calls
    out = parse_output("ok\n</think>\n\n\n" + calls, reasoning=True, tools=True)
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"city": "北京"}),
        ("get_time", {"tz": "东八区"}),
    ]


def test_is_thinking_template():
    assert is_thinking_template(THINKING_CHAT_TEMPLATE)
    # ERNIE-4.5-21B-A3B-Thinking style: the generation prompt is appended unconditionally
    ernie_like = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n\\n' }}"
        "{%- endfor %}\n{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    assert is_thinking_template(ernie_like)
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert not is_thinking_template(chatml)
    qwen_off = chatml.replace(
        "assistant\n{% endif %}",
        "assistant\n{% if not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
    )
    assert not is_thinking_template(qwen_off, enable_thinking=False)
    assert is_thinking_template(chatml.replace("assistant\n{% endif %}", "assistant\n<think>{% endif %}"))
    assert not is_thinking_template("{% if %}")  # syntax error
    assert not is_thinking_template("{{ raise_exception('no') }}<think>")
    assert not is_thinking_template("{{ ''.__class__.__mro__ }}<think>")  # sandbox refusal
    assert not is_thinking_template("")
    assert not is_thinking_template(None)
