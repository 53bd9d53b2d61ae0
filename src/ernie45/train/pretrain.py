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
import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ernie45.errors import ErnieError
from ernie45.train.distributed import Dist, all_reduce_sum, init_distributed
from ernie45.train.schedule import SCHEDULES, lr_at

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"
LOG_FILE = "log.jsonl"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


@dataclass
class PretrainArgs:
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
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float | None = None
    schedule: str = "cosine"
    warmup: int = 100
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    bf16: str = "auto"
    log: str = "jsonl"
    device: str = "auto"
    progress: bool = True
    overwrite: bool = False
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
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self), generator=g).numpy()
            self._perm_epoch = epoch
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


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on norms, biases and the router correction bias (GPT convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def use_bf16(mode: str, device: torch.device) -> bool:
    from ernie45.device import cpu_has_fast_bf16

    if mode not in ("auto", "on", "off"):
        raise ErnieError(f"--bf16 must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    if mode == "on":
        if not supported:
            raise ErnieError("--bf16 on: this GPU does not support bfloat16")
        return True
    return supported if device.type == "cuda" else cpu_has_fast_bf16()


# ---- checkpoints ------------------------------------------------------------------------------------
def _state_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_training_checkpoint(
    out: str, step: int, model, optimizer, state: dict[str, Any], tokenizer, keep: int
) -> str:
    """Write checkpoints/step-NNNNNNN atomically (fp32 weights, optimizer, RNG, data position)."""
    from ernie45.checkpoint import save_checkpoint

    path = os.path.join(out, CKPT_DIR, f"step-{step:07d}")
    extra = {STATE_FILE: json.dumps(state, indent=2) + "\n"}
    save_checkpoint(model, path, tokenizer=tokenizer, overwrite=True, extra_files=extra)
    # The optimizer file goes in after the atomic model dir exists; the state file names it, so a
    # checkpoint without it is detected as incomplete rather than silently used.
    from ernie45.utils import atomic_write_bytes

    atomic_write_bytes(
        os.path.join(path, OPTIM_FILE),
        _state_bytes({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}),
    )
    ckpts = list_checkpoints(out)
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out, CKPT_DIR, old), ignore_errors=True)
    return path


def list_checkpoints(out: str) -> list[str]:
    d = os.path.join(out, CKPT_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(
        n for n in os.listdir(d) if n.startswith("step-") and os.path.isfile(os.path.join(d, n, OPTIM_FILE))
    )


def load_training_checkpoint(path: str, device: torch.device):
    """(model in fp32 train mode, optimizer payload, trainer state) of a checkpoint directory."""
    from ernie45.checkpoint import load_checkpoint

    model = load_checkpoint(path, dtype="float32", device=device)
    try:
        payload = torch.load(os.path.join(path, OPTIM_FILE), map_location=device, weights_only=True)
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, RuntimeError, json.JSONDecodeError) as e:
        raise ErnieError(f"checkpoint {path} is unreadable: {e}") from None
    return model, payload, state


