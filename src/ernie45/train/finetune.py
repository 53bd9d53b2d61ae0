"""`ernie45 finetune`: supervised fine-tuning (full, LoRA, rsLoRA, QLoRA) and DPO on chat data.

Loss only on assistant tokens, normalised by the target-token count of the whole global batch, so gradient
accumulation and `torchrun` data parallelism give the same update as one big batch. The data order is a
seeded permutation per epoch and a function of the optimizer step alone, so `--resume` replays exactly the
batches (and the loss curve) of an uninterrupted run. MoE models add the router aux loss; the router is
frozen unless `--train-router`. Layout of `--out`: `checkpoints/step-N/`, `log.jsonl`, `final/` (a PEFT
adapter directory for LoRA/QLoRA, a Hugging Face checkpoint for full fine-tuning).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from ernie45.errors import ErnieError
from ernie45.train.data import FORMATS, IGNORE, TOO_LONG, collate
from ernie45.train.distributed import Dist, all_reduce_sum, barrier, init_distributed, shutdown
from ernie45.train.schedule import SCHEDULES, lr_at

CKPT_DIR, FINAL_DIR, LOG_FILE = "checkpoints", "final", "log.jsonl"
STATE_FILE, OPTIM_FILE, SUMMARY_FILE = "trainer_state.json", "optimizer.pt", "training_summary.json"
DEFAULT_LR = {("full", False): 1e-5, ("lora", False): 2e-4, ("full", True): 1e-6, ("lora", True): 5e-5}


@dataclass
class FinetuneArgs:
    """Everything a run depends on (saved in each checkpoint; `--resume` checks the ones that matter)."""

    model: str
    data: str
    out: str
    eval_data: str | None = None
    eval_split: float = 0.0
    format: str = "auto"
    dpo: bool = False
    beta: float = 0.1
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    rslora: bool = False
    lora_experts: bool = False
    qlora: bool = False
    train_router: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 2048
    pack: bool = False
    too_long: str = "skip"
    skip_bad_lines: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    bf16: str = "auto"
    device: str = "auto"
    progress: bool = True

    @property
    def method(self) -> str:
        return "qlora" if self.qlora else "lora" if self.lora_rank else "full"

    @property
    def learning_rate(self) -> float:
        return (
            self.lr
            if self.lr is not None
            else DEFAULT_LR[("full" if self.method == "full" else "lora", self.dpo)]
        )


# ---- data -------------------------------------------------------------------------------------------
def load_data(a: FinetuneArgs, tokenizer, vocab_size: int, d: Dist) -> tuple[list, list]:
    """(train, eval) samples: Sample rows for SFT (packed with --pack), PairSamples for DPO."""
    from ernie45.train.data import format_problems, load_preferences, load_sft, pack

    def read(path):
        if a.dpo:
            items, rep = load_preferences(path, tokenizer, a.max_length, a.too_long, a.skip_bad_lines)
        else:
            items, rep = load_sft(path, tokenizer, a.max_length, a.format, a.too_long, a.skip_bad_lines)
        if d.main:
            if rep.problems:
                print(format_problems(path, rep.problems) + "\n(skipped)", file=sys.stderr)
            if rep.too_long:
                print(
                    format_problems(path, rep.too_long, "record(s) too long")
                    + "\n(skipped; --too-long truncate or error changes this)",
                    file=sys.stderr,
                )
            if rep.truncated:
                print(
                    f"{path}: truncated {rep.truncated} record(s) to --max-length {a.max_length}",
                    file=sys.stderr,
                )
        return items

    train = read(a.data)
    if not train:
        raise ErnieError(f"{a.data}: no usable training records")
    evals = read(a.eval_data) if a.eval_data else []
    if a.eval_split > 0:
        g = torch.Generator().manual_seed(a.seed)
        perm = torch.randperm(len(train), generator=g).tolist()
        n_eval = max(1, round(len(train) * a.eval_split))
        if n_eval >= len(train):
            raise ErnieError(f"--eval-split {a.eval_split} leaves no training records")
        evals = evals + [train[i] for i in sorted(perm[:n_eval])]
        train = [train[i] for i in sorted(perm[n_eval:])]
    rows = [s for p in train for s in (p.chosen, p.rejected)] if a.dpo else train
    top = max((max(s.input_ids) for s in rows), default=0)
    if top >= vocab_size:
        raise ErnieError(f"the tokenizer produced id {top} but the model's vocab_size is {vocab_size}")
    if a.pack:
        train = pack(train, a.max_length)
    return train, evals


class Stream:
    """The endless shuffled sample stream: position p -> sample, a fresh seeded permutation per epoch."""

    def __init__(self, items: list, seed: int):
        self.items, self.seed = items, seed
        self._epoch, self._perm = -1, []

    def __getitem__(self, position: int):
        epoch, i = divmod(position, len(self.items))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.items), generator=g).tolist(), epoch
        return self.items[self._perm[i]]


# ---- model ------------------------------------------------------------------------------------------
def resolve_bf16(mode: str, device: torch.device) -> bool:
    from ernie45.device import cpu_has_fast_bf16

    if mode == "off":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    if mode == "on":
        if not supported:
            raise ErnieError("--bf16 on: this GPU does not support bfloat16")
        return True
    return supported if device.type == "cuda" else cpu_has_fast_bf16()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_model(a: FinetuneArgs, device: torch.device, bf16: bool, resume_dir: str | None):
    """The model to train: fp32 weights for full fine-tuning, a frozen (bf16 / NF4) base plus an fp32 LoRA
    adapter otherwise. Resuming reloads the trained weights (full) or the adapter (LoRA) of the checkpoint."""
    from ernie45.checkpoint import load_checkpoint
    from ernie45.train import lora

    if a.method == "full":
        model = load_checkpoint(resume_dir or a.model, dtype="float32", device=device)
        model.requires_grad_(True)
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name or (name.endswith("mlp.gate.weight") and not a.train_router):
                p.requires_grad_(False)
    else:
        dtype = torch.bfloat16 if bf16 else torch.float32
        if a.qlora:
            model = lora.quantize_nf4(load_checkpoint(a.model, dtype=dtype, device="cpu"), dtype, device)
        else:
            model = load_checkpoint(a.model, dtype=dtype, device=device)
        if resume_dir:
            lora.load_adapter(model, resume_dir, trainable=True)
        else:
            torch.manual_seed(a.seed)  # identical adapter init on every rank
            cfg = lora.lora_config(
                model,
                a.lora_rank or 8,
                a.lora_alpha,
                a.lora_dropout,
                a.target_modules,
                a.rslora,
                a.lora_experts,
                base_model_name_or_path=os.path.abspath(a.model),
            )
            lora.add_lora(model, cfg)
    if a.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on vectors (norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)


# ---- losses -----------------------------------------------------------------------------------------
def _forward(model, rows: list, device, bf16: bool):
    ids, labels, mask = (t.to(device) for t in collate(rows, model.config.pad_token_id))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, attention_mask=mask, output_router_logits=model.config.is_moe)
    return out, labels


def sft_micro_step(model, rows: list, n_targets: int, n_rows: int, device, bf16: bool) -> torch.Tensor:
    """Backward one micro-batch's share of the global loss; returns [ce_sum, aux_weighted] (detached)."""
    out, labels = _forward(model, rows, device, bf16)
    V = out.logits.shape[-1]
    ce = F.cross_entropy(
        out.logits[:, :-1].float().reshape(-1, V),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    loss = ce / n_targets
    aux = torch.zeros((), device=device)
    if out.aux_loss is not None:
        aux = out.aux_loss.float() * (len(rows) / n_rows)
        loss = loss + model.config.router_aux_loss_coef * aux
    loss.backward()
    return torch.stack([ce.detach().double(), aux.detach().double()])


def dpo_logps(model, ref_model, pairs: list, device, bf16: bool):
    """Policy and reference log-probabilities of chosen and rejected; reference = ref_model or the base with
    the adapter disabled. Returns (pc, pr, rc, rr, policy aux loss or None)."""
    from ernie45.train.dpo import sequence_logprobs
    from ernie45.train.lora import adapters_disabled

    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    out, labels = _forward(model, rows, device, bf16)
    logps = sequence_logprobs(out.logits, labels)
    with torch.no_grad():
        if ref_model is not None:
            ref_out, _ = _forward(ref_model, rows, device, bf16)
        else:
            with adapters_disabled(model):
                ref_out, _ = _forward(model, rows, device, bf16)
        ref = sequence_logprobs(ref_out.logits, labels)
    k = len(pairs)
    return logps[:k], logps[k:], ref[:k], ref[k:], out.aux_loss


def dpo_micro_step(
    model, ref_model, pairs: list, n_pairs: int, beta: float, device, bf16: bool
) -> torch.Tensor:
    """Backward one micro-batch's share of the mean DPO loss; returns [loss_sum, margin_sum, correct, aux]."""
    from ernie45.train.dpo import dpo_loss

    pc, pr, rc, rr, aux_loss = dpo_logps(model, ref_model, pairs, device, bf16)
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta)
    loss = losses.sum() / n_pairs
    aux = torch.zeros((), device=device)
    if aux_loss is not None:
        aux = aux_loss.float() * (len(pairs) / n_pairs)
        loss = loss + model.config.router_aux_loss_coef * aux
    loss.backward()
    return torch.stack(
        [
            losses.detach().sum().double(),
            (pc - pr).detach().sum().double(),
            (r_c > r_r).sum().double(),
            aux.detach().double(),
        ]
    )


