"""Fine-tuning data: read chat / ERNIEKit / Alpaca / preference jsonl, validate it, tokenize with loss masks.

Every record becomes a list of chat messages rendered with the tokenizer's chat template; only assistant turns
carry loss. Formats (detected per record):

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` (OpenAI style);
- ERNIEKit: `{"system"?, "src": [...], "tgt": [...], "label"?: [1, 0, ...]}` (label 0 = no loss on that turn);
- Alpaca: `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`;
- preference pairs (DPO): `{"prompt" | "messages", "chosen", "rejected"}` or ERNIEKit's
  `{"system"?, "src", "tgt", "response": [[...], [...]], "sort": [1, 0]}`.

A file is jsonl (one object per line) or, for `.json` files, one JSON array. Problems are reported with their
line numbers (array items by index); `load_sft`/`load_preferences` raise on them unless told to skip.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ernie45.errors import ErnieError

IGNORE = -100
FORMATS = ("auto", "chat", "erniekit", "alpaca")
TOO_LONG = ("skip", "truncate", "error")
ROLES = ("system", "user", "assistant")


@dataclass
class Problem:
    """One bad record: where it is (`line 12` / `item 3`) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Conversation:
    """Chat messages plus, per message, whether it is trained on (assistant turns only)."""

    messages: list[dict[str, str]]
    train: list[bool]
    where: str = ""


@dataclass
class PreferencePair:
    """A shared prompt and two continuations; `chosen` should score higher than `rejected`."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    where: str = ""


@dataclass
class Sample:
    """Token ids and labels (IGNORE where no loss), same length; `where` names the source record(s)."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class PairSequences:
    chosen: Sample
    rejected: Sample
    where: str = ""


class RecordError(ValueError):
    """A record is malformed; the message is shown to the user with the record's line number."""


@dataclass
class LoadReport:
    """What loading a file did: problems found and how many records were skipped for length."""

    problems: list[Problem] = field(default_factory=list)
    too_long: list[Problem] = field(default_factory=list)
    truncated: int = 0


# ---- reading ---------------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield (`line N` | `item N`, parsed object or Problem) for a jsonl file or a `.json` array file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ErnieError(f"data file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.endswith(".json") and head.startswith(b"["):
        try:
            with open(path, encoding="utf-8-sig") as f:
                items = json.load(f)
        except json.JSONDecodeError as e:
            raise ErnieError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except UnicodeDecodeError as e:
            raise ErnieError(f"{path}: not UTF-8 text (byte {e.start})") from None
        for i, item in enumerate(items, 1):
            yield f"item {i}", item
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"line {n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, Problem(where, f"not UTF-8 text (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, Problem(where, f"not valid JSON ({e.msg} at column {e.colno})")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{what} must be a string or a list of strings")
    return value


def _check_messages(messages: list[dict[str, str]], train: list[bool], require_target: bool = True) -> None:
    """Roles in order (optional system first, then user/assistant), no empty trained assistant turn."""
    if not messages:
        raise RecordError("no messages")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RecordError(f"message {i + 1}: a system message may only come first")
        if m["role"] == "assistant" and (i == 0 or messages[i - 1]["role"] not in ("user",)):
            raise RecordError(f"message {i + 1}: an assistant turn must follow a user turn")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"message {i + 1}: empty assistant turn")
    if require_target:
        if messages[-1]["role"] != "assistant":
            raise RecordError("the conversation must end with an assistant turn")
        if not any(train):
            raise RecordError("no assistant turn to train on")


