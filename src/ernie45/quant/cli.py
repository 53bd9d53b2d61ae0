"""`ernie45 quantize`: write a wint8 / wint4 / llm.int8 / nf4 checkpoint that `ernie45.load(dir)` reads as is."""

from __future__ import annotations

import argparse
import json
import os

from ernie45.errors import ErnieError
from ernie45.quant import MODES, QuantReport, quantize_model, validate_options
from ernie45.quant.calibrate import CALIB_METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _weights_bytes(path: str) -> int:
    from ernie45.checkpoint import safetensors_files

    return sum(os.path.getsize(f) for f in safetensors_files(path))


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
    skip: tuple[str, ...] = (),
    dtype: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    progress: bool = True,
) -> tuple[QuantReport, int, int]:
    """Load `model_dir`, quantize it and save it (atomically) with its tokenizer to `out_dir`.

    `dtype="auto"` keeps the checkpoint's own dtype for everything left in float (embeddings, norms, router,
    scales). Returns (report, weight bytes before, weight bytes after) as stored on disk.
    """
    import ernie45
    from ernie45.checkpoint import save_checkpoint
    from ernie45.config import ErnieConfig

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
    config = ErnieConfig.from_pretrained(model_dir)
    if config.quantization_config:
        raise ErnieError(
            f"{model_dir} is already quantized ({config.quantization_config.get('mode')}); "
            "quantize the original float checkpoint"
        )
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ErnieError(f"destination exists and is not empty: {out_dir} (pass --overwrite to replace it)")
    if dtype == "auto":
        dtype = config.torch_dtype if config.torch_dtype in DTYPES[1:] else "float32"
    model, tokenizer = ernie45.load(model_dir, dtype=dtype, device=device)
    report = quantize_model(
        model,
        mode,
        group_size=group_size,
        threshold=threshold,
        calib=calib,
        tokenizer=tokenizer,
        calib_samples=calib_samples,
        calib_max_length=calib_max_length,
        calib_method=calib_method,
        quantize_lm_head=quantize_lm_head,
        skip=skip,
        progress=progress,
    )
    save_checkpoint(
        model,
        out_dir,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        overwrite=overwrite,
        extra_files={"quantization_report.json": json.dumps(report.to_dict(), indent=1) + "\n"},
    )
    return report, _weights_bytes(model_dir), _weights_bytes(out_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 quantize", description=__doc__)
    p.add_argument("--model", required=True, help="float checkpoint directory (HF layout)")
    p.add_argument("--mode", required=True, choices=MODES, help="quantization mode")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="wint4: input columns per scale, 64 or 128 (default: 128 if it divides every width)",
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
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="leave Linears with this name or name suffix in float (e.g. down_proj); repeatable",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of everything left in float (default: the checkpoint's)",
    )
    p.add_argument("--device", default="cpu", help="where to quantize: cpu (default), cuda, auto")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        skip=tuple(args.skip),
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
    )
    print(report.summary())
    print(
        f"checkpoint weights: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / max(after, 1):.2f}x)"
    )
    print(f"wrote {args.out} (per-layer details in quantization_report.json)")
    return 0
