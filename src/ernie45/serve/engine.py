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
  costs a few rows' arithmetic instead of a separate pass over the weights. Short prompts (`ROWS_PREFILL_MAX`)
  are rows of a C step even when nothing decodes: faster than the PyTorch prefill at those lengths.
- A request is admitted once blocks for its whole prompt are available; when a decoding sequence needs a
  block and none is left, the youngest sequence is preempted (its blocks freed, cached ones kept) and goes
  back to the head of the queue to be recomputed later, mostly from the prefix cache.

Decode runs every decoding sequence in one call (in C when the model has a native step, reading the pages in
place). Sampling (`ernie45.serve.sampler`) reuses the pure processors of `ernie45.generation.sampling` per row
(penalties) or per group of rows that share the same warper settings; text is produced by
`ernie45.generation.streaming`'s incremental detokeniser.

This module holds the engine thread, its model calls and token emission; the scheduling policy above is
`ernie45.serve.scheduler`, and the types the engine and its callers exchange are `ernie45.serve.request`.

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
from collections.abc import Callable

import torch
from torch import Tensor

from ernie45.fast import ROWS_PREFILL_MAX
from ernie45.serve.blocks import BlockManager
from ernie45.serve.drafter import ReplicatedMTP, SeqDrafter
from ernie45.serve.kv import kv_cache_blocks
from ernie45.serve.metrics import ServerMetrics
from ernie45.serve.request import (
    EngineArgs,
    EngineError,
    Output,
    RequestGroup,
    SamplingParams,
    Seq,
    TokenLogprob,
    deliver,
)
from ernie45.serve.runner import ModelRunner
from ernie45.serve.sampler import pick_logprobs, sample
from ernie45.serve.scheduler import Scheduler

log = logging.getLogger("ernie45.serve")