def _parse_messages(value: Any, what: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(f"'{what}' must be a list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{what}[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(
                f"{what}[{i}] has unknown role {m['role']!r} (expected system, user or assistant)"
            )
        out.append({"role": m["role"], "content": _text(m["content"], f"{what}[{i}].content")})
    return out


def _erniekit_turns(rec: dict, n_tgt_expected: int | None = None) -> list[dict[str, str]]:
    src = _str_list(rec["src"], "'src'")
    tgt = _str_list(rec.get("tgt", []), "'tgt'")
    want = len(src) if n_tgt_expected is None else n_tgt_expected
    if len(tgt) != want:
        raise RecordError(f"'src' has {len(src)} turns but 'tgt' has {len(tgt)} (expected {want})")
    messages = [{"role": "system", "content": _text(rec["system"], "'system'")}] if rec.get("system") else []
    for i, q in enumerate(src):
        messages.append({"role": "user", "content": q})
        if i < len(tgt):
            messages.append({"role": "assistant", "content": tgt[i]})
    return messages


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "chat"
    if "src" in rec:
        return "erniekit"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise RecordError(
        "unknown record format: expected 'messages', 'src'/'tgt' or 'instruction'/'output' fields"
    )


def parse_conversation(rec: Any, fmt: str = "auto") -> Conversation:
    """One SFT record -> Conversation. Raises RecordError with a one-line reason."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object, got {type(rec).__name__}")
    kind = detect_format(rec) if fmt == "auto" else fmt
    if kind == "chat":
        if "messages" not in rec:
            raise RecordError("missing field 'messages'")
        messages = _parse_messages(rec["messages"])
        train = [m["role"] == "assistant" for m in messages]
    elif kind == "erniekit":
        for key in ("src", "tgt"):
            if key not in rec:
                raise RecordError(f"missing field '{key}'")
        messages = _erniekit_turns(rec)
        labels = rec.get("label")
        n_turns = len(_str_list(rec["tgt"], "'tgt'"))
        if labels is None:
            labels = [1] * n_turns
        if not isinstance(labels, list) or len(labels) != n_turns or any(v not in (0, 1) for v in labels):
            raise RecordError(f"'label' must be a list of {n_turns} values 0/1 (one per turn)")
        turn = iter(labels)
        train = [bool(next(turn)) if m["role"] == "assistant" else False for m in messages]
    elif kind == "alpaca":
        for key in ("instruction", "output"):
            if key not in rec:
                raise RecordError(f"missing field '{key}'")
        messages = (
            [{"role": "system", "content": _text(rec["system"], "'system'")}] if rec.get("system") else []
        )
        for i, pair in enumerate(rec.get("history") or [], 1):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError(f"history[{i}] must be a [question, answer] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = _text(rec["instruction"], "'instruction'")
        extra = _text(rec.get("input") or "", "'input'")
        prompt = f"{prompt}\n{extra}" if prompt and extra else prompt + extra
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(rec["output"], "'output'")},
        ]
        train = [m["role"] == "assistant" for m in messages]
    else:
        raise ErnieError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    _check_messages(messages, train)
    return Conversation(messages, train)


def _continuation(value: Any, what: str) -> list[dict[str, str]]:
    """A response: a string, one assistant message, or a list of messages (the first must be assistant)."""
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        msgs = _parse_messages([value], what)
    else:
        msgs = _parse_messages(value, what)
    if not msgs or msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant":
        raise RecordError(f"'{what}' must start and end with an assistant turn")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"'{what}' has an empty assistant turn")
    return msgs


def parse_preference(rec: Any) -> PreferencePair:
    """One DPO record -> PreferencePair. Raises RecordError with a one-line reason."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object, got {type(rec).__name__}")
    if "response" in rec or "sort" in rec:  # ERNIEKit
        for key in ("src", "response", "sort"):
            if key not in rec:
                raise RecordError(f"missing field '{key}'")
        prompt = _erniekit_turns(rec, n_tgt_expected=len(_str_list(rec["src"], "'src'")) - 1)
        responses, sort = rec["response"], rec["sort"]
        if (
            not isinstance(responses, list)
            or not isinstance(sort, list)
            or len(responses) != len(sort)
            or len(responses) < 2
        ):
            raise RecordError("'response' and 'sort' must be lists of the same length (at least 2)")
        conts = []
        for i, r in enumerate(responses, 1):
            turns = _str_list(r, f"'response'[{i}]")
            if len(turns) % 2 == 0:
                raise RecordError(
                    f"'response'[{i}] must hold an odd number of strings (assistant, user, ...)"
                )
            conts.append(
                [{"role": "assistant" if j % 2 == 0 else "user", "content": t} for j, t in enumerate(turns)]
            )
        if len(set(sort)) < 2:
            raise RecordError("'sort' must rank the chosen response above the rejected one")
        chosen = _continuation(conts[max(range(len(sort)), key=sort.__getitem__)], "response")
        rejected = _continuation(conts[min(range(len(sort)), key=sort.__getitem__)], "response")
    else:
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise RecordError(f"missing field '{key}'")
        if "prompt" in rec:
            p = rec["prompt"]
            prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _parse_messages(p, "prompt")
        elif "messages" in rec:
            prompt = _parse_messages(rec["messages"])
        else:
            raise RecordError("missing field 'prompt' (or 'messages')")
        if rec.get("system") and (not prompt or prompt[0]["role"] != "system"):
            prompt = [{"role": "system", "content": _text(rec["system"], "'system'")}, *prompt]
        chosen = _continuation(rec["chosen"], "chosen")
        rejected = _continuation(rec["rejected"], "rejected")
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("the prompt must end with a user turn")
    _check_messages(prompt, [False] * len(prompt), require_target=False)
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical")
    return PreferencePair(prompt, chosen, rejected)


