"""Continuous-batching generation engine: one thread runs the model; asyncio handlers submit and stream.

Design (vLLM's, sized for a CPU). The KV cache is paged (`ernie45.serve.kv`): one pool of fixed-size blocks
sized by memory, from which each sequence takes blocks as it grows (`ernie45.serve.blocks.BlockManager`), so
short and long sequences share memory and a sequence uses only what it fills.

- Prefix caching: full blocks are registered under a chained hash of their tokens; a new request starts with
  the longest run of its prompt's blocks already cached (an agent's system prompt, tool definitions and
  earlier turns) and prefills only the rest. Finished sequences leave their blocks cached until the pool
  needs them back (least recently used first).
- Chunked prefill: each step first gives every decoding sequence a token, then spends what remains of
  `max_num_batched_tokens` on prompt chunks. While sequences are decoding, a chunk is also kept to about
  `CHUNK_LATENCY` decode steps (from measured step times), so a long prompt no longer stalls the streams;
  with the C decode step the chunk's tokens are extra rows of the decode step itself ("mixed" steps), which
  costs a few rows' arithmetic instead of a separate pass over the weights.
- A request is admitted once blocks for its whole prompt are available; when a decoding sequence needs a
  block and none is left, the youngest sequence is preempted (its blocks freed, cached ones kept) and goes
  back to the head of the queue to be recomputed later, mostly from the prefix cache.

Decode runs every decoding sequence in one call (in C when the model has a native step, reading the pages in
place). Sampling reuses the pure processors of `ernie45.generation.sampling` per row (penalties) or per group
of rows that share the same warper settings; text is produced by `ernie45.generation.streaming`'s incremental
detokeniser.

Every model call goes through a `ModelRunner`, which under tensor parallelism replays it on the other ranks.
There, any error in a step is fatal (the ranks may no longer agree): the engine answers every request with
503, refuses new ones and reports to `on_fatal`, whose owner stops the server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ernie45.generation import sampling, structured
from ernie45.generation.streaming import IncrementalDetokenizer, StopStringFilter
from ernie45.generation.structured import Grammar
from ernie45.serve.blocks import BlockManager, block_hashes
from ernie45.serve.kv import kv_cache_blocks
from ernie45.serve.metrics import ServerMetrics
from ernie45.serve.runner import ModelRunner

log = logging.getLogger("ernie45.serve")

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports masked tokens with this value too


class EngineError(Exception):
    """A request the engine refuses or could not finish; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int, type_: str = "server_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.code = message, status, type_, code


