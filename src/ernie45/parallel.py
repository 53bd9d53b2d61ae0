"""Tensor and expert parallel inference over `torch.distributed` (gloo on CPU, nccl on CUDA).

Megatron-style sharding applied as a module swap on a meta-device model, then each rank reads only its own
slices from the safetensors files (plain reads, no full-file mapping), so memory per rank is ≈ 1/N:

- attention: q heads split; kv heads split, or the kv heads a rank's q heads need are replicated when kv heads
  do not divide evenly; o_proj row-split + all-reduce;
- dense MLP: gate/up column-split, down row-split + all-reduce;
- MoE: router replicated (fp32); experts either tensor-split (each expert's gate/up/down split like the MLP) or,
  with `--ep`, expert-parallel (each rank owns whole experts); one all-reduce per MoE block sums the partial
  outputs (activations are replicated, so no all-to-all is needed);
- embedding vocab-split (masked lookup + all-reduce); lm_head vocab-split + all-gather.

Every rank ends with identical logits, so SPMD loops (generate) stay in lockstep with no extra messages.
We write this by hand rather than with DTensor `parallelize_module` because the GQA replication and the
per-expert split/ownership rules are not expressible as plain Colwise/Rowwise placements.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError


# ---- process group ---------------------------------------------------------------------------------
def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA). Returns (rank, world_size).

    The timeout bounds every collective: if a rank dies, the others fail instead of hanging forever.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ErnieError("--tp needs several processes: launch with `torchrun --nproc-per-node N -m ernie45 ...`")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _all_reduce(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


# ---- parallel modules --------------------------------------------------------------------------------
class ParallelLinear(nn.Linear):
    """A Linear holding this rank's shard.

    mode "col": output features split (no communication, or an all-gather of the outputs when `gather`);
    mode "row": input features split; the partial products are all-reduced (unless `reduce=False`, when the
    caller reduces once for several modules), then the bias is added once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, reduce: bool = True,
                 gather_sizes: list[int] | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.mode, self.reduce, self.gather_sizes = mode, reduce, gather_sizes

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "col":
            y = F.linear(x, self.weight, self.bias)
            return _gather_last(y, self.gather_sizes) if self.gather_sizes else y
        y = F.linear(x, self.weight)
        if self.reduce:
            y = _all_reduce(y)
        return y + self.bias if self.bias is not None else y


def _gather_last(y: Tensor, sizes: list[int]) -> Tensor:
    """All-gather uneven vocab shards along the last dim (padded to the largest shard, then trimmed)."""
    m = max(sizes)
    if y.shape[-1] < m:
        y = F.pad(y, (0, m - y.shape[-1]))
    parts = [torch.empty_like(y) for _ in sizes]
    dist.all_gather(parts, y.contiguous())
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the embedding; ids outside the shard look up zeros, then an all-reduce."""

    def __init__(self, start: int, end: int, dim: int):
        super().__init__(end - start, dim)
        self.start, self.end = start, end

    def forward(self, ids: Tensor) -> Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        y = F.embedding(local, self.weight) * inside[..., None].to(self.weight.dtype)
        return _all_reduce(y)


# ---- the sharding plan -------------------------------------------------------------------------------
def _split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous near-even split of range(n): (start, end) for `rank`."""
    base, rem = divmod(n, world)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


def check_split(config: ErnieConfig, tp: int, ep: int) -> None:
    """Clear errors for impossible splits."""
    if tp < 1:
        raise ErnieError("--tp must be >= 1")
    if tp > config.num_attention_heads:
        raise ErnieError(f"--tp {tp} is larger than the number of attention heads ({config.num_attention_heads})")
    if config.num_attention_heads % tp:
        raise ErnieError(f"num_attention_heads ({config.num_attention_heads}) is not divisible by --tp {tp}")
    if config.intermediate_size % tp and any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        raise ErnieError(f"intermediate_size ({config.intermediate_size}) is not divisible by --tp {tp}")
    if ep not in (1, tp):
        raise ErnieError(f"--ep must be 1 (experts tensor-split) or equal to --tp ({tp}) (experts distributed)")
    if config.is_moe:
        if ep == 1 and config.moe_intermediate_size % tp:
            raise ErnieError(f"moe_intermediate_size ({config.moe_intermediate_size}) is not divisible by --tp "
                             f"{tp}; use --ep {tp} to distribute whole experts instead")
        if ep > config.moe_num_experts:
            raise ErnieError(f"--ep {ep} is larger than the number of experts ({config.moe_num_experts})")
        if config.moe_num_shared_experts and (config.moe_intermediate_size * config.moe_num_shared_experts) % tp:
            raise ErnieError(f"the shared experts' width is not divisible by --tp {tp}")


