"""What a chat request asks of the output beyond text: reasoning to split off (Thinking models), tool calls
to parse (and, for `tool_choice` "required" or a named function, to force), and structured output
(`response_format`, vLLM's `guided_*`), turned into a prompt, parsing flags and a compiled grammar.

Runs off the event loop (template rendering, tokenization and grammar compilation take milliseconds to
seconds on big schemas). Formats: docs/THINKING_TOOLS_MTP.md; the parsers: `ernie45.serve.parsers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ernie45.chat_template import THINK_START
from ernie45.errors import ErnieError
from ernie45.generation import structured
from ernie45.generation.structured import Grammar
from ernie45.serve.parsers import MARKERS

REASONING_PARSERS = ("auto", "ernie45", "none")
# template variables a request's chat_template_kwargs may not replace (besides the tokenizer's special tokens)
RESERVED_TEMPLATE_NAMES = frozenset(
    {"messages", "tools", "add_generation_prompt", "tokenize", "continue_final_message", "documents",
     "return_dict", "chat_template"}
)
TOOL_CALL_PARSERS = ("ernie45", "none")
# Forced output on a Thinking model: reasoning may take half of max_tokens, at most MAX_REASONING_BUDGET, and
# always leaves FORCED_OUTPUT_RESERVE tokens for the call or JSON itself.
MAX_REASONING_BUDGET = 8192
FORCED_OUTPUT_RESERVE = 256


class RequestError(Exception):
    """A request that cannot be served as asked (a 400), with the parameter at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class ChatPlan:
    prompt: list[int]
    reasoning: bool  # split reasoning from content (the prompt ends in `<think>`, or the server forces it)
    tools: bool  # parse `<tool_call>` blocks into tool_calls
    max_calls: int | None  # parallel_tool_calls false: keep the first call only
    grammar: Grammar | None


def marker_ids(tokenizer: Any) -> dict[str, int | None]:
    """Each Thinking marker's token id where it is one (added) token, else None (it is spelled in text)."""
    return {m: tokenizer.added_tokens.get(m) for m in MARKERS}


def plan_chat(
    tokenizer: Any,
    req: Any,
    *,
    eos_ids: list[int],
    max_model_len: int,
    reasoning_parser: str = "auto",
    tool_call_parser: str = "ernie45",
) -> tuple[ChatPlan, int]:
    """Render and tokenize a `ChatCompletionRequest` and build its grammar; returns the plan and max_tokens.

    Raises RequestError (a 400) for a template that fails, a prompt too long or a schema llguidance rejects.
    """
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools] if req.tools else None
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & (RESERVED_TEMPLATE_NAMES | set(tokenizer.special_tokens_map)))
    if reserved:
        raise RequestError(
            f"chat_template_kwargs: {', '.join(reserved)} cannot be set here (set by the server or the request)",
            "chat_template_kwargs",
        )
    try:
        text = tokenizer.apply_chat_template(
            [m.as_template_dict() for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            tools=tools,
            **kwargs,
        )
    except ErnieError as e:
        raise RequestError(f"messages: {e}", "messages") from None
    prompt = tokenizer.encode(text)
    mode = req.tool_choice_mode
    reasoning = reasoning_parser == "ernie45" or (
        reasoning_parser == "auto" and text.rstrip(" \n").endswith(THINK_START)
    )
    parse_tools = bool(tools) and mode != "none" and tool_call_parser != "none"
    max_tokens = req.max_new_tokens or max_model_len - len(prompt)
    budget = reasoning_budget(max_tokens)
    if req.reasoning_max_tokens is not None:
        budget = min(req.reasoning_max_tokens, max(max_tokens - 1, 0))
    ids = marker_ids(tokenizer)
    source = None
    try:
        if mode in ("required", "named") and parse_tools:
            name = req.tool_choice.function.name if mode == "named" else None
            source = structured.tool_call_grammar(
                tools,
                name=name,
                parallel=req.parallel_tool_calls,
                reasoning=reasoning,
                reasoning_budget=budget,
                marker_ids=ids,
            )
        elif (fmt := req.output_format()) is not None:
            source = output_grammar(fmt, reasoning=reasoning, reasoning_budget=budget, marker_ids=ids)
        grammar = structured.compile_grammar(tokenizer, source, eos_ids) if source is not None else None
    except ErnieError as e:
        raise RequestError(str(e), "tools" if mode in ("required", "named") else "response_format") from None
    plan = ChatPlan(
        prompt=prompt,
        reasoning=reasoning,
        tools=parse_tools,
        max_calls=None if req.parallel_tool_calls else 1,
        grammar=grammar,
    )
    return plan, max_tokens


def reasoning_budget(max_tokens: int) -> int:
    """Tokens of reasoning allowed before a forced tool call or structured answer on a Thinking model."""
    return max(0, min(max_tokens // 2, max_tokens - FORCED_OUTPUT_RESERVE, MAX_REASONING_BUDGET))


def output_grammar(
    fmt: tuple[str, Any],
    *,
    reasoning: bool = False,
    reasoning_budget: int = 0,
    marker_ids: dict[str, int | None] | None = None,
) -> str:
    """The grammar source for a request's `output_format()`: the content follows it. On a Thinking prompt the
    reasoning (bounded) comes first and the content sits in ERNIE's `<response>` wrapper, which the reasoning
    parser removes; a Lark/GBNF grammar is taken as the whole output."""
    kind, value = fmt
    if kind == "grammar":
        return structured.lark_grammar(value)
    if not reasoning:
        if kind == "json":
            return structured.json_schema_grammar(*value)
        if kind == "regex":
            return structured.regex_grammar(value)
        return structured.lark_grammar("start: " + structured.choice_rule(value))
    if kind == "json":
        body = "%json " + json.dumps(structured.prepared_schema(*value), ensure_ascii=False)
    elif kind == "regex":
        body = "/" + value.replace("/", "\\/") + "/"
    else:
        body = structured.choice_rule(value)
    return structured.reasoning_grammar(
        f"body: {body}", "response", budget=reasoning_budget, marker_ids=marker_ids or {}
    )
