"""The training core `pretrain`, `finetune` and `sft` share: precision, the data order, the optimizer and its
step, the run directory (checkpoints saved, listed and resumed; `final/`) and the step log.

A run directory holds `checkpoints/step-NNNNNNN/` (weights, `optimizer.pt`, `trainer_state.json`),
`log.jsonl` and `final/`. A checkpoint counts once it has both the optimizer and the trainer state: the state
is written last, and the checkpoints of older runs (pre-training wrote the state first, fine-tuning both in
one atomic directory) have both, so every run directory written so far resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ernie45.errors import ErnieError
from ernie45.train.schedule import SCHEDULES, lr_at

CKPT_DIR, FINAL_DIR, LOG_FILE = "checkpoints", "final", "log.jsonl"
STATE_FILE, OPTIM_FILE, SUMMARY_FILE = "trainer_state.json", "optimizer.pt", "training_summary.json"
BF16_MODES = ("auto", "on", "off")


# ---- precision and data order -----------------------------------------------------------------------
def use_bf16(mode: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: `auto` where the hardware runs it fast, `on` wherever it is supported."""
    from ernie45.device import cpu_has_fast_bf16

    if mode not in BF16_MODES:
        raise ErnieError(f"--bf16 must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    if mode == "on":
        if not supported:
            raise ErnieError("--bf16 on: this GPU does not support bfloat16")
        return True
    return supported if device.type == "cuda" else cpu_has_fast_bf16()


def stored_dtype(model_dir: str) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point weights are stored in, from the safetensors headers
    (config.json's torch_dtype can disagree with the tensors; the fp32 router of a bf16 checkpoint does not
    count against it); float32 when nothing floating-point is stored."""
    from ernie45.checkpoint_read import CheckpointReader

    sizes: Counter[torch.dtype] = Counter()
    with CheckpointReader(model_dir, normalise=False) as reader:
        for e in reader.entries.values():
            if e.dtype.is_floating_point:
                sizes[e.dtype] += math.prod(e.shape)
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, a function of (seed, epoch) alone: a resumed run replays its batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# ---- optimizer --------------------------------------------------------------------------------------
def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on vectors (norms, biases, the router correction bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8, foreach=False)


def schedule_lr(
    optimizer: torch.optim.Optimizer,
    step: int,
    total: int,
    lr: float,
    min_lr: float,
    warmup: int,
    schedule: str,
) -> float:
    """Set (and return) the learning rate of optimizer step `step` (0-based) of `total` (see `lr_at`)."""
    value = lr_at(step, total, lr, min_lr, warmup, schedule)
    for g in optimizer.param_groups:
        g["lr"] = value
    return value


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, max_grad_norm: float) -> float:
    """Clip the gradients (0: no clipping), step and clear them; returns the gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise ErnieError(f"loss became {loss} at step {step}; lower --lr or check the data")


# ---- the run directory ------------------------------------------------------------------------------
def list_checkpoints(out: str) -> list[str]:
    """The complete checkpoints of a run directory (names step-NNNNNNN), oldest first."""
    d = os.path.join(out, CKPT_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(
        n
        for n in os.listdir(d)
        if n.startswith("step-")
        and all(os.path.isfile(os.path.join(d, n, f)) for f in (OPTIM_FILE, STATE_FILE))
    )


def prepare_run_dir(out: str, resume: bool, overwrite: bool, main: bool) -> str | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into an old one.

    With `overwrite` the main process clears what an earlier run left (checkpoints, final model, log).
    """
    ckpts = list_checkpoints(out)
    if resume:
        if not ckpts:
            raise ErnieError(f"--resume: no checkpoint in {os.path.join(out, CKPT_DIR)}")
        return os.path.join(out, CKPT_DIR, ckpts[-1])
    if os.path.exists(out) and not os.path.isdir(out):
        raise ErnieError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ErnieError(
                f"output directory {out} is not empty (pass --resume to continue it, or --overwrite to start over)"
            )
        if main:
            for name in (CKPT_DIR, FINAL_DIR, LOG_FILE):
                p = os.path.join(out, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.unlink(p)
    return None


def trainer_state(step: int, args, history: list, wall_time_s: float, **metrics) -> dict[str, Any]:
    """What a checkpoint records besides weights and optimizer: the step, the run's arguments, the curve."""
    return {"step": step, "args": asdict(args), "history": history, "wall_time_s": wall_time_s, **metrics}


def save_step(
    out: str,
    step: int,
    write_weights: Callable[[str], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> str:
    """checkpoints/step-NNNNNNN: `write_weights(path)` writes the weights directory atomically, then the
    optimizer (with the torch RNG) and, last, the trainer state; all but the newest `keep` (> 0) are removed."""
    from ernie45.utils import atomic_write_bytes, atomic_write_text

    path = os.path.join(out, CKPT_DIR, f"step-{step:07d}")
    write_weights(path)
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, buf)
    atomic_write_bytes(os.path.join(path, OPTIM_FILE), buf.getvalue())
    atomic_write_text(os.path.join(path, STATE_FILE), json.dumps(state, indent=2) + "\n")
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out, CKPT_DIR, old), ignore_errors=True)
    return path


def read_state(path: str) -> dict[str, Any]:
    """The trainer state of checkpoint directory `path`."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ErnieError(f"checkpoint {path} is unreadable: {e}") from None


def restore_optimizer(path: str, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Load the optimizer state of checkpoint `path`, and the torch RNG where it was saved (fine-tuning
    checkpoints written before this core hold the bare optimizer state)."""
    try:
        payload = torch.load(os.path.join(path, OPTIM_FILE), map_location=device, weights_only=True)
        optimizer.load_state_dict(payload.get("optimizer", payload))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ErnieError(f"checkpoint {path}: unreadable optimizer state: {e}") from None
    if "torch_rng" in payload:
        torch.set_rng_state(payload["torch_rng"].cpu())


def check_resume(saved: dict[str, Any], a, keys: tuple[str, ...], also: tuple[str, ...] = ()) -> None:
    """A resumed run must see the same data order, model and schedule (`keys` of the saved arguments, plus
    the differences `also` names), else its curve is not a continuation."""
    diff = [k for k in keys if saved.get(k) != getattr(a, k)] + list(also)
    if diff:
        raise ErnieError("--resume with different settings than the checkpoint: " + ", ".join(diff))


def save_final(out: str, write_weights: Callable[[str], None], summary: dict[str, Any]) -> str:
    """final/: the weights and training_summary.json (the summary less its per-step history)."""
    from ernie45.utils import atomic_write_text

    path = os.path.join(out, FINAL_DIR)
    write_weights(path)
    text = json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2) + "\n"
    atomic_write_text(os.path.join(path, SUMMARY_FILE), text)
    return path