# ---- tokenizing ------------------------------------------------------------------------------------
def render_segments(tokenizer, messages: list[dict[str, str]], train: list[bool]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) pieces at assistant-turn boundaries.

    Piece i is the text the template adds between two renders; an assistant piece is what the template adds
    for that message after the generation prompt (its content plus the end-of-turn token), so the prompt
    pieces are exactly what `generate` feeds the model at inference.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ErnieError(
                "the tokenizer's chat template does not render conversations as growing prefixes; "
                "loss masking needs that property"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], train[i])]
        done = full
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return [(t, tr) for t, tr in pieces if t]


def tokenize_conversation(tokenizer, conv: Conversation) -> Sample:
    """Token ids with labels on trained assistant tokens only (IGNORE elsewhere)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in render_segments(tokenizer, conv.messages, conv.train):
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return Sample(ids, labels, conv.where)


def tokenize_pair(tokenizer, pair: PreferencePair) -> PairSequences:
    """Chosen and rejected sequences; the loss (log-probability) covers the continuation's assistant turns."""
    seqs = []
    for cont in (pair.chosen, pair.rejected):
        msgs = pair.prompt + cont
        train = [False] * len(pair.prompt) + [m["role"] == "assistant" for m in cont]
        seqs.append(tokenize_conversation(tokenizer, Conversation(msgs, train, pair.where)))
    return PairSequences(seqs[0], seqs[1], pair.where)


def _fit(seq: Sample, max_length: int, policy: str) -> Sample | None:
    if len(seq.input_ids) <= max_length:
        return seq
    if policy == "error":
        raise ErnieError(
            f"{seq.where}: {len(seq.input_ids)} tokens, longer than --max-length {max_length} "
            "(use --too-long skip or truncate)"
        )
    if policy == "truncate":
        cut = Sample(seq.input_ids[:max_length], seq.labels[:max_length], seq.where)
        return cut if cut.n_targets > 0 else None
    return None


# ---- loading ---------------------------------------------------------------------------------------
def _collect(path, parse, skip_bad: bool) -> tuple[list, LoadReport]:
    report = LoadReport()
    items = []
    for where, rec in read_records(path):
        if isinstance(rec, Problem):
            report.problems.append(rec)
            continue
        try:
            item = parse(rec)
        except RecordError as e:
            report.problems.append(Problem(where, str(e)))
            continue
        item.where = where
        items.append(item)
    if report.problems and not skip_bad:
        raise ErnieError(format_problems(path, report.problems) + "\n(fix them, or pass --skip-bad-lines)")
    return items, report


