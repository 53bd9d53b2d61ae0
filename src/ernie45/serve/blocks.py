"""Block bookkeeping of the paged KV cache: allocation, reference counts and the prefix cache.

The pool (`ernie45.serve.kv.PagedKVCache`) holds `num_blocks` pages of `block_size` positions per layer. A
sequence owns a list of block ids (its block table); position t lives in block `blocks[t // block_size]`.

Prefix caching (as vLLM's automatic prefix caching): once a block is full, it is registered under a hash of
its tokens chained with the hash of the block before it (plus a salt naming anything else the keys depend
on), so a block's hash names the whole prefix up to its end. A new sequence whose first blocks' hashes are
registered shares those blocks instead of computing them again. A block whose last user has finished stays
registered but becomes *evictable*; allocation takes never-used blocks first, then evicts the least recently
used evictable block. Blocks are never written once registered: a sequence writes only at positions past
its last shared block, so sharing never changes what another sequence reads.

Hashes are SHA-256 (not Python's `hash`), so that a client cannot craft a prompt whose blocks collide with
another client's cached prefix.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict


def block_hashes(
    tokens: list[int], block_size: int, salt: bytes = b"", start: list[bytes] | None = None
) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens`; `start` holds hashes already computed for its first
    blocks (extended, not recomputed)."""
    out = list(start or [])
    for i in range(len(out), len(tokens) // block_size):
        parent = out[-1] if out else salt
        chunk = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        out.append(hashlib.sha256(parent + chunk).digest())
    return out


class BlockManager:
    """Free list, reference counts and the hash table of full blocks.

    Args:
        num_blocks: pages in the pool.
        block_size: positions per page.
        caching: register full blocks and share them between sequences (prefix caching).
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._free = list(range(num_blocks))  # a heap: the lowest ids first, so the used pages stay compact
        self._ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unused; oldest first
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get: never used or evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def match(self, hashes: list[bytes], limit: int) -> list[int]:
        """The longest run of registered blocks for `hashes` (at most `limit`), taken (reference counted)."""
        found: list[int] = []
        if self.caching:
            for h in hashes[:limit]:
                b = self._by_hash.get(h)
                if b is None:
                    break
                found.append(b)
        for b in found:
            self._take(b)
        return found

    def count_query(self, tokens: int, hit: int) -> None:
        self.queries += tokens
        self.hits += hit

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting the least recently used cached ones if needed), or None if too few."""
        if n > self.num_available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = heapq.heappop(self._free)
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of[b]]
                self._hash_of[b] = None
            self._ref[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> None:
        """Record that `block` (full, owned by the caller) holds the prefix named by `h`."""
        if not self.caching or self._hash_of[block] is not None or h in self._by_hash:
            return  # already registered, or the same prefix was computed twice: the first copy is shared
        self._hash_of[block] = h
        self._by_hash[h] = block

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unused registered blocks become evictable, others free.

        Evictable blocks queue least recently used first, and a sequence's tail ahead of its head: the head
        (system prompt, tool definitions) is the part other requests share."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash_of[b] is not None:
                    self._evictable[b] = None  # newest last; within a sequence its head is newest
                else:
                    heapq.heappush(self._free, b)

    def reset(self) -> int:
        """Forget every evictable cached block (they become free); returns how many."""
        n = len(self._evictable)
        for b in self._evictable:
            del self._by_hash[self._hash_of[b]]
            self._hash_of[b] = None
            heapq.heappush(self._free, b)
        self._evictable.clear()
        return n

    def _take(self, b: int) -> None:
        if self._ref[b] == 0:
            self._evictable.pop(b)
        self._ref[b] += 1