class _Plan:
    """Records, per local parameter name, which slice of which checkpoint tensor fills it."""

    def __init__(self):
        self.specs: dict[str, tuple[str, str, list[tuple[int, int]]]] = {}

    def rows(self, name: str, ranges: list[tuple[int, int]], src: str | None = None) -> None:
        self.specs[name] = (src or name, "rows", ranges)

    def cols(self, name: str, start: int, end: int) -> None:
        self.specs[name] = (name, "cols", [(start, end)])


def _col(lin: nn.Linear, rows: list[tuple[int, int]], plan: _Plan, name: str, gather=None) -> ParallelLinear:
    n = sum(e - s for s, e in rows)
    new = ParallelLinear(lin.in_features, n, lin.bias is not None, "col", gather_sizes=gather)
    plan.rows(f"{name}.weight", rows)
    if lin.bias is not None:
        plan.rows(f"{name}.bias", rows)
    return new


def _row(lin: nn.Linear, start: int, end: int, plan: _Plan, name: str, reduce: bool = True) -> ParallelLinear:
    new = ParallelLinear(end - start, lin.out_features, lin.bias is not None, "row", reduce=reduce)
    plan.cols(f"{name}.weight", start, end)
    if lin.bias is not None:
        plan.rows(f"{name}.bias", [(0, lin.out_features)])
    return new


