"""The multi-token-prediction (MTP) layer of ERNIE 4.5 checkpoints, used as a one-token draft model.

Checkpoints with `num_nextn_predict_layers > 0` may carry `model.mtp_emb_norm.0`, `model.mtp_hidden_norm.0`,
`model.mtp_linear_proj.0` (Linear 2H -> H, a bias when `use_bias`) and `model.mtp_block.0.*` (one decoder layer with
the main model's attention and a dense MLP); the embedding and `lm_head` are the main model's. For the hidden state
h_j of position j and the next token x_{j+1}, the layer at position j computes
`x = mtp_block(mtp_linear_proj(cat(mtp_emb_norm(embed(x_{j+1})), mtp_hidden_norm(h_j))))` with its own KV cache,
and `lm_head` turns x into a guess for x_{j+2}.

Engines differ in which hidden state feeds it (config.json key `mtp_hidden_state`):
- "post_norm" (vLLM, SGLang; the default): h_j after the final norm, `lm_head` applied to x directly, and the
  embedding zeroed at position 0;
- "pre_norm" (PaddleFormers' training code): h_j before the final norm, and the final norm applied to x before
  `lm_head`.
The modules live on `model.model` under the checkpoint's names, so loading, saving and conversion need no key map.

A draft vocabulary (`draft_ids`, vLLM / EAGLE-3's `draft_vocab_size`): the MTP layer's own cost is dominated by
`lm_head` (a 103k x H matrix against one decoder layer), so the draft may score only the N most frequent tokens --
a gathered copy of those rows -- and pick among them (FR-Spec, Zhao et al. 2025). Verification still uses the full
head, so the output does not change; a draft outside the subset is simply never proposed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ernie45.config import DENSE, ErnieConfig
from ernie45.errors import ErnieError
from ernie45.generation.speculative import capture_pre_norm

MTP_PREFIX = "model.mtp_"
VARIANTS = ("post_norm", "pre_norm")


def mtp_depth(config: ErnieConfig) -> int:
    """How many MTP layers the config declares (`num_nextn_predict_layers`, 0 when absent)."""
    n = config.extra.get("num_nextn_predict_layers", 0) or 0
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ErnieError(f"config: num_nextn_predict_layers must be a non-negative integer, got {n!r}")
    return n


def mtp_variant(config: ErnieConfig) -> str:
    """Which hidden state feeds the head: "post_norm" (vLLM) or "pre_norm" (PaddleFormers); see the module doc."""
    v = config.extra.get("mtp_hidden_state", "post_norm")
    if v not in VARIANTS:
        raise ErnieError(f"config: mtp_hidden_state must be one of {', '.join(VARIANTS)}, got {v!r}")
    return v


def block_config(config: ErnieConfig) -> ErnieConfig:
    """The MTP block's config: one dense layer of the main model's widths (its MLP is `intermediate_size`)."""
    return config.replace(model_type=DENSE, num_hidden_layers=1, moe_num_experts=0)


def attach_mtp(model: nn.Module, depth: int = 1) -> None:
    """Add empty MTP modules to `model.model` (on the model's device, meta included, and dtype)."""
    from ernie45.model import DecoderLayer, RMSNorm

    cfg = model.config
    H = cfg.hidden_size
    w = model.model.embed_tokens.weight
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype if model.dtype.is_floating_point else torch.float32)
    try:
        with torch.device(w.device):
            inner = model.model
            inner.mtp_emb_norm = nn.ModuleList(RMSNorm(H, cfg.rms_norm_eps) for _ in range(depth))
            inner.mtp_hidden_norm = nn.ModuleList(RMSNorm(H, cfg.rms_norm_eps) for _ in range(depth))
            inner.mtp_linear_proj = nn.ModuleList(nn.Linear(2 * H, H, bias=cfg.use_bias) for _ in range(depth))
            inner.mtp_block = nn.ModuleList(DecoderLayer(block_config(cfg), 0) for _ in range(depth))
    finally:
        torch.set_default_dtype(prev)
    model.mtp_head_class = MTPHead  # what `--speculative mtp` drafts with (ernie45.generation.speculative)


