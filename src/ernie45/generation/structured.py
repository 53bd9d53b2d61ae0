"""Structured (grammar-constrained) decoding: JSON schema, any JSON object, regex, Lark grammars and forced
tool calls, enforced by masking each step's logits to the tokens the grammar allows.

Built on llguidance rather than xgrammar: llguidance is one dependency-free wheel (Rust, abi3) for every system
ernie45 runs on (x86-64 and aarch64 Linux, macOS), computes a mask in microseconds on the CPU without a
per-grammar vocabulary precomputation, and covers JSON Schema widely; xgrammar's wheel pulls in triton and
transformers. Both back vLLM's structured output, so grammars behave as users know them.

Usage: `compile_grammar(tokenizer, source, eos_ids)` once per request (`json_schema_grammar`,
`tool_call_grammar`, ... give `source`), then one `Guide` per generated sequence (`grammar.guide()`):
`guide.mask_(scores_row)` before a token is chosen, `guide.accept(token)` after. Generation ends when the
grammar is complete: the mask then allows only the end-of-sequence tokens.
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ernie45.errors import ErnieError

# JSON as json.dumps writes it (", " and ": ", no other whitespace): what ERNIE's chat template shows the model,
# and no room for runaway whitespace from a weak model.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 4  # forced calls: a weak model cannot emit calls forever


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of ernie45
        raise ErnieError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


# ---- the tokenizer as llguidance sees it ------------------------------------------------------------------
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Each token id's bytes (SentencePiece `▁` is a space, `<0xNN>` that byte); special and control tokens get
    llguidance's 0xFF prefix, so grammars can name them (`<[id]>`) but free text never produces them."""
    sp = tokenizer.sp
    n_sp = sp.GetPieceSize()
    added = {v: k for k, v in tokenizer.added_tokens.items()}
    out: list[bytes] = []
    for i in range(tokenizer.vocab_size):
        if i in added or i in tokenizer.special_ids or i >= n_sp:
            text = added.get(i) or (sp.IdToPiece(i) if i < n_sp else "")
            out.append(b"\xff" + text.encode() if text else b"")
        elif sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            out.append(b"\xff" + sp.IdToPiece(i).encode())
        elif sp.IsByte(i):
            out.append(bytes([int(sp.IdToPiece(i)[3:5], 16)]))
        else:
            out.append(sp.IdToPiece(i).replace("\u2581", " ").encode())
    return out


class _Vocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Any, eos: list[int]):
        self.tokens = token_bytes(tokenizer)
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(i for i in tokenizer.special_ids if i < len(self.tokens))
        self._tok = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text)


def ll_tokenizer(tokenizer: Any, eos_ids: list[int]):
    """The llguidance tokenizer for `tokenizer` (built once per tokenizer and end-token set)."""
    llg = _llg()
    eos = sorted({int(e) for e in eos_ids}) or [tokenizer.eos_token_id]
    per = _TOKENIZERS.setdefault(tokenizer, {})
    key = tuple(eos)
    if key not in per:
        per[key] = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer, eos)), eos_token=eos)
    return per[key]


# ---- grammar sources ---------------------------------------------------------------------------------------
def closed_schema(schema: Any) -> Any:
    """A copy of `schema` in which objects that do not say otherwise allow no properties beyond their
    `properties` (OpenAI's strict mode demands this; for forced calls it keeps a weak model from adding keys
    forever). Every instance of the result is an instance of the original."""
    schema = copy.deepcopy(schema)

    def walk(s: Any) -> None:
        if isinstance(s, dict):
            if s.get("type") == "object" or "properties" in s:
                s.setdefault("additionalProperties", False)
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(schema)
    return schema


