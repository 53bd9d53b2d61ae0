"""MTP drafts for a served sequence (`ernie45 serve --speculative mtp`).

The checkpoint's MTP layer (`ernie45.mtp`) at position j reads the target's hidden state h_j and the next token
x_{j+1} and guesses x_{j+2}. In `generate` the whole history feeds it; in the server a sequence's positions are
computed by prefill chunks, batched decode steps, mixed steps and verification passes, some with no hidden states
at all (a prefix-cache hit, a preemption's recomputation). So each sequence keeps a `SeqDrafter`: the hidden states
the engine's model calls returned for it, fed lazily into the layer's own KV cache when the sequence speculates.
Where the states have a gap, the layer restarts at the first position after it (`MTPHead`'s `offset`): it then
attends to fewer positions, which may lower acceptance but never changes an answer (verification decides).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

MAX_PENDING = 1024  # hidden states held per sequence before the oldest are dropped (the layer restarts later)


class SeqDrafter:
    """One sequence's MTP state: the layer's KV cache from absolute position `start`, and the target's hidden
    states for positions `fed` .. `fed + len(pending)` - 1 not fed yet.

    Args:
        head: the model's `ernie45.mtp.MTPHead`, or under tensor parallelism a `ReplicatedMTP`.
        capacity: positions the sequence can reach (prompt + max_tokens + drafts), the cache's bound.
    """

    def __init__(self, head, capacity: int):
        self.head, self.capacity = head, capacity
        self.cache = None
        self.start = 0
        self.pending: list[Tensor] = []  # (n_i, H) blocks of consecutive positions
        self.n_pending = 0
        self.logits: Tensor | None = None  # (V,) the guess after the last fed position
        self.out: Tensor | None = None  # (1, 1, H) the layer's output there (a chained draft's input)

    @property
    def fed(self) -> int:
        """The next position to feed into the layer."""
        return self.start + (self.cache.length if self.cache is not None else 0)

    def add(self, pos: int, hidden: Tensor) -> None:
        """The target's hidden states `hidden` (n, H) at positions pos .. pos + n - 1 (copied: a view would keep a
        whole batch's states alive)."""
        if pos != self.fed + self.n_pending:  # a gap, or positions computed again: start over from here
            self._restart(pos)
        self.pending.append(hidden.clone())
        self.n_pending += hidden.shape[0]
        if self.n_pending > MAX_PENDING:  # a long stretch without drafting: keep the newest states only
            rows = torch.cat(self.pending)[-MAX_PENDING:]
            self._restart(pos + hidden.shape[0] - MAX_PENDING)
            self.pending, self.n_pending = [rows], MAX_PENDING

    def settle(self, tokens: list[int]) -> bool:
        """Feed every pending position j whose next token tokens[j + 1] is known; True when the layer now guesses
        the token after tokens[-1] (its last fed position is len(tokens) - 2), so `draft` can run."""
        m = min(self.n_pending, len(tokens) - 1 - self.fed)
        if m > 0:
            self._room((self.cache.length if self.cache is not None else 0) + m)
            rows = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
            first = self.fed
            nxt = torch.tensor([tokens[first + 1:first + 1 + m]])
            logits, out = self.head(nxt, rows[None, :m], self.cache, offset=self.start, last_only=True)
            self.logits, self.out = logits[0, -1], out[:, -1:]
            rest = rows[m:]
            self.pending, self.n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        return self.logits is not None and self.fed == len(tokens) - 1

    def draft(self, k: int) -> list[int]:
        """k greedy drafts after the last fed position, chaining the layer on its own output; the cache is left as
        it was. Drafts are one-hot, so the engine's accept-if-the-draw-matches rule keeps sampled outputs exact."""
        length = self.cache.length
        self._room(length + k)
        toks: list[int] = []
        logits, out = self.logits, self.out
        for i in range(k):
            toks.append(int(logits.argmax()))
            if i + 1 < k:
                lg, out = self.head(torch.tensor([[toks[-1]]]), out, self.cache, offset=self.start,
                                   last_only=True)
                logits, out = lg[0, -1], out[:, -1:]
        self.cache.length = length
        return toks

    def close(self) -> None:
        """The sequence is done: give its cache back (under tensor parallelism every rank drops its copy)."""
        if self.cache is not None:
            self.head.release(self.cache)
            self.cache = None

    def _room(self, entries: int) -> None:
        """A cache of at least `entries` entries, grown by doubling (from 256) up to the sequence's reach and copied
        over: allocated at once, `--max-model-len 131072` would hold 256 MB per 21B-A3B sequence from its first
        draft."""
        old = self.cache
        if old is not None and old.max_len >= entries:
            return
        reach = max(self.capacity - self.start, 1)
        self.cache = self.head.resize(old, max(entries, min(reach, max(256, 2 * (old.max_len if old is not None else 0)))))

    def _restart(self, pos: int) -> None:
        self.start, self.pending, self.n_pending = pos, [], 0
        self.logits = self.out = None
        if self.cache is not None:
            self.cache.length = 0


class SharedCache:
    """A sequence's MTP cache under tensor parallelism: every rank holds the tensors (`ModelRunner`'s MTP ops), rank
    0's drafter its key and length."""

    def __init__(self, key: int, max_len: int, length: int):
        self.key, self.max_len, self.length = key, max_len, length


class ReplicatedMTP:
    """The MTP head of a tensor-parallel server: each call is a `ModelRunner` op that every rank runs on its own copy
    of the sequence's cache (the layer is whole on each rank; its embedding and head are the model's sharded
    modules, whose collectives every rank joins), with the hidden states sent from rank 0. What `SeqDrafter` uses
    of `ernie45.mtp.MTPHead`."""

    def __init__(self, head, runner):
        self.head, self.runner = head, runner
        self._keys = itertools.count()

    def wants_pre_norm(self) -> bool:
        return self.head.wants_pre_norm()

    def resize(self, cache: SharedCache | None, max_len: int) -> SharedCache:
        key = next(self._keys) if cache is None else cache.key
        keep = 0 if cache is None else cache.length
        self.runner.mtp_resize(key, max_len, keep)
        return SharedCache(key, max_len, keep)

    def release(self, cache: SharedCache) -> None:
        self.runner.mtp_free(cache.key)

    def __call__(self, next_tokens: Tensor, hidden: Tensor, cache: SharedCache, offset: int = 0,
                 last_only: bool = False) -> tuple[Tensor, Tensor]:
        n = next_tokens.shape[1]
        if cache.length + n > cache.max_len:
            raise ValueError(f"MTP cache overflow: {cache.length} + {n} > {cache.max_len}")
        out = self.runner.mtp_run(cache.key, offset, cache.length, next_tokens[0].tolist(), hidden.reshape(n, -1),
                                  last_only)
        cache.length += n
        return out