def has_mtp(model: nn.Module) -> bool:
    return hasattr(getattr(model, "model", None), "mtp_block")


def mtp_parameters(model: nn.Module) -> int:
    """Parameters of the MTP layers (0 without them)."""
    if not has_mtp(model):
        return 0
    inner = model.model
    return sum(p.numel() for name in ("mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block")
               for p in getattr(inner, name).parameters())


def check_mtp_entries(shapes: dict[str, tuple[int, ...]], config: ErnieConfig) -> dict[str, str]:
    """Check the checkpoint's MTP tensor shapes; {name: "transpose"} for a `mtp_linear_proj` stored (H, 2H)^T
    (SGLang found the 300B-PT one so), ErnieError (one line) for anything else unexpected."""
    H = config.hidden_size
    fix = {}
    for name, shape in shapes.items():
        if ".mtp_linear_proj." in name and name.endswith(".weight"):
            if shape == (2 * H, H) and H != 2 * H:
                fix[name] = "transpose"
            elif shape != (H, 2 * H):
                raise ErnieError(f"MTP tensor {name} has shape {shape}; expected ({H}, {2 * H}) or its transpose")
    return fix


class MTPHead:
    """Runs the first MTP layer of `model` over a window of positions, with its own one-layer KV cache.

    `cache` is a `KVCache` of one layer; its length counts the positions j whose (h_j, x_{j+1}) were fed.
    `draft_ids` (sorted token ids, `draft_ids()`): score only these tokens; the others get -inf logits.
    """

    def __init__(self, model: nn.Module, draft_ids: Tensor | None = None):
        if not has_mtp(model):
            raise ErnieError("the model has no MTP layer")
        self.model = model
        self.variant = mtp_variant(model.config)
        inner = model.model
        self.emb_norm, self.hidden_norm = inner.mtp_emb_norm[0], inner.mtp_hidden_norm[0]
        self.proj, self.block = inner.mtp_linear_proj[0], inner.mtp_block[0]
        self.draft_ids = None if draft_ids is None or len(draft_ids) >= model.config.vocab_size else draft_ids
        self.head, self._c = _heads(model, self.draft_ids, self.wants_pre_norm())
        _c_linears(model)

    @classmethod
    def with_draft_vocab(cls, model: nn.Module, tokenizer, size: int) -> MTPHead:
        """The head over the `size` most frequent tokens of `tokenizer` (`draft_ids`)."""
        return cls(model, draft_ids(tokenizer, size, model.config.vocab_size))

    def new_cache(self, max_len: int):
        from ernie45.model import KVCache

        m = self.model  # the layer's own kv heads: all of them under tensor parallelism too (it is not sharded)
        kv_heads = self.block.self_attn.k_proj.out_features // m.config.head_dim
        return KVCache(block_config(m.config), 1, max_len, m.dtype, m.device, kv_heads)

    def wants_pre_norm(self) -> bool:
        return self.variant == "pre_norm"

    def resize(self, cache, max_len: int):
        """A cache of `max_len` entries holding `cache`'s (None: a new, empty one)."""
        new = self.new_cache(max_len)
        if cache is not None and cache.length:
            n = cache.length
            for dst, src in zip(new.k + new.v, cache.k + cache.v):
                dst[:, :, :n] = src[:, :, :n]
            new.length = n
        return new

    def release(self, cache) -> None:
        """Nothing to do: a cache is freed with its last reference (`ReplicatedMTP` frees every rank's copy)."""

    @torch.inference_mode()
    def __call__(self, next_tokens: Tensor, hidden: Tensor, cache, offset: int = 0,
                 last_only: bool = False) -> tuple[Tensor, Tensor]:
        """next_tokens (1, n) = x_{j+1}, hidden (1, n, H) = h_j for positions j = offset + cache.length ... + n - 1.

        `offset`: the position of the cache's first entry (a server's sequence whose earlier positions have no
        hidden states, e.g. a prefix-cache hit: the layer then attends to the positions it was fed).
        -> (logits (1, n, V) fp32 guesses for x_{j+2}, or with `last_only` the last row's (1, 1, V) (what a drafter
        reads: the others cost a head each); the layer's output (1, n, H), which feeds a chained draft).
        Beside a C decoder a window of a few rows runs as one C call (`ernie45.fast.MTPStep`).
        """
        from ernie45.model import build_attention_mask, rope_cos_sin

        m, cfg = self.model, self.model.config
        past, n = cache.length, next_tokens.shape[1]
        if past + n > cache.max_len:
            raise ValueError(f"MTP cache overflow: {past} + {n} > {cache.max_len}")
        if self._c is not None and n <= self._c.ROWS and m.fast_decoder.reads(cache):
            logits, x = self._c(next_tokens[0].tolist(), hidden, cache, offset, last_only)
            return logits[None], x.to(m.dtype)[None]  # model-dtype values in fp32: exact
        e = m.model.embed_tokens(next_tokens)  # (1, n, H)
        if self.variant == "post_norm" and offset + past == 0:
            e = e.clone()
            e[:, 0] = 0  # vLLM zeroes the embedding at position 0
        x = self.proj(torch.cat([self.emb_norm(e), self.hidden_norm(hidden.to(e.dtype))], dim=-1))  # (1, n, H)
        pos = torch.arange(offset + past, offset + past + n, device=x.device)[None]  # (1, n)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        mask = build_attention_mask(None, n, past, x.dtype, x.device)
        x, _ = self.block(x, cos, sin, mask, cache)
        cache.length += n
        y = x[:, -1:] if last_only else x
        out = m.model.norm(y) if self.variant == "pre_norm" else y
        return self._full(self.head(out)), x

    def _full(self, logits: Tensor) -> Tensor:
        """(1, n, V) logits from the draft head's (1, n, rows): the draft vocabulary's at their ids, -inf elsewhere."""
        if self.draft_ids is None:
            return logits
        n, rows = logits.shape[1], logits.shape[2]
        full = torch.full((n, self.model.config.vocab_size), float("-inf"), dtype=torch.float32, device=logits.device)
        ids = self.draft_ids.to(logits.device)[None].expand(n, rows)
        return full.scatter_(1, ids, logits[0])[None]


