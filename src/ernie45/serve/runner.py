"""The serving engine's model calls as a few replayable ops, so tensor-parallel ranks stay in lockstep.

A tensor-parallel model's forward contains collectives: every rank must run the same computation, with the same
inputs, in the same order. The engine (rank 0) therefore makes every model call through a `ModelRunner`:
prefill, prompt logits, decode, a KV row move, an idle heartbeat. Under tensor parallelism the runner first
sends the op — a fixed-size int64 message `[op, a, b, c, payload length, payload...]` whose room fits a decode
step's tokens and lengths; a longer payload (prompts) follows in a second broadcast — and then runs it; the
other ranks sit in `ModelRunner.follow`, receive each op and replay it on their own mirror of the slot cache
(same rows and positions, this rank's kv heads). Sampling happens on rank 0 only: the logits are identical on
every rank. Ops travel as tensors rather than `broadcast_object_list`, which pickles.

The message is an all-reduce (the followers add zeros) rather than a broadcast, so rank 0 also waits for every
follower: a dead or stuck rank then fails rank 0's next op within the process group's timeout, even when idle.
The heartbeat matters too: a follower waits for the next op inside a collective, which would time out on an
idle server, so an idle rank 0 pings every second.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

STOP, PREFILL, PROMPT_LOGITS, DECODE, MOVE_ROW, PING = range(6)


class SlotKVCache:
    """`max_rows` rows of `max_len` cached keys/values per layer, each row with its own length.

    It exposes the `update(layer, k, v)`, `length` and `max_len` that `ErnieForCausalLM.forward` uses, so the
    model runs unchanged (see `ernie45.serve.engine` for how rows are used). Its kv-head count is the model's
    own (fewer per rank under tensor parallelism).
    """

    def __init__(self, model, max_rows: int, max_len: int):
        cfg = model.config
        n_kv = model.model.layers[0].self_attn.k_proj.out_features // cfg.head_dim
        shape = (max_rows, n_kv, max_len, cfg.head_dim)
        self.k = [
            torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0  # read (and advanced) by the model: the shared "past" of the current call
        self._rows = slice(0, 0)
        self._pos: Tensor | None = None  # (n,) write position per row in decode mode
        self._arange: Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def prepare_prefill(self, first_row: int, n: int) -> None:
        """The next forward writes a fresh (right-padded) batch of n prompts into rows first_row.."""
        self._rows, self._pos, self.length = slice(first_row, first_row + n), None, 0

    def prepare_decode(self, positions: Tensor, total: int) -> None:
        """The next forward writes one token per row 0..n-1 at `positions` (n,); keys span `total` columns."""
        self._pos, self.length = positions, total - 1
        self._arange = torch.arange(positions.shape[0], device=positions.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self._pos is None:  # prefill: k (n, nKV, S, d) at positions 0..S-1
            S = k.shape[2]
            self.k[layer][self._rows, :, :S] = k
            self.v[layer][self._rows, :, :S] = v
            return k, v
        n, total = k.shape[0], self.length + 1
        self.k[layer][self._arange, :, self._pos] = k[:, :, 0]  # (n, nKV, d) scattered per row
        self.v[layer][self._arange, :, self._pos] = v[:, :, 0]
        return self.k[layer][:n, :, :total], self.v[layer][:n, :, :total]

    def move_row(self, src: int, dst: int, length: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


class ModelRunner:
    """Runs the engine's model calls; under tensor parallelism rank 0 broadcasts each one to the other ranks.

    Args:
        model: an `ErnieForCausalLM` (a tensor-parallel shard when the process group has several ranks).
        max_rows, max_len: the slot cache's shape (the engine's `max_num_seqs`, `max_model_len`).
    """

    def __init__(self, model, max_rows: int, max_len: int):
        self.model = model
        self.device = model.device
        self.cache = SlotKVCache(model, max_rows, max_len)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._room = 2 * max_rows  # a decode step's tokens and lengths fit inside the fixed-size message
        self._hidden: Tensor | None = None  # (n, S, H) final hidden states of the last prefill

    # ---- rank 0 (the engine thread) ----------------------------------------------------------------
    def prefill(self, first_row: int, prompts: list[list[int]]) -> Tensor:
        """Write the prompts' keys/values into rows first_row..; returns each prompt's next-token logits (n, V)."""
        lens = [len(p) for p in prompts]
        return self._call(PREFILL, first_row, len(prompts), 0, lens + [t for p in prompts for t in p])

    def prompt_logits(self, i: int, start: int, end: int) -> Tensor:
        """Logits (end - start, V) at positions start..end-1 of prompt i of the last prefill."""
        return self._call(PROMPT_LOGITS, i, start, end, [])

    def decode(self, tokens: list[int], lengths: list[int]) -> Tensor:
        """One token per running row 0..n-1, row i holding `lengths[i]` positions; returns logits (n, V)."""
        return self._call(DECODE, len(tokens), 0, 0, tokens + lengths)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self._call(MOVE_ROW, src, dst, length, [])

    def heartbeat(self) -> None:
        """Keep idle followers inside their collective timeout (and notice a dead rank while idle)."""
        if self.distributed:
            self._call(PING, 0, 0, 0, [])

    def close(self) -> None:
        """Release the followers (they return from `follow`)."""
        if self.distributed:
            self._send(STOP, 0, 0, 0, [])

    def _call(self, op: int, a: int, b: int, c: int, payload: list[int]):
        if self.distributed:
            self._send(op, a, b, c, payload)
        return self._run(op, a, b, c, torch.tensor(payload, dtype=torch.long))

    def _send(self, op: int, a: int, b: int, c: int, payload: list[int]) -> None:
        n = len(payload)
        inline = payload + [0] * (self._room - n) if n <= self._room else [0] * self._room
        dist.all_reduce(torch.tensor([op, a, b, c, n, *inline], dtype=torch.long, device=self.device))
        if n > self._room:
            dist.broadcast(torch.tensor(payload, dtype=torch.long, device=self.device), src=0)

    # ---- ranks > 0 ---------------------------------------------------------------------------------
    def follow(self) -> None:
        """Replay rank 0's ops until it sends STOP. A lost rank raises (a collective error or timeout)."""
        message = torch.empty(5 + self._room, dtype=torch.long, device=self.device)
        while True:
            message.zero_()
            dist.all_reduce(message)
            op, a, b, c, n = message[:5].tolist()
            if op == STOP:
                return
            if n <= self._room:
                payload = message[5 : 5 + n].clone()
            else:
                payload = torch.empty(n, dtype=torch.long, device=self.device)
                dist.broadcast(payload, src=0)
            self._run(op, a, b, c, payload)

    # ---- every rank ----------------------------------------------------------------------------------
    def _run(self, op: int, a: int, b: int, c: int, payload: Tensor) -> Tensor | None:
        if op == PREFILL:
            return self._prefill(a, b, payload)
        if op == PROMPT_LOGITS:
            return self.model.lm_head(self._hidden[a, b:c]).float()
        if op == DECODE:
            return self._decode(payload[:a], payload[a:])
        if op == MOVE_ROW:
            self.cache.move_row(a, b, c)
        return None

    def _prefill(self, first_row: int, n: int, payload: Tensor) -> Tensor:
        """Right-padded batch of n prompts; payload = n lengths, then the prompts' tokens back to back."""
        model, dev = self.model, self.device
        lens = payload[:n].tolist()
        S = max(lens)
        ids = torch.full((n, S), model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, S), dtype=torch.long)
        flat = payload[n:].cpu()
        start = 0
        for i, length in enumerate(lens):
            ids[i, :length] = flat[start : start + length]
            mask[i, :length] = 1
            start += length
        attn = None if min(lens) == S else mask.to(dev)  # right padding needs a key mask
        self.cache.prepare_prefill(first_row, n)
        out = model(ids.to(dev), attention_mask=attn, cache=self.cache, logits_to_keep=1)
        self._hidden = out.hidden_states  # (n, S, H)
        last = self._hidden[torch.arange(n, device=dev), torch.tensor(lens, device=dev) - 1]  # (n, H)
        return model.lm_head(last).float()  # (n, V)

    def _decode(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        dev = self.device
        self._hidden = None
        pos = lengths.to(dev)
        total = int(pos.max()) + 1
        attn = None
        if int(pos.min()) != total - 1:  # rows of unequal length: hide each row's unused tail
            attn = (torch.arange(total, device=dev)[None, :] <= pos[:, None]).long()  # (n, T)
        self.cache.prepare_decode(pos, total)
        out = self.model(
            tokens.to(dev)[:, None], attention_mask=attn, position_ids=pos[:, None], cache=self.cache
        )
        return out.logits[:, -1].float()  # (n, V)