def shard_model(model: nn.Module, tp: int, ep: int, rank: int) -> _Plan:
    """Swap the modules of a meta-device ErnieForCausalLM for this rank's shards; return the load plan."""
    cfg: ErnieConfig = model.config
    check_split(cfg, tp, ep)
    plan = _Plan()
    d, nH, nKV = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    h = nH // tp
    q_heads = list(range(rank * h, (rank + 1) * h))
    group = nH // nKV
    kv_needed = sorted({j // group for j in q_heads})
    # Uniform when every local kv head serves the same number of consecutive local q heads.
    uniform = h % len(kv_needed) == 0 and all(
        (q_heads[i] // group) == kv_needed[i // (h // len(kv_needed))] for i in range(h))
    kv_heads = kv_needed if uniform else [j // group for j in q_heads]  # else one kv copy per q head

    def head_rows(heads: list[int]) -> list[tuple[int, int]]:
        return [(x * d, (x + 1) * d) for x in heads]

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        att = layer.self_attn
        att.q_proj = _col(att.q_proj, head_rows(q_heads), plan, f"{p}.self_attn.q_proj")
        att.k_proj = _col(att.k_proj, head_rows(kv_heads), plan, f"{p}.self_attn.k_proj")
        att.v_proj = _col(att.v_proj, head_rows(kv_heads), plan, f"{p}.self_attn.v_proj")
        att.o_proj = _row(att.o_proj, q_heads[0] * d, (q_heads[-1] + 1) * d, plan, f"{p}.self_attn.o_proj")
        mlp = layer.mlp
        if not layer.is_moe:
            s, e = _split(cfg.intermediate_size, tp, rank)
            mlp.gate_proj = _col(mlp.gate_proj, [(s, e)], plan, f"{p}.mlp.gate_proj")
            mlp.up_proj = _col(mlp.up_proj, [(s, e)], plan, f"{p}.mlp.up_proj")
            mlp.down_proj = _row(mlp.down_proj, s, e, plan, f"{p}.mlp.down_proj")
            continue
        mlp.reduce_output = _all_reduce
        if ep > 1:
            mlp.local_experts = set(range(*_split(cfg.moe_num_experts, ep, rank)))
            for j in range(cfg.moe_num_experts):
                if j not in mlp.local_experts:
                    mlp.experts[j] = nn.Module()  # not this rank's: holds no weights
        else:
            s, e = _split(cfg.moe_intermediate_size, tp, rank)
            for j, ex in enumerate(mlp.experts):
                q = f"{p}.mlp.experts.{j}"
                ex.gate_proj = _col(ex.gate_proj, [(s, e)], plan, f"{q}.gate_proj")
                ex.up_proj = _col(ex.up_proj, [(s, e)], plan, f"{q}.up_proj")
                ex.down_proj = _row(ex.down_proj, s, e, plan, f"{q}.down_proj", reduce=False)
        if mlp.shared_experts is not None:
            sh = mlp.shared_experts
            s, e = _split(sh.gate_proj.out_features, tp, rank)
            q = f"{p}.mlp.shared_experts"
            sh.gate_proj = _col(sh.gate_proj, [(s, e)], plan, f"{q}.gate_proj")
            sh.up_proj = _col(sh.up_proj, [(s, e)], plan, f"{q}.up_proj")
            sh.down_proj = _row(sh.down_proj, s, e, plan, f"{q}.down_proj", reduce=False)
            if sh.down_proj.bias is not None and rank != 0:
                # The bias must be added once across ranks before the single all-reduce.
                sh.down_proj.bias = None
                plan.specs.pop(f"{q}.down_proj.bias", None)

    vs, ve = _split(cfg.vocab_size, tp, rank)
    sizes = [(_split(cfg.vocab_size, tp, r)[1] - _split(cfg.vocab_size, tp, r)[0]) for r in range(tp)]
    model.model.embed_tokens = VocabParallelEmbedding(vs, ve, cfg.hidden_size)
    plan.rows("model.embed_tokens.weight", [(vs, ve)])
    head_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    model.lm_head = _col(model.lm_head, [(vs, ve)], plan, "lm_head", gather=sizes)
    plan.rows("lm_head.weight", [(vs, ve)], src=head_src)
    return plan


def load_parallel(path: str, tp: int, ep: int = 1, dtype: str | torch.dtype = "auto", device: str = "auto"):
    """Load this rank's shard of a checkpoint. Call inside an initialised process group (see init_distributed)."""
    from ernie45.checkpoint import CheckpointReader, build_model
    from ernie45.device import resolve_device, resolve_dtype
    from ernie45.models import resolve_model_path
    from ernie45.mtp import plan_mtp, read_mtp

    path = resolve_model_path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    config = ErnieConfig.from_pretrained(path)
    if config.quantization_config:
        raise ErnieError("tensor parallelism does not support quantized checkpoints yet")
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    dt = resolve_dtype(dtype, dev)
    model = build_model(config, dt, dev, meta=True)
    with torch.device("meta"):  # the swapped-in shard modules are filled by assign below
        plan = shard_model(model, tp, ep, rank)
    reader = CheckpointReader(path)
    # the MTP layer (`--speculative mtp`), whole on every rank: one decoder layer, which every rank runs alike
    # beside the sharded embedding and head (their collectives are the model's own)
    mtp_plan, mtp_fix = plan_mtp(model, reader.mtp_entries, dt, path)
    mtp = {}
    if mtp_plan:
        reader.keep_mtp()
        read_mtp(reader, mtp_plan, mtp_fix, mtp)
    sd = {}
    for name, ref in model.state_dict().items():
        if name in mtp:
            sd[name] = mtp[name].to(device=dev)
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied below to the same vocab shard as the embedding
        src, kind, ranges = plan.specs.get(name, (name, "full", []))
        if src not in reader:
            raise ErnieError(f"checkpoint {path} is missing tensor {src}")
        if kind == "rows":
            parts = [reader.read(src, rows=r) for r in ranges]
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
        elif kind == "cols":
            t = reader.cols(src, *ranges[0])
        else:
            t = reader.read(src)
        if tuple(t.shape) != tuple(ref.shape):
            raise ErnieError(f"tensor {src}: slice shape {tuple(t.shape)} does not match {tuple(ref.shape)}")
        keep32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        sd[name] = t.to(device=dev, dtype=torch.float32 if keep32 else (dt if t.is_floating_point() else t.dtype))
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    model.name_or_path = path
    return model