class GemvLinear(nn.Module):
    """An MTP-layer Linear (float, int8 or int4) multiplied by the C decoder's GEMV for a few rows (a draft step),
    by the module it wraps otherwise. PyTorch's one-row bf16 matmul is several times slower than streaming the
    weight (0.3B shape, 2 threads: the MTP layer's MLP took 32 ms by F.linear); the parameters and buffers are
    the wrapped module's own (the same dicts), so the state dict does not change."""

    MAX_ROWS = 4

    def __init__(self, linear: nn.Module, fast, L):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._parameters, self._buffers = linear._parameters, linear._buffers  # weight, bias, scales: shared
        self._many = [linear]  # the wrapped module, kept out of the module tree (its names stay the state dict's)
        self._gemv = lambda x: fast.gemv(L, x)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // self.in_features > self.MAX_ROWS:
            return self._many[0](x)
        return self._gemv(x).to(x.dtype)


def _c_linears(model: nn.Module) -> None:
    """Swap the MTP layer's plain Linears for `GemvLinear`s where a C decoder runs (once; an inference-only model).
    Types are told by name: this module must not import ernie45.fast (a cycle through the loader)."""
    fast = getattr(model, "fast_decoder", None)
    if fast is None:
        return
    inner = model.model
    for root in (inner.mtp_linear_proj, inner.mtp_block):
        for mod in list(root.modules()):
            for name, child in list(mod.named_children()):
                if type(child).__name__ in ("Linear", "DnnLinear", "UpcastLinear", "Int8Linear", "Int4Linear"):
                    L = fast.linear_struct(child)
                    if L is not None:
                        setattr(mod, name, GemvLinear(child, fast, L))


