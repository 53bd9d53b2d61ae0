"""Text out of token ids, one step at a time: an incremental detokeniser that never emits a broken character,
stop-string handling that never leaks part of a stop string, and transformers-style streamers (`put`/`end`).

Reference: vLLM's incremental detokenisation (prefix/read offsets) and transformers' `TextStreamer` /
`TextIteratorStreamer` protocol, so the streamers here also work when passed to transformers' `generate`.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, text deltas out; the concatenated deltas equal `tokenizer.decode(all ids)`.

    A byte-fallback token (`<0xE4>`) that leaves a UTF-8 character unfinished decodes to U+FFFD; such text is
    held back until the character completes. Each delta is the difference between decoding a short window
    with and without the newest tokens, so the cost per token stays constant and SentencePiece's
    leading-space handling cancels out.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: the tokens whose text was emitted last time
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append tokens; return the newly completed text (possibly "")."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else (int(t) for t in token_ids))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) <= len(prefix_text) or full.endswith(REPLACEMENT):
            return ""
        delta = full[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD, as `decode` does)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        delta = self._decode(self.ids[self._prefix :])[len(prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


class StopStringFilter:
    """Passes text through until a stop string appears; holds back any tail that could start one.

    `add` returns (text safe to show, whether a stop string was hit); after a hit the text before the stop
    string has been returned and nothing more is.
    """

    def __init__(self, stop_strings: Sequence[str] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False

    def add(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out, True
        hold = max((_overlap(self.pending, s) for s in self.stop_strings), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop` (text that may still become it).

    Only the last len(stop) - 1 characters can matter; each place where stop's first character occurs there is
    tried once, from the longest tail down, with a C-level `startswith`: linear in len(stop) in practice (the
    pending text never holds more than that), where comparing every tail length was quadratic.
    """
    start = max(0, len(text) - len(stop) + 1)
    i = text.find(stop[0], start)
    while i >= 0:
        if stop.startswith(text[i:]):
            return len(text) - i
        i = text.find(stop[0], i + 1)
    return 0


def ends_with_stop_string(tokenizer: Any, ids: Sequence[int], stop_strings: Sequence[str]) -> bool:
    """True when a stop string occurs in the decoded `ids` and overlaps the text of the last token.

    This is transformers' `StopStringCriteria` rule: checked after every token, so a stop string is caught
    by the token that completes it, never later. Only a bounded tail of `ids` is decoded.
    """
    if not ids or not stop_strings:
        return False
    longest = max(len(s) for s in stop_strings)
    tail = list(ids[-(4 * longest + 2) :])  # >= longest characters even if every token is one UTF-8 byte
    text = tokenizer.decode(tail, skip_special_tokens=False)
    before = tokenizer.decode(tail[:-1], skip_special_tokens=False)
    common = len(os.path.commonprefix([before, text]))  # text that existed before the last token
    return any(text.find(s, max(0, common - len(s) + 1)) >= 0 for s in stop_strings)


class TextStreamer:
    """transformers-compatible streamer that prints text as soon as whole characters are available.

    `generate(..., streamer=TextStreamer(tok))` calls `put(prompt_ids)` once, then `put(new_token)` per step
    and `end()` at the end. Only batch size 1 is supported (as in transformers).

    Args:
        tokenizer: anything with `decode(ids, skip_special_tokens=...)`.
        skip_prompt: do not print the prompt (the first `put`).
        skip_special_tokens: leave special tokens (EOS, ...) out of the text.
        stop_strings: stop printing at the first stop string (it is not printed).
        file: where to print (default stdout).
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_prompt: bool = False,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
        file: TextIO | None = None,
    ):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.filter = StopStringFilter(stop_strings)
        self.skip_prompt = skip_prompt
        self.file = file
        self._next_is_prompt = True

    def put(self, value: Any) -> None:
        ids = value.tolist() if hasattr(value, "tolist") else value
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            if len(ids) > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            ids = ids[0]
        if self._next_is_prompt:
            self._next_is_prompt = False
            if self.skip_prompt:
                return
        text, _ = self.filter.add(self.detokenizer.add(ids))
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        text, _ = self.filter.add(self.detokenizer.flush())
        self.on_finalized_text(text + self.filter.flush(), stream_end=True)
        self._next_is_prompt = True

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", flush=True, file=self.file or sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """A `TextStreamer` that queues text for another thread: run `generate` in a thread, iterate here.

    Iteration raises `queue.Empty` if no text arrives within `timeout` seconds (as transformers does).
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_prompt: bool = False,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
        timeout: float | None = None,
    ):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens, stop_strings)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text, timeout=self.timeout)
        if stream_end:
            self.queue.put(None, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.queue.get(timeout=self.timeout)
        if value is None:
            raise StopIteration
        return value
