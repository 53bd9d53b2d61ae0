"""ERNIE 4.5 forward pass (dense and MoE), and nothing else.

Module names reproduce the Hugging Face `-PT` checkpoint keys, so loading needs no key map. Numerics follow
transformers 5.x `modeling_ernie4_5{,_moe}.py` (see ../shared/docs/ARCHITECTURE.md §2, §5, §8):
fp32 RMSNorm statistics, interleaved RoPE in fp32, GQA with an independent head_dim, an fp32 softmax router
whose correction bias only affects selection, and dropless experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ernie45.config import ErnieConfig


# ---- RoPE -----------------------------------------------------------------------------------------
def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (B, S, head_dim/2), fp32: one angle per interleaved (even, odd) pair.

    Computed once per forward and shared by all layers (not cached across calls: a cache would capture
    fake tensors when the model is traced by torch.export / torch.compile).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                                / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, S, d/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle i (GPT-J style, not Llama's rotate_half).

    x: (B, n_heads, S, d); cos/sin: (B, S, d/2). Computed in fp32, cast back (as transformers does).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, h, S, d/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None], sin[:, None]  # (B, 1, S, d/2)
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)  # (B, h, S, d/2, 2)
    return out.flatten(-2).to(x.dtype)


# ---- leaf modules ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # cast before the weight multiply (Llama style)


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv, max_len, d) each, written in place.

    `length` is the number of positions filled; left-padded batches share one length and mask the padding.
    """

    def __init__(self, config: ErnieConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, n_kv: int | None = None):
        # n_kv: kv heads held by this process (fewer than the config's under tensor parallelism)
        shape = (batch_size, n_kv or config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                lst[i] = t.index_select(0, index)


class Attention(nn.Module):
    def __init__(self, config: ErnieConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.use_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nKV, T, d)
        if q.shape[2] == 1 and cache is not None:
            o = decode_attention(q, k, v, mask, self.head_dim**-0.5)
        else:
            o = self.attend(q, k, v, mask)
        return self.output(o)

    def forward_step(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, k_past: Tensor,
                     v_past: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` for torch.export: keys are [k_past, new keys], one SDPA call for any length S (a branch on S
        would pin the traced length). -> (output, new k, new v).

        k_past, v_past: (B, nKV, M, d) cache slots; mask: bool (S, M + S), True where attention is allowed.
        """
        q, k, v = self.project(x, cos, sin)
        o = self.attend(q, torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2), mask)
        return self.output(o), k, v

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, S, H) -> q (B, nH, S, d), k and v (B, nKV, S, d), RoPE applied to q and k."""
        B, S, _ = x.shape
        # Head counts come from the projection widths so that tensor-parallel shards work unchanged.
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None and _blocked_attention_fits(q, k):
            return blocked_causal_attention(q, k, v, self.head_dim**-0.5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=self.head_dim**-0.5, enable_gqa=q.shape[1] != k.shape[1])

    def output(self, o: Tensor) -> Tensor:
        return self.o_proj(o.transpose(1, 2).flatten(2))  # (B, nH, S, d) -> (B, S, nH*d) -> (B, S, H)


# A fresh causal prompt of BLOCKED_ROWS positions on the CPU is attended in blocks of ATTENTION_BLOCK queries: each
# block's scores against the keys it may see as one fp32 batched matmul per kv head (the group's query heads
# stacked as rows), softmax, times the values. At these lengths that beats SDPA's flash kernel, whose per-tile
# overhead dominates; from ~2K positions the score blocks leave the cache and the two are even, at 4K SDPA wins.
# 2 threads, 16 heads over 2 kv heads of 128 (0.3B), 512 positions: 9.8 / 9.4 ms against 12.4 / 13.3 ms (fp32 /
# bf16, AVX2 level), 8.5 / 8.2 against 13.6 / 12.6 ms (AVX-512); 128 positions 0.76 against 0.92 ms.
BLOCKED_ROWS = (128, 1536)
ATTENTION_BLOCK = 64


def _blocked_attention_fits(q: Tensor, k: Tensor) -> bool:
    S = q.shape[2]
    return (q.device.type == "cpu" and BLOCKED_ROWS[0] <= S <= BLOCKED_ROWS[1] and k.shape[2] == S
            and not (torch.is_grad_enabled() and q.requires_grad) and not torch.compiler.is_compiling())


def blocked_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of S queries over the same S positions (nothing cached before them), computed in fp32.

    q: (B, nH, S, d); k, v: (B, nKV, S, d) -> (B, nH, S, d) in q's dtype, a transposed view of a (B, S, nH, d)
    tensor (so `output`'s reshape copies nothing)."""
    B, nH, S, d = q.shape
    nKV = k.shape[1]
    g = nH // nKV
    qf = (q.float() * scale).view(B, nKV, g, S, d)  # query head j uses kv head j // g
    kf = k.float().reshape(B * nKV, S, d)
    vf = v.float().reshape(B * nKV, S, d)
    out = torch.empty(B, S, nKV, g, d, device=q.device)
    above = torch.ones(ATTENTION_BLOCK, ATTENTION_BLOCK, dtype=torch.bool, device=q.device).triu(1)
    for s0 in range(0, S, ATTENTION_BLOCK):
        s1 = min(S, s0 + ATTENTION_BLOCK)
        b = s1 - s0
        qb = qf[:, :, :, s0:s1].reshape(B * nKV, g * b, d)  # (B·nKV, g·b, d)
        scores = torch.bmm(qb, kf[:, :s1].transpose(1, 2))  # (B·nKV, g·b, s1): the keys up to the block's end
        scores.view(B * nKV, g, b, s1)[..., s0:].masked_fill_(above[:b, :b], float("-inf"))
        o = torch.bmm(torch.softmax(scores, -1), vf[:, :s1])  # (B·nKV, g·b, d)
        out[:, s0:s1] = o.view(B, nKV, g, b, d).permute(0, 3, 1, 2, 4)  # -> (B, b, nKV, g, d)
    return out.view(B, S, nH, d).to(q.dtype).transpose(1, 2)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Attention for one new query per sequence, with q heads grouped by kv head (no repeat_kv copy).

    At decode time this is several times cheaper on CPU than SDPA's flash kernel (tiny matmuls).
    q: (B, nH, 1, d); k, v: (B, nKV, T, d); mask: additive (B, 1, 1, T) or None.
    """
    B, nH, _, d = q.shape
    nKV = k.shape[1]
    qg = q.reshape(B, nKV, nH // nKV, d)  # (B, nKV, g, d): q head j uses kv head j // g
    scores = (qg @ k.transpose(-1, -2)) * scale  # (B, nKV, g, T)
    if mask is not None:
        scores = scores + mask  # (B, 1, 1, T) broadcasts over kv heads and groups
    p = scores.float().softmax(-1).to(q.dtype)
    return (p @ v).reshape(B, nH, 1, d)  # (B, nKV, g, d) -> (B, nH, 1, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Linear):
    """The MoE gate: an fp32 Linear (H -> E) that stays fp32 whatever dtype the model is cast to."""

    def __init__(self, hidden: int, n_experts: int):
        super().__init__(hidden, n_experts, bias=False, dtype=torch.float32)

    def _apply(self, fn, recurse=True):  # keep fp32 through .to(bfloat16) / .half()
        super()._apply(fn, recurse)
        if self.weight.is_floating_point() and self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):  # the router always runs in fp32
            return F.linear(x.float(), self.weight.float())


class MoEStatics(nn.Module):
    """Holds `e_score_correction_bias` (1, E), fp32, used only to pick experts (aux-loss-free balancing)."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, n_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self


class MoE(nn.Module):
    """Top-k routed experts plus optional shared experts; dropless, computes only the experts hit."""

    def __init__(self, config: ErnieConfig):
        super().__init__()
        E, H = config.moe_num_experts, config.hidden_size
        self.top_k, self.norm_min, self.num_experts = config.moe_k, config.moe_norm_min, E
        self.gate = Router(H, E)
        self.moe_statics = MoEStatics(E)
        # Routed experts never carry a bias in transformers 5, whatever use_bias says.
        self.experts = nn.ModuleList(MLP(H, config.moe_intermediate_size, False) for _ in range(E))
        n_sh = config.moe_num_shared_experts
        self.shared_experts = (
            MLP(H, config.moe_intermediate_size * n_sh, config.use_bias) if n_sh > 0 else None
        )
        # Set by tensor/expert parallelism (ernie45.parallel): which experts live on this rank, and the
        # collective that sums the partial outputs of all ranks. None = single process.
        self.local_experts: set[int] | None = None
        self.reduce_output = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (T, H) -> router logits (T, E) fp32, weights (T, K) in x.dtype, expert ids (T, K)."""
        logits = self.gate(x)
        probs = logits.softmax(-1)
        idx = (probs + self.moe_statics.e_score_correction_bias.view(-1)).topk(self.top_k, dim=-1).indices
        w = probs.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return logits, w.to(x.dtype), idx

    def forward(self, x: Tensor, all_experts: bool = False) -> tuple[Tensor, Tensor]:
        """x (B, S, H) -> (output (B, S, H), router logits (T, E)).

        `all_experts`: the torch.export variant, without data-dependent shapes (which torch.export cannot trace):
        every expert runs on every token, weighted 0 where not routed. The zero contributions leave the sum
        bit-identical, at num_experts / k times the expert compute.
        """
        B, S, H = x.shape
        x = x.reshape(-1, H)  # (T, H)
        logits, w, idx = self.route(x)
        out = torch.zeros_like(x)
        if all_experts:
            for e, expert in enumerate(self.experts):
                if self._local(e):
                    we = (w * (idx == e)).sum(-1, keepdim=True)  # (T, 1): expert e's weight, 0 when not chosen
                    out = out + (expert(x) * we).to(out.dtype)
        else:
            # Group (token, slot) pairs by expert with one sort, then run each hit expert once.
            flat = idx.flatten()  # (T*K,)
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            tok = order // self.top_k
            wts = w.flatten()[order]
            start = 0
            for e, n in enumerate(counts):
                if n and self._local(e):
                    t = tok[start:start + n]
                    y = self.experts[e](x[t]) * wts[start:start + n, None]
                    out.index_add_(0, t, y.to(out.dtype))
                start += n
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.reduce_output is not None:
            out = self.reduce_output(out)
        return out.view(B, S, H), logits

    def _local(self, e: int) -> bool:
        return self.local_experts is None or e in self.local_experts


class DecoderLayer(nn.Module):
    def __init__(self, config: ErnieConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size,
                                                         config.use_bias)

    def forward(self, x, cos, sin, mask, cache) -> tuple[Tensor, Tensor | None]:
        """-> (x, router logits of a MoE layer, else None)."""
        return self.feed_forward(x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))

    def forward_step(self, x, cos, sin, mask, k_past, v_past) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` for torch.export (`Attention.forward_step`, all experts): -> (x, new k, new v)."""
        h, k, v = self.self_attn.forward_step(self.input_layernorm(x), cos, sin, mask, k_past, v_past)
        return self.feed_forward(x + h, all_experts=True)[0], k, v

    def feed_forward(self, x: Tensor, all_experts: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, router_logits = self.mlp(h, all_experts)
            return x + h, router_logits
        return x + self.mlp(h), None


# ---- full model -----------------------------------------------------------------------------------
class ErnieModel(nn.Module):
    def __init__(self, config: ErnieConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None
    cache: KVCache | None = None
    hidden_states: Tensor | None = None


def build_attention_mask(attention_mask: Tensor | None, q_len: int, past: int, dtype: torch.dtype,
                         device: torch.device) -> Tensor | None:
    """Additive (B, 1, S, T) mask: causal plus key padding. None when plain causal attention suffices.

    Fully masked rows (left padding queries) get a finite minimum rather than -inf, so no NaN appears.
    """
    total = past + q_len
    if attention_mask is None or bool(attention_mask[:, :total].all()):
        if past == 0:
            return None
        if q_len == 1:
            return None  # a single new query may see every cached key
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, S, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def load_balancing_loss(router_logits: tuple[Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: Tensor | None = None) -> Tensor:
    """Switch-style aux loss, transformers' formula: E * sum_e f_e * P_e over all MoE layers (no bias)."""
    dev = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    rows = torch.zeros((), dtype=torch.float32, device=dev)
    m = None if attention_mask is None else attention_mask.reshape(-1).to(dev, torch.float32)
    for logits in router_logits:
        p = logits.float().softmax(-1)  # (T, E)
        sel = p.topk(top_k, dim=-1).indices
        if m is None:
            counts = counts + torch.bincount(sel.flatten(), minlength=num_experts).float()
            probs_sum = probs_sum + p.sum(0)
            rows = rows + p.shape[0]
        else:
            counts = counts.scatter_add(0, sel.flatten(), m.repeat_interleave(top_k))
            probs_sum = probs_sum + (p * m[:, None]).sum(0)
            rows = rows + m.sum()
    return num_experts * torch.sum((counts / rows) * (probs_sum / rows))


class ErnieForCausalLM(nn.Module):
    """ERNIE 4.5 causal LM. `model(input_ids)` -> CausalLMOutput(logits, loss, aux_loss, router_logits, cache)."""

    def __init__(self, config: ErnieConfig):
        super().__init__()
        self.config = config
        self.model = ErnieModel(config)
        # transformers: the dense lm_head never has a bias; the MoE one follows use_bias.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size,
                                 bias=config.use_bias and config.model_type == "ernie4_5_moe")
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            emb = self.model.embed_tokens
            if hasattr(emb, "tie_head"):  # a quantized table that is the quantized head's storage too
                emb.tie_head(self.lm_head)
            else:
                self.lm_head.weight = emb.weight

    @property
    def kv_heads(self) -> int:
        """KV heads held by this process (fewer than the config's under tensor parallelism)."""
        return self.model.layers[0].self_attn.k_proj.out_features // self.config.head_dim

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device, self.kv_heads)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        cache: KVCache | None = None,
        output_router_logits: bool = False,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
    ) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: (B, S) token ids (or pass `inputs_embeds` (B, S, H)).
            attention_mask: (B, T) 1 for real tokens, 0 for padding, over cached + new positions; or a
                prebuilt (B, 1, S, T) mask (additive, or boolean for S > 1), used as given (a paged cache's rows).
            position_ids: (B, S); by default derived from `attention_mask` (left padding safe), else arange.
            labels: (B, S) targets, -100 ignored; shifted inside (HF convention). MoE adds coef * aux_loss.
            cache: a `KVCache` from `new_cache`, advanced by S after the call.
            output_router_logits: also return per-MoE-layer router logits and the aux loss.
            logits_to_keep: if > 0, compute logits only for the last N positions (prefill saving).
        """
        cfg = self.config
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        past = cache.length if cache is not None else 0
        if cache is not None and past + S > cache.max_len:
            raise ValueError(f"KV cache overflow: {past} + {S} > {cache.max_len}")
        prebuilt = attention_mask is not None and attention_mask.dim() == 4  # (B, 1, S, T): used as given
        if position_ids is None:
            if attention_mask is not None and not prebuilt:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.clamp(min=0)[:, past:past + S]
            else:
                position_ids = torch.arange(past, past + S, device=x.device).expand(B, S)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        mask = attention_mask if prebuilt else build_attention_mask(attention_mask, S, past, x.dtype, x.device)
        router_logits: list[Tensor] = []
        for layer in self.model.layers:
            x, rl = layer(x, cos, sin, mask, cache)
            if rl is not None:
                router_logits.append(rl)
        if cache is not None:
            cache.length += S
        x = self.model.norm(x)
        hidden = x
        if logits_to_keep:
            # contiguous: a strided 3-D input makes lm_head copy its (V, H) weight per batch row
            x = x[:, -logits_to_keep:].contiguous()
        logits = self.lm_head(x)

        aux_loss = None
        if router_logits and (output_router_logits or labels is not None):
            aux_mask = None if attention_mask is None or prebuilt else attention_mask[:, past:past + S]
            aux_loss = load_balancing_loss(tuple(router_logits), cfg.moe_num_experts, cfg.moe_k, aux_mask)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if aux_loss is not None:
                loss = loss + cfg.router_aux_loss_coef * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                              router_logits=tuple(router_logits) if output_router_logits else None,
                              cache=cache, hidden_states=hidden)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random init for from-scratch training (normal(0, std) Linear/Embedding, ones for norms)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or "e_score_correction_bias" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
        # Scale residual-branch outputs down with depth (GPT-2 init), which trains small models faster.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(1 / math.sqrt(2 * self.config.num_hidden_layers))

    def generate(self, *args, **kwargs):
        from ernie45.generation import generate

        return generate(self, *args, **kwargs)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross entropy over non-ignored (-100) targets, in fp32."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(S-1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
