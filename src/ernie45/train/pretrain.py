"""`ernie45 pretrain`: next-token (continued) pre-training on packed shards from `ernie45 preprocess`.

Deterministic by construction: the sample order is a seeded permutation per epoch, so the data position
is a function of the optimizer step alone, and a resumed run replays exactly the batches (and therefore
the loss curve) of an uninterrupted one. Data parallel under `torchrun`: each optimizer step consumes the
same global batch whatever the world size; every rank takes an equal slice of each micro-batch and the
gradients are averaged with one all-reduce, so N processes compute the same update as one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ernie45.commands import add_out_arg
from ernie45.errors import ErnieError
from ernie45.train import core
from ernie45.train.distributed import Dist, all_reduce_sum, barrier, init_distributed
from ernie45.train.schedule import SCHEDULES


@dataclass
class PretrainArgs(core.RunArgs):
    """Everything a run depends on (saved in each checkpoint; `--resume` checks the data-affecting ones)."""

    data: list[str]
    out: str
    eval_data: list[str] = field(default_factory=list)
    config: str | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    data_weights: list[int] | None = None
    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    min_lr: float | None = None
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    log: str = "jsonl"
    mtp: str | None = None  # "head" (train the MTP layer on the frozen model) or "joint"; ernie45.mtp.mtp_loss
    mtp_weight: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)


# ---- data -------------------------------------------------------------------------------------------
class Mixture:
    """The train samples of several shard directories; source i appears `weights[i]` times per epoch.

    Integer repetition (rather than random sampling) keeps an epoch a fixed, seed-determined list.
    """

    def __init__(self, datasets: list, weights: list[int], seed: int):
        self.datasets, self.seed = datasets, seed
        self.seq_len = datasets[0].seq_len
        self._index = np.concatenate(
            [
                np.stack([np.full(len(d), k), np.arange(len(d))], 1)
                for k, (d, w) in enumerate(zip(datasets, weights))
                for _ in range(w)
            ]
        )  # (epoch_len, 2): (source, sample)
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self._index)

    def sample(self, position: int) -> tuple[np.ndarray, int]:
        """The `position`-th sample of the endless shuffled stream: (tokens [seq_len], valid length)."""
        epoch, i = divmod(position, len(self))
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = core.epoch_order(len(self), self.seed, epoch).numpy(), epoch
        src, j = self._index[self._perm[i]]
        ds = self.datasets[src]
        return ds[j], ds.valid_length(j)


def open_splits(data: list[str], weights: list[int] | None, seed: int, eval_data: list[str] = ()):
    """(train Mixture, list of eval PackedDatasets); clear errors for a missing or empty directory.

    Evaluation covers the val split of each `data` directory and every sample of each `eval_data` one.
    """
    from ernie45.data.shards import PackedDataset

    if not data:
        raise ErnieError("--data: give at least one `ernie45 preprocess` output directory")
    weights = list(weights) if weights else [1] * len(data)
    if len(weights) != len(data):
        raise ErnieError(f"--data-weights has {len(weights)} values for {len(data)} --data directories")
    if any(w < 1 for w in weights):
        raise ErnieError("--data-weights must be positive integers")
    trains, vals = [], []
    for d in [*data, *eval_data]:
        if not os.path.exists(d):
            raise ErnieError(f"data directory not found: {d}")
        if not os.path.isdir(d):
            raise ErnieError(f"--data must be a directory written by `ernie45 preprocess`: {d}")
        if not os.listdir(d):
            raise ErnieError(f"data directory is empty: {d} (run `ernie45 preprocess` first)")
        train = PackedDataset(d, "train")
        if d not in data:
            vals.append(train)
            continue
        if len(train) == 0:
            raise ErnieError(f"{d} has no training samples (is the corpus empty?)")
        trains.append(train)
        with contextlib.suppress(ErnieError):
            val = PackedDataset(d, "val")
            if len(val):
                vals.append(val)
    if len({t.seq_len for t in trains}) > 1:
        raise ErnieError("all --data directories must have the same seq_len")
    return Mixture(trains, weights, seed), vals


def make_batch(
    samples: list[tuple[np.ndarray, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S] int64, labels [B, S] with the padding of a split's last sample set to -100)."""
    ids = torch.from_numpy(np.stack([s for s, _ in samples]).astype(np.int64))  # (B, S)
    labels = ids.clone()
    for row, (_, n) in enumerate(samples):
        labels[row, n:] = -100
    return ids.to(device), labels.to(device)