class Engine(Scheduler):
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
        self._incoming: queue.SimpleQueue[Seq | None] = queue.SimpleQueue()
        self._waiting: deque[Seq] = deque()
        self._rows: list[Seq] = []  # admitted sequences (prefilling or decoding), oldest first
        self._prefill_tok_s: float | None = None  # measured seconds per prompt token (moving average)
        self._decode_s: float | None = None  # measured seconds per decode step (moving average)
        self._row_s: float | None = None  # measured seconds a prompt-chunk row adds to a C decode step
        self._pending = 0  # submitted, not yet holding a row (incoming + waiting)
        self._outbox: list[tuple[Seq, Output | EngineError]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._drain_deadline = float("inf")
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()
        self._threads = torch.get_num_threads()  # OpenMP's thread count is per thread: carried over in _run
        self._settle_s = SETTLE_S
        self._spec = None
        self._mtp = None  # the MTPHead sequences draft with (`--speculative mtp`, ernie45.serve.drafter)
        if args.speculative is not None:
            from ernie45.generation.speculative import Speculative

            self._spec = Speculative(args.speculative, args.num_speculative_tokens,
                                     draft_vocab_size=args.draft_vocab_size)
            if self._spec.method == "mtp":
                self._mtp = self._mtp_head()
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

    def _mtp_head(self):
        """The model's MTP head, the runner set to keep the hidden states it reads; ErnieError where it cannot."""
        from ernie45.errors import ErnieError
        from ernie45.generation.speculative import _mtp_head, require_mtp

        require_mtp(self.model)
        size, shared = self.args.draft_vocab_size, self.runner.distributed
        if shared and size is not None:  # the sharded head has no C GEMV over gathered rows: no saving, not offered
            raise ErnieError("--draft-vocab-size does not apply under tensor parallelism")
        head = _mtp_head(self.model, None if size is None else (size, self.tokenizer))
        self.runner.keep_hidden, self.runner.pre_norm = True, head.wants_pre_norm()
        if not shared:
            return head
        self.runner.mtp_head = head  # every rank runs it (`ReplicatedMTP`)
        return ReplicatedMTP(head, self.runner)

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
        group = RequestGroup(self._wake, asyncio.get_running_loop(), len(prompts))
        deadline = time.monotonic() + self.args.request_timeout
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(p.seed % 2**64)
            group.seqs.append(Seq(group, i, list(prompt), p, self.tokenizer, gen, deadline))
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
            s.drafter = None  # no MTP_FREE op: the ranks can no longer agree on one (the process is stopping)
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
        native = self.runner.native
        mixed = bool(decoding) and native
        chunks = self._schedule(self.args.max_num_batched_tokens - len(decoding), bool(decoding), mixed)
        # prompt chunks that ride along the decode step, or, with nothing decoding, short ones that make a C step of
        # their own (`ROWS_PREFILL_MAX`); the rest, and any whose prompt logprobs are wanted, go through PyTorch
        rows = [(s, n) for s, n in chunks if native and s.prompt_lps is None
                and (mixed or s.computed + n <= ROWS_PREFILL_MAX)]
        if not mixed and sum(n for _, n in rows) > ROWS_PREFILL_MAX:
            rows = []  # many prompts at once: PyTorch's batched GEMMs win
        riding = {id(s) for s, _ in rows}
        alone = [(s, n) for s, n in chunks if id(s) not in riding]
        if alone:
            self._prefill(alone)
            self._flush()  # first tokens go out before the decode step (time to first token)
        decoding = [s for s in decoding if s.admitted]  # a prefill may have finished one (max_tokens)
        if len(decoding) == 1 and not chunks and self._spec is not None and self._speculate(decoding[0]):
            return  # batch 1 is where drafts pay: with more sequences the step already shares the weight reads
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

    def _reap(self, now: float) -> None:
        """Drop cancelled and timed-out sequences, running or waiting."""
        for s in [s for s in self._rows if s.cancelled or now > s.deadline]:
            if s.cancelled:
                self._retire(s, "abort")
            else:
                self._fail(s, _timeout_error(self.args.request_timeout))
        kept: deque[Seq] = deque()
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

    # ---- model calls ------------------------------------------------------------------------------
    def _prefill(self, chunks: list[tuple[Seq, int]]) -> None:
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
            if self._mtp is not None:
                self._drafter(s).add(s.computed, self.runner.kept[i, :n])
            s.computed += n
            self._register_blocks(s)
        self._first_tokens(seqs, logits)

    def _first_tokens(self, seqs: list[Seq], logits: Tensor) -> None:
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

    def _prompt_logprobs(self, i: int, s: Seq, start: int, n: int) -> list[TokenLogprob]:
        """Logprobs of the prompt tokens that positions start..start+n-1 predict (row i of the last prefill)."""
        k = s.params.prompt_logprobs or 0
        stop = min(n, len(s.prompt) - 1 - start)  # the last prompt position predicts no prompt token
        res: list[TokenLogprob] = []
        for a in range(0, stop, 512):  # bounded (512, V) logits at a time
            b = min(a + 512, stop)
            targets = torch.tensor(s.prompt[start + a + 1 : start + b + 1], device=self.device)
            lp = torch.log_softmax(self.runner.prompt_logits(i, a, b), dim=-1)
            res.extend(pick_logprobs(lp, targets, k))
        return res

    def _decode(self, seqs: list[Seq], chunks: list[tuple[Seq, int]] = ()) -> None:
        """One token for each decoding sequence; `chunks` (C decode step only) add a prompt chunk's tokens as
        rows of the same step, at consecutive positions of their sequence (the step stores every row's keys
        and values before any row attends, so the chunk is causal), and only its last row's logits are used."""
        tokens, pos, tables = (
            [s.output[-1] for s in seqs],
            [s.computed for s in seqs],
            [s.blocks for s in seqs],
        )
        want = [True] * len(seqs)
        for s, n in chunks:
            tokens += s.tokens[s.computed : s.computed + n]
            pos += range(s.computed, s.computed + n)
            tables += [s.blocks] * n
            want += [False] * (n - 1) + [s.computed + n >= s.target]  # logits only where the prompt ends
        t0 = time.monotonic()
        logits = self.runner.decode(tokens, pos, tables, want if chunks else None)  # (rows, V)
        dt = time.monotonic() - t0
        extra = len(tokens) - len(seqs)
        if extra and seqs and self._decode_s is not None:  # what a chunk row costs beside the decode rows
            row = max(dt - self._decode_s, 0.0) / extra
            self._row_s = row if self._row_s is None else 0.7 * self._row_s + 0.3 * row
        elif not extra:
            self._decode_s = dt if self._decode_s is None else 0.7 * self._decode_s + 0.3 * dt
        if self._mtp is not None:  # every row's hidden state, rows in the order fed: decode rows, then chunks
            kept, r = self.runner.kept, len(seqs)
            for i, s in enumerate(seqs):
                self._drafter(s).add(s.computed, kept[i:i + 1])
            for s, n in chunks:
                self._drafter(s).add(s.computed, kept[r:r + n])
                r += n
        for s in seqs:
            s.computed += 1
            self._register_blocks(s)
        if seqs:
            self._advance(seqs, logits[: len(seqs)])
        ended = []  # logits holds the decode rows, then one row per chunk that ends its prompt
        for s, n in chunks:
            s.computed += n
            self._register_blocks(s)
            if s.computed >= s.target:
                ended.append(s)
        if ended:
            self._first_tokens(ended, logits[len(seqs) : len(seqs) + len(ended)])

    def _speculate(self, s: Seq) -> bool:
        """A speculative step for the one decoding sequence: drafts d_1..d_k (prompt lookup, or the MTP layer's
        greedy chain: `ernie45.serve.drafter`), scored with its last token in one pass (C: k + 1 rows of the decode step on the sequence's own block table; PyTorch: a
        prefill chunk whose every row's logits are kept), then tokens sampled row by row as plain steps would,
        keeping rows while the sampled token equals the draft. Keeping a one-hot draft d when the draw from p is
        d is the rejection rule for one-hot drafts (accept with p(d), else a draw from p without d), so greedy
        answers are those of plain decoding and sampled ones keep their distribution. False when there is
        nothing to draft (the caller runs a plain step; for mtp also while the layer has not yet seen the
        sequence's newest position, which that step's hidden state then brings)."""
        from ernie45.generation.speculative import ngram_drafts

        spec, p, bs = self._spec, s.params, self.args.block_size
        room = min(p.max_tokens - len(s.output), self.args.max_model_len - len(s.tokens)) - 1
        k = min(spec.num_speculative_tokens, room)
        if k < 1:
            return False
        if self._mtp is not None:
            drafter = self._drafter(s)
            drafts = drafter.draft(k) if drafter.settle(s.tokens) else []
        else:
            drafts = ngram_drafts(s.tokens, k, spec.prompt_lookup_min, spec.prompt_lookup_max)
        while drafts and len(s.blocks) <= (s.computed + len(drafts)) // bs:  # blocks for the draft positions
            got = self.blocks.allocate(1)
            if got is None:  # no spare block: draft only what fits, never preempt for it
                drafts = drafts[: len(s.blocks) * bs - 1 - s.computed]
                break
            s.blocks += got
        if not drafts:
            return False
        toks = [s.output[-1], *drafts]
        n, first = len(toks), s.computed
        if self.runner.native:  # rows of one sequence: the step stores every row's K/V before any row attends
            logits = self.runner.decode(toks, list(range(s.computed, s.computed + n)), [s.blocks] * n)
            kept = self.runner.kept
        else:
            self.runner.prefill([toks], [s.computed], [s.blocks])
            logits = self.runner.prompt_logits(0, 0, n)  # (n, V): every row, not just the last
            kept = None if self.runner.kept is None else self.runner.kept[0]
        s.computed += 1  # the last token's keys/values
        self._register_blocks(s)
        accepted = 0
        for i in range(n):
            self._advance([s], logits[i : i + 1])
            if not s.admitted or i == n - 1 or s.output[-1] != drafts[i]:
                break
            accepted += 1
            s.computed += 1  # draft i is what the sequence holds there: its keys/values stay
            self._register_blocks(s)
        if self._mtp is not None and s.admitted:  # the hidden states of the positions kept (rejected rows' go)
            self._drafter(s).add(first, kept[: s.computed - first])
        self.metrics.spec_drafts.inc()
        self.metrics.spec_draft_tokens.inc(len(drafts))
        self.metrics.spec_accepted_tokens.inc(accepted)
        for i in range(accepted):
            self.metrics.spec_accepted_per_pos.labels(str(i)).inc()
        spec.drafted += len(drafts)
        spec.accepted += accepted
        spec.steps += 1
        return True

    def _drafter(self, s: Seq):
        """The sequence's MTP state (`ernie45.serve.drafter.SeqDrafter`), made at its first hidden state."""
        if s.drafter is None:
            reach = min(len(s.prompt) + s.params.max_tokens, self.args.max_model_len)
            s.drafter = SeqDrafter(self._mtp, reach + self._spec.num_speculative_tokens + 1)
        return s.drafter

    # ---- sampling and token emission ------------------------------------------------------------------
    def _advance(self, seqs: list[Seq], logits: Tensor) -> None:
        """Pick the next token of each sequence from its logits (n, V); emit, and retire finished ones.

        A failure that belongs to one sequence (its sampling parameters, its stop strings, its grammar) fails that
        sequence alone; the others continue with the tokens they would have had without it.
        """
        try:
            tokens, lps = sample(seqs, logits, self.eos_ids, self._rng)
        except Exception:
            tokens, lps, kept = [], [], []
            for i, s in enumerate(seqs):  # find the culprit(s): sample each row on its own
                try:
                    t, lp = sample([s], logits[i : i + 1], self.eos_ids, self._rng)
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

    def _fail_alone(self, s: Seq, e: Exception) -> None:
        """Fail one sequence whose own processing raised (400: what it asked for cannot be computed)."""
        log.warning("request %s failed alone: %s: %s", id(s.group), type(e).__name__, e)
        self._fail(s, EngineError(f"generation failed for this request's parameters: {e}", 400,
                                  "invalid_request_error"))

    def _emit_token(self, s: Seq, tok: int, lp: TokenLogprob | None, now: float) -> None:
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


    # ---- bookkeeping --------------------------------------------------------------------------------
    def _emit_output(self, s: Seq, out: Output, finish: str | None) -> None:
        out.num_prompt_tokens, out.num_output_tokens = len(s.prompt), len(s.output)
        out.num_cached_tokens = s.cached_tokens
        out.finish_reason = finish
        if finish is not None:
            self._retire(s, finish)
        self._outbox.append((s, out))

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops: one cross-thread wake-up per loop, not per token; then
        let the loops send them before the next step starts (`SETTLE_S`)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Seq, Output | EngineError]]] = {}
        for s, item in self._outbox:
            by_loop.setdefault(s.group._loop, []).append((s, item))
        self._outbox = []
        settled: list[threading.Event] = []
        for loop, items in by_loop.items():
            try:
                ev = threading.Event() if self._settle_s > 0 else None
                loop.call_soon_threadsafe(_deliver, loop, items, ev)  # one wake-up: each costs the step a switch
                if ev is not None:
                    settled.append(ev)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                for s, _ in items:
                    s.cancelled = True
        deadline = time.monotonic() + self._settle_s
        for ev in settled:
            ev.wait(max(0.0, deadline - time.monotonic()))

    def _fail(self, s: Seq, err: EngineError) -> None:
        self._retire(s, "timeout" if err.status == 408 else "error")
        self._outbox.append((s, err))

    def _retire(self, s: Seq, outcome: str) -> None:
        """Record the outcome once and give back the blocks of `s` (full ones stay in the prefix cache)."""
        if s.finish_reason is None:
            s.finish_reason = outcome
            now = time.monotonic()
            self.metrics.requests.labels(outcome).inc()
            self.metrics.e2e.observe(now - s.arrival)
            if s.first_token_at is not None and len(s.output) > 1:
                self.metrics.tpot.observe((now - s.first_token_at) / (len(s.output) - 1))
        if s.drafter is not None:
            s.drafter.close()
        s.drafter = None
        if not s.admitted:
            return
        self._rows.remove(s)
        self.blocks.free(s.blocks)
        s.blocks, s.admitted = [], False

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._rows))
        self.metrics.waiting.set(self._pending)
        self.metrics.kv_usage.set(self.blocks.num_used / self.blocks.num_blocks)


