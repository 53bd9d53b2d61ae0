"""Terminal commands (`ernie45 generate`, `chat`, `info`), what `generate` and `chat` share (the sampling flags,
turning them into generation keywords, loading a model behind a spinner), and the options every command spells the
same way: `--model`, `--out`, `--dtype`, `--device`, `--quantize`, `--adapter`, `--max-new-tokens`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from ernie45.errors import ErnieError

# Every --dtype takes these spellings; the short ones are the names the benchmarks give their rows.
DTYPE_CHOICES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
_LONG_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SHORT_DTYPE = {v: k for k, v in _LONG_DTYPE.items()}
QUANTIZE_MODES = ("wint8", "wint4", "llm.int8", "nf4")
# Positional arguments of earlier releases, folded into their flag by `parse_args`: dest -> (flag, what it names)
_POSITIONAL = {"model": ("--model", "checkpoint"), "out": ("--out", "output")}


def dtype_name(value: str, short: bool = False) -> str:
    """A --dtype spelling as the code names it: float32 / bfloat16 / float16 / auto, or with `short` fp32 / bf16 /
    fp16 / auto (the benchmarks' row names). Other values come back as given, for the caller to refuse."""
    name = _LONG_DTYPE.get(value.strip().lower(), value.strip().lower())
    return _SHORT_DTYPE.get(name, name) if short else name


def _checked_dtype_name(value: str) -> str:
    if dtype_name(value) not in DTYPE_CHOICES:
        raise ErnieError(f"unknown dtype {value!r}; choose from {', '.join(DTYPE_CHOICES)}")
    return dtype_name(value)


def add_dtype_arg(p: argparse.ArgumentParser, default: str = "auto",
                  help: str = "weights and activations; auto: bf16 where the hardware runs it fast, else fp32", *,
                  one_line_error: bool = False) -> None:
    """`--dtype`, the same seven spellings in every command (fp32 = float32, ...), normalised by `dtype_name`. An
    unknown value is argparse's usage error, or with `one_line_error` an ErnieError (for a command that reports
    all its bad options that way)."""
    if one_line_error:
        kw: dict[str, Any] = dict(type=_checked_dtype_name)
    else:
        kw = dict(type=dtype_name, choices=DTYPE_CHOICES)
    p.add_argument("--dtype", default=default, metavar="DTYPE", help=f"{help} (auto, fp32 or float32, bf16 or "
                   f"bfloat16, fp16 or float16; default {default})", **kw)


def add_device_arg(p: argparse.ArgumentParser, help: str = "where to run") -> None:
    p.add_argument("--device", default="auto", help=f"{help}: auto (CUDA when present, else CPU; the default), "
                   "cpu, cuda or cuda:N")


def add_model_arg(p: argparse.ArgumentParser, help: str, *, required: bool = True,
                  positional: str | None = None) -> None:
    """`--model DIR` (or FILE.gguf where the command loads a model), the checkpoint a command reads. `positional`
    (a metavar, e.g. SRC) also takes it as the bare first argument, as earlier releases did; `parse_args` then checks
    that it is given (once)."""
    if positional:
        p.add_argument("model_arg", nargs="?", metavar=positional, help="the same as --model")
    p.add_argument("--model", required=required and not positional, metavar="DIR", help=help)


def add_out_arg(p: argparse.ArgumentParser, help: str, *, metavar: str = "DIR", positional: str | None = None,
                required: bool = True) -> None:
    """`--out`, where a command writes; `positional` as for `add_model_arg`."""
    if positional:
        p.add_argument("out_arg", nargs="?", metavar=positional, help="the same as --out")
    p.add_argument("--out", required=required and not positional, metavar=metavar, help=help)


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p.parse_args(argv)`, with the positional SRC / DST of earlier releases folded into `--model` / `--out`:
    either spelling, or both when they agree; a one-line ErnieError otherwise. Intermixed, so that options may
    still stand between SRC and DST (optional positionals would otherwise take only what precedes the first)."""
    args = p.parse_intermixed_args(argv)
    for dest, (flag, what) in _POSITIONAL.items():
        if not hasattr(args, f"{dest}_arg"):
            continue
        bare, given = vars(args).pop(f"{dest}_arg"), getattr(args, dest)
        if bare is not None and given is not None and bare != given:
            raise ErnieError(f"the {what} is given twice, as {bare!r} and {flag} {given!r}: give it once")
        if bare is None and given is None:
            raise ErnieError(f"no {what} given: pass {flag}")
        setattr(args, dest, given if given is not None else bare)
    return args


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """`--quantize` and `--adapter`, for every command that loads a model to run it (see `load_model`)."""
    p.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                   help="quantize the weights on the fly after loading (see docs/quantize.md)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter (PEFT layout) without merging")


def add_max_new_tokens_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: int, help: str,
                           old: tuple[str, ...] = ()) -> None:
    """`--max-new-tokens N`, the reply length in every command; `old`: earlier spellings, still taken but not
    shown by --help."""
    p.add_argument("--max-new-tokens", type=int, default=default, metavar="N", help=help)
    for flag in old:
        p.add_argument(flag, dest="max_new_tokens", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options of a command that loads a model to generate text (generate, chat)."""
    add_model_arg(p, "checkpoint directory, GGUF file or bundled model name (default: the bundled ernie-tiny)",
                  required=False)
    add_dtype_arg(p)
    add_device_arg(p)
    add_inference_args(p)
    p.add_argument("--verbose", action="store_true", help="report prompt and decode speed on stderr")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (launch with torchrun --nproc-per-node N)")
    g.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size (= number of processes)")
    g.add_argument("--ep", type=int, default=1, metavar="M", help="MoE expert-parallel size: 1 or equal to --tp")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("decoding")
    add_max_new_tokens_arg(g, max_new_tokens, f"tokens to generate at most (default {max_new_tokens})")
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="> 0 samples, 0 is greedy (default: the checkpoint's generation_config.json, else greedy)",
    )
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K best tokens")
    g.add_argument(
        "--min-p", type=float, default=None, metavar="P", help="drop tokens below P x the top probability"
    )
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="make sampling reproducible")
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when TEXT is generated (not printed); repeatable",
    )
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords for `generate` / `stream_generate` from the CLI flags, validated (ErnieError on bad input).

    The CLI samples when `--temperature` > 0, or when `--top-p/--top-k/--min-p` is given without a
    temperature; `--temperature 0` is greedy; otherwise the checkpoint's generation_config.json decides.
    """
    from ernie45.generation import GenerationConfig

    kw: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop,
        num_beams=getattr(args, "num_beams", None),
    )
    if args.temperature is not None:
        kw["do_sample"] = args.temperature > 0
    elif any(v is not None for v in (args.top_p, args.top_k, args.min_p)):
        kw["do_sample"] = True
    if args.ignore_eos:
        kw["eos_token_id"] = []
    GenerationConfig().update(**kw).with_defaults().validate()
    return {k: v for k, v in kw.items() if v is not None}


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    """`--speculative mtp|ngram`, `--num-speculative-tokens K` and `--draft-vocab-size N` (docs/speculative.md)."""
    from ernie45.generation.speculative import DEFAULT_TOKENS, MAX_SPECULATIVE_TOKENS, METHODS

    g = p.add_argument_group("speculative decoding (one sequence at a time; docs/speculative.md)")
    g.add_argument("--speculative", default=None, metavar="METHOD", type=_speculative_method,
                   help=f"draft tokens and verify them in one pass: {' or '.join(METHODS)} (the checkpoint's MTP head, "
                   "or prompt lookup); greedy output is unchanged, sampling keeps its distribution")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help=f"draft tokens per pass, 1 to {MAX_SPECULATIVE_TOKENS} (default: "
                   + ", ".join(f"{m} {k}" for m, k in DEFAULT_TOKENS.items()) + ")")
    g.add_argument("--draft-vocab-size", type=int, default=None, metavar="N",
                   help="mtp: the draft scores only the N most frequent tokens (specials always included), most of "
                   "the MTP layer's cost being the full-vocabulary lm_head; output unchanged (default: all)")


def _speculative_method(value: str) -> str:
    from ernie45.generation.speculative import METHODS

    if value not in METHODS:
        raise ErnieError(f"--speculative must be one of {', '.join(METHODS)}, got {value!r}")
    return value


def speculative_from_args(args: argparse.Namespace) -> Any:
    """The `Speculative` the flags ask for (None without --speculative); ErnieError for a bad K."""
    from ernie45.generation.speculative import Speculative

    method, k = getattr(args, "speculative", None), getattr(args, "num_speculative_tokens", None)
    vocab = getattr(args, "draft_vocab_size", None)
    if method is None:
        if k is not None:
            raise ErnieError("--num-speculative-tokens needs --speculative mtp or ngram")
        if vocab is not None:
            raise ErnieError("--draft-vocab-size needs --speculative mtp")
        return None
    if vocab is not None and method != "mtp":
        raise ErnieError(f"--draft-vocab-size applies to --speculative mtp, not {method}")
    return Speculative(method, k, vocab)


@contextlib.contextmanager
def spinner(message: str, stream: TextIO | None = None) -> Iterator[None]:
    """An animated spinner on stderr while a slow step runs; silent when stderr is not a terminal.

    Hand-written because the core install has no terminal-UI library (rich is an optional extra).
    """
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
            stream.write(f"\r{frame} {message}")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r\033[K")
        stream.flush()

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def load_model(path: str | None, dtype: str, device: str, *, quantize: str | None = None,
               adapter: str | None = None, tp: int = 1, ep: int = 1, optimize: bool = True) -> tuple[Any, Any]:
    """Load a model behind a spinner (`path=None` is the bundled default model), then apply the on-the-fly
    quantization and LoRA adapter flags; with `tp > 1`, load this rank's tensor-parallel shard. `optimize=False`
    skips `optimize_for_inference` (its kernels decode faster but round differently: scores stay comparable)."""
    import ernie45
    from ernie45.models import resolve_model_path
    from ernie45.tokenizer import Tokenizer

    path = resolve_model_path(path)
    if tp > 1 or ep > 1:
        from ernie45.gguf_file import is_gguf

        if quantize or adapter:
            raise ErnieError("--tp/--ep cannot be combined with --quantize or --adapter yet")
        if is_gguf(path):
            raise ErnieError("--tp/--ep load checkpoint directories, not GGUF files")
        from ernie45.parallel import init_distributed, load_parallel

        init_distributed(device)
        with spinner(f"loading {path} (tensor parallel {tp})"):
            return load_parallel(path, tp, ep, dtype=dtype, device=device), Tokenizer.from_pretrained(path)
    with spinner(f"loading {path}"):
        from ernie45.quant.stream import STREAM_MODES

        stream = quantize in STREAM_MODES and not adapter  # quantized tensor by tensor while loading
        model, tokenizer = ernie45.load(path, dtype=dtype, device=device, quantize=quantize if stream else None)
        if adapter:
            from ernie45.train.lora import load_adapter

            load_adapter(model, adapter)
        if quantize and not stream:
            from ernie45.quant import quantize_model

            quantize_model(model, quantize, tokenizer=tokenizer, progress=False)
        if optimize:
            from ernie45.fast import optimize_for_inference

            optimize_for_inference(model)
    return model, tokenizer


def is_main_rank() -> bool:
    """False on the non-zero ranks of a tensor-parallel run (they compute but do not print)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def report_speed(chunk: Any, stream: TextIO | None = None) -> None:
    """One line: prompt size and prefill speed, generated tokens and decode speed (the --verbose output)."""
    cached = getattr(chunk, "cached_tokens", 0)
    print(
        f"prompt: {chunk.prompt_tokens} tokens" + (f" ({cached} cached)" if cached else "")
        + f", first token after {chunk.ttft * 1000:.0f} ms "
        f"({chunk.prompt_tps:.1f} tokens/s) | generated: {chunk.generation_tokens} tokens, "
        f"{chunk.generation_tps:.1f} tokens/s",
        file=stream or sys.stderr,
    )


def add_reasoning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hide-reasoning",
        action="store_true",
        help="Thinking models: print only the answer, not the reasoning before it (shown dimmed by default)",
    )


class ReplyPrinter:
    """Prints a streamed reply. For a Thinking model (`reasoning`) the reasoning before `</think>` is shown dimmed
    on a terminal (plain otherwise, ending with a blank line), or left out with `hide`; the answer follows
    without ERNIE's `<response>` wrapper. `reasoning` and `content` hold the whole texts afterwards."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out: TextIO | None, reasoning: bool = False, hide: bool = False):
        from ernie45.serve.parsers import ReasoningParser

        self.out, self.hide = out, hide
        self.parser = ReasoningParser() if reasoning else None
        self.tty = bool(out is not None and out.isatty())
        self.reasoning, self.content = "", ""
        self._kind: str | None = None  # the kind of the text written last

    def write(self, delta: str) -> None:
        if self.parser is None:
            self._emit("content", delta)
            return
        for ev in self.parser.feed(delta):
            self._emit(ev.kind, ev.value)

    def finish(self) -> None:
        """Write what the parser held back, close the dimmed block, end the line."""
        if self.parser is not None:
            for ev in self.parser.finish():
                self._emit(ev.kind, ev.value)
        if self.out is not None:
            if self._kind == "reasoning" and self.tty and not self.hide:
                self.out.write(self.RESET)
            self.out.write("\n")
            self.out.flush()

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        if self.out is None or (kind == "reasoning" and self.hide):
            return
        if kind != self._kind:
            if kind == "reasoning" and self.tty:
                self.out.write(self.DIM)
            elif self._kind == "reasoning" and not self.hide:
                self.out.write((self.RESET if self.tty else "") + "\n\n")
            self._kind = kind
        self.out.write(text)
        self.out.flush()
