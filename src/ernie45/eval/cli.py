"""`ernie45 eval`: C-Eval, CMMLU, CLUE and perplexity; batched, resumable, results written atomically.

    ernie45 eval --model DIR --task ceval|cmmlu|clue-<name>|ppl --data-dir DIR [--shots K] [--limit N]
                 [--batch-size B] --out results.json

Finished chunks are appended to `<out>.partial` as they complete, so an interrupted run continues where it
stopped; the file goes away once `<out>` is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ernie45.commands import (
    add_device_arg,
    add_dtype_arg,
    add_inference_args,
    add_model_arg,
    add_out_arg,
    load_model,
)
from ernie45.errors import ErnieError
from ernie45.eval.tasks import TASKS, Subset, check_task, load_subsets
from ernie45.utils import atomic_write_text

CHUNK = 64  # examples (or perplexity windows) per resume record
_SAMPLE_BLOCKS, _BLOCK = 16, 1 << 16


def model_fingerprint(path: str) -> str:
    """sha256 over config.json and, per weight file, its name, size, safetensors header and 16 sampled 64 KiB blocks.

    Hashing every byte of a 300B checkpoint would take longer than many evaluations; sampled blocks still tell a
    fine-tune from its base, which is what the results file and the resume check need.
    """
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(path) if f == "config.json" or f.endswith(".safetensors"))
    for name in files:
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        with open(full, "rb") as f:
            if name == "config.json":
                h.update(f.read())
                continue
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, size - 8)))
            for k in range(_SAMPLE_BLOCKS):
                f.seek(k * max(size - _BLOCK, 0) // max(_SAMPLE_BLOCKS - 1, 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ResumeLog:
    """Finished chunks of one run, one JSON line each; a rerun with the same fingerprint reuses them.

    The first line holds the fingerprint (model, task, data, options). A line torn by a crash is dropped.
    """

    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.done: dict[str, Any] = {}
        self.resumed = 0
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            try:
                same = json.loads(lines[0]).get("fingerprint") == fingerprint
            except (json.JSONDecodeError, AttributeError):
                same = False
            if same:
                for line in lines[1:]:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    self.done[rec["key"]] = rec["value"]
            else:
                print(
                    f"note: {path} is from a different run (model, data or options changed); starting over",
                    file=sys.stderr,
                )
        body = [json.dumps({"fingerprint": fingerprint})]
        body += [json.dumps({"key": k, "value": v}) for k, v in self.done.items()]
        atomic_write_text(path, "\n".join(body) + "\n")

    def get(self, key: str) -> Any:
        if key in self.done:
            self.resumed += 1
        return self.done.get(key)

    def put(self, key: str, value: Any) -> None:
        self.done[key] = value
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        os.remove(self.path)


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


def score_subsets(
    model,
    tokenizer,
    subsets: Sequence[Subset],
    batch_size: int = 8,
    max_length: int | None = None,
    log: ResumeLog | None = None,
    progress=None,
) -> dict[str, Any]:
    """Per-subset acc/acc_norm plus their macro (mean of subsets) and micro (mean of items) averages."""
    from ernie45.eval.scoring import accuracy_table, choice_scores, encode_pair, loglikelihoods, mean

    pad_id = tokenizer.pad_token_id or 0
    per_subset: dict[str, dict[str, float]] = {}
    items: list[tuple[float, float]] = []
    for s in subsets:
        subset_items: list[tuple[float, float]] = []
        for c in _chunks(len(s.examples)):
            chunk = s.examples[c : c + CHUNK]
            key = f"{s.name}/{c}"
            lls = log.get(key) if log else None
            if lls is None:
                reqs = [
                    encode_pair(tokenizer.encode, ex.context, cont)
                    for ex in chunk
                    for cont in ex.continuations
                ]
                flat = [ll for ll, _ in loglikelihoods(model, reqs, batch_size, max_length, pad_id, progress)]
                lls, k = [], 0
                for ex in chunk:
                    lls.append(flat[k : k + len(ex.choices)])
                    k += len(ex.choices)
                if log:
                    log.put(key, lls)
            elif progress is not None:
                progress.update(sum(len(ex.choices) for ex in chunk))
            subset_items += [choice_scores(ll, ex.choices, ex.gold) for ll, ex in zip(lls, chunk)]
        per_subset[s.name] = accuracy_table(subset_items)
        items += subset_items
    macro = {m: mean([r[m] for r in per_subset.values()]) for m in ("acc", "acc_norm")}
    return {"subsets": per_subset, "macro": {**macro, "n": len(items)}, "micro": accuracy_table(items)}


def text_files(data: str) -> list[str]:
    """The text to score: one UTF-8 file, or every `*.txt` in a folder (each its own document)."""
    if os.path.isfile(data):
        return [data]
    if not os.path.isdir(data):
        raise ErnieError(f"perplexity data not found: {data}")
    files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".txt"))
    if not files:
        raise ErnieError(f"{data}: no *.txt files")
    return files


def document_ids(tokenizer, path: str) -> list[int]:
    """BOS + the file's tokens: with BOS as context every text token is scored (lm-eval's rolling convention)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ErnieError(f"{path}: not UTF-8 text") from None
    ids = tokenizer.encode(text)
    if not ids:
        raise ErnieError(f"{path}: empty text")
    return [tokenizer.bos_token_id, *ids]