def _heads(model: nn.Module, ids: Tensor | None, pre_norm: bool):
    """-> (x (..., H) -> fp32 logits (..., rows) of `lm_head`, or of its rows `ids`; the layer as one C call
    (`ernie45.fast.MTPStep`) drafting with the same head, or None).

    A draft's lm_head reads the whole (V, H) matrix, the largest weight of a small model: oneDNN's GEMM on the plain
    weight (what prefill uses beside the C step) is slow for one row (0.3B shape: 24 against 12 ms), the C GEMV
    streams it. Drafts need no bit-exact logits (verification decides), so the summation order does not matter.
    With `ids` and a C decoder the head is a gathered copy of those rows (`draft_rows`), so a draft reads
    len(ids) / V of it; without a C decoder, the full head's logits at those ids (the same draft, no saving)."""
    fast = getattr(model, "fast_decoder", None)
    if fast is None:
        return (lambda x: model.lm_head(x).float()[..., ids]) if ids is not None else (
            lambda x: model.lm_head(x).float()), None
    L, keep = (fast._m.head, None) if ids is None else draft_rows(fast, ids)
    return (lambda x, keep=keep: fast.gemv(L, x)), fast.mtp_step(model.model, L, pre_norm, keep, ids)


def draft_ids(tokenizer, size: int, vocab_size: int) -> Tensor:
    """The `size` token ids a reduced MTP draft scores, sorted: every special, control, byte and added token (a
    draft must be able to propose `</s>`, tool-call and thinking markers), then the other pieces by the tokenizer's
    score -- for SentencePiece BPE (ERNIE's tokenizer) the merge order, which follows corpus frequency -- so no
    corpus is needed. ErnieError when `size` leaves no room beyond the special tokens."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ErnieError(f"draft_vocab_size must be a positive integer, got {size!r}")
    sp = getattr(tokenizer, "sp", None)
    if sp is None:
        raise ErnieError("a draft vocabulary needs the model's SentencePiece tokenizer")
    pieces = min(sp.GetPieceSize(), vocab_size)
    special = {i for i in range(pieces) if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i)}
    special |= {i for i in getattr(tokenizer, "special_ids", ()) if 0 <= i < vocab_size}
    special |= {i for i in getattr(tokenizer, "added_tokens", {}).values() if 0 <= i < vocab_size}
    if size <= len(special):
        raise ErnieError(f"draft_vocab_size {size} leaves no room beyond the tokenizer's {len(special)} special, "
                         "control and byte tokens; use a larger one")
    normal = sorted((i for i in range(pieces) if i not in special), key=lambda i: (-sp.GetScore(i), i))
    return torch.tensor(sorted(special | set(normal[: size - len(special)])), dtype=torch.long)


def draft_rows(fast, ids: Tensor):
    """The C decoder's head rows `ids` as a draft head: an int8 copy (one scale per row) of a float head, else a
    copy in the head's own format (int8 or int4 with their scales). Reading the rows is the draft's largest cost
    (32,768 rows of 2,560: 168 MB in bf16), and int8 halves it (bf16; fp32: a quarter) at no cost to the output --
    verification decides -- and none measured to acceptance (the bundled head at 1,298 of its 4,096 tokens: 95 of 155
    drafts accepted, as with the fp32 rows). -> (the C Linear, the tensors it points into)."""
    from ernie45.native_abi import W_BF16, W_F32
    from ernie45.quant.linear import Int8Linear

    G, keep = gather_rows(fast._m.head, ids)
    if G.kind not in (W_F32, W_BF16):
        return G, keep
    dtype = torch.float32 if G.kind == W_F32 else torch.bfloat16
    lin = nn.Linear(G.in_, G.out, bias=bool(G.bias), dtype=dtype, device="meta")  # no random init of 84 M weights
    lin.weight = nn.Parameter(keep[0].view(dtype).view(G.out, G.in_), requires_grad=False)
    if G.bias:
        lin.bias = nn.Parameter(keep[-1].view(torch.float32).view(G.out).to(dtype), requires_grad=False)
    with torch.inference_mode(False):  # normal tensors: the quantizer's worker threads write into them
        q = Int8Linear.from_float(lin, dtype)
    return fast.linear_struct(q), [q]


def gather_rows(L, ids: Tensor):
    """A copy of C Linear `L` (`ernie45.native_abi._Linear`) holding only its rows `ids`: weights, scales, zeros
    and bias gathered from the memory L points at, laid out as L's. -> (the new _Linear, the tensors it points
    into, which the caller keeps alive)."""
    import ctypes

    from ernie45.native_abi import W_BF16, W_F32, W_I4, W_I8, _Linear

    n_in, rows = L.in_, L.out
    row_bytes = {W_F32: 4 * n_in, W_BF16: 2 * n_in, W_I8: n_in, W_I4: n_in // 2}[L.kind]
    per_row = 1 if L.kind == W_I8 and not L.group else n_in // L.group if L.kind in (W_I8, W_I4) else 0
    sz_bytes = per_row * (2 if L.sdt else 4)

    def take(ptr: int, nbytes: int) -> Tensor:
        raw = torch.frombuffer((ctypes.c_uint8 * (rows * nbytes)).from_address(ptr), dtype=torch.uint8)
        return raw.view(rows, nbytes).index_select(0, ids).contiguous()

    keep = [take(L.w, row_bytes)]
    G = _Linear(kind=L.kind, out=len(ids), in_=n_in, group=L.group, sdt=L.sdt, w=keep[0].data_ptr())
    if sz_bytes:
        keep.append(take(L.scale, sz_bytes))
        G.scale = keep[-1].data_ptr()
        if L.kind == W_I4:
            keep.append(take(L.zero, sz_bytes))
            G.zero = keep[-1].data_ptr()
    if L.bias:
        keep.append(take(L.bias, 4))
        G.bias = keep[-1].data_ptr()
    return G, keep


# ---- loading ----------------------------------------------------------------------------------------
def plan_mtp(model: nn.Module, entries: dict, dt: torch.dtype, path: str) -> tuple[dict, dict[str, str]]:
    """Attach the MTP modules when the config declares them and the checkpoint holds `model.mtp_*` tensors.

    `entries`: the checkpoint's MTP tensors {name: TensorEntry}. -> ({name: (dtype, shape)} to read,
    {name: "transpose"} for tensors stored transposed). ErnieError (one line) for missing, unexpected or
    mis-shaped MTP tensors; a config without MTP layers ignores them (as transformers does).
    """
    from ernie45.checkpoint_read import mismatch_problems

    depth = mtp_depth(model.config)
    if not depth or not entries:
        return {}, {}
    mtp_variant(model.config)  # a bad switch fails here, at load
    if not has_mtp(model):  # a quantized checkpoint's layer is attached (and swapped) before: `attach_before_swap`
        attach_mtp(model, depth)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(MTP_PREFIX)}
    # float weights only: a quantized layer's (int8 / packed int4) are checked against the swapped modules below
    fix = check_mtp_entries({k: e.shape for k, e in entries.items() if e.dtype.is_floating_point}, model.config)
    missing = [k for k in expected if k not in entries]
    unexpected = [k for k in entries if k not in expected]
    bad = [f"{k} {e.shape} (expected {tuple(expected[k].shape)})" for k, e in entries.items()
           if k in expected and k not in fix and e.shape != tuple(expected[k].shape)]
    problems = mismatch_problems(missing, bad, unexpected)
    if problems:
        raise ErnieError(f"checkpoint {path}: the MTP layer does not match its config.json — " + "; ".join(problems))
    return {k: (dt if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in expected.items()}, fix


def attach_before_swap(model: nn.Module, entries: dict, quantizing: bool) -> None:
    """Attach the MTP layer before `ernie45.quant.prepare_for_load` swaps the Linears, so its own are swapped too:
    when quantizing while loading, or when the checkpoint stores the layer quantized (int8 / int4 weights). A
    quantized checkpoint written before ernie45 quantized the layer stores it in float: attached after the swap."""
    depth = mtp_depth(model.config)
    if depth and entries and not has_mtp(model) and (
            quantizing or any(not e.dtype.is_floating_point for e in entries.values())):
        attach_mtp(model, depth)


def read_mtp(reader, plan: dict, fix: dict[str, str], storage: dict[str, Tensor]) -> None:
    """Read the planned MTP tensors into `storage` (a transposed `mtp_linear_proj` turned the right way); `reader`
    holds them among its entries (`CheckpointReader.keep_mtp`)."""
    for name, (dtype, shape) in plan.items():
        if fix.get(name) == "transpose":
            t = reader.read(name, dtype=dtype)  # (2H, H) as stored
            storage[name] = t.t().contiguous()  # -> (H, 2H)
        else:
            storage[name] = reader.read(name, out=torch.empty(shape, dtype=dtype))


# ---- training ---------------------------------------------------------------------------------------
def init_mtp(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Attach (if missing) and randomly initialise one MTP layer for training: normal(0, std) weights, ones for
    the norms, zero biases; the config then declares it (`num_nextn_predict_layers` = 1)."""
    if not has_mtp(model):
        model.config.extra["num_nextn_predict_layers"] = 1
        attach_mtp(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(MTP_PREFIX):
                continue
            if name.endswith("norm.weight") or ".mtp_emb_norm." in name or ".mtp_hidden_norm." in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g).mul_(std).to(p.dtype))