def format_problems(path, problems: list[Problem], what: str = "bad record(s)", limit: int = 20) -> str:
    lines = [f"{path}: {len(problems)} {what}:"] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def load_sft(
    path, tokenizer, max_length: int, fmt: str = "auto", too_long: str = "skip", skip_bad: bool = False
) -> tuple[list[Sample], LoadReport]:
    """Read, validate and tokenize an SFT file. Bad records raise ErnieError unless `skip_bad`."""
    if fmt not in FORMATS:
        raise ErnieError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if too_long not in TOO_LONG:
        raise ErnieError(f"unknown --too-long policy {too_long!r}; use one of {', '.join(TOO_LONG)}")
    convs, report = _collect(path, lambda r: parse_conversation(r, fmt), skip_bad)
    seqs = []
    for conv in convs:
        seq = tokenize_conversation(tokenizer, conv)
        fitted = _fit(seq, max_length, too_long)
        if fitted is None:
            report.too_long.append(
                Problem(conv.where, f"{len(seq.input_ids)} tokens > --max-length {max_length}")
            )
            continue
        report.truncated += fitted is not seq
        seqs.append(fitted)
    return seqs, report


def load_preferences(
    path, tokenizer, max_length: int, too_long: str = "skip", skip_bad: bool = False
) -> tuple[list[PairSequences], LoadReport]:
    """Read, validate and tokenize a preference (DPO) file."""
    if too_long not in TOO_LONG:
        raise ErnieError(f"unknown --too-long policy {too_long!r}; use one of {', '.join(TOO_LONG)}")
    pairs, report = _collect(path, parse_preference, skip_bad)
    out = []
    for pair in pairs:
        ps = tokenize_pair(tokenizer, pair)
        c, r = _fit(ps.chosen, max_length, too_long), _fit(ps.rejected, max_length, too_long)
        if c is None or r is None:
            n = max(len(ps.chosen.input_ids), len(ps.rejected.input_ids))
            report.too_long.append(Problem(pair.where, f"{n} tokens > --max-length {max_length}"))
            continue
        report.truncated += (c is not ps.chosen) or (r is not ps.rejected)
        out.append(PairSequences(c, r, pair.where))
    return out, report


def validate_file(
    path, tokenizer=None, max_length: int | None = None, fmt: str = "auto", dpo: bool = False
) -> list[Problem]:
    """Every problem in a data file, with line numbers: malformed JSON, missing fields, bad roles, empty
    assistant turns and (given a tokenizer and max length) sequences longer than the max length."""
    problems: list[Problem] = []
    for where, rec in read_records(path):
        if isinstance(rec, Problem):
            problems.append(rec)
            continue
        try:
            item = parse_preference(rec) if dpo else parse_conversation(rec, fmt)
        except RecordError as e:
            problems.append(Problem(where, str(e)))
            continue
        if tokenizer is None or max_length is None:
            continue
        item.where = where
        if dpo:
            ps = tokenize_pair(tokenizer, item)
            n = max(len(ps.chosen.input_ids), len(ps.rejected.input_ids))
        else:
            n = len(tokenize_conversation(tokenizer, item).input_ids)
        if n > max_length:
            problems.append(Problem(where, f"{n} tokens > --max-length {max_length}"))
    return problems


# ---- packing and batching --------------------------------------------------------------------------
def pack(seqs: list[Sample], max_length: int) -> list[Sample]:
    """Concatenate consecutive sequences into rows of at most `max_length` tokens (none is split).

    Each packed example keeps its own begin-of-sentence token and labels; attention is not blocked between
    examples of one row (the usual "naive" packing trade-off: fewer pad tokens, some cross-example context).
    """
    rows: list[Sample] = []
    cur = Sample([], [], "")
    for s in seqs:
        if cur.input_ids and len(cur.input_ids) + len(s.input_ids) > max_length:
            rows.append(cur)
            cur = Sample([], [], "")
        # The first token of each packed example is a prompt token, so its label stays IGNORE and no
        # target ever crosses an example boundary.
        cur = Sample(
            cur.input_ids + s.input_ids,
            cur.labels + s.labels,
            f"{cur.where}+{s.where}" if cur.where else s.where,
        )
    if cur.input_ids:
        rows.append(cur)
    return rows


def collate(seqs: list[Sample], pad_id: int):
    """Right-pad to the longest row -> (input_ids, labels, attention_mask), each (B, S) int64."""
    import torch

    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return ids, labels, mask
