"""The paged KV cache: per layer one pool of pages that sequences fill block by block.

Layout (the one every attention kernel reads, `KV` in csrc/decode.c): keys and values of layer l are each a
tensor `(num_blocks, n_kv, block_size, head_dim)` in the model dtype; a sequence's block table lists its pages,
and position t of kv head h lives at `pages[table[t // block_size], h, t % block_size]`. The rows of one page
are contiguous per head, so a kernel walks a sequence page by page.

The pool is allocated with `torch.empty`: the operating system backs a page of memory only once it is written,
so a pool sized for many long sequences costs only what the sequences fill. A block is zeroed the first time it
appears in a block table (`touch`, before anything writes it): PyTorch's gathered view spans masked positions
too, and uninitialised memory may hold NaN bit patterns, which a zero attention weight does not cancel.

With `kv_dtype="int8"` pages hold int8 values and each (position, kv head) row one fp32 scale in a parallel
`(num_blocks, n_kv, block_size)` tensor: `s = max|x| / 127`, `q = round(x / s)`; attention reads `q * s`
rounded to the model dtype. Half the memory of bf16 pages (a quarter of fp32), per-row scales keep the error
at about 0.4 % of each row's largest value.

`PagedBatch` adapts the pool to `ErnieForCausalLM.forward`'s cache interface (`update`, `length`, `max_len`)
for one PyTorch forward over n rows, row i feeding `S_i` new tokens at positions `past_i..`: `update` writes
the new keys/values into the rows' pages and returns each row's whole history gathered into a contiguous
(n, n_kv, T, d) view for attention (with the mask from `mask()`). The C decode step reads the pages directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

KV_DTYPES = ("auto", "int8")  # auto: the model dtype


def kv_row_bytes(head_dim: int, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
    """Bytes of one cached key (or value) row of one kv head: int8 values + an fp32 scale, or the model dtype."""
    return head_dim + 4 if kv_dtype == "int8" else head_dim * dtype.itemsize


def kv_bytes_per_token(model, kv_dtype: str = "auto") -> int:
    """Bytes of keys and values one position takes in every layer (this process's kv heads)."""
    cfg = model.config
    n_kv = model.model.layers[0].self_attn.k_proj.out_features // cfg.head_dim
    return 2 * cfg.num_hidden_layers * n_kv * kv_row_bytes(cfg.head_dim, model.dtype, kv_dtype)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., d) -> int8 values (..., d) and fp32 scales (...): symmetric, one scale per row."""
    s = x.abs().amax(-1, keepdim=True).float() / 127
    nz = s > 0
    q = torch.where(nz, torch.round(x.float() / torch.where(nz, s, 1)), 0).clamp(-127, 127).to(torch.int8)
    return q, s[..., 0]


def dequantize_rows(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * s[..., None]).to(dtype)


class PagedKVCache:
    """`num_blocks` pages of `block_size` positions for every layer of `model` (this process's kv heads), in the
    model dtype or (`kv_dtype="int8"`) int8 with per-row scales (`k_scale`, `v_scale`)."""

    def __init__(self, model, num_blocks: int, block_size: int, kv_dtype: str = "auto"):
        cfg = model.config
        self.n_kv = model.model.layers[0].self_attn.k_proj.out_features // cfg.head_dim
        self.num_blocks, self.block_size, self.kv_dtype = num_blocks, block_size, kv_dtype
        self.dtype = model.dtype  # what attention computes in
        shape = (num_blocks, self.n_kv, block_size, cfg.head_dim)
        dev, n = model.device, cfg.num_hidden_layers
        page = torch.int8 if kv_dtype == "int8" else model.dtype
        self.k = [torch.empty(shape, dtype=page, device=dev) for _ in range(n)]
        self.v = [torch.empty(shape, dtype=page, device=dev) for _ in range(n)]
        self.k_scale: list[Tensor] | None = None
        self.v_scale: list[Tensor] | None = None
        if kv_dtype == "int8":
            self.k_scale = [torch.empty(shape[:3], dtype=torch.float32, device=dev) for _ in range(n)]
            self.v_scale = [torch.empty(shape[:3], dtype=torch.float32, device=dev) for _ in range(n)]
        self._clean = bytearray(num_blocks)  # 1: zeroed or written since

    def _tensors(self) -> list[Tensor]:
        return self.k + self.v + (self.k_scale or []) + (self.v_scale or [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def touch(self, tables: Tensor) -> None:
        """Zero the blocks of `tables` never seen before (call before every forward that uses them)."""
        clean = self._clean
        fresh = [b for b in set(tables.flatten().tolist()) if not clean[b]]  # a bytearray: no tensor op per step
        if fresh:
            idx = torch.tensor(fresh, device=self.k[0].device)
            for t in self._tensors():
                t[idx] = 0
            for b in fresh:
                clean[b] = 1

    def batch(self, tables: Tensor, past: list[int], new: list[int]) -> PagedBatch:
        return PagedBatch(self, tables, past, new)


class PagedBatch:
    """One forward's view of the pool: row i writes `new[i]` tokens at positions `past[i]..` through
    `tables[i]` (n, W) block ids (long), W covering every row's last position."""

    def __init__(self, cache: PagedKVCache, tables: Tensor, past: list[int], new: list[int]):
        self.cache, self.tables, self.past, self.new = cache, tables, past, new
        bs, dev = cache.block_size, tables.device
        self.total = max(p + s for p, s in zip(past, new))  # key columns attention sees
        self.length, self.max_len = 0, 2**62  # the model's own bookkeeping; positions come from position_ids
        rows = torch.cat([torch.full((s,), i, dtype=torch.long) for i, s in enumerate(new)])
        cols = torch.cat([torch.arange(s) for s in new])  # index among the row's new tokens
        pos = torch.cat([torch.arange(p, p + s) for p, s in zip(past, new)])
        rows, cols, pos = rows.to(dev), cols.to(dev), pos.to(dev)
        self._src = (rows, cols)
        self._dst = (tables[rows, pos // bs], pos % bs)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (n, n_kv, S, d) for the new positions -> the rows' keys/values (n, n_kv, T, d)."""
        c = self.cache
        if c.kv_dtype == "int8":
            return (
                self._store_q8(k, c.k[layer], c.k_scale[layer]),
                self._store_q8(v, c.v[layer], c.v_scale[layer]),
            )
        return self._store(k, c.k[layer]), self._store(v, c.v[layer])

    def _store(self, x: Tensor, pages: Tensor) -> Tensor:
        (rows, cols), (blk, off) = self._src, self._dst
        pages[blk, :, off] = x[rows, :, cols]  # (N, n_kv, d): one entry per real (unpadded) new token
        return self._gather(pages)

    def _store_q8(self, x: Tensor, pages: Tensor, scales: Tensor) -> Tensor:
        (rows, cols), (blk, off) = self._src, self._dst
        q, s = quantize_rows(x[rows, :, cols])  # (N, n_kv, d), (N, n_kv)
        pages[blk, :, off] = q
        scales[blk, :, off] = s
        g = dequantize_rows(pages[self.tables], scales[self.tables], self.cache.dtype)  # (n, W, n_kv, bs, d)
        return self._view(g)

    def _gather(self, pages: Tensor) -> Tensor:
        return self._view(pages[self.tables])  # (n, W, n_kv, bs, d)

    def _view(self, g: Tensor) -> Tensor:
        """(n, W, n_kv, bs, d) pages of each row -> (n, n_kv, T, d) positions."""
        n, W, n_kv, bs, d = g.shape
        return g.transpose(1, 2).reshape(n, n_kv, W * bs, d)[:, :, : self.total]

    def mask(self, dtype: torch.dtype) -> Tensor | None:
        """Row i's query j sees keys 0..past_i + j. None when plain causal attention is exact (one row, nothing
        cached before it); a boolean (n, 1, S, T) mask for prompt chunks (a byte per entry: the engine bounds
        S x T at long contexts); an additive (n, 1, 1, T) one for decode steps."""
        n, S, T = len(self.new), max(self.new), self.total
        if n == 1 and self.past[0] == 0:
            return None
        dev = self.tables.device
        past = torch.tensor(self.past, device=dev)
        last = past[:, None] + torch.arange(S, device=dev)[None, :]  # (n, S) last key each query may see
        allowed = (torch.arange(T, device=dev)[None, None, :] <= last[:, :, None])[:, None]  # (n, 1, S, T)
        if S > 1:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def position_ids(self) -> Tensor:
        """(n, S) positions of the new tokens (padding positions repeat a row's last one)."""
        S = max(self.new)
        dev = self.tables.device
        ar = torch.arange(S, device=dev)[None, :]
        new = torch.tensor(self.new, device=dev)[:, None]
        return torch.tensor(self.past, device=dev)[:, None] + torch.minimum(ar, new - 1)


def available_memory() -> int:
    """Bytes the system can still give without swapping (MemAvailable); 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def kv_cache_blocks(model, args) -> int:
    """Blocks in the pool for `args` (an `EngineArgs`): `kv_cache_memory` bytes, or by default room for
    `max_num_seqs` full-length sequences capped at half the available memory; never less than one sequence
    of `max_model_len`. Under tensor parallelism every rank agrees on the smallest count."""
    from ernie45.errors import ErnieError

    bs = args.block_size
    per_block = kv_bytes_per_token(model, args.kv_cache_dtype) * bs
    one_seq = -(-args.max_model_len // bs)
    if args.kv_cache_memory is not None:
        n = args.kv_cache_memory // per_block
    else:
        n = args.max_num_seqs * one_seq
        avail = available_memory() if model.device.type == "cpu" else 0
        if avail:
            n = min(n, avail // 2 // per_block)
        n = max(n, one_seq)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=model.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t)
    if n < one_seq:
        need = one_seq * per_block
        raise ErnieError(
            f"the KV cache ({n * per_block / 2**20:.0f} MiB) cannot hold one sequence of --max-model-len "
            f"{args.max_model_len} ({need / 2**20:.0f} MiB): raise --kv-cache-memory or lower --max-model-len"
        )
    return int(n)
