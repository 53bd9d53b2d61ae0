"""Keep one conversation's KV cache between generate calls, so each chat turn prefills only its new tokens.

A chat re-sends the whole history every turn. `PromptCache` remembers the tokens whose keys/values the last
call left in its cache; the next call reuses the longest common prefix with its prompt (always recomputing at
least the prompt's last token, whose logits give the first new token) and prefills only the rest — llama.cpp's
prompt reuse, for in-process users (`ernie45 chat`, the web UI, LangChain). The server does the same across
requests with its paged prefix cache (`ernie45.serve.blocks`).

One cache serves one sequence at a time: a call that finds it in use by another (a second browser tab)
decodes with a fresh cache of its own.
"""

from __future__ import annotations

import threading
from typing import Any

_GRANULE = 256  # cache lengths are rounded up to this, with headroom, so a growing chat rarely reallocates


class PromptCache:
    """A reusable batch-1 `KVCache` and the tokens it holds; pass it as `prompt_cache=` to `generate`,
    `generate_step` or `stream_generate`."""

    def __init__(self) -> None:
        self.tokens: list[int] = []  # cache positions 0..len-1 hold these tokens' keys/values
        self.reused = 0  # prompt tokens the last call took from the cache
        self._cache = None
        self._model = None
        self._lock = threading.Lock()
        self._busy = False

    def take(self, model: Any, prompt: list[int], max_len: int) -> tuple[Any, int] | None:
        """A cache of at least `max_len` positions for `prompt`, and how many of its first tokens it already
        holds (its `length`); None while another call uses it. Call `keep` when done, also after an error."""
        with self._lock:
            if self._busy:
                return None
            self._busy = True
        limit = model.config.max_position_embeddings
        common = 0
        if self._model is model:
            held = self.tokens
            n = min(len(held), len(prompt) - 1)
            while common < n and held[common] == prompt[common]:
                common += 1
        cache = self._cache if self._model is model else None
        if cache is None or cache.max_len < max_len:
            size = min(limit, -(-(max_len + max_len // 4) // _GRANULE) * _GRANULE)
            grown = model.new_cache(1, max(size, max_len))
            for old, new in ((cache.k, grown.k), (cache.v, grown.v)) if cache is not None else ():
                for a, b in zip(old, new):
                    b[:, :, :common] = a[:, :, :common]
            cache, self._cache, self._model = grown, grown, model
        cache.length = common
        self.reused = common
        return cache, common

    def keep(self, tokens: list[int]) -> None:
        """Record the tokens the cache now holds (the first `cache.length` of the sequence) and release it."""
        self.tokens = tokens
        with self._lock:
            self._busy = False

    def clear(self) -> None:
        """Forget the cached tokens (the memory stays allocated for the next call)."""
        self.tokens = []
