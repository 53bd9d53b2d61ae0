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
import math
import os
import sys
from typing import Any

import torch

from ernie45.commands import add_model_arg, add_out_arg
from ernie45.errors import ErnieError
from ernie45.train import core
from ernie45.train.data import FORMATS, TOO_LONG
from ernie45.train.distributed import Dist, all_reduce_sum, barrier, init_distributed, shutdown
from ernie45.train.finetune_args import FinetuneArgs
from ernie45.train.finetune_model import build_model, weights_writer
from ernie45.train.objectives import dpo_micro_step, evaluate, sft_micro_step
from ernie45.train.schedule import SCHEDULES


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
            self._perm, self._epoch = core.epoch_order(len(self.items), self.seed, epoch).tolist(), epoch
        return self.items[self._perm[i]]


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
        resume_dir = core.prepare_run_dir(a.out, a.resume, a.overwrite, d.main)
        barrier(d)
        bf16 = core.use_bf16(a.bf16, device)
        model = build_model(a, device, bf16, resume_dir)
        ref_model = None
        if a.dpo and a.method == "full":
            from ernie45.checkpoint import load_checkpoint

            ref_model = load_checkpoint(a.model, dtype="float32", device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = core.build_optimizer(model, a.learning_rate, a.weight_decay, betas=(0.9, 0.999))
        state: dict[str, Any] = {}
        if resume_dir:
            state = core.read_state(resume_dir)
            core.check_resume(state["args"], a, _RESUME_KEYS)
            core.restore_optimizer(resume_dir, optimizer, device)
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
            total_steps,
            state,
        )
    finally:
        shutdown(d)
    return summary


def _train_loop(
    a, model, ref_model, optimizer, params, train, evals, tokenizer, device, bf16, d, total_steps, state
) -> dict[str, Any]:
    stream = Stream(train, a.seed)
    per_step, local = a.batch_size * a.grad_accum, a.batch_size // d.world
    start = int(state.get("step", 0))
    metrics: dict[str, float] = dict(state.get("eval", {}))
    desc = f"finetune ({a.method}{', dpo' if a.dpo else ''})"
    log = core.StepLog(a.out, state, total_steps, desc, d.main, a.progress)
    write_weights = weights_writer(a, model, tokenizer)
    record: dict[str, Any] = {}
    try:
        for step in range(start, total_steps):
            torch.manual_seed(a.seed * 1_000_003 + step * 1009 + d.rank)  # LoRA dropout: replayable on resume
            lr = core.schedule_lr(
                optimizer, step, total_steps, a.learning_rate, a.min_lr, a.warmup, a.schedule
            )
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
            norm = core.optimizer_step(optimizer, params, a.max_grad_norm)
            done = step + 1
            record = _step_record(a, done, stats, n_targets, lr, norm, model)
            core.check_finite(record["loss"], done)
            if evals and ((a.eval_every and done % a.eval_every == 0) or done == total_steps):
                metrics = evaluate(model, ref_model, evals, a, device, bf16, d)
                record.update(metrics)
            log.write(record, loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if d.main and a.save_every and done % a.save_every == 0 and done < total_steps:
                state = core.trainer_state(done, a, log.history, log.wall_time_s, eval=metrics)
                core.save_step(a.out, done, write_weights, optimizer, state, a.keep_checkpoints)
    finally:
        log.close()
    summary = {
        "method": a.method,
        "dpo": a.dpo,
        "steps": total_steps,
        "final_loss": record.get("loss"),
        **metrics,
        "world_size": d.world,
        "wall_time_s": log.wall_time_s,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "train_records": len(train),
        "eval_records": len(evals),
        "history": log.history,
        "out": os.path.join(a.out, core.FINAL_DIR),
    }
    if d.main and start < total_steps:
        if a.method == "full":
            model.eval()
            model.to(core.stored_dtype(a.model))  # final/ keeps the base checkpoint's dtype
        core.save_final(a.out, write_weights, summary)
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
    if a.bf16 not in core.BF16_MODES:
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
    add_model_arg(p, "base checkpoint directory (HF layout, with tokenizer)", required=False)
    p.add_argument(
        "--data",
        required=True,
        help="training jsonl (chat messages, ERNIEKit src/tgt, Alpaca; prompt/chosen/rejected with --dpo)",
    )
    add_out_arg(p, "run directory: checkpoints/, log.jsonl, final/", required=False)
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
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--batch-size", type=int, default=8, help="sequences (pairs) per micro-batch, all processes"
    )
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
    core.add_run_args(p, bf16_help="bf16 compute (and bf16 frozen base for LoRA)")
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
    s = finetune(core.args_from(FinetuneArgs, ns))
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
