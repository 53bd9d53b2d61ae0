"""The serving engine for in-process callers: the web UI's and LangChain's local back ends.

Several browser tabs or LangChain calls at once then share what `ernie45 serve` gives its clients: one engine
thread batching every caller's sequences through the batched C decode step, the paged KV cache, and the prefix
cache (a conversation's next turn prefills only what it added). `LocalEngine.stream` is a plain iterator for
synchronous code; the engine's outputs reach it through a private event loop thread.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterator

from ernie45.errors import ErnieError
from ernie45.serve.engine import Engine, EngineArgs, EngineError, Output, SamplingParams

LOCAL_MAX_NUM_SEQS = 4  # in-process callers: a few tabs or concurrent chains, not a server's load
LOCAL_MAX_MODEL_LEN = 32768  # default context of a local engine (the model's own where shorter)


class LocalEngine:
    """An `Engine` over `model` plus an event loop thread; `stream()` from any thread, `close()` when done.

    Args:
        model, tokenizer: the loaded model (optimized for inference) and its tokenizer.
        args: capacity; default `LOCAL_MAX_NUM_SEQS` sequences of up to `LOCAL_MAX_MODEL_LEN` positions (the
            KV pool is backed by memory only as it fills). `max_model_len` is the context callers must fit.
    """

    def __init__(self, model, tokenizer, args: EngineArgs | None = None):
        if args is None:
            context = min(model.config.max_position_embeddings, LOCAL_MAX_MODEL_LEN)
            args = EngineArgs(max_num_seqs=LOCAL_MAX_NUM_SEQS, max_model_len=context)
        self.args = args
        self.max_model_len = args.max_model_len
        self.engine = Engine(model, tokenizer, args)
        self.engine.start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ernie45-local-loop", daemon=True)
        self._thread.start()

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Output]:
        """The outputs of one sequence, step by step (the last has `finish_reason`). Closing the iterator early
        aborts the sequence; an engine error is raised as `ErnieError`."""

        async def submit():
            return self.engine.submit([prompt], [params])

        try:
            group = asyncio.run_coroutine_threadsafe(submit(), self._loop).result()
        except EngineError as e:
            raise ErnieError(e.message) from None
        outputs = group.__aiter__()

        async def step():
            return await outputs.__anext__()

        finished = False
        try:
            while not finished:
                try:
                    _, out = asyncio.run_coroutine_threadsafe(step(), self._loop).result()
                except StopAsyncIteration:
                    return
                except EngineError as e:
                    raise ErnieError(e.message) from None
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                group.abort()  # a closed stream (the stop button): the engine frees its blocks at the next step

    def close(self) -> None:
        self.engine.shutdown(0.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def shared_engine(model, tokenizer) -> LocalEngine:
    """The one `LocalEngine` of `model` in this process (created on first use): every in-process caller of the
    same model — web UI tabs, LangChain chat models built with `from_model` — is batched by the same engine."""
    with _shared_lock:
        engine = _shared.get(model)
        if engine is None:
            engine = _shared[model] = LocalEngine(model, tokenizer)
        return engine