# ---- distributed ------------------------------------------------------------------------------------
def all_reduce_mean(tensors: list[torch.Tensor], d: Dist) -> None:
    """Average tensors across ranks in place (one flat all-reduce per step)."""
    if d.world == 1:
        return
    all_reduce_sum(tensors, d)
    for t in tensors:
        t /= d.world


# ---- model / optimizer ------------------------------------------------------------------------------
def resolve_config(spec: str, tokenizer=None):
    """A preset name or a JSON file (config.json or a dict of overrides on top of a `preset` key)."""
    from ernie45.config import PRESETS, ErnieConfig, preset

    if spec in PRESETS:
        cfg = preset(spec)
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ErnieError(f"cannot read config {spec}: {e}") from None
        if not isinstance(d, dict):
            raise ErnieError(f"config {spec} must hold a JSON object")
        cfg = preset(d.pop("preset"), **d) if "preset" in d else ErnieConfig.from_dict(d)
    elif os.path.isdir(spec):
        cfg = ErnieConfig.from_pretrained(spec)
    else:
        raise ErnieError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    if tokenizer is not None:
        sep = tokenizer.convert_tokens_to_ids("<|end_of_sentence|>")
        eos = [tokenizer.eos_token_id] + ([sep] if sep is not None and sep != tokenizer.eos_token_id else [])
        cfg = cfg.replace(vocab_size=len(tokenizer), eos_token_id=eos if len(eos) > 1 else eos[0])
    return cfg


# ---- the loop ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model, vals: list, batch_size: int, max_batches: int, device: torch.device, bf16: bool, d: Dist
) -> float:
    """Mean next-token loss (LM only, no aux) over the first batches of each eval split, token-weighted."""
    from ernie45.model import causal_lm_loss

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    for ds in vals:
        batches = 0
        for start in range(0, len(ds), batch_size):
            if batches >= max_batches:
                break
            idx = [i for i in range(start, min(start + batch_size, len(ds))) if i % d.world == d.rank]
            batches += 1
            if not idx:
                continue
            ids, labels = make_batch([(ds[i], ds.valid_length(i)) for i in idx], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(ids).logits
            n = int((labels[:, 1:] != -100).sum())
            total[0] += causal_lm_loss(logits, labels).double() * n
            total[1] += n
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1]) if total[1] else float("nan")