@dataclass
class EngineArgs:
    """Capacity and limits. The KV pool holds `kv_cache_memory` bytes (default: room for `max_num_seqs`
    sequences of `max_model_len`, at most half the memory available at start) in blocks of `block_size`."""

    max_num_seqs: int = 8  # sequences admitted at once (prefilling or decoding)
    max_model_len: int = 2048
    max_queue_len: int = 256  # waiting requests beyond this are refused with 429
    max_num_batched_tokens: int = 2048  # tokens one step computes (decode tokens + prompt chunks)
    request_timeout: float = 600.0  # seconds from arrival; then the request ends with an error
    block_size: int = 16
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto (the model dtype) or int8 (per-row scales: half of bf16's memory)


CHUNK_LATENCY = 1.5  # while sequences decode, a prompt chunk costs at most about this many decode steps
# in a mixed C step the chunk's rows cost more as the prompt's position grows (attention), so aim lower
MIXED_CHUNK_LATENCY = 1.0
MASK_ENTRIES = (
    1 << 26
)  # a prompt chunk's query x key mask stays within 64 MiB (chunks shrink at long contexts)


# Temperatures below this decode greedily (vLLM's rule): dividing logits by 1e-45 makes them inf and the draw NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI/vLLM meaning). temperature below MIN_TEMPERATURE means greedy."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives per generated token; 0 = only the chosen token's logprob
    prompt_logprobs: int | None = None  # same, for the prompt tokens (completions with echo)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    grammar: Grammar | None = None  # structured output: every sequence's tokens follow it


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Output:
    """What one request gained in one engine step."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; entry 0 is None
    finish_reason: str | None = None  # "stop" | "length" once finished
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache


class _Seq:
    """Engine-side state of one sequence (one choice of one HTTP request)."""

    def __init__(
        self,
        group: RequestGroup,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        tokenizer,
        generator: torch.Generator | None,
        deadline: float,
    ):
        self.group, self.index, self.prompt, self.params = group, index, prompt, params
        self.generator, self.deadline = generator, deadline
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stops = StopStringFilter(params.stop)
        self.guide = params.grammar.guide() if params.grammar is not None else None
        self.bias = None  # logit_bias as (ids, values) tensors, built once per sequence, not per token
        if params.logit_bias:
            self.bias = (torch.tensor(list(params.logit_bias), dtype=torch.long),
                         torch.tensor(list(params.logit_bias.values()), dtype=torch.float32))
        self.prompt_lps: list[TokenLogprob | None] | None = None  # sent with the first output
        self.output: list[int] = []
        self.blocks: list[int] = []  # block table: position t lives in blocks[t // block_size]
        self.hashes: list[bytes] = []  # chained hashes of the full blocks of prompt + output known so far
        self.registered = 0  # leading blocks registered in the prefix cache
        self.computed = 0  # positions whose keys/values are in the cache
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.admitted = False
        self.cancelled = False
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def target(self) -> int:
        """Positions to prefill before decoding: the prompt (its last logits give the first token), or after a
        preemption all but the last token (which the next decode step feeds)."""
        return len(self.prompt) + len(self.output) - (1 if self.output else 0)

    @property
    def decoding(self) -> bool:
        return bool(self.output) and self.computed == self.target


class RequestGroup:
    """The n choices of one HTTP request; iterate it (in the event loop) for `(choice index, Output)` pairs.

    Raises the `EngineError` of a choice that failed. `abort()` (e.g. on client disconnect) frees the
    choices' KV blocks at the engine's next step.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, n: int):
        self._engine, self._loop, self._n = engine, loop, n
        self._queue: asyncio.Queue[tuple[int, Output | EngineError]] = asyncio.Queue()
        self.seqs: list[_Seq] = []

    def abort(self) -> None:
        for s in self.seqs:
            s.cancelled = True
        self._engine._wake()

    async def __aiter__(self) -> AsyncIterator[tuple[int, Output]]:
        open_ = self._n
        while open_:
            index, item = await self._queue.get()
            if isinstance(item, EngineError):
                self.abort()
                raise item
            if item.finish_reason is not None:
                open_ -= 1
            yield index, item