def json_options(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with ernie45's JSON layout (`JSON_OPTIONS`) unless it sets its own `x-guidance`."""
    return {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}


def prepared_schema(schema: dict[str, Any] | None, strict: bool = False) -> dict[str, Any]:
    """A request's schema as the grammar compiler gets it: None is any JSON object (OpenAI's `json_object`),
    `strict` closes its objects, and ernie45's JSON layout applies."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ErnieError("a JSON schema must be a JSON object")
    return json_options(closed_schema(schema) if strict else schema)


def choice_rule(choices: list[str]) -> str:
    """A Lark alternation of literal strings (vLLM's `guided_choice`)."""
    return " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def json_schema_grammar(schema: dict[str, Any] | None, strict: bool = False) -> str:
    """Output is JSON matching `schema` (None: any JSON object, OpenAI's `json_object`)."""
    llg = _llg()
    schema = prepared_schema(schema, strict)
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema)
    except ValueError as e:
        raise ErnieError(f"invalid JSON schema: {e}") from None


def regex_grammar(pattern: str) -> str:
    return _llg().LLMatcher.grammar_from_regex(pattern)


def lark_grammar(text: str) -> str:
    """A Lark grammar, or llama.cpp's GBNF (converted); ErnieError for text that is neither."""
    try:
        return _llg().grammar_from("grammar", text)
    except ValueError as e:  # the GBNF converter's errors (a Lark grammar is checked when compiled)
        raise ErnieError(f"invalid grammar: {e}") from None


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": closed_schema(params)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _lark_token(text: str, token_id: int | None) -> str:
    """A marker in a Lark rule: its special token when it is one token, else its text."""
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def reasoning_grammar(body: str, kind: str, *, budget: int, marker_ids: dict[str, int | None]) -> str:
    """A Thinking model's whole output around `body` (Lark rules defining `body`): up to `budget` tokens of
    free reasoning closed by `</think>`, then `body` as a tool call (`kind` "tool": `body` is the call blocks)
    or a response (`kind` "response": `<response>\n{body}\n</response>\n`), as ERNIE writes them
    (docs/THINKING_TOOLS_MTP.md §2). Reasoning needs `</think>` to be one token (free text never produces a
    special token, so it cannot close the reasoning by accident); otherwise the output starts at `</think>`."""
    def tok(marker: str) -> str:
        return _lark_token(marker, marker_ids.get(marker))

    think_end = marker_ids.get("</think>")
    if kind == "tool":
        after = '"\\n\\n\\n" body'
    else:
        after = f'"\\n\\n" {tok("<response>")} "\\n" body "\\n" {tok("</response>")} "\\n"'
    rules = [f"start: think {after}"]
    if think_end is not None and budget > 0:
        rules += [f"think: thought? <[{think_end}]>", f"thought[max_tokens={budget}]: /(.|\\n)+/"]
    else:
        rules.append(f"think: {tok('</think>')}")
    return lark_grammar("\n".join([*rules, body]))


def tool_call_grammar(
    tools: list[dict[str, Any]],
    *,
    name: str | None = None,
    parallel: bool = True,
    reasoning: bool = False,
    reasoning_budget: int = 0,
    marker_ids: dict[str, int | None] | None = None,
) -> str:
    """Output is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>\\n` blocks (ERNIE's format): one
    call of `name` (OpenAI's named tool_choice), or without it one or more calls (at most `MAX_PARALLEL_CALLS`;
    one without `parallel`) of any of `tools`. The arguments follow each function's JSON schema, closed (no
    properties beyond those listed). With `reasoning` (a Thinking prompt) the calls follow bounded reasoning
    (`reasoning_grammar`)."""
    ids = marker_ids or {}
    chosen = [t for t in tools if t.get("function", t).get("name") == name] if name else tools
    if not chosen:
        raise ErnieError(f"tool_choice names the function {name!r}, which is not among the tools")
    schema = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
    start, end = _lark_token("<tool_call>", ids.get("<tool_call>")), _lark_token("</tool_call>", ids.get("</tool_call>"))
    rules = [
        f"body: block{{1,{MAX_PARALLEL_CALLS if parallel and name is None else 1}}}",
        f'block: {start} "\\n" call "\\n" {end} "\\n"',
        "call: %json " + json.dumps(json_options(schema), ensure_ascii=False),
    ]
    if reasoning:
        return reasoning_grammar("\n".join(rules), "tool", budget=reasoning_budget, marker_ids=ids)
    return lark_grammar("\n".join(["start: body", *rules]))


# ---- compiled grammars and per-sequence guides --------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """A grammar checked against one tokenizer; `guide()` starts a fresh matcher for one sequence."""

    source: str
    _template: Any  # an LLMatcher in its start state, deep-copied per sequence

    def guide(self) -> Guide:
        return Guide(self._template.deep_copy())


def compile_grammar(tokenizer: Any, source: str, eos_ids: list[int]) -> Grammar:
    """Check `source` (from the `*_grammar` functions) against the tokenizer; ErnieError when it is invalid."""
    llg = _llg()
    matcher = llg.LLMatcher(ll_tokenizer(tokenizer, eos_ids), source, log_level=0)
    if matcher.is_error():
        raise ErnieError(f"invalid grammar: {matcher.get_error()}")
    return Grammar(source, matcher)


class Guide:
    """The grammar state of one sequence: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    @property
    def finished(self) -> bool:
        """True once the grammar is complete (only an end token may follow) or broken."""
        return self.matcher.is_stopped()

    def allowed(self, width: int) -> Tensor:
        """(width,) bool: tokens the grammar allows next (ids past the tokenizer's vocabulary never are)."""
        return ~self.disallowed(width)

    def disallowed(self, width: int) -> Tensor:
        """(width,) bool: tokens the grammar rules out next; one pass over the unpacked bitmask."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        n = min(width, bits.shape[0])
        out = np.ones(width, dtype=bool)
        np.equal(bits[:n], 0, out=out[:n])
        return torch.from_numpy(out)

    def accept(self, token: int) -> bool:
        """Advance past the chosen token; False (and the guide broken) if the grammar did not allow it."""
        return self.matcher.consume_token(int(token))

    @property
    def error(self) -> str:
        return self.matcher.get_error()


def mask_rows_(scores: Tensor, guides: list[Guide | None]) -> Tensor:
    """Apply each row's guide (None: unconstrained) to scores (B, V) in place. A row left with no allowed token
    (another constraint removed all the grammar allows) falls back to the grammar's tokens alone, uniformly."""
    for i, g in enumerate(guides):
        if g is None:
            continue
        banned = g.disallowed(scores.shape[-1]).to(scores.device)
        row = scores[i].masked_fill_(banned, float("-inf"))
        if bool(row.amax() == float("-inf")):
            if bool(banned.all()):
                raise ErnieError("the grammar allows no token of the model's vocabulary (a tokenizer that does "
                                 "not belong to this model?)")
            row.copy_(torch.zeros_like(row).masked_fill_(banned, float("-inf")))
    return scores