def score_perplexity(
    model,
    documents: Sequence[tuple[str, list[int]]],
    window: int,
    stride: int,
    batch_size: int = 8,
    pad_id: int = 0,
    log: ResumeLog | None = None,
    progress=None,
) -> dict[str, Any]:
    """Token-level perplexity of (name, token ids) documents with a sliding window; per document and overall."""
    from ernie45.eval.scoring import loglikelihoods, perplexity, window_requests

    docs: dict[str, dict[str, float]] = {}
    total_nll, total_tokens, total_windows = 0.0, 0, 0
    for name, ids in documents:
        reqs = window_requests(ids, window, stride)
        nll = 0.0
        for c in _chunks(len(reqs)):
            key = f"{name}/{c}"
            lls = log.get(key) if log else None
            if lls is None:
                lls = [
                    ll
                    for ll, _ in loglikelihoods(
                        model, reqs[c : c + CHUNK], batch_size, window, pad_id, progress
                    )
                ]
                if log:
                    log.put(key, lls)
            elif progress is not None:
                progress.update(len(lls))
            nll -= sum(lls)
        n = sum(len(cont) for _, cont in reqs)
        docs[name] = {"ppl": perplexity(nll, n), "tokens": n, "windows": len(reqs)}
        total_nll, total_tokens, total_windows = total_nll + nll, total_tokens + n, total_windows + len(reqs)
    return {
        "ppl": perplexity(total_nll, total_tokens),
        "nll_per_token": total_nll / total_tokens,
        "tokens": total_tokens,
        "windows": total_windows,
        "documents": docs,
    }


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of one run's scores, as printed after the run."""
    res = report["results"]
    if report["task"] == "ppl":
        rows = [(name, str(d["tokens"]), f"{d['ppl']:.4f}") for name, d in res["documents"].items()]
        rows.append(("all", str(res["tokens"]), f"{res['ppl']:.4f}"))
        header = ("document", "tokens", "ppl")
    else:
        rows = [
            (name, str(r["n"]), f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}")
            for name, r in res["subsets"].items()
        ]
        if len(res["subsets"]) > 1:
            rows += [
                (
                    f"{avg} average",
                    str(res[avg]["n"]),
                    f"{res[avg]['acc']:.4f}",
                    f"{res[avg]['acc_norm']:.4f}",
                )
                for avg in ("macro", "micro")
            ]
        header = ("subset", "n", "acc", "acc_norm")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_range(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ErnieError(f"--{name} must be at least {low}, got {value}")


def run_eval(
    model: str,
    task: str,
    data_dir: str,
    out: str,
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    max_length: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = True,
    quantize: str | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint `model` on `task` and write the report to `out` (atomically).

    Args:
        model: checkpoint directory (HF layout, with tokenizer files).
        task: ceval, cmmlu, clue-<name> or ppl.
        data_dir: the benchmark's official files (for ppl: a text file or a folder of *.txt).
        shots: few-shot examples per prompt, taken in order from dev (C-Eval, CMMLU) or train (CLUE).
        limit: score only the first N items of each subset.
        batch_size: model inputs per forward pass.
        max_length: longest model input (default: the model's max_position_embeddings).
        window, stride: perplexity window and step in tokens (default min(max_length, 4096) and window // 2).
        quantize, adapter: score the model quantized on the fly, or with a LoRA adapter (as `generate`).

    Returns:
        The report that was written: task, config, model fingerprint, results and timings.
    """
    import torch
    from tqdm import tqdm

    import ernie45

    check_task(task)
    for name, value, low in (
        ("shots", shots, 0),
        ("limit", limit, 1),
        ("batch-size", batch_size, 1),
        ("max-length", max_length, 2),
        ("window", window, 2),
        ("stride", stride, 1),
    ):
        _check_range(name, value, low)
    if task != "ppl" and (window is not None or stride is not None):
        raise ErnieError("--window and --stride apply to --task ppl only")
    started = time.perf_counter()
    subsets = load_subsets(task, data_dir, shots, limit) if task != "ppl" else []
    files = text_files(os.fspath(data_dir)) if task == "ppl" else []
    lm, tokenizer = load_model(model, dtype, device, quantize=quantize, adapter=adapter, optimize=False)
    max_length = max_length or lm.config.max_position_embeddings
    if task == "ppl":
        window = window or min(max_length, 4096)
        stride = stride or max(window // 2, 1)
        if window > max_length:
            raise ErnieError(f"--window {window} is longer than the model's context ({max_length})")
        if stride >= window:
            raise ErnieError(f"--stride must be smaller than --window, got stride {stride}, window {window}")
    config = {
        "task": task,
        "data_dir": os.path.abspath(data_dir),
        "shots": shots,
        "limit": limit,
        "batch_size": batch_size,
        "max_length": max_length,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
    }
    if task == "ppl":
        config.update(window=window, stride=stride)
    if quantize:
        config["quantize"] = quantize
    if adapter:
        from ernie45.train.lora import resolve_adapter_dir

        adapter = resolve_adapter_dir(adapter)
        config["adapter"] = {"path": os.path.abspath(adapter), "fingerprint": model_fingerprint(adapter)}
    fingerprint = model_fingerprint(model)
    data_files = [f for s in subsets for f in s.files] + files
    run_key = {k: v for k, v in config.items() if k not in ("batch_size", "data_dir")}
    run_key.update(model=fingerprint, data={os.path.basename(f): _file_digest(f) for f in data_files})
    log = ResumeLog(
        out + ".partial", hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()
    )

    if task == "ppl":
        from ernie45.eval.scoring import sliding_windows

        documents = [(os.path.basename(f), document_ids(tokenizer, f)) for f in files]
        n_requests = sum(len(sliding_windows(len(ids), window, stride)) for _, ids in documents)
    else:
        n_requests = sum(len(ex.choices) for s in subsets for ex in s.examples)
    with tqdm(
        total=n_requests, desc=f"eval {task}", unit="req", file=sys.stderr, disable=not progress
    ) as bar:
        if task == "ppl":
            results = score_perplexity(
                lm, documents, window, stride, batch_size, tokenizer.pad_token_id or 0, log, bar
            )
        else:
            results = score_subsets(lm, tokenizer, subsets, batch_size, max_length, log, bar)
    seconds = time.perf_counter() - started
    report = {
        "task": task,
        "config": config,
        "model": {
            "path": os.path.abspath(model),
            "fingerprint": fingerprint,
            "parameters": sum(p.numel() for p in lm.parameters()),
        },
        "results": results,
        "timings": {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "requests": n_requests,
            "resumed_chunks": log.resumed,
        },
        "versions": {"ernie45": ernie45.__version__, "torch": torch.__version__},
    }
    atomic_write_text(out, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    log.remove()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 eval",
        description="Score a checkpoint on C-Eval, CMMLU, CLUE or "
        "perplexity, from local copies of the official files (nothing is downloaded).",
    )
    add_model_arg(p, "checkpoint directory (HF layout with tokenizer files)")
    p.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    p.add_argument(
        "--data-dir",
        required=True,
        help="the benchmark's official files; for ppl a UTF-8 text file or a folder of *.txt",
    )
    add_out_arg(p, "results JSON (written atomically)", metavar="FILE")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt (default 0)")
    p.add_argument("--limit", type=int, help="score only the first N items of each subject/task")
    p.add_argument("--batch-size", type=int, default=8, help="model inputs per forward pass (default 8)")
    p.add_argument("--max-length", type=int, help="longest model input (default: the model's context)")
    p.add_argument("--window", type=int, help="ppl: tokens per window (default min(context, 4096))")
    p.add_argument("--stride", type=int, help="ppl: tokens the window moves by (default window/2)")
    add_dtype_arg(p)
    add_device_arg(p)
    add_inference_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    report = run_eval(
        a.model,
        a.task,
        a.data_dir,
        a.out,
        shots=a.shots,
        limit=a.limit,
        batch_size=a.batch_size,
        dtype=a.dtype,
        device=a.device,
        max_length=a.max_length,
        window=a.window,
        stride=a.stride,
        progress=not a.no_progress,
        quantize=a.quantize,
        adapter=a.adapter,
    )
    print(format_table(report))
    print(f"wrote {a.out}")
    return 0