class Engine:
    """Owns the model runner (model + slot cache) and the engine thread.

    Args:
        model: an `ErnieForCausalLM` in eval mode (on rank 0, a tensor-parallel shard).
        tokenizer: the matching `ernie45.tokenizer.Tokenizer`.
        args: capacity and limits.
        metrics: Prometheus metrics to update (optional).
        on_fatal: called (from the engine thread) when a tensor-parallel step fails and the engine stops.
    """

    def __init__(
        self,
        model,
        tokenizer,
        args: EngineArgs,
        metrics: ServerMetrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.metrics = metrics or ServerMetrics()
        self.device = model.device
        num_blocks = kv_cache_blocks(model, args)
        self.runner = ModelRunner(
            model, num_blocks, args.block_size, room=3 * args.max_num_seqs, kv_dtype=args.kv_cache_dtype
        )
        self.blocks = BlockManager(num_blocks, args.block_size, caching=args.enable_prefix_caching)
        self.on_fatal = on_fatal
        self.failed: BaseException | None = None  # set when a tensor-parallel step failed; the engine is gone
        self.eos_ids = frozenset(model.config.eos_token_ids) | frozenset(tokenizer.stop_token_ids)
        self._incoming: queue.SimpleQueue[_Seq | None] = queue.SimpleQueue()
        self._waiting: deque[_Seq] = deque()
        self._rows: list[_Seq] = []  # admitted sequences (prefilling or decoding), oldest first
        self._prefill_tok_s: float | None = None  # measured seconds per prompt token (moving average)
        self._decode_s: float | None = None  # measured seconds per decode step (moving average)
        self._row_s: float | None = None  # measured seconds a prompt-chunk row adds to a C decode step
        self._pending = 0  # submitted, not yet holding a row (incoming + waiting)
        self._outbox: list[tuple[_Seq, Output | EngineError]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._drain_deadline = float("inf")
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()
        self._threads = torch.get_num_threads()  # OpenMP's thread count is per thread: carried over in _run
        self._thread = threading.Thread(target=self._run, name="ernie45-engine", daemon=True)
        log.info(
            "KV cache: %d blocks of %d positions (%d positions, %.1f MiB at most, %s), prefix caching %s, "
            "decode step: %s",
            num_blocks,
            args.block_size,
            num_blocks * args.block_size,
            self.runner.cache.nbytes / 2**20,
            "int8" if args.kv_cache_dtype == "int8" else str(model.dtype).removeprefix("torch."),
            "on" if args.enable_prefix_caching else "off",
            "C" if self.runner.native else "PyTorch",
        )

    # ---- public API (event-loop side) ------------------------------------------------------------
    def start(self) -> None:
        # The model, tokenizer and pools are long-lived: move them out of the collector's reach, so a full
        # collection (every few thousand allocations) does not walk them mid-stream (as vLLM does after startup).
        gc.collect()
        gc.freeze()
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestGroup:
        """Queue one sequence per (prompt, params) pair; all or none are accepted.

        Raises EngineError 429 when the queue is full and 503 once shutdown has begun. Prompts must be
        non-empty and prompt + max_tokens must fit `max_model_len` (the HTTP layer answers 400 otherwise).
        """
        if len(prompts) > self.args.max_queue_len:
            raise EngineError(
                f"the request has {len(prompts)} sequences but the server queues at most {self.args.max_queue_len}",
                400,
                "invalid_request_error",
            )
        group = RequestGroup(self, asyncio.get_running_loop(), len(prompts))
        deadline = time.monotonic() + self.args.request_timeout
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(p.seed % 2**64)
            group.seqs.append(_Seq(group, i, list(prompt), p, self.tokenizer, gen, deadline))
        with self._lock:  # the check and the enqueue are one step, so shutdown never strands a request
            if self.failed is not None:
                raise _rank_failed()
            if self._stopping:
                raise EngineError("the server is shutting down", 503, "server_error", "shutting_down")
            if self._pending + len(prompts) > self.args.max_queue_len:
                self.metrics.rejected.inc()
                raise EngineError(
                    f"the server is overloaded ({self._pending} requests waiting); retry later",
                    429,
                    "rate_limit_error",
                    "queue_full",
                )
            self._pending += len(prompts)
            for s in group.seqs:
                self._incoming.put(s)
        return group

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Refuse new work, answer waiting requests with 503, let running ones finish for `drain_timeout` s."""
        with self._lock:
            self._stopping = True
        self._drain_deadline = time.monotonic() + drain_timeout
        self._wake()
        if self._thread.is_alive():
            self._thread.join(drain_timeout + 5.0)

    def stats(self) -> dict[str, int]:
        b = self.blocks
        return {
            "running": len(self._rows),
            "waiting": self._pending,
            "slots": self.args.max_num_seqs,
            "kv_blocks": b.num_blocks,
            "kv_blocks_used": b.num_used,
            "prefix_cache_queries": b.queries,
            "prefix_cache_hits": b.hits,
        }

    def _wake(self) -> None:
        self._incoming.put(None)

    # ---- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                self._loop()
        except Exception as e:  # only tensor-parallel errors get here: the ranks can no longer agree
            self._die(e)

    def _loop(self) -> None:
        while True:
            self._pull(block=not self._rows and not self._waiting and not self._stopping)
            if self._stopping and self._shutdown_step():
                self.runner.close()
                return
            if not self._rows and not self._waiting:
                self.runner.heartbeat()
            try:
                self._step()
            except Exception:  # a bug or an out-of-memory must not take a single-process server down
                if self.runner.distributed:
                    raise
                log.exception("engine step failed; failing the running requests")
                for s in list(self._rows):
                    self._fail(s, EngineError("internal error during generation", 500))
            self._flush()
            self._update_gauges()

    def _die(self, e: Exception) -> None:
        """A tensor-parallel step failed (a rank died or timed out): answer everything with 503 and stop."""
        log.error("a tensor-parallel step failed (%s: %s); stopping the server", type(e).__name__, e)
        with self._lock:
            self.failed, self._stopping = e, True
        self._pull(block=False)
        for s in [*self._rows, *self._waiting]:
            self._fail(s, _rank_failed())
        self._rows, self._waiting = [], deque()
        self._release_pending(self._pending)
        self._flush()
        self._update_gauges()
        if self.on_fatal is not None:
            self.on_fatal(e)

    def _step(self) -> None:
        self._reap(time.monotonic())
        decoding = self._reserve_decode_blocks()
        mixed = bool(decoding) and self.runner.native
        chunks = self._schedule(self.args.max_num_batched_tokens - len(decoding), bool(decoding), mixed)
        rows = [(s, n) for s, n in chunks if mixed and s.prompt_lps is None]  # ride along the decode step
        alone = [(s, n) for s, n in chunks if not (mixed and s.prompt_lps is None)]
        if alone:
            self._prefill(alone)
            self._flush()  # first tokens go out before the decode step (time to first token)
        decoding = [s for s in decoding if s.admitted]  # a prefill may have finished one (max_tokens)
        if decoding or rows:
            self._decode(decoding, rows)

    def _pull(self, block: bool) -> None:
        try:
            item = self._incoming.get(timeout=1.0) if block else self._incoming.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass

    def _shutdown_step(self) -> bool:
        """While stopping: answer the queue with 503, drain the rows. True when the thread may exit."""
        gone = EngineError("the server is shutting down", 503, "server_error", "shutting_down")
        self._pull(block=False)  # submit() enqueues under the lock, so nothing can arrive after this
        while self._waiting:
            s = self._waiting.popleft()
            self._release_pending(1)
            self._fail(s, gone)
        if self._rows and time.monotonic() > self._drain_deadline:
            for s in list(self._rows):
                self._fail(s, gone)
        self._flush()
        self._update_gauges()
        return not self._rows

    def _release_pending(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    def _reap(self, now: float) -> None:
        """Drop cancelled and timed-out sequences, running or waiting."""
        for s in [s for s in self._rows if s.cancelled or now > s.deadline]:
            if s.cancelled:
                self._retire(s, "abort")
            else:
                self._fail(s, _timeout_error(self.args.request_timeout))
        kept: deque[_Seq] = deque()
        for s in self._waiting:
            if s.cancelled or now > s.deadline:
                self._release_pending(1)
                if s.cancelled:
                    self._retire(s, "abort")
                else:
                    self._fail(s, _timeout_error(self.args.request_timeout))
            else:
                kept.append(s)
        self._waiting = kept

    # ---- scheduling ------------------------------------------------------------------------------
    def _reserve_decode_blocks(self) -> list[_Seq]:
        """The sequences that decode this step, each with a block for its next position; when the pool is
        out of blocks, the youngest sequences are preempted to make room."""
        bs = self.args.block_size
        out: list[_Seq] = []
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

    def _preempt(self, s: _Seq) -> None:
        """Give back every block of `s` (full ones stay cached) and requeue it first; recomputed later."""
        log.info("KV cache full: preempting a sequence of %d tokens", len(s.tokens))
        self.metrics.preemptions.inc()
        self._rows.remove(s)
        self.blocks.free(s.blocks)
        s.blocks, s.computed, s.registered, s.admitted = [], 0, 0, False
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

    def _schedule(self, budget: int, decoding: bool, mixed: bool = False) -> list[tuple[_Seq, int]]:
        """Prompt chunks for this step: first the sequences already prefilling (oldest first), then newly
        admitted ones (FIFO) while seats, blocks and the token budget last. Returns (sequence, tokens)."""
        budget = min(budget, self._chunk_cap(decoding, mixed))
        chunks: list[tuple[_Seq, int]] = []
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

    def _add_chunk(self, chunks: list[tuple[_Seq, int]], s: _Seq, budget: int) -> int:
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

    def _admit(self, s: _Seq) -> bool:
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

    def _register_blocks(self, s: _Seq) -> None:
        """Enter the newly filled blocks of `s` into the prefix cache."""
        full = s.computed // self.args.block_size
        if not self.args.enable_prefix_caching or full <= s.registered:
            return
        bs = self.args.block_size
        s.hashes = block_hashes(s.tokens[: full * bs], bs, start=s.hashes[:full])
        for i in range(s.registered, full):
            self.blocks.register(s.blocks[i], s.hashes[i])
        s.registered = full

    # ---- model calls ------------------------------------------------------------------------------
    def _prefill(self, chunks: list[tuple[_Seq, int]]) -> None:
        seqs = [s for s, _ in chunks]
        past = [s.computed for s in seqs]
        toks = [s.tokens[s.computed : s.computed + n] for s, n in chunks]
        t0 = time.monotonic()
        logits = self.runner.prefill(toks, past, [s.blocks for s in seqs])  # (n, V)
        n_tok = sum(n for _, n in chunks)
        per_tok = (time.monotonic() - t0) / n_tok
        self._prefill_tok_s = (
            per_tok if self._prefill_tok_s is None else 0.7 * self._prefill_tok_s + 0.3 * per_tok
        )
        for i, (s, n) in enumerate(chunks):
            if s.prompt_lps is not None and not s.output:
                s.prompt_lps.extend(self._prompt_logprobs(i, s, past[i], n))
            s.computed += n
            self._register_blocks(s)
        self._first_tokens(seqs, logits)

    def _first_tokens(self, seqs: list[_Seq], logits: Tensor) -> None:
        """Sequences whose prompt is now all prefilled get their first token from their row of `logits`."""
        done = [i for i, s in enumerate(seqs) if s.computed == s.target and not s.output]
        now = time.monotonic()
        generate = []
        for i in done:
            s = seqs[i]
            if s.params.max_tokens == 0:  # scoring only (echo with max_tokens=0): nothing to generate
                s.first_token_at = now
                self._emit_output(s, Output(prompt_logprobs=s.prompt_lps), "length")
            else:
                generate.append(i)
        if generate:
            self._advance([seqs[i] for i in generate], logits[generate])

    def _prompt_logprobs(self, i: int, s: _Seq, start: int, n: int) -> list[TokenLogprob]:
        """Logprobs of the prompt tokens that positions start..start+n-1 predict (row i of the last prefill)."""
        k = s.params.prompt_logprobs or 0
        stop = min(n, len(s.prompt) - 1 - start)  # the last prompt position predicts no prompt token
        res: list[TokenLogprob] = []
        for a in range(0, stop, 512):  # bounded (512, V) logits at a time
            b = min(a + 512, stop)
            targets = torch.tensor(s.prompt[start + a + 1 : start + b + 1], device=self.device)
            lp = torch.log_softmax(self.runner.prompt_logits(i, a, b), dim=-1)
            res.extend(_pick_logprobs(lp, targets, k))
        return res

    def _decode(self, seqs: list[_Seq], chunks: list[tuple[_Seq, int]] = ()) -> None:
        """One token for each decoding sequence; `chunks` (C decode step only) add a prompt chunk's tokens as
        rows of the same step, at consecutive positions of their sequence (the step stores every row's keys
        and values before any row attends, so the chunk is causal), and only its last row's logits are used."""
        tokens, pos, tables = (
            [s.output[-1] for s in seqs],
            [s.computed for s in seqs],
            [s.blocks for s in seqs],
        )
        for s, n in chunks:
            tokens += s.tokens[s.computed : s.computed + n]
            pos += range(s.computed, s.computed + n)
            tables += [s.blocks] * n
        t0 = time.monotonic()
        logits = self.runner.decode(tokens, pos, tables)  # (rows, V)
        dt = time.monotonic() - t0
        extra = len(tokens) - len(seqs)
        if extra and seqs and self._decode_s is not None:  # what a chunk row costs beside the decode rows
            row = max(dt - self._decode_s, 0.0) / extra
            self._row_s = row if self._row_s is None else 0.7 * self._row_s + 0.3 * row
        elif not extra:
            self._decode_s = dt if self._decode_s is None else 0.7 * self._decode_s + 0.3 * dt
        for s in seqs:
            s.computed += 1
            self._register_blocks(s)
        if seqs:
            self._advance(seqs, logits[: len(seqs)])
        last, at = [], len(seqs)
        for s, n in chunks:
            s.computed += n
            self._register_blocks(s)
            at += n
            last.append(at - 1)
        if chunks:
            self._first_tokens([s for s, _ in chunks], logits[last])

    # ---- sampling ----------------------------------------------------------------------------------
    def _advance(self, seqs: list[_Seq], logits: Tensor) -> None:
        """Pick the next token of each sequence from its logits (n, V); emit, and retire finished ones.

        A failure that belongs to one sequence (its sampling parameters, its stop strings, its grammar) fails that
        sequence alone; the others continue with the tokens they would have had without it.
        """
        try:
            tokens, lps = self._sample(seqs, logits)
        except Exception:
            tokens, lps, kept = [], [], []
            for i, s in enumerate(seqs):  # find the culprit(s): sample each row on its own
                try:
                    t, lp = self._sample([s], logits[i : i + 1])
                except Exception as e:
                    self._fail_alone(s, e)
                    continue
                tokens += t
                lps += lp
                kept.append(s)
            seqs = kept
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(seqs))
        for i, s in enumerate(seqs):
            try:
                self._emit_token(s, tokens[i], lps[i], now)
            except Exception as e:
                self._fail_alone(s, e)

    def _fail_alone(self, s: _Seq, e: Exception) -> None:
        """Fail one sequence whose own processing raised (400: what it asked for cannot be computed)."""
        log.warning("request %s failed alone: %s: %s", id(s.group), type(e).__name__, e)
        self._fail(s, EngineError(f"generation failed for this request's parameters: {e}", 400,
                                  "invalid_request_error"))

    def _emit_token(self, s: _Seq, tok: int, lp: TokenLogprob | None, now: float) -> None:
        p = s.params
        s.output.append(tok)
        if s.first_token_at is None:
            s.first_token_at = now
            self.metrics.ttft.observe(now - s.arrival)
        out = Output(token_ids=[tok], logprobs=None if lp is None else [lp], prompt_logprobs=s.prompt_lps)
        s.prompt_lps = None
        finish = None
        if s.guide is not None and not s.guide.accept(tok) and tok not in self.eos_ids:
            finish = "stop"  # cannot happen (the mask allowed tok); ends the sequence rather than the server
        elif tok in p.stop_token_ids or (tok in self.eos_ids and not p.ignore_eos):
            finish = "stop"  # the stop token itself adds no text
        else:
            out.text, hit = s.stops.add(s.detok.add(tok))
            if hit:
                finish = "stop"
            elif len(s.output) >= p.max_tokens or len(s.prompt) + len(s.output) >= self.args.max_model_len:
                finish = "length"
        if finish is not None and not s.stops.stopped:
            out.text += s.stops.add(s.detok.flush())[0] + s.stops.flush()
        self._emit_output(s, out, finish)

    def _sample(self, seqs: list[_Seq], logits: Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Penalties per row, warpers per group of rows with equal settings, then argmax or a draw."""
        if all(_plain_greedy(s) for s in seqs):  # the common agent case: one argmax, no per-row work
            return sampling.greedy(logits).tolist(), [None] * len(seqs)
        dev = logits.device
        scores = logits
        for i, s in enumerate(seqs):
            p = s.params
            row = None
            if s.bias is not None:
                row = scores[i : i + 1].clone()
                ids, values = s.bias
                row[0, ids.to(dev)] += values.to(device=dev, dtype=row.dtype)
            if len(s.output) < p.min_tokens:
                stop = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids)))
                if stop:
                    row = sampling.suppress_tokens(
                        scores[i : i + 1] if row is None else row, torch.tensor(stop, device=dev)
                    )
            if p.repetition_penalty != 1.0:
                hist = torch.tensor([s.prompt + s.output], device=dev)
                row = sampling.apply_repetition_penalty(
                    scores[i : i + 1] if row is None else row, hist, p.repetition_penalty
                )
            if (p.presence_penalty or p.frequency_penalty) and s.output:
                gen = torch.tensor([s.output], device=dev)
                row = sampling.apply_presence_frequency_penalty(
                    scores[i : i + 1] if row is None else row, gen, p.presence_penalty, p.frequency_penalty
                )
            if row is not None:
                if scores is logits:
                    scores = logits.clone()
                scores[i : i + 1] = row
        guides = [s.guide for s in seqs]
        if any(g is not None for g in guides):  # grammar last: it overrides what the penalties left
            scores = structured.mask_rows_(logits.clone() if scores is logits else scores, guides)
        chosen = torch.empty(len(seqs), dtype=torch.long, device=dev)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.params
            key = (p.temperature, p.top_k if p.top_k > 0 else 0, p.top_p, p.min_p or None)
            groups.setdefault(key if p.temperature >= MIN_TEMPERATURE else ("greedy",), []).append(i)
        for key, idx in groups.items():
            ix = torch.tensor(idx, device=dev)
            sub = scores[ix]
            if key == ("greedy",):
                chosen[ix] = sampling.greedy(sub)
                continue
            temperature, top_k, top_p, min_p = key
            for w in sampling.make_warpers(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p):
                sub = w(sub)
            seeded = [j for j, i in enumerate(idx) if seqs[i].generator is not None]
            unseeded = [j for j in range(len(idx)) if seqs[idx[j]].generator is None]
            for j in seeded:  # a request's own generator: its draws do not depend on its batch mates
                chosen[idx[j]] = sampling.sample(sub[j : j + 1], seqs[idx[j]].generator)[0]
            if unseeded:
                u = torch.tensor(unseeded, device=dev)
                chosen[ix[u]] = sampling.sample(sub[u], self._rng)
        tokens = chosen.tolist()
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            w = torch.tensor(want, device=dev)
            # Logprobs of the raw model distribution (before penalties and warpers), as vLLM reports them.
            raw = torch.log_softmax(logits[w], dim=-1)
            k = max(seqs[i].params.logprobs or 0 for i in want)
            picked = _pick_logprobs(raw, chosen[w], k)
            for j, i in enumerate(want):
                kk = seqs[i].params.logprobs or 0
                lps[i] = TokenLogprob(picked[j].token_id, picked[j].logprob, picked[j].top[:kk])
        return tokens, lps

    # ---- bookkeeping --------------------------------------------------------------------------------
    def _emit_output(self, s: _Seq, out: Output, finish: str | None) -> None:
        out.num_prompt_tokens, out.num_output_tokens = len(s.prompt), len(s.output)
        out.num_cached_tokens = s.cached_tokens
        out.finish_reason = finish
        if finish is not None:
            self._retire(s, finish)
        self._outbox.append((s, out))

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops: one cross-thread wake-up per loop, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Seq, Output | EngineError]]] = {}
        for s, item in self._outbox:
            by_loop.setdefault(s.group._loop, []).append((s, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                for s, _ in items:
                    s.cancelled = True

    def _fail(self, s: _Seq, err: EngineError) -> None:
        self._retire(s, "timeout" if err.status == 408 else "error")
        self._outbox.append((s, err))

    def _retire(self, s: _Seq, outcome: str) -> None:
        """Record the outcome once and give back the blocks of `s` (full ones stay in the prefix cache)."""
        if s.finish_reason is None:
            s.finish_reason = outcome
            now = time.monotonic()
            self.metrics.requests.labels(outcome).inc()
            self.metrics.e2e.observe(now - s.arrival)
            if s.first_token_at is not None and len(s.output) > 1:
                self.metrics.tpot.observe((now - s.first_token_at) / (len(s.output) - 1))
        if not s.admitted:
            return
        self._rows.remove(s)
        self.blocks.free(s.blocks)
        s.blocks, s.admitted = [], False

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._rows))
        self.metrics.waiting.set(self._pending)
        self.metrics.kv_usage.set(self.blocks.num_used / self.blocks.num_blocks)


def _plain_greedy(s: _Seq) -> bool:
    """Greedy with nothing that changes the scores or asks for logprobs."""
    p = s.params
    return (
        p.temperature < MIN_TEMPERATURE
        and p.logprobs is None
        and not p.logit_bias
        and p.grammar is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and len(s.output) >= p.min_tokens
    )


def _deliver(items: list[tuple[_Seq, Output | EngineError]]) -> None:
    """Runs in the event loop: route outputs to their request queues."""
    for s, item in items:
        s.group._queue.put_nowait((s.index, item))


def _rank_failed() -> EngineError:
    return EngineError(
        "the server lost a tensor-parallel rank and is stopping", 503, "server_error", "rank_failed"
    )


def _timeout_error(limit: float) -> EngineError:
    return EngineError(
        f"the request did not finish within the server's {limit:g} s request timeout",
        408,
        "timeout_error",
        "request_timeout",
    )


def _pick_logprobs(lp: Tensor, targets: Tensor, k: int) -> list[TokenLogprob]:
    """Logprob of `targets` (n,) under `lp` (n, V) plus the k best alternatives, on the host."""
    chosen = lp.gather(1, targets[:, None])[:, 0].clamp(min=LOGPROB_FLOOR).tolist()
    if k:
        top_v, top_i = lp.topk(k, dim=-1)
        top_v, top_i = top_v.clamp(min=LOGPROB_FLOOR).tolist(), top_i.tolist()
    else:
        top_v = top_i = [[] for _ in chosen]
    return [
        TokenLogprob(int(t), c, list(zip(ti, tv)))
        for t, c, ti, tv in zip(targets.tolist(), chosen, top_i, top_v)
    ]
