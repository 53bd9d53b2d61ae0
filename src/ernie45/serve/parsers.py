"""Reasoning and tool-call parsing of ERNIE 4.5 Thinking output, whole or streamed.

What a Thinking model emits after the prompt `...<|im_start|>assistant\\n<think>\\n` (the markers are single
special tokens, kept here as their text):

    {reasoning}\\n</think>\\n\\n<response>\\n{content}\\n</response>\\n
    {reasoning}\\n</think>\\n\\n\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "北京"}}\\n</tool_call>\\n

Reference: vLLM's `ernie45` reasoning and tool parsers, FastDeploy's `ernie_x1` parsers (`<tool_call>` also ends
the reasoning), PaddleFormers' `ernie` template (the prompt format). Unlike those, the streaming parsers here
work on text alone (no token ids) and give, for every way of cutting the text into deltas, exactly what the
whole-text parser gives; a marker is never emitted in part (text that may start one is held back).

Rules, the same whole or streamed:
- reasoning is the text before the first `</think>` or `<tool_call>`; with neither, all text is reasoning (the
  model is still thinking). `<think>` itself is dropped.
- content is the text after `</think>` (or from `<tool_call>` on), with the `<response>`/`</response>` wrapper
  removed.
- the newlines next to `<think>`, `</think>`, `<response>`, `</response>` (both sides) are format, not text:
  they are dropped; so are those on both sides of a `<tool_call>` block that parses as a call.
- a tool-call block runs from `<tool_call>` to the next `</tool_call>` and must hold a JSON object with a
  non-empty string "name" and object "arguments" (or a string holding one, or none); anything else (bad JSON,
  no name, no closing tag, a new `<tool_call>` before the closing one) stays in the content as plain text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

THINK_START = "<think>"
THINK_END = "</think>"
RESPONSE_START = "<response>"
RESPONSE_END = "</response>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
MARKERS = (THINK_START, THINK_END, RESPONSE_START, RESPONSE_END, TOOL_CALL_START, TOOL_CALL_END)

_REASONING_MARKERS = (THINK_START, THINK_END, TOOL_CALL_START)  # looked for while thinking
_CONTENT_MARKERS = (RESPONSE_START, RESPONSE_END)  # looked for by the reasoning parser after it
_THINK_RE = re.compile(r"\n*<think>\n*")
_RESPONSE_RE = re.compile(r"\n*</?response>\n*")


class StreamEvent(NamedTuple):
    """One streamed item: kind "reasoning" or "content" with text, or "tool_call" with an OpenAI delta item."""

    kind: str
    value: Any

    def delta(self) -> dict[str, Any]:
        """The `choices[i].delta` fields for this event (reasoning under both names, as clients differ)."""
        if self.kind == "reasoning":
            return {"reasoning_content": self.value, "reasoning": self.value}
        if self.kind == "tool_call":
            return {"tool_calls": [self.value]}
        return {"content": self.value}


def _emit(events: list[StreamEvent], kind: str, text: str) -> None:
    """Append text to the events, merged into the last event when it is of the same kind."""
    if not text:
        return
    if events and events[-1].kind == kind:
        events[-1] = StreamEvent(kind, events[-1].value + text)
    else:
        events.append(StreamEvent(kind, text))


def _find_first(text: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str | None]:
    """Position and text of the earliest marker in text[start:], or (-1, None)."""
    best, found = -1, None
    for m in markers:
        i = text.find(m, start)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, m
    return best, found


def _safe_cut(text: str) -> int:
    """How much of `text` (holding no complete marker the caller acts on) can be emitted now.

    Held back: the longest tail that is a proper prefix of any marker ("</thi"; markers the caller does not act
    on are held too, so that none is ever cut in two), and the newlines before it, which are dropped if a marker
    follows.
    """
    held = 0
    for m in MARKERS:
        for k in range(min(len(m) - 1, len(text)), held, -1):
            if text.endswith(m[:k]):
                held = k
                break
    cut = len(text) - held
    while cut and text[cut - 1] == "\n":
        cut -= 1
    return cut


class ReasoningParser:
    """Splits Thinking output into reasoning and content; `extract` for whole text, `feed`/`finish` streamed.

    One instance per output stream (the streaming state lives on it); `extract` uses no state.
    """

    def __init__(self) -> None:
        self.in_reasoning = True  # False once `</think>` or `<tool_call>` was seen
        self._buf = ""  # text not emitted yet: a possible marker start and the newlines before it
        self._eat_nl = False  # drop the newlines that come next (after a marker)

    @staticmethod
    def extract(text: str) -> tuple[str | None, str]:
        """(reasoning or None when there is none, content) of a whole output."""
        end, marker = _find_first(text, (THINK_END, TOOL_CALL_START))
        if marker is None:  # still thinking
            return _THINK_RE.sub("", text) or None, ""
        reasoning = _THINK_RE.sub("", text[:end]).rstrip("\n")
        rest = text[end + len(THINK_END) :].lstrip("\n") if marker == THINK_END else text[end:]
        return reasoning or None, _RESPONSE_RE.sub("", rest)

    def feed(self, delta: str) -> list[StreamEvent]:
        """Add text; return the (kind, text) pieces that are now certain, kind "reasoning" or "content"."""
        self._buf += delta
        events: list[StreamEvent] = []
        while True:
            if self._eat_nl:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    break
                self._eat_nl = False
            kind = "reasoning" if self.in_reasoning else "content"
            markers = _REASONING_MARKERS if self.in_reasoning else _CONTENT_MARKERS
            i, m = _find_first(self._buf, markers)
            if m is None:
                cut = _safe_cut(self._buf)
                _emit(events, kind, self._buf[:cut])
                self._buf = self._buf[cut:]
                break
            _emit(events, kind, self._buf[:i].rstrip("\n"))
            if m == TOOL_CALL_START:  # ends the reasoning and belongs to the content (the tool parser's)
                self.in_reasoning = False
                self._buf = self._buf[i:]
            else:
                self.in_reasoning = self.in_reasoning and m != THINK_END
                self._buf = self._buf[i + len(m) :]
                self._eat_nl = True
        return events

    def finish(self) -> list[StreamEvent]:
        """End of output: whatever was held back, as text (a partial marker is text after all)."""
        text = self._buf.lstrip("\n") if self._eat_nl else self._buf
        self._buf, self._eat_nl = "", False
        events: list[StreamEvent] = []
        _emit(events, "reasoning" if self.in_reasoning else "content", text)
        return events


def _tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """A parsed call; `arguments` is a JSON string, as in the OpenAI API."""

    name: str
    arguments: str
    id: str = field(default_factory=_tool_call_id)
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        """The `message.tool_calls[i]` item of a (non-streamed) chat completion."""
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def to_delta(self, index: int) -> dict[str, Any]:
        """The `delta.tool_calls[i]` item of a streamed chunk carrying this whole call."""
        return {"index": index, **self.to_dict()}


def parse_tool_call(block: str) -> ToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>`, or None when it is not a valid call."""
    text = block.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        args = {}
    elif isinstance(args, str):  # arguments already serialised
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Takes `<tool_call>{json}</tool_call>` blocks out of content; `extract` for whole text, `feed`/`finish`
    streamed (each call is sent whole once its closing tag arrives, as vLLM's ernie45 parser does).

    One instance per output stream; `extract` uses no state.
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []  # calls emitted so far, in order (index = position)
        self._text = ""  # text outside blocks not emitted yet: a possible `<tool_call>` start, newlines
        self._block: str | None = None  # inside a block: its text after `<tool_call>` so far
        self._scanned = 0  # block text already searched for markers
        self._held_nl = ""  # newlines before the open block: dropped if it is a call, text if not
        self._eat_nl = False  # drop the newlines that come next (after a call)

    @staticmethod
    def extract(content: str) -> tuple[str, list[ToolCall]]:
        """(content without the calls, calls in order) of a whole text."""
        out, calls, eat, pos = "", [], False, 0

        def add(text: str) -> None:
            nonlocal out, eat
            if eat:
                text = text.lstrip("\n")
                eat = not text
            out += text

        while True:
            i = content.find(TOOL_CALL_START, pos)
            if i < 0:
                add(content[pos:])
                return out, calls
            j, m = _find_first(content, (TOOL_CALL_END, TOOL_CALL_START), i + len(TOOL_CALL_START))
            if m is None:  # unterminated: text
                add(content[pos:])
                return out, calls
            if m == TOOL_CALL_START:  # another block opens first: this one is text
                add(content[pos:j])
                pos = j
                continue
            call = parse_tool_call(content[i + len(TOOL_CALL_START) : j])
            if call is None:
                add(content[pos : j + len(TOOL_CALL_END)])
            else:
                add(content[pos:i])
                out = out.rstrip("\n")
                calls.append(call)
                eat = True
            pos = j + len(TOOL_CALL_END)

    def feed(self, delta: str) -> list[StreamEvent]:
        """Add content text; return ("content", text) and ("tool_call", OpenAI delta item) events."""
        events: list[StreamEvent] = []
        if self._block is None:
            self._text += delta
        else:
            self._block += delta
        while True:
            if self._block is None:
                if self._eat_nl:
                    self._text = self._text.lstrip("\n")
                    if not self._text:
                        break
                    self._eat_nl = False
                i = self._text.find(TOOL_CALL_START)
                if i < 0:
                    cut = _safe_cut(self._text)
                    _emit(events, "content", self._text[:cut])
                    self._text = self._text[cut:]
                    break
                before = self._text[:i].rstrip("\n")
                _emit(events, "content", before)
                self._held_nl = self._text[len(before) : i]
                self._block, self._scanned = self._text[i + len(TOOL_CALL_START) :], 0
                self._text = ""
                continue
            j, m = _find_first(self._block, (TOOL_CALL_END, TOOL_CALL_START), self._scanned)
            if m is None:
                self._scanned = max(0, len(self._block) - len(TOOL_CALL_END) + 1)
                break
            if m == TOOL_CALL_START:  # another block opens first: this one is text
                text = self._held_nl + TOOL_CALL_START + self._block[:j]
                shown = text.rstrip("\n")
                _emit(events, "content", shown)
                self._held_nl = text[len(shown) :]
                self._block, self._scanned = self._block[j + len(TOOL_CALL_START) :], 0
                self._eat_nl = False
                continue
            inner, rest = self._block[:j], self._block[j + len(TOOL_CALL_END) :]
            call = parse_tool_call(inner)
            if call is None:
                _emit(events, "content", self._held_nl + TOOL_CALL_START + inner + TOOL_CALL_END)
                self._eat_nl = False
            else:
                events.append(StreamEvent("tool_call", call.to_delta(len(self.calls))))
                self.calls.append(call)
                self._eat_nl = True
            self._held_nl, self._block, self._text = "", None, rest
        return events

    def finish(self) -> list[StreamEvent]:
        """End of output: held text, and an unterminated block as text."""
        if self._block is not None:
            text = self._held_nl + TOOL_CALL_START + self._block
        else:
            text = self._text.lstrip("\n") if self._eat_nl else self._text
        self._text, self._block, self._held_nl, self._eat_nl = "", None, "", False
        return [StreamEvent("content", text)] if text else []


@dataclass
class ParsedOutput:
    """A whole output, parsed: what a non-streamed chat completion's choice needs."""

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str | None  # "tool_calls" when a call was parsed, else the one passed in

    def message(self) -> dict[str, Any]:
        """The OpenAI `choices[i].message` (content None when empty, reasoning under both field names)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.reasoning is not None:
            msg["reasoning_content"] = msg["reasoning"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return msg


def adjust_finish_reason(finish_reason: str | None, tool_calls: bool) -> str | None:
    """OpenAI reports "tool_calls" as the finish reason when the answer holds calls (vLLM does so always)."""
    return "tool_calls" if tool_calls else finish_reason


def parse_output(
    text: str, reasoning: bool, tools: bool, finish_reason: str | None = None, max_calls: int | None = None
) -> ParsedOutput:
    """Parse a whole output: reasoning (for a Thinking model), then tool calls (when the request has tools; only
    the first `max_calls` are kept, e.g. 1 for `parallel_tool_calls: false`)."""
    thought, content = ReasoningParser.extract(text) if reasoning else (None, text)
    calls: list[ToolCall] = []
    if tools:
        content, calls = ToolCallParser.extract(content)
        calls = calls[:max_calls]
    return ParsedOutput(thought, content, calls, adjust_finish_reason(finish_reason, bool(calls)))


class OutputStream:
    """Streaming twin of `parse_output`: `feed(delta)` per text delta, `finish()` once at the end; both return
    `StreamEvent`s in order (reasoning, content, tool_call). Their concatenation equals `parse_output` (with the
    same `max_calls`: later calls are not sent).
    """

    def __init__(self, reasoning: bool, tools: bool, max_calls: int | None = None):
        self.reasoning = ReasoningParser() if reasoning else None
        self.tools = ToolCallParser() if tools else None
        self.max_calls = max_calls

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return adjust_finish_reason(finish_reason, bool(self.tool_calls))

    def _route(self, events: list[StreamEvent], final: bool) -> list[StreamEvent]:
        if self.tools is None:
            return events
        out: list[StreamEvent] = []
        for ev in events:
            if ev.kind == "content":
                out.extend(self.tools.feed(ev.value))
            else:
                out.append(ev)
        if final:
            out.extend(self.tools.finish())
        merged: list[StreamEvent] = []
        for ev in out:
            if ev.kind == "tool_call":
                if self.max_calls is None or ev.value["index"] < self.max_calls:
                    merged.append(ev)
            else:
                _emit(merged, ev.kind, ev.value)
        return merged

    def feed(self, delta: str) -> list[StreamEvent]:
        if self.reasoning is not None:
            return self._route(self.reasoning.feed(delta), final=False)
        return self._route([StreamEvent("content", delta)] if delta else [], final=False)

    def finish(self) -> list[StreamEvent]:
        return self._route(self.reasoning.finish() if self.reasoning is not None else [], final=True)
