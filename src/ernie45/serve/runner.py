"""The serving engine's model calls as a few replayable ops, so tensor-parallel ranks stay in lockstep.

A tensor-parallel model's forward contains collectives: every rank must run the same computation, with the same
inputs, in the same order. The engine (rank 0) therefore makes every model call through a `ModelRunner`:
prefill (chunks of prompts), prompt logits, decode, an idle heartbeat. Under tensor parallelism the runner
first sends the op — a fixed-size int64 message `[op, a, b, c, payload length, payload...]`; a longer payload
(prompts, block tables) follows in a second broadcast — and then runs it; the other ranks sit in
`ModelRunner.follow`, receive each op and replay it on their own mirror of the paged KV cache (same blocks and
positions, this rank's kv heads): every block decision travels in the ops' block tables, so only rank 0 keeps
the block bookkeeping. Sampling happens on rank 0 only: the logits are identical on every rank. Ops travel as
tensors rather than `broadcast_object_list`, which pickles.

Decode runs the C step (`FastDecoder.step_batch`, every row in one pass over the weights, reading the pages in
place) where the model has one, else the PyTorch forward over a gathered view of the pages.

The message is an all-reduce (the followers add zeros) rather than a broadcast, so rank 0 also waits for every
follower: a dead or stuck rank then fails rank 0's next op within the process group's timeout, even when idle.
The heartbeat matters too: a follower waits for the next op inside a collective, which would time out on an
idle server, so an idle rank 0 pings every second.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ernie45.generation.speculative import forward_keeping
from ernie45.serve.kv import PagedKVCache

STOP, PREFILL, PROMPT_LOGITS, DECODE, PING, MTP_RESIZE, MTP_RUN, MTP_FREE = range(8)


class ModelRunner:
    """Runs the engine's model calls; under tensor parallelism rank 0 broadcasts each one to the other ranks.

    Args:
        model: an `ErnieForCausalLM` (a tensor-parallel shard when the process group has several ranks).
        num_blocks, block_size, kv_dtype: the paged KV cache's shape and dtype (every rank passes the same).
        room: int64s of payload sent inline with an op (the rest follows in a second broadcast).
    """

    def __init__(self, model, num_blocks: int, block_size: int, room: int = 64, kv_dtype: str = "auto"):
        self.model = model
        self.device = model.device
        self.cache = PagedKVCache(model, num_blocks, block_size, kv_dtype)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._room = room
        self._hidden: Tensor | None = None  # (n, S, H) final hidden states of the last prefill
        # `--speculative mtp` (ernie45.serve.drafter): every call also keeps the hidden states the MTP layer reads,
        # after the final norm or, with `pre_norm`, before it -- `kept`: (n, S, H) after a prefill, (rows, H) after
        # a decode (rank 0 only: it sends them with each MTP op)
        self.keep_hidden, self.pre_norm = False, False
        self.kept: Tensor | None = None
        # under tensor parallelism every rank runs the MTP layer (`mtp_head`) on its own copy of each sequence's
        # MTP cache, by key; `_floats`: the hidden states rank 0 sends with the next MTP_RUN
        self.mtp_head = None
        self._mtp_caches: dict[int, object] = {}
        self._floats: Tensor | None = None
        fast = getattr(model, "fast_decoder", None)
        self._native = fast if hasattr(fast, "step_batch") else None

    @property
    def native(self) -> bool:
        """Whether decode steps run in C."""
        return self._native is not None

    # ---- rank 0 (the engine thread) ----------------------------------------------------------------
    def prefill(self, tokens: list[list[int]], past: list[int], tables: list[list[int]]) -> Tensor:
        """Row i feeds `tokens[i]` at positions `past[i]..` through block table `tables[i]`; returns each row's
        next-token logits after its last new token (n, V)."""
        n, W = len(tokens), max(len(t) for t in tables)
        flat = [b for t in tables for b in t + [0] * (W - len(t))]
        return self._call(
            PREFILL, n, W, 0, past + [len(t) for t in tokens] + flat + [x for t in tokens for x in t]
        )

    def prompt_logits(self, i: int, start: int, end: int) -> Tensor:
        """Logits (end - start, V) at new-token indices start..end-1 of row i of the last prefill."""
        return self._call(PROMPT_LOGITS, i, start, end, [])

    def decode(self, tokens: list[int], positions: list[int], tables: list[list[int]],
               want: list[bool] | None = None) -> Tensor:
        """One token per row at `positions[i]` (= positions already cached) through `tables[i]`; logits (n, V).
        `want`: the rows whose logits are needed; then only theirs are returned, in row order (the C step skips
        the lm_head for the others)."""
        n, W = len(tokens), max(len(t) for t in tables)
        flat = [b for t in tables for b in t + [0] * (W - len(t))]
        flags = [] if want is None else [int(bool(w)) for w in want]
        return self._call(DECODE, n, W, int(want is not None), tokens + positions + flat + flags)

    def mtp_resize(self, key: int, max_len: int, keep: int) -> None:
        """Every rank: sequence `key`'s MTP cache becomes one of `max_len` entries holding its first `keep`."""
        self._call(MTP_RESIZE, key, max_len, keep, [])

    def mtp_run(self, key: int, offset: int, length: int, tokens: list[int], hidden: Tensor,
                last_only: bool) -> tuple[Tensor, Tensor]:
        """Every rank: the MTP layer over `tokens` and `hidden` (n, H) at cache entries `length`.. of sequence
        `key` (`MTPHead.__call__`'s arguments); -> its (logits, outputs) on rank 0."""
        self._floats = hidden.float().contiguous()
        return self._call(MTP_RUN, key, offset, int(last_only), [length, *tokens])

    def mtp_free(self, key: int) -> None:
        """Every rank drops sequence `key`'s MTP cache."""
        self._call(MTP_FREE, key, 0, 0, [])

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
            return self._prefill(a, b, payload.cpu())
        if op == PROMPT_LOGITS:
            return self.model.lm_head(self._hidden[a, b:c]).float()
        if op == DECODE:
            return self._decode(a, b, c, payload.cpu())
        if op == MTP_RESIZE:
            old = self._mtp_caches.get(a)
            if old is not None:
                old.length = c
            self._mtp_caches[a] = self.mtp_head.resize(old if c else None, b)
        elif op == MTP_RUN:
            return self._mtp_run(a, b, bool(c), payload.cpu())
        elif op == MTP_FREE:
            self._mtp_caches.pop(a, None)
        return None

    def _mtp_run(self, key: int, offset: int, last_only: bool, payload: Tensor) -> tuple[Tensor, Tensor]:
        """payload = the cache length, then the tokens; the hidden states come from rank 0 (`_floats`)."""
        tokens = payload[1:]
        n, H = tokens.numel(), self.model.config.hidden_size
        h = self._floats if self._floats is not None else torch.empty(n, H)
        self._floats = None
        h = h.to(self.device)
        if self.distributed:
            dist.broadcast(h, src=0)
        cache = self._mtp_caches[key]
        cache.length = int(payload[0])
        return self.mtp_head(tokens.view(1, n).to(self.device), h.to(self.model.dtype)[None], cache, offset=offset,
                             last_only=last_only)

    def _prefill(self, n: int, W: int, payload: Tensor) -> Tensor:
        """payload = past (n), new-token counts (n), tables (n * W), the new tokens back to back."""
        model, dev = self.model, self.device
        past, new = payload[:n].tolist(), payload[n : 2 * n].tolist()
        tables = payload[2 * n : 2 * n + n * W].view(n, W)
        flat = payload[2 * n + n * W :]
        S = max(new)
        ids = torch.full((n, S), model.config.pad_token_id, dtype=torch.long)
        start = 0
        for i, s in enumerate(new):
            ids[i, :s] = flat[start : start + s]
            start += s
        self.cache.touch(tables)
        batch = self.cache.batch(tables.to(dev), past, new)
        mask = batch.mask(model.dtype)
        out, self.kept = forward_keeping(model, ids.to(dev), batch, self.keep_hidden, self.pre_norm,
                                         attention_mask=mask, position_ids=batch.position_ids(), logits_to_keep=1)
        self._hidden = out.hidden_states  # (n, S, H)
        last = self._hidden[torch.arange(n, device=dev), torch.tensor(new, device=dev) - 1]  # (n, H)
        return model.lm_head(last).float()  # (n, V)

    def _decode(self, n: int, W: int, flagged: int, payload: Tensor) -> Tensor:
        """payload = tokens (n), positions (n), tables (n * W), and with `flagged` the rows' want flags (n)."""
        self._hidden = None
        tokens, pos = payload[:n].tolist(), payload[n : 2 * n].tolist()
        tables = payload[2 * n : 2 * n + n * W].view(n, W)
        want = payload[2 * n + n * W : 3 * n + n * W].tolist() if flagged else None
        self.cache.touch(tables)
        if self._native is not None:
            c = self.cache
            q8 = {} if c.k_scale is None else {"k_scales": c.k_scale, "v_scales": c.v_scale}
            kw = {}
            if self.keep_hidden:  # the rows' last hidden states, for the MTP drafter
                kw = {"hidden_out": torch.empty(n, self._native.hidden, dtype=torch.float32), "pre_norm": self.pre_norm}
            logits = self._native.step_batch(tokens, pos, tables.to(torch.int32), c.k, c.v, **q8, logit_rows=want,
                                             **kw)
            # the C step's hidden states hold model-dtype values (bf16 rounded in a bf16 model): converting is exact
            self.kept = kw["hidden_out"].to(self.model.dtype) if kw else None
            return logits
        dev = self.device
        batch = self.cache.batch(tables.to(dev), pos, [1] * n)
        mask = batch.mask(self.model.dtype)
        ids = torch.tensor(tokens, device=dev)[:, None]
        out, kept = forward_keeping(self.model, ids, batch, self.keep_hidden, self.pre_norm, attention_mask=mask,
                                    position_ids=batch.position_ids())
        self.kept = None if kept is None else kept[:, -1]  # (n, H)
        logits = out.logits[:, -1].float()  # (n, V)
        return logits if want is None else logits[torch.tensor(want, dtype=torch.bool, device=logits.device)]