# After each step the engine waits, the GIL released, until every event loop it handed tokens to has run
# SETTLE_ROUNDS more rounds of its ready queue (the streams' handlers format and send in the first), for at most
# SETTLE_S. Otherwise that work runs during the next step and, on a machine whose cores all run the step,
# pre-empts one of its threads, whose share of the rows the others then wait for. Four alternating
# `bench serve --concurrency 1,8` runs (MoE wint4, 2 cores): c1 / generate 0.83-0.90x with the wait, 0.76-0.87x
# without; ITL p99 5.3-7.3 against 7.7-9.4 ms.
SETTLE_S = 0.002
SETTLE_ROUNDS = 3


def _deliver(loop: asyncio.AbstractEventLoop, items: list, settled: threading.Event | None) -> None:
    """Runs in the event loop: route a step's outputs to their requests (which wakes their handlers), then count
    SETTLE_ROUNDS rounds of the ready queue behind those handlers before setting `settled`."""
    deliver(items)
    if settled is not None:
        loop.call_soon(_after_ready, loop, SETTLE_ROUNDS, settled)


def _after_ready(loop: asyncio.AbstractEventLoop, rounds: int, settled: threading.Event) -> None:
    """Runs in the event loop: go round its ready queue `rounds` more times, then set `settled`."""
    if rounds:
        loop.call_soon(_after_ready, loop, rounds - 1, settled)
    else:
        settled.set()


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

