"""Exact (xxhash) and near-duplicate (MinHash LSH, datasketch) document deduplication.

Both keep their state as plain arrays (digests, MinHash signatures) so that a preprocessing run can save it
after every input chunk and rebuild it on resume without pickling.
"""

from __future__ import annotations

import numpy as np
import xxhash


def text_digest(text: str) -> bytes:
    """128-bit xxh3 digest of a (normalised) document: the key of exact deduplication."""
    return xxhash.xxh3_128_digest(text.encode("utf-8"))


class ExactDedup:
    """Remembers the digests of documents already seen; `seen(text)` is True for a repeat."""

    DIGEST_BYTES = 16

    def __init__(self, digests: bytes = b""):
        n = self.DIGEST_BYTES
        self._order: list[bytes] = [digests[i : i + n] for i in range(0, len(digests), n)]
        self._set = set(self._order)

    def seen(self, text: str) -> bool:
        """True if `text` is a repeat; otherwise remember it and return False."""
        d = text_digest(text)
        if d in self._set:
            return True
        self._set.add(d)
        self._order.append(d)
        return False

    def __len__(self) -> int:
        return len(self._order)

    def state(self, start: int = 0) -> bytes:
        """The digests remembered from the `start`-th on, in insertion order (what a checkpoint appends)."""
        return b"".join(self._order[start:])


def shingles(text: str, n: int) -> set[bytes]:
    """Character n-grams of `text` with whitespace removed.

    Characters rather than words because Chinese has no spaces; dropping whitespace makes re-wrapped copies of
    the same text identical.
    """
    s = "".join(text.split())
    if len(s) <= n:
        return {s.encode("utf-8")}
    return {s[i : i + n].encode("utf-8") for i in range(len(s) - n + 1)}


def _hash32(b: bytes) -> int:
    return xxhash.xxh32_intdigest(b)


class NearDedup:
    """MinHash LSH over character shingles: `is_near_duplicate(text)` against every document kept so far.

    An LSH candidate counts as a duplicate only if its estimated Jaccard similarity reaches `threshold`, so
    banding false positives do not remove documents. Signatures are deterministic (fixed seed and hash).
    """

    SEED = 1

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        signatures: np.ndarray | None = None,
    ):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # Permutations are drawn once and shared by every MinHash (drawing them per document dominates runtime).
        self._perms = MinHash(num_perm=num_perm, seed=self.SEED, scheme="affine32").permutations
        self._sigs: list[np.ndarray] = []
        if signatures is not None:
            for sig in np.asarray(signatures, dtype=np.uint32).reshape(-1, num_perm):
                self._insert(sig)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature, `[num_perm]` uint32 (the affine32 scheme's values fit in 32 bits)."""
        from datasketch import MinHash

        m = MinHash(
            num_perm=self.num_perm,
            seed=self.SEED,
            hashfunc=_hash32,
            permutations=self._perms,
            scheme="affine32",
        )
        m.update_batch(list(shingles(text, self.ngram)))
        return m.hashvalues.astype(np.uint32)

    def _lean(self, sig: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self.SEED, hashvalues=sig.astype(np.uint64), scheme="affine32")

    def _insert(self, sig: np.ndarray) -> None:
        self._lsh.insert(len(self._sigs), self._lean(sig), check_duplication=False)
        self._sigs.append(sig)

    def similarity(self, a: str, b: str) -> float:
        """Estimated Jaccard similarity of two texts' shingle sets."""
        return float(np.mean(self.signature(a) == self.signature(b)))

    def is_near_duplicate(self, text: str) -> bool:
        """True if `text` is a near-duplicate of a kept document; otherwise keep it and return False."""
        sig = self.signature(text)
        for key in self._lsh.query(self._lean(sig)):
            if np.mean(self._sigs[key] == sig) >= self.threshold:
                return True
        self._insert(sig)
        return False

    def __len__(self) -> int:
        return len(self._sigs)

    def state(self, start: int = 0) -> bytes:
        """Signatures of the documents kept from the `start`-th on, `[n, num_perm]` uint32 little-endian."""
        if start >= len(self._sigs):
            return b""
        return np.stack(self._sigs[start:]).astype("<u4").tobytes()