@torch.no_grad()
def evaluate(model, ref_model, items: list, a: FinetuneArgs, device, bf16: bool, d: Dist) -> dict[str, float]:
    """Held-out metrics: token-mean LM loss (SFT), or DPO loss, chosen-minus-rejected log-prob margin and
    reward accuracy (DPO). Ranks split the items and sum."""
    from ernie45.train.dpo import dpo_loss

    was_training = model.training
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, len(items), a.batch_size):
        mine = items[start : start + a.batch_size][d.rank :: d.world]
        if not mine:
            continue
        if a.dpo:
            pc, pr, rc, rr, _ = dpo_logps(model, ref_model, mine, device, bf16)
            losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, a.beta)
            total += (
                torch.stack(
                    [losses.sum(), (pc - pr).sum(), (r_c > r_r).sum(), torch.tensor(float(len(mine)))]
                )
                .double()
                .to(device)
            )
        else:
            out, labels = _forward(model, mine, device, bf16)
            V = out.logits.shape[-1]
            ce = F.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, V),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total[0] += ce.double()
            total[3] += int((labels[:, 1:] != IGNORE).sum())
    all_reduce_sum([total], d)
    model.train(was_training)
    n = float(total[3]) or float("nan")
    if a.dpo:
        return {
            "eval_loss": float(total[0]) / n,
            "eval_margin": float(total[1]) / n,
            "eval_accuracy": float(total[2]) / n,
        }
    return {"eval_loss": float(total[0]) / n}