def pretrain(a: PretrainArgs) -> dict[str, Any]:
    """Run (or resume) a pre-training job; returns a summary (steps, losses, wall time, eval ppl)."""
    from ernie45.checkpoint import build_model, load_checkpoint, save_checkpoint
    from ernie45.device import resolve_device
    from ernie45.tokenizer import Tokenizer

    _validate(a)
    device = resolve_device(a.device)
    d, device = init_distributed(device)
    if a.batch_size % d.world:
        raise ErnieError(
            f"--batch-size {a.batch_size} must be divisible by the number of processes ({d.world})"
        )
    train, vals = open_splits(a.data, a.data_weights, a.seed, a.eval_data)
    min_lr = a.lr * 0.1 if a.min_lr is None else a.min_lr
    bf16 = core.use_bf16(a.bf16, device)
    resume_dir = core.prepare_run_dir(a.out, a.resume, a.overwrite, d.main)
    barrier(d)

    tokenizer, prior = None, {}
    if resume_dir:
        prior = core.read_state(resume_dir)
        _check_resume(prior["args"], a)
        model = load_checkpoint(resume_dir, dtype="float32", device=device)
        if os.path.isfile(os.path.join(resume_dir, "tokenizer.model")):
            tokenizer = Tokenizer.from_pretrained(resume_dir)
    else:
        tok_dir = a.tokenizer or a.init_from
        if tok_dir and os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
            tokenizer = Tokenizer.from_pretrained(tok_dir)
        elif a.tokenizer:
            raise ErnieError(f"--tokenizer {a.tokenizer}: no tokenizer.model there")
        if a.init_from:
            model = load_checkpoint(a.init_from, dtype="float32", device=device)
        else:
            model = build_model(resolve_config(a.config, tokenizer), torch.float32, device)
            model.init_weights(std=0.02, seed=a.seed)
    model.requires_grad_(True)
    if a.mtp:
        from ernie45.mtp import has_mtp, init_mtp, mtp_parameters_of

        if not has_mtp(model):
            init_mtp(model, seed=a.seed)
        if a.mtp in ("head", "distill"):  # only the MTP layer trains (the optimizer takes those that need grads)
            model.requires_grad_(False)
            for p in mtp_parameters_of(model):
                p.requires_grad_(True)
    model.train()
    vocab = model.config.vocab_size
    for ds in train.datasets:
        top = int(max(int(np.max(ds[i])) for i in range(min(len(ds), 256))))
        if top >= vocab:
            raise ErnieError(
                f"the data has token id {top} but the model's vocab_size is {vocab}: "
                "preprocess with the model's tokenizer"
            )
    optimizer = core.build_optimizer(model, a.lr, a.weight_decay)
    if resume_dir:
        core.restore_optimizer(resume_dir, optimizer, device)
    else:
        torch.manual_seed(a.seed)

    write_weights = functools.partial(save_checkpoint, model, tokenizer=tokenizer, overwrite=True)
    params = [p for p in model.parameters() if p.requires_grad]
    global_batch = a.batch_size * a.grad_accum
    local = a.batch_size // d.world
    tokens_per_step = global_batch * train.seq_len
    start_step = int(prior.get("step", 0))
    log = core.StepLog(
        a.out, prior, a.steps, "pretrain", d.main, a.progress, tensorboard=a.log == "tensorboard"
    )
    eval_loss = prior.get("eval_loss")
    loss_val = log.history[-1]["loss"] if log.history else float("nan")
    try:
        for step in range(start_step, a.steps):
            t_step = time.perf_counter()
            lr = core.schedule_lr(optimizer, step, a.steps, a.lr, min_lr, a.warmup, a.schedule)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(a.grad_accum):
                first = (step * a.grad_accum + micro) * a.batch_size
                batch = [train.sample(first + i) for i in range(a.batch_size)]  # the global micro-batch
                mine = batch[d.rank * local : (d.rank + 1) * local]
                ids, labels = make_batch(mine, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    if a.mtp:
                        from ernie45.mtp import mtp_loss

                        loss = mtp_loss(model, ids, labels, a.mtp, a.mtp_weight)
                    else:
                        loss = model(ids, labels=labels).loss
                # Weight this rank's mean by its share of the micro-batch's targets, so that the average over
                # ranks is the global token mean even when a padded sample makes the shares unequal.
                share = _targets(mine) * d.world / max(_targets(batch), 1)
                loss = loss * share
                (loss / a.grad_accum).backward()
                loss_sum += loss.detach().double()
            grads = [p.grad for p in params if p.grad is not None]
            all_reduce_mean(grads + [loss_sum], d)
            grad_norm = core.optimizer_step(optimizer, params, a.max_grad_norm)
            loss_val = float(loss_sum) / a.grad_accum
            dt = time.perf_counter() - t_step
            done = step + 1
            core.check_finite(loss_val, done)
            record = {
                "step": done,
                "loss": loss_val,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / dt if dt > 0 else 0.0,
            }
            if vals and ((a.eval_every > 0 and done % a.eval_every == 0) or done == a.steps):
                eval_loss = evaluate(model, vals, a.batch_size, a.eval_batches, device, bf16, d)
                record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50.0)))
            log.write(record, loss=f"{loss_val:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if d.main and a.save_every > 0 and done % a.save_every == 0 and done < a.steps:
                state = _trainer_state(a, done, log, eval_loss)
                core.save_step(a.out, done, write_weights, optimizer, state, a.keep_checkpoints)
    finally:
        log.close()
    summary = {
        "steps": a.steps,
        "final_loss": loss_val,
        "eval_loss": eval_loss,
        "eval_ppl": math.exp(eval_loss) if eval_loss is not None else None,
        "wall_time_s": log.wall_time_s,
        "tokens_seen": a.steps * tokens_per_step,
        "world_size": d.world,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "history": log.history,
    }
    if d.main and start_step < a.steps:
        core.save_step(
            a.out,
            a.steps,
            write_weights,
            optimizer,
            _trainer_state(a, a.steps, log, eval_loss),
            a.keep_checkpoints,
        )
        core.save_final(a.out, write_weights, summary)
    return summary


def _targets(samples: list[tuple[np.ndarray, int]]) -> int:
    """Next-token targets in a list of (tokens, valid length) samples (labels are shifted by one)."""
    return sum(max(n - 1, 0) for _, n in samples)


def _trainer_state(a: PretrainArgs, step: int, log: core.StepLog, eval_loss) -> dict[str, Any]:
    samples = step * a.batch_size * a.grad_accum
    return core.trainer_state(
        step, a, log.history, log.wall_time_s, samples_seen=samples, eval_loss=eval_loss
    )


_RESUME_KEYS = (
    "data",
    "data_weights",
    "eval_data",
    "batch_size",
    "grad_accum",
    "seed",
    "lr",
    "min_lr",
    "schedule",
    "warmup",
)


def _check_resume(saved: dict[str, Any], a: PretrainArgs) -> None:
    """A resumed run must see the same data order and schedule, else its curve is not a continuation."""
    also = ()
    if saved.get("schedule") == "cosine" and saved.get("steps") != a.steps:
        also = ("steps (the cosine schedule depends on it; use --schedule wsd to extend runs)",)
    core.check_resume(saved, a, _RESUME_KEYS, also)


def _validate(a: PretrainArgs) -> None:
    if (a.config is None) == (a.init_from is None) and not a.resume:
        raise ErnieError("give exactly one of --config (train from scratch) or --model (continue training)")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(a, name) < 1:
            raise ErnieError(f"--{name.replace('_', '-')} must be >= 1")
    if not a.lr > 0:
        raise ErnieError("--lr must be positive")
    if a.min_lr is not None and not 0 <= a.min_lr <= a.lr:
        raise ErnieError("--min-lr must be in [0, --lr]")
    if a.warmup < 0 or a.weight_decay < 0 or a.eval_every < 0 or a.save_every < 0:
        raise ErnieError("--warmup, --weight-decay, --eval-every and --save-every must be >= 0")
    if a.schedule not in SCHEDULES:
        raise ErnieError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if a.log not in ("jsonl", "tensorboard"):
        raise ErnieError(f"--log must be jsonl or tensorboard, got {a.log!r}")
    if a.init_from is not None and not os.path.isdir(a.init_from):
        raise ErnieError(f"--model: checkpoint directory not found: {a.init_from}")
    if a.mtp not in (None, "head", "distill", "joint"):
        raise ErnieError(f"--mtp must be head, distill or joint, got {a.mtp!r}")
    if a.mtp in ("head", "distill") and a.init_from is None and not a.resume:
        raise ErnieError(f"--mtp {a.mtp} trains the MTP layer of a trained model: give --model DIR")
    if not a.mtp_weight > 0:
        raise ErnieError("--mtp-weight must be positive")


# ---- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 pretrain", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="DIR",
        help="`ernie45 preprocess` output directories (train split trained on, val split evaluated)",
    )
    p.add_argument(
        "--data-weights",
        nargs="+",
        type=int,
        metavar="N",
        help="repeat each --data directory N times per epoch (oversampling; default 1 each)",
    )
    p.add_argument(
        "--eval-data",
        nargs="+",
        default=[],
        metavar="DIR",
        help="held-out preprocess outputs: all their samples are evaluated, never trained on",
    )
    add_out_arg(p, "run directory: checkpoints/, log.jsonl, final/")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="a preset (tiny, tiny-moe, 0.3b, ...) or a config JSON file")
    src.add_argument("--model", dest="init_from", metavar="DIR", help="continue pre-training this checkpoint")
    src.add_argument("--init-from", dest="init_from", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--tokenizer", help="tokenizer directory (sets vocab_size; copied into checkpoints)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, over all processes")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200, help="val loss every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--log", choices=("jsonl", "tensorboard"), default="jsonl")
    p.add_argument("--mtp", default=None, metavar="MODE",
                   help="train a multi-token-prediction layer (the draft head of --speculative mtp; added when the "
                   "model has none): head = only the layer, on the frozen --model, against the data; distill = the "
                   "same against the model's own next-token distribution (what drafts must match); joint = with the "
                   "model, loss + --mtp-weight x MTP loss")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss with --mtp joint")
    core.add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = core.args_from(PretrainArgs, build_parser().parse_args(argv))
    s = pretrain(args)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = (
            f", eval loss {s['eval_loss']:.4f} (ppl {s['eval_ppl']:.2f})"
            if s["eval_loss"] is not None
            else ""
        )
        print(
            f"trained {s['steps']} steps in {s['wall_time_s']:.0f}s: loss {s['final_loss']:.4f}{ev}; "
            f"model in {os.path.join(args.out, core.FINAL_DIR)}"
        )
    return 0