def mtp_parameters_of(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith(MTP_PREFIX)]


def mtp_loss(model: nn.Module, ids: Tensor, labels: Tensor, mode: str = "head", weight: float = 0.3) -> Tensor:
    """The pre-training loss with the MTP objective: position j's MTP output predicts token j + 2 from (h_j,
    x_{j+1}), cross entropy over the non-ignored targets (PaddleFormers' layout, one layer).

    mode "head": the main model is frozen (run without gradients) and the loss is the MTP loss alone, so only the
    layer trains; "distill": the same, but the target is the frozen model's own next-token distribution at
    position j + 1 (soft cross entropy), which is what a draft must guess to be accepted; "joint": next-token loss
    (with the MoE aux loss) + `weight` x the MTP loss, everything trains.
    ids, labels: (B, S), labels -100 where ignored.
    """
    import torch.nn.functional as F

    from ernie45.model import rope_cos_sin

    inner, cfg = model.model, model.config
    variant = mtp_variant(cfg)
    with contextlib.ExitStack() as stack:
        frozen = mode in ("head", "distill")
        if frozen:
            stack.enter_context(torch.no_grad())
        box = stack.enter_context(capture_pre_norm(model))  # ernie45.generation.speculative
        out = model(ids, labels=None if frozen else labels)
    hidden = box[0] if variant == "pre_norm" else out.hidden_states  # (B, S, H)
    e = inner.embed_tokens(ids[:, 1:])  # (B, S-1, H): x_{j+1}
    if variant == "post_norm":
        e = torch.cat([torch.zeros_like(e[:, :1]), e[:, 1:]], 1)  # position 0's embedding zeroed, as vLLM runs it
    h = hidden[:, :-1].to(e.dtype)  # (B, S-1, H): h_j
    x = inner.mtp_linear_proj[0](torch.cat([inner.mtp_emb_norm[0](e), inner.mtp_hidden_norm[0](h)], -1))
    pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # (B, S-1)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    x, _ = inner.mtp_block[0](x, cos, sin, None, None)  # causal over the window
    logits = model.lm_head(inner.norm(x) if variant == "pre_norm" else x)  # (B, S-1, V)
    if mode == "distill":  # the model's distribution at j + 1 (which predicts token j + 2), positions 0..S-2
        teacher = out.logits[:, 1:].float().softmax(-1)  # (B, S-1, V)
        per = -(teacher * logits.float().log_softmax(-1)).sum(-1)  # (B, S-1)
        keep = labels[:, 1:] != -100  # x_{j+1} is a real token
        return (per * keep).sum() / keep.sum().clamp(min=1)
    target = labels[:, 2:]  # position j -> token j + 2: (B, S-2)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100)
    return loss if frozen else out.loss + weight * loss