# ---- checkpoints ------------------------------------------------------------------------------------
def list_checkpoints(out: str) -> list[str]:
    d = os.path.join(out, CKPT_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(
        n for n in os.listdir(d) if n.startswith("step-") and os.path.isfile(os.path.join(d, n, STATE_FILE))
    )


def save_training_checkpoint(a: FinetuneArgs, step: int, model, optimizer, tokenizer, state: dict) -> str:
    """checkpoints/step-NNNNNNN/, atomically: trained weights (adapter or full), optimizer, trainer state."""
    from ernie45.checkpoint import checkpoint_state_dict, write_safetensors_shards
    from ernie45.train.lora import write_adapter
    from ernie45.utils import atomic_directory

    path = os.path.join(a.out, CKPT_DIR, f"step-{step:07d}")
    with atomic_directory(path, overwrite=True) as tmp:
        if a.method == "full":
            write_safetensors_shards(checkpoint_state_dict(model), tmp)
            model.config.replace(torch_dtype="float32").save(tmp)
        else:
            write_adapter(model, tmp, base_model_name_or_path=os.path.abspath(a.model))
        tokenizer.save_pretrained(tmp)
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        with open(os.path.join(tmp, OPTIM_FILE), "wb") as f:
            f.write(buf.getvalue())
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
    for old in list_checkpoints(a.out)[: -a.keep_checkpoints]:
        shutil.rmtree(os.path.join(a.out, CKPT_DIR, old), ignore_errors=True)
    return path


_RESUME_KEYS = (
    "model",
    "data",
    "eval_data",
    "eval_split",
    "format",
    "dpo",
    "beta",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "rslora",
    "lora_experts",
    "qlora",
    "train_router",
    "epochs",
    "max_steps",
    "lr",
    "min_lr",
    "schedule",
    "warmup",
    "weight_decay",
    "batch_size",
    "grad_accum",
    "max_length",
    "pack",
    "too_long",
    "seed",
)


def _check_resume(saved: dict[str, Any], a: FinetuneArgs) -> None:
    """A resumed run must see the same data order, model and schedule, else it is not a continuation."""
    diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(a, k)]
    if diff:
        raise ErnieError("--resume with different settings than the checkpoint: " + ", ".join(diff))