# ---- logging ----------------------------------------------------------------------------------------
class Logger:
    """JSONL always (one record per step / eval); TensorBoard scalars too with `--log tensorboard`."""

    def __init__(self, out: str, kind: str, resume_step: int | None):
        if kind not in ("jsonl", "tensorboard"):
            raise ErnieError(f"--log must be jsonl or tensorboard, got {kind!r}")
        self.path = os.path.join(out, LOG_FILE)
        if resume_step is not None and os.path.isfile(self.path):
            # Drop what a crashed run logged past the checkpoint, so the log is one clean curve.
            with open(self.path, encoding="utf-8") as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            from ernie45.utils import atomic_write_text

            atomic_write_text(self.path, "".join(keep))
        elif os.path.exists(self.path):
            os.unlink(self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ErnieError(
                    "--log tensorboard needs the `tensorboard` package (pip install 'ernie45[train]')"
                ) from None
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
    from tqdm import tqdm

    from ernie45.checkpoint import build_model, save_checkpoint
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
    bf16 = use_bf16(a.bf16, device)

    start_step, tokenizer, payload, prior = 0, None, None, {}
    ckpts = list_checkpoints(a.out) if a.resume else []
    if a.resume and not ckpts:
        raise ErnieError(f"--resume: no checkpoint in {os.path.join(a.out, CKPT_DIR)}")
    if ckpts:
        path = os.path.join(a.out, CKPT_DIR, ckpts[-1])
        model, payload, prior = load_training_checkpoint(path, device)
        _check_resume(prior["args"], a)
        start_step = int(prior["step"])
        tokenizer = (
            Tokenizer.from_pretrained(path) if os.path.isfile(os.path.join(path, "tokenizer.model")) else None
        )
    else:
        if d.main and os.path.isdir(a.out) and os.listdir(a.out) and not a.overwrite:
            raise ErnieError(
                f"output directory {a.out} is not empty (pass --resume to continue it, "
                "or --overwrite to start over)"
            )
        tok_dir = a.tokenizer or a.init_from
        if tok_dir and os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
            tokenizer = Tokenizer.from_pretrained(tok_dir)
        elif a.tokenizer:
            raise ErnieError(f"--tokenizer {a.tokenizer}: no tokenizer.model there")
        if a.init_from:
            from ernie45.checkpoint import load_checkpoint

            model = load_checkpoint(a.init_from, dtype="float32", device=device)
        else:
            model = build_model(resolve_config(a.config, tokenizer), torch.float32, device)
            model.init_weights(std=0.02, seed=a.seed)
    model.requires_grad_(True)
    model.train()
    vocab = model.config.vocab_size
    for ds in train.datasets:
        top = int(max(int(np.max(ds[i])) for i in range(min(len(ds), 256))))
        if top >= vocab:
            raise ErnieError(
                f"the data has token id {top} but the model's vocab_size is {vocab}: "
                "preprocess with the model's tokenizer"
            )
    optimizer = build_optimizer(model, a.lr, a.weight_decay)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"].cpu())
    else:
        torch.manual_seed(a.seed)

    if d.main and not ckpts:
        if os.path.isdir(a.out):
            shutil.rmtree(os.path.join(a.out, CKPT_DIR), ignore_errors=True)
        os.makedirs(a.out, exist_ok=True)
    logger = Logger(a.out, a.log, start_step if ckpts else None) if d.main else None
    params = [p for p in model.parameters() if p.requires_grad]
    global_batch = a.batch_size * a.grad_accum
    local = a.batch_size // d.world
    tokens_per_step = global_batch * train.seq_len
    history: list[dict[str, Any]] = list(prior.get("history", []))
    bar = tqdm(
        total=a.steps,
        initial=start_step,
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
        disable=not (a.progress and d.main),
    )
    t0 = time.perf_counter()
    wall_before = float(prior.get("wall_time_s", 0.0))
    eval_loss = prior.get("eval_loss")
    loss_val = history[-1]["loss"] if history else float("nan")
    try:
        for step in range(start_step, a.steps):
            t_step = time.perf_counter()
            lr = lr_at(step, a.steps, a.lr, min_lr, a.warmup, a.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(a.grad_accum):
                first = (step * a.grad_accum + micro) * a.batch_size
                batch = [train.sample(first + i) for i in range(a.batch_size)]  # the global micro-batch
                mine = batch[d.rank * local : (d.rank + 1) * local]
                ids, labels = make_batch(mine, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(ids, labels=labels).loss
                # Weight this rank's mean by its share of the micro-batch's targets, so that the average over
                # ranks is the global token mean even when a padded sample makes the shares unequal.
                share = _targets(mine) * d.world / max(_targets(batch), 1)
                loss = loss * share
                (loss / a.grad_accum).backward()
                loss_sum += loss.detach().double()
            grads = [p.grad for p in params if p.grad is not None]
            all_reduce_mean(grads + [loss_sum], d)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, a.max_grad_norm if a.max_grad_norm > 0 else math.inf
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_val = float(loss_sum) / a.grad_accum
            dt = time.perf_counter() - t_step
            record = {
                "step": step + 1,
                "loss": loss_val,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step / dt if dt > 0 else 0.0,
            }
            if not math.isfinite(loss_val):
                raise ErnieError(f"loss became {loss_val} at step {step + 1}; lower --lr or check the data")
            done = step + 1
            if vals and ((a.eval_every > 0 and done % a.eval_every == 0) or done == a.steps):
                eval_loss = evaluate(model, vals, a.batch_size, a.eval_batches, device, bf16, d)
                record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50.0)))
            history.append({k: record[k] for k in ("step", "loss") if k in record})
            if d.main:
                logger.write(record)
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            if d.main and a.save_every > 0 and done % a.save_every == 0 and done < a.steps:
                state = _trainer_state(a, done, history, eval_loss, wall_before + time.perf_counter() - t0)
                save_training_checkpoint(a.out, done, model, optimizer, state, tokenizer, a.keep_checkpoints)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    wall = wall_before + time.perf_counter() - t0
    summary = {
        "steps": a.steps,
        "final_loss": loss_val,
        "eval_loss": eval_loss,
        "eval_ppl": math.exp(eval_loss) if eval_loss is not None else None,
        "wall_time_s": wall,
        "tokens_seen": a.steps * tokens_per_step,
        "world_size": d.world,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    if d.main and start_step < a.steps:
        state = _trainer_state(a, a.steps, history, eval_loss, wall)
        save_training_checkpoint(a.out, a.steps, model, optimizer, state, tokenizer, a.keep_checkpoints)
        save_checkpoint(
            model,
            os.path.join(a.out, FINAL_DIR),
            tokenizer=tokenizer,
            overwrite=True,
            extra_files={
                "training_summary.json": json.dumps(
                    {k: v for k, v in summary.items() if k != "history"}, indent=2
                )
                + "\n"
            },
        )
    return summary


def _targets(samples: list[tuple[np.ndarray, int]]) -> int:
    """Next-token targets in a list of (tokens, valid length) samples (labels are shifted by one)."""
    return sum(max(n - 1, 0) for _, n in samples)


def _trainer_state(a: PretrainArgs, step: int, history, eval_loss, wall: float) -> dict[str, Any]:
    return {
        "step": step,
        "samples_seen": step * a.batch_size * a.grad_accum,
        "args": asdict(a),
        "history": history,
        "eval_loss": eval_loss,
        "wall_time_s": wall,
    }


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
    "steps",
)


