"""What the engine and its callers exchange: the engine's limits (`EngineArgs`), a request's decoding settings
(`SamplingParams`), what a request gets back (`Output`, `TokenLogprob`, `EngineError`), the handle a caller
iterates (`RequestGroup`), and the engine-side state of each sequence (`Seq`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from ernie45.generation.streaming import IncrementalDetokenizer, StopStringFilter
from ernie45.generation.structured import Grammar


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
    # "ngram" (prompt lookup) or "mtp" (the checkpoint's MTP layer): drafts while one sequence decodes
    # (Engine._speculate); `draft_vocab_size`: mtp drafts score only that many tokens (ernie45.mtp.draft_ids)
    speculative: str | None = None
    num_speculative_tokens: int | None = None
    draft_vocab_size: int | None = None


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


class Seq:
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
        self.drafter = None  # `--speculative mtp`: its MTP state (ernie45.serve.drafter.SeqDrafter)

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

    def __init__(self, wake: Callable[[], None], loop: asyncio.AbstractEventLoop, n: int):
        self._wake, self._loop, self._n = wake, loop, n
        self._queue: asyncio.Queue[tuple[int, Output | EngineError]] = asyncio.Queue()
        self.seqs: list[Seq] = []

    def abort(self) -> None:
        for s in self.seqs:
            s.cancelled = True
        self._wake()

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


def deliver(items: list[tuple[Seq, Output | EngineError]]) -> None:
    """Runs in the event loop: route outputs to their request queues."""
    for s, item in items:
        s.group._queue.put_nowait((s.index, item))