# ---- the command line -------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunArgs:
    """The settings every training run has (each command's arguments add their own); `add_run_args` adds
    their options."""

    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    bf16: str = "auto"
    device: str = "auto"
    progress: bool = True


def add_run_args(p: argparse.ArgumentParser, bf16_help: str = "bf16 autocast") -> None:
    """The options every training command takes, spelled the same way."""
    from ernie45.commands import add_device_arg

    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", choices=BF16_MODES, default="auto", help=bf16_help)
    add_device_arg(p, "where to train")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def args_from(cls, ns: argparse.Namespace):
    """The run's argument dataclass from parsed options whose dests are its field names."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


# ---- the step log -----------------------------------------------------------------------------------
class StepLog:
    """What a loop reports per step: log.jsonl (and TensorBoard scalars), the progress bar, the loss history
    the checkpoints keep and the wall time, both carried over from the checkpoint `state` on resume.

    Only the main process (`main`) writes; on resume the lines a crashed run logged past the checkpoint are
    dropped, so the log is one clean curve.
    """

    def __init__(
        self,
        out: str,
        state: dict[str, Any],
        total: int,
        desc: str,
        main: bool,
        progress: bool,
        tensorboard: bool = False,
    ):
        from tqdm import tqdm

        from ernie45.utils import atomic_write_text

        start = int(state.get("step", 0))
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self._t0, self._wall_before = time.perf_counter(), float(state.get("wall_time_s", 0.0))
        self.main, self.file, self.tb = main, None, None
        self.bar = tqdm(
            total=total,
            initial=start,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=not (progress and main),
        )
        if not main:
            return
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, LOG_FILE)
        keep = ""
        if start and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                keep = "".join(ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start)
        atomic_write_text(path, keep)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.close()
                raise ErnieError(
                    "--log tensorboard needs the `tensorboard` package (pip install 'ernie45[train]')"
                ) from None
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"))

    @property
    def wall_time_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._t0

    def write(self, record: dict[str, Any], **postfix: str) -> None:
        """Log one step's record (it has "step" and "loss") and show `postfix` on the progress bar."""
        self.history.append({"step": record["step"], "loss": record["loss"]})
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