def _check_resume(saved: dict[str, Any], a: PretrainArgs) -> None:
    """A resumed run must see the same data order and schedule, else its curve is not a continuation."""
    diff = [k for k in _RESUME_KEYS if k != "steps" and saved.get(k) != getattr(a, k)]
    if saved.get("schedule") == "cosine" and saved.get("steps") != a.steps:
        diff.append("steps (the cosine schedule depends on it; use --schedule wsd to extend runs)")
    if diff:
        raise ErnieError("--resume with different settings than the checkpoint: " + ", ".join(diff))


def _validate(a: PretrainArgs) -> None:
    if (a.config is None) == (a.init_from is None) and not a.resume:
        raise ErnieError(
            "give exactly one of --config (train from scratch) or --init-from (continue training)"
        )
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
    if a.init_from is not None and not os.path.isdir(a.init_from):
        raise ErnieError(f"--init-from: checkpoint directory not found: {a.init_from}")


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
    p.add_argument("--out", required=True, help="run directory: checkpoints/, log.jsonl, final/")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="a preset (tiny, tiny-moe, 0.3b, ...) or a config JSON file")
    src.add_argument("--init-from", metavar="CHECKPOINT", help="continue pre-training this checkpoint")
    p.add_argument("--tokenizer", help="tokenizer directory (sets vocab_size; copied into checkpoints)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, over all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--eval-every", type=int, default=200, help="val loss every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 autocast")
    p.add_argument("--log", choices=("jsonl", "tensorboard"), default="jsonl")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    args = PretrainArgs(
        data=ns.data,
        data_weights=ns.data_weights,
        eval_data=ns.eval_data,
        out=ns.out,
        config=ns.config,
        init_from=ns.init_from,
        tokenizer=ns.tokenizer,
        steps=ns.steps,
        batch_size=ns.batch_size,
        grad_accum=ns.grad_accum,
        lr=ns.lr,
        min_lr=ns.min_lr,
        schedule=ns.schedule,
        warmup=ns.warmup,
        weight_decay=ns.weight_decay,
        max_grad_norm=ns.max_grad_norm,
        eval_every=ns.eval_every,
        eval_batches=ns.eval_batches,
        save_every=ns.save_every,
        keep_checkpoints=ns.keep_checkpoints,
        resume=ns.resume,
        seed=ns.seed,
        bf16=ns.bf16,
        log=ns.log,
        device=ns.device,
        progress=not ns.no_progress,
        overwrite=ns.overwrite,
    )
    s = pretrain(args)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = (
            f", eval loss {s['eval_loss']:.4f} (ppl {s['eval_ppl']:.2f})"
            if s["eval_loss"] is not None
            else ""
        )
        print(
            f"trained {s['steps']} steps in {s['wall_time_s']:.0f}s: loss {s['final_loss']:.4f}{ev}; "
            f"model in {os.path.join(args.out, FINAL_DIR)}"
        )
    return 0