def _prepare_out(a: FinetuneArgs, d: Dist) -> str | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into an old one."""
    ckpts = list_checkpoints(a.out)
    if a.resume:
        if not ckpts:
            raise ErnieError(f"--resume: no checkpoint in {os.path.join(a.out, CKPT_DIR)}")
        return os.path.join(a.out, CKPT_DIR, ckpts[-1])
    if os.path.isdir(a.out) and os.listdir(a.out):
        if not a.overwrite:
            raise ErnieError(
                f"output directory {a.out} is not empty (pass --resume to continue it, "
                "or --overwrite to start over)"
            )
        if d.main:
            for name in (CKPT_DIR, FINAL_DIR, LOG_FILE):
                p = os.path.join(a.out, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.unlink(p)
    elif os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ErnieError(f"--out {a.out} exists and is not a directory")
    return None


class Log:
    """log.jsonl: one record per step and eval; on resume, lines past the checkpoint are dropped."""

    def __init__(self, out: str, resume_step: int | None):
        from ernie45.utils import atomic_write_text

        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, LOG_FILE)
        keep = ""
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                keep = "".join(ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step)
        atomic_write_text(self.path, keep)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---- the loop ---------------------------------------------------------------------------------------
def finetune(a: FinetuneArgs) -> dict[str, Any]:
    """Run (or resume) a fine-tuning job; returns a summary (steps, losses, eval metrics, output path)."""
    from ernie45.config import ErnieConfig
    from ernie45.device import resolve_device
    from ernie45.tokenizer import Tokenizer

    _validate(a)
    d, device = init_distributed(resolve_device(a.device))
    try:
        config = ErnieConfig.from_pretrained(a.model)
        tokenizer = Tokenizer.from_pretrained(a.model)
        train, evals = load_data(a, tokenizer, config.vocab_size, d)
        if a.batch_size % d.world:
            raise ErnieError(
                f"--batch-size {a.batch_size} must be divisible by the number of processes ({d.world})"
            )
        resume_dir = _prepare_out(a, d)
        barrier(d)
        bf16 = resolve_bf16(a.bf16, device)
        model = build_model(a, device, bf16, resume_dir)
        ref_model = None
        if a.dpo and a.method == "full":
            from ernie45.checkpoint import load_checkpoint

            ref_model = load_checkpoint(a.model, dtype="float32", device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, a.learning_rate, a.weight_decay)
        state: dict[str, Any] = {}
        if resume_dir:
            with open(os.path.join(resume_dir, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
            _check_resume(state["args"], a)
            try:
                optimizer.load_state_dict(
                    torch.load(os.path.join(resume_dir, OPTIM_FILE), map_location=device, weights_only=True)
                )
            except (OSError, RuntimeError, ValueError) as e:
                raise ErnieError(f"checkpoint {resume_dir}: unreadable optimizer state: {e}") from None
        start = int(state.get("step", 0))
        per_step = a.batch_size * a.grad_accum
        total_steps = a.max_steps or math.ceil((a.epochs or 1) * len(train) / per_step)
        summary = _train_loop(
            a,
            model,
            ref_model,
            optimizer,
            params,
            train,
            evals,
            tokenizer,
            device,
            bf16,
            d,
            start,
            total_steps,
            state,
        )
    finally:
        shutdown(d)
    return summary


def _train_loop(
    a,
    model,
    ref_model,
    optimizer,
    params,
    train,
    evals,
    tokenizer,
    device,
    bf16,
    d,
    start,
    total_steps,
    state,
) -> dict[str, Any]:
    from tqdm import tqdm

    stream = Stream(train, a.seed)
    per_step, local = a.batch_size * a.grad_accum, a.batch_size // d.world
    lr_max = a.learning_rate
    history: list[dict[str, Any]] = list(state.get("history", []))
    metrics: dict[str, float] = dict(state.get("eval", {}))
    log = Log(a.out, start if start else None) if d.main else None
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=f"finetune ({a.method}{', dpo' if a.dpo else ''})",
        unit="step",
        dynamic_ncols=True,
        disable=not (a.progress and d.main),
    )
    t0, wall_before = time.perf_counter(), float(state.get("wall_time_s", 0.0))
    record: dict[str, Any] = {}
    try:
        for step in range(start, total_steps):
            torch.manual_seed(a.seed * 1_000_003 + step * 1009 + d.rank)  # LoRA dropout: replayable on resume
            lr = lr_at(step, total_steps, lr_max, a.min_lr, a.warmup, a.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = [stream[step * per_step + i] for i in range(per_step)]
            n_targets = sum(s.n_targets for s in batch) if not a.dpo else per_step
            stats = torch.zeros(4, dtype=torch.float64, device=device)
            for micro in range(a.grad_accum):
                mine = batch[micro * a.batch_size : (micro + 1) * a.batch_size][
                    d.rank * local : (d.rank + 1) * local
                ]
                if a.dpo:
                    stats += dpo_micro_step(model, ref_model, mine, per_step, a.beta, device, bf16)
                else:
                    stats[:2] += sft_micro_step(model, mine, n_targets, per_step, device, bf16)
            grads = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            all_reduce_sum(grads, d)
            all_reduce_sum([stats], d)
            norm = torch.nn.utils.clip_grad_norm_(
                params, a.max_grad_norm if a.max_grad_norm > 0 else math.inf
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            record = _step_record(a, done, stats, n_targets, lr, float(norm), model)
            if not math.isfinite(record["loss"]):
                raise ErnieError(f"loss became {record['loss']} at step {done}; lower --lr or check the data")
            if evals and ((a.eval_every and done % a.eval_every == 0) or done == total_steps):
                metrics = evaluate(model, ref_model, evals, a, device, bf16, d)
                record.update(metrics)
            history.append({"step": done, "loss": record["loss"]})
            if d.main:
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if a.save_every and done % a.save_every == 0 and done < total_steps:
                    save_training_checkpoint(
                        a,
                        done,
                        model,
                        optimizer,
                        tokenizer,
                        {
                            "step": done,
                            "args": asdict(a),
                            "history": history,
                            "eval": metrics,
                            "wall_time_s": wall_before + time.perf_counter() - t0,
                        },
                    )
    finally:
        bar.close()
        if log is not None:
            log.close()
    summary = {
        "method": a.method,
        "dpo": a.dpo,
        "steps": total_steps,
        "final_loss": record.get("loss"),
        **metrics,
        "world_size": d.world,
        "wall_time_s": wall_before + time.perf_counter() - t0,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "train_records": len(train),
        "eval_records": len(evals),
        "history": history,
        "out": os.path.join(a.out, FINAL_DIR),
    }
    if d.main and start < total_steps:
        _save_final(a, model, tokenizer, {k: v for k, v in summary.items() if k != "history"})
    barrier(d)
    return summary


def _step_record(a, step: int, stats: torch.Tensor, n_targets: int, lr: float, norm: float, model) -> dict:
    if a.dpo:
        n = a.batch_size * a.grad_accum
        rec = {
            "step": step,
            "loss": float(stats[0]) / n,
            "margin": float(stats[1]) / n,
            "accuracy": float(stats[2]) / n,
        }
        aux = float(stats[3])
    else:
        rec = {"step": step, "loss": float(stats[0]) / max(1, n_targets), "tokens": n_targets}
        aux = float(stats[1])
    if model.config.is_moe:
        rec["aux_loss"] = aux
    rec.update(lr=lr, grad_norm=norm)
    return rec


def _save_final(a: FinetuneArgs, model, tokenizer, summary: dict) -> None:
    """final/: the adapter (PEFT layout) or the full model (HF layout, the base checkpoint's dtype)."""
    from ernie45.checkpoint import save_checkpoint
    from ernie45.config import ErnieConfig
    from ernie45.device import resolve_dtype
    from ernie45.train.lora import save_adapter
    from ernie45.utils import atomic_write_text

    path = os.path.join(a.out, FINAL_DIR)
    text = json.dumps(summary, indent=2) + "\n"
    if a.method == "full":
        model.eval()
        model.to(resolve_dtype(ErnieConfig.from_pretrained(a.model).torch_dtype or "float32"))
        save_checkpoint(model, path, tokenizer=tokenizer, overwrite=True, extra_files={SUMMARY_FILE: text})
        return
    save_adapter(model, path, base_model_name_or_path=os.path.abspath(a.model), tokenizer=tokenizer)
    atomic_write_text(os.path.join(path, SUMMARY_FILE), text)


def _validate(a: FinetuneArgs) -> None:
    if not os.path.isdir(a.model):
        raise ErnieError(f"--model: checkpoint directory not found: {a.model}")
    if not os.path.isfile(a.data):
        raise ErnieError(f"--data: file not found: {a.data}")
    if a.eval_data and not os.path.isfile(a.eval_data):
        raise ErnieError(f"--eval-data: file not found: {a.eval_data}")
    if a.epochs is not None and a.max_steps is not None:
        raise ErnieError("give --epochs or --max-steps, not both")
    for name in ("epochs", "max_steps", "lora_rank"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ErnieError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_size", "grad_accum", "keep_checkpoints"):
        if getattr(a, name) < 1:
            raise ErnieError(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_length < 16:
        raise ErnieError("--max-length must be >= 16")
    if a.lr is not None and not a.lr > 0:
        raise ErnieError("--lr must be positive")
    if not 0 <= a.min_lr <= a.learning_rate:
        raise ErnieError("--min-lr must be in [0, --lr]")
    if a.warmup < 0 or a.weight_decay < 0 or a.eval_every < 0 or a.save_every < 0 or a.max_grad_norm < 0:
        raise ErnieError(
            "--warmup, --weight-decay, --eval-every, --save-every and --max-grad-norm must be >= 0"
        )
    if not 0 <= a.eval_split < 1:
        raise ErnieError("--eval-split must be in [0, 1)")
    if not a.beta > 0:
        raise ErnieError("--beta must be positive")
    if a.schedule not in SCHEDULES:
        raise ErnieError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if a.format not in FORMATS or a.too_long not in TOO_LONG:
        raise ErnieError(
            f"--format must be one of {', '.join(FORMATS)}; --too-long one of {', '.join(TOO_LONG)}"
        )
    if a.bf16 not in ("auto", "on", "off"):
        raise ErnieError("--bf16 must be auto, on or off")
    if a.dpo and a.pack:
        raise ErnieError("--pack does not apply to --dpo (pairs are scored separately)")
    if a.train_router and a.method != "full":
        raise ErnieError("--train-router needs full fine-tuning (LoRA never adapts the router)")
    lora_only = {
        "lora_alpha": a.lora_alpha,
        "target_modules": a.target_modules,
        "rslora": a.rslora or None,
        "lora_experts": a.lora_experts or None,
        "lora_dropout": a.lora_dropout or None,
    }
    used = [k for k, v in lora_only.items() if v is not None]
    if a.method == "full" and used:
        raise ErnieError(f"--{used[0].replace('_', '-')} needs --lora-rank (or --qlora)")


# ---- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 finetune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="base checkpoint directory (HF layout, with tokenizer)")
    p.add_argument(
        "--data",
        required=True,
        help="training jsonl (chat messages, ERNIEKit src/tgt, Alpaca; prompt/chosen/rejected with --dpo)",
    )
    p.add_argument("--out", help="run directory: checkpoints/, log.jsonl, final/")
    p.add_argument(
        "--validate",
        action="store_true",
        help="only check --data and list every bad record with its line number (exit 1 if any)",
    )
    p.add_argument("--eval-data", help="held-out jsonl evaluated every --eval-every steps and at the end")
    p.add_argument("--eval-split", type=float, default=0.0, help="hold out this fraction of --data for eval")
    p.add_argument("--format", choices=FORMATS, default="auto", help="record format (auto: per record)")
    g = p.add_argument_group("LoRA / QLoRA (omit --lora-rank and --qlora for full fine-tuning)")
    g.add_argument("--lora-rank", type=int, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2*r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear (default: all)",
    )
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    g.add_argument("--lora-experts", action="store_true", help="also adapt MoE routed experts")
    g.add_argument(
        "--qlora", action="store_true", help="NF4 4-bit base (bitsandbytes) + LoRA (rank 8 default)"
    )
    p.add_argument("--dpo", action="store_true", help="DPO on preference pairs instead of SFT")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--train-router", action="store_true", help="full fine-tuning: also train the MoE router")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    n.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 1e-5 full; /4 and /10 for DPO)"
    )
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="sequences (pairs) per micro-batch, all processes"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=2048, help="max tokens per sequence (and packed row)")
    p.add_argument("--pack", action="store_true", help="pack several examples into each row")
    p.add_argument(
        "--too-long",
        choices=TOO_LONG,
        default="skip",
        help="records over --max-length: skip (listed), truncate, or error",
    )
    p.add_argument(
        "--skip-bad-lines", action="store_true", help="skip (and list) malformed records instead of stopping"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers to save memory")
    p.add_argument("--eval-every", type=int, default=0, help="eval every N steps (always at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 compute (and bf16 frozen base for LoRA)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _validate_only(ns) -> int:
    from ernie45.train.data import validate_file

    tokenizer = None
    if ns.model:
        from ernie45.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(ns.model)
    problems = validate_file(ns.data, tokenizer, ns.max_length if tokenizer else None, ns.format, ns.dpo)
    for prob in problems:
        print(f"{ns.data}: {prob}")
    checked = "records and lengths" if tokenizer else "records (pass --model to check lengths too)"
    print(f"{ns.data}: {len(problems)} problem(s); checked {checked}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.validate:
        return _validate_only(ns)
    if not ns.model or not ns.out:
        raise ErnieError("--model and --out are required (only --validate works without them)")
    # Every option's dest is the FinetuneArgs field of the same name.
    args = FinetuneArgs(**{f.name: getattr(ns, f.name) for f in fields(FinetuneArgs)})
    s = finetune(args)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = "".join(
            f", {k.replace('_', ' ')} {s[k]:.4f}"
            for k in ("eval_loss", "eval_margin", "eval_accuracy")
            if k in s
        )
        print(
            f"trained {s['steps']} steps ({s['method']}{', dpo' if s['dpo'] else ''}) in {s['wall_time_s']:.0f}s: "
            f"loss {s['final_loss']:.4f}{ev}; output in {s['out']}"
        )
    return 0
