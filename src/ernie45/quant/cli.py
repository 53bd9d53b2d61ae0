"""`ernie45 quantize`: write a wint8 / wint4 / llm.int8 / nf4 checkpoint that `ernie45.load(dir)` reads as is.

wint8, wint4 and uncalibrated llm.int8 stream on CPU (one tensor at a time, `ernie45.quant.stream`): memory is
bounded by the largest tensor, not by the checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ernie45.checkpoint_read import inside_checkpoint
from ernie45.commands import add_device_arg, add_dtype_arg, add_model_arg, add_out_arg
from ernie45.errors import ErnieError
from ernie45.quant import (
    MODES,
    QuantReport,
    _skipped,
    check_embedding_option,
    quantize_model,
    validate_options,
)
from ernie45.quant.calibrate import CALIB_METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _weights_bytes(path: str) -> int:
    from ernie45.checkpoint_read import safetensors_files

    return sum(os.path.getsize(f) for f in safetensors_files(path))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def streams(mode: str, calib=None, device: str = "cpu") -> bool:
    """Whether `quantize_checkpoint` quantizes tensor by tensor (wint8, wint4, uncalibrated llm.int8 on CPU).
    `auto` streams whenever the mode can: memory stays bounded, and these modes gain little from a GPU."""
    from ernie45.device import resolve_device
    from ernie45.quant.stream import STREAM_MODES

    return mode in STREAM_MODES and calib is None and (device == "auto" or resolve_device(device).type == "cpu")


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    mode: str,
    *,
    group_size: int | None = None,
    calib: str | os.PathLike | None = None,
    calib_samples: int = 512,
    calib_max_length: int = 512,
    calib_method: str = "kl",
    threshold: float = 6.0,
    quantize_lm_head: bool = False,
    quantize_embedding: bool = False,
    skip: tuple[str, ...] = (),
    dtype: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    progress: bool = True,
    stream: bool | None = None,
    stats: dict | None = None,
) -> tuple[QuantReport, int, int]:
    """Quantize `model_dir` and save it (atomically) with its tokenizer to `out_dir`.

    wint8, wint4 and uncalibrated llm.int8 on CPU stream (`stream=None`: whenever they can): one tensor at a
    time is read, quantized and written, so memory stays bounded by the largest tensor. nf4, calibrated
    llm.int8 and other devices (or `stream=False`) load the model, `quantize_model` it and save it. Both give
    the same files. `dtype="auto"` keeps the checkpoint's own dtype for everything left in float (embeddings,
    norms, router, scales). `quantize_embedding`: the token embedding in int8 too, one scale per row (tied
    embeddings need `quantize_lm_head`). Returns (report, weight bytes before, weight bytes after) as stored on disk;
    `stats`, if given, receives `params` (source parameters), `seconds` and `streamed`.
    """
    from ernie45.config import ErnieConfig
    from ernie45.utils import parse_size

    validate_options(mode, 128 if group_size is None else group_size, threshold, calib_method)
    if calib is not None and mode != "llm.int8":
        raise ErnieError(f"--calib is only used by --mode llm.int8, not {mode}")
    if calib is not None and not os.path.isfile(calib):
        raise ErnieError(f"calibration file not found: {calib}")
    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ErnieError("--out must differ from --model (the source is read while the output is written)")
    if dtype not in DTYPES:
        raise ErnieError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    parse_size(max_shard_size)
    config = ErnieConfig.from_pretrained(model_dir)
    if config.quantization_config:
        raise ErnieError(
            f"{model_dir} is already quantized ({config.quantization_config.get('mode')}); "
            "quantize the original float checkpoint"
        )
    if quantize_embedding:
        head = quantize_lm_head and not _skipped("lm_head", skip)
        check_embedding_option(mode, bool(config.tie_word_embeddings), head)
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ErnieError(f"destination exists and is not empty: {out_dir} (pass --overwrite to replace it)")
    if dtype == "auto":
        dtype = config.torch_dtype if config.torch_dtype in DTYPES[1:] else "float32"
    can_stream = streams(mode, calib, device)
    if stream and not can_stream:
        raise ErnieError(
            f"mode {mode} (calibration: {calib is not None}, device {device}) cannot be streamed"
        )
    t0 = time.perf_counter()
    kw = dict(
        group_size=group_size,
        threshold=threshold,
        quantize_lm_head=quantize_lm_head,
        quantize_embedding=quantize_embedding,
        skip=skip,
        dtype=dtype,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        progress=progress,
    )
    stream = can_stream if stream is None else stream
    if stream:
        report, params = _quantize_streaming(model_dir, out_dir, config, mode, **kw)
    else:
        report, params = _quantize_in_memory(
            model_dir,
            out_dir,
            mode,
            calib=calib,
            calib_samples=calib_samples,
            calib_max_length=calib_max_length,
            calib_method=calib_method,
            device=device,
            **kw,
        )
    if stats is not None:
        stats.update(params=params, seconds=time.perf_counter() - t0, streamed=stream)
    return report, _weights_bytes(model_dir), _weights_bytes(out_dir)


def _report_file(report: QuantReport) -> dict[str, str]:
    return {"quantization_report.json": json.dumps(report.to_dict(), indent=1) + "\n"}


def _quantize_in_memory(
    model_dir: str,
    out_dir: str,
    mode: str,
    *,
    dtype: str,
    device: str,
    overwrite: bool,
    max_shard_size: str,
    progress: bool,
    **options,
) -> tuple[QuantReport, int]:
    import ernie45
    from ernie45.checkpoint import checkpoint_state_dict, save_checkpoint

    model, tokenizer = ernie45.load(model_dir, dtype=dtype, device=device)
    params = sum(t.numel() for t in checkpoint_state_dict(model).values())
    report = quantize_model(model, mode, tokenizer=tokenizer, progress=progress, **options)
    save_checkpoint(
        model,
        out_dir,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        overwrite=overwrite,
        extra_files=_report_file(report),
    )
    return report, params


def _quantize_streaming(
    model_dir: str,
    out_dir: str,
    config,
    mode: str,
    *,
    dtype: str,
    overwrite: bool,
    max_shard_size: str,
    progress: bool,
    **options,
) -> tuple[QuantReport, int]:
    """Read, quantize and write one tensor at a time (`StreamQuantizer`); the same files as the in-memory path."""
    from tqdm import tqdm

    from ernie45.checkpoint_read import CheckpointReader
    from ernie45.convert import safetensors_io
    from ernie45.quant.stream import StreamQuantizer
    from ernie45.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    with (
        CheckpointReader(model_dir) as reader,
        StreamQuantizer(reader, config, mode, dtype=dtype, **options) as sq,
        tqdm(
            total=sq.total_params,
            desc=f"quantize {mode}",
            unit="param",
            unit_scale=True,
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):

        def produce(spec):
            t = sq.tensor(spec.name)
            bar.update(sq.source_params[spec.name])
            return t

        with safetensors_io.output_directory(out_dir, overwrite=overwrite) as tmp:
            safetensors_io.write_shards(tmp, sq.specs, produce, max_shard_size, progress=False)
            report = sq.report
            _write_side_files(tmp, model_dir, sq.config, tokenizer, _report_file(report))
    return report, sq.total_params


def _write_side_files(tmp: str, model_dir: str, config, tokenizer, extra_files: dict[str, str]) -> None:
    """config.json, generation_config.json, the tokenizer and `extra_files`, as `save_checkpoint` writes them."""
    config.save(tmp)
    gen = {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    src_gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(src_gen) and inside_checkpoint(model_dir, src_gen):  # never read through a symlink out
        with open(src_gen, encoding="utf-8") as f:
            gen = json.load(f)
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
    tokenizer.save_pretrained(tmp)
    for name, text in extra_files.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            f.write(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 quantize", description=__doc__)
    add_model_arg(p, "float checkpoint directory (HF layout)")
    p.add_argument("--mode", required=True, choices=MODES, help="quantization mode")
    add_out_arg(p, "output directory (written atomically)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="wint4: input columns per scale, 32, 64 or 128 (default: 128 if it divides every width)",
    )
    p.add_argument(
        "--calib",
        help="llm.int8: calibration set, a .jsonl file (text / prompt / messages) or a "
        "text file (one sample per line)",
    )
    p.add_argument("--calib-samples", type=int, default=512, help="calibration samples to use (default 512)")
    p.add_argument("--calib-max-length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument(
        "--calib-method",
        choices=CALIB_METHODS,
        default="kl",
        help="activation clip from the calibration histogram (default kl)",
    )
    p.add_argument("--threshold", type=float, default=6.0, help="llm.int8 outlier threshold (default 6.0)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output head")
    p.add_argument(
        "--quantize-embedding",
        action="store_true",
        help="also store the token embedding in int8, one scale per vocabulary row (V x H bytes instead of "
        "2 V x H in bf16, as llama.cpp's q8_0 / q4_0 files do); any mode but nf4; embeddings tied to the "
        "head need --quantize-lm-head",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="leave Linears with this name or name suffix in float (e.g. down_proj); repeatable",
    )
    add_dtype_arg(p, help="dtype of everything left in float; auto: the checkpoint's")
    add_device_arg(p, "where to quantize (wint8, wint4 and llm.int8 without --calib stream tensor by tensor on the "
                   "CPU, as auto does; nf4, calibrated llm.int8 and cuda load the whole model)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stats: dict = {}
    report, before, after = quantize_checkpoint(
        args.model,
        args.out,
        args.mode,
        group_size=args.group_size,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_max_length=args.calib_max_length,
        calib_method=args.calib_method,
        threshold=args.threshold,
        quantize_lm_head=args.quantize_lm_head,
        quantize_embedding=args.quantize_embedding,
        skip=tuple(args.skip),
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
        stats=stats,
    )
    print(report.summary())
    rate = stats["params"] / max(stats["seconds"], 1e-9)
    print(
        f"{stats['params'] / 1e6:.1f} M parameters in {stats['seconds']:.1f} s ({rate / 1e6:.1f} M params/s, "
        f"{'streamed' if stats['streamed'] else 'in memory'}), peak RSS {peak_rss() / 2**30:.2f} GiB"
    )
    print(
        f"checkpoint weights: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / max(after, 1):.2f}x)"
    )
    print(f"wrote {args.out} (per-layer details in quantization_report.json)")
    return 0
