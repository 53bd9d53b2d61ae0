"""The engine's scheduling: which sequences decode this step, which prompt chunks are prefilled beside them,
admission of waiting requests (with their cached prefix) and preemption when the block pool runs out.

`Scheduler` is a base class of `Engine`, kept in its own module to keep the policy apart from the engine
thread, the model calls and token emission; it works on the engine's state, declared below. Only the engine
thread calls it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ernie45.serve.blocks import BlockManager, block_hashes
from ernie45.serve.metrics import ServerMetrics
from ernie45.serve.request import EngineArgs, Seq

log = logging.getLogger("ernie45.serve")

CHUNK_LATENCY = 1.5  # while sequences decode, a prompt chunk costs at most about this many decode steps
# in a mixed C step the chunk's rows cost more as the prompt's position grows (attention), so aim lower
MIXED_CHUNK_LATENCY = 1.0
MASK_ENTRIES = (
    1 << 26
)  # a prompt chunk's query x key mask stays within 64 MiB (chunks shrink at long contexts)


class Scheduler:
    """Admission, prompt chunking and preemption over the engine's rows and block pool (the state below is
    set, and described, in `Engine.__init__`)."""

    args: EngineArgs
    blocks: BlockManager
    metrics: ServerMetrics
    _rows: list[Seq]
    _waiting: deque[Seq]
    _lock: threading.Lock
    _pending: int
    _prefill_tok_s: float | None
    _decode_s: float | None
    _row_s: float | None

    def _release_pending(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    def _reserve_decode_blocks(self) -> list[Seq]:
        """The sequences that decode this step, each with a block for its next position; when the pool is
        out of blocks, the youngest sequences are preempted to make room."""
        bs = self.args.block_size
        out: list[Seq] = []
        for s in list(self._rows):
            if not s.admitted or not s.decoding:
                continue
            while s.admitted and len(s.blocks) <= s.computed // bs:
                got = self.blocks.allocate(1)
                if got is not None:
                    s.blocks += got
                else:
                    self._preempt(self._rows[-1])  # the youngest, possibly s itself
            if s.admitted:
                out.append(s)
        return [s for s in out if s.admitted]

    def _preempt(self, s: Seq) -> None:
        """Give back every block of `s` (full ones stay cached) and requeue it first; recomputed later."""
        log.info("KV cache full: preempting a sequence of %d tokens", len(s.tokens))
        self.metrics.preemptions.inc()
        self._rows.remove(s)
        self.blocks.free(s.blocks)
        s.blocks, s.computed, s.registered, s.admitted = [], 0, 0, False
        s.drafter = None  # recomputed positions bring their hidden states again (ernie45.serve.drafter)
        self._waiting.appendleft(s)
        with self._lock:
            self._pending += 1

    def _chunk_cap(self, decoding: bool, mixed: bool) -> int:
        """Prompt tokens one step may prefill: all of the budget when nothing decodes, else about
        `CHUNK_LATENCY` (`MIXED_CHUNK_LATENCY`) decode steps' worth, so streams keep flowing. Measured, not guessed: from the
        seconds per prompt token of PyTorch chunks (a multiple of the block size), or, in `mixed` steps (the
        chunk's tokens are extra rows of the C decode step, which has no per-call cost of its own), from what
        each extra row added to the step."""
        if not decoding:
            return self.args.max_num_batched_tokens
        if mixed:
            if self._row_s is None or self._decode_s is None:
                return 4
            rows = MIXED_CHUNK_LATENCY * self._decode_s / max(self._row_s, 1e-6)  # a row may measure as free
            return max(1, min(self.args.max_num_batched_tokens, int(rows)))
        bs = self.args.block_size
        if self._prefill_tok_s is None or self._decode_s is None:
            return 4 * bs
        tokens = int(CHUNK_LATENCY * self._decode_s / self._prefill_tok_s)
        return max(bs, tokens // bs * bs)

    def _schedule(self, budget: int, decoding: bool, mixed: bool = False) -> list[tuple[Seq, int]]:
        """Prompt chunks for this step: first the sequences already prefilling (oldest first), then newly
        admitted ones (FIFO) while seats, blocks and the token budget last. Returns (sequence, tokens)."""
        budget = min(budget, self._chunk_cap(decoding, mixed))
        chunks: list[tuple[Seq, int]] = []
        for s in self._rows:
            if budget <= 0:
                return chunks
            budget -= self._add_chunk(chunks, s, budget)
        while budget > 0 and self._waiting and len(self._rows) < self.args.max_num_seqs:
            s = self._waiting[0]
            if not self._admit(s):
                break  # FIFO: a later, smaller request does not overtake a waiting one
            self._waiting.popleft()
            self._release_pending(1)
            budget -= self._add_chunk(chunks, s, budget)
        return chunks

    def _add_chunk(self, chunks: list[tuple[Seq, int]], s: Seq, budget: int) -> int:
        """Schedule the next prompt chunk of `s` (if it is prefilling) within `budget`; returns its length."""
        left = s.target - s.computed
        if left <= 0:
            return 0
        bs = self.args.block_size
        # the chunk's mask has take x (computed + take) entries: shrink it at long contexts
        by_mask = max(bs, MASK_ENTRIES // (s.computed + min(left, budget)))
        take = min(left, budget, by_mask)
        chunks.append((s, take))
        return take

    def _admit(self, s: Seq) -> bool:
        """Give `s` its cached prefix and blocks for the rest of its prompt; False if the pool is too full."""
        bs, bm = self.args.block_size, self.blocks
        tokens = s.tokens
        use_cache = s.params.prompt_logprobs is None or bool(s.output)  # prompt logprobs need every position
        if use_cache:
            s.hashes = block_hashes(tokens[: s.target // bs * bs], bs, start=s.hashes)
        # at least one prompt token is computed: its logits give the first output token
        limit = (s.target - (0 if s.output else 1)) // bs if use_cache else 0
        hit = bm.match(s.hashes, limit)
        need = -(-s.target // bs) - len(hit)
        fresh = bm.allocate(need) if need > 0 else []
        if fresh is None:
            bm.free(hit)
            return False
        if not s.output:
            bm.count_query(len(s.prompt), len(hit) * bs)
            self.metrics.prefix_queries.inc(len(s.prompt))
            self.metrics.prefix_hits.inc(len(hit) * bs)
            s.cached_tokens = len(hit) * bs
            self.metrics.prompt_tokens.inc(len(s.prompt))
            self.metrics.queue_time.observe(time.monotonic() - s.arrival)
            if s.params.prompt_logprobs is not None:
                s.prompt_lps = [None]
        s.blocks, s.computed, s.registered, s.admitted = hit + fresh, len(hit) * bs, len(hit), True
        self._rows.append(s)
        return True

    def _register_blocks(self, s: Seq) -> None:
        """Enter the newly filled blocks of `s` into the prefix cache."""
        full = s.computed // self.args.block_size
        if not self.args.enable_prefix_caching or full <= s.registered:
            return
        bs = self.args.block_size
        s.hashes = block_hashes(s.tokens[: full * bs], bs, start=s.hashes[:full])
        for i in range(s.registered, full):
            self.blocks.register(s.blocks[i], s.hashes[i])
        s.registered = full
