"""`ernie45 <command>`: a thin, lazy dispatcher.

Each command lives in its own module exposing `main(argv: list[str] | None) -> int | None`; modules are
imported only when their command runs, so `ernie45 --help` never imports torch, gradio or FastAPI.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("ernie45.commands.generate", "continue a prompt (raw text, streamed)"),
    "chat": ("ernie45.commands.chat", "multi-turn chat in the terminal"),
    "bench": ("ernie45.bench", "prefill / decode throughput and first-token latency"),
    "preprocess": ("ernie45.data.preprocess", "clean, dedup, tokenise and pack a corpus"),
    "train-tokenizer": ("ernie45.data.train_tokenizer", "train an ERNIE-format SentencePiece tokenizer"),
    "pretrain": ("ernie45.train.pretrain", "pre-train or continue pre-training on packed shards"),
    "finetune": ("ernie45.train.finetune", "SFT / LoRA / QLoRA / DPO fine-tuning"),
    "merge-lora": ("ernie45.train.merge", "merge a LoRA adapter into its base model"),
    "quantize": ("ernie45.quant.cli", "write a wint8 / wint4 / llm.int8 / nf4 checkpoint"),
    "serve": ("ernie45.serve.server", "OpenAI-compatible HTTP server"),
    "loadtest": ("ernie45.serve.loadtest", "concurrent load test against a running server"),
    "webui": ("ernie45.webui", "Gradio streaming web chat"),
    "moe-stats": ("ernie45.moe_stats", "MoE routing statistics and plots"),
    "convert": ("ernie45.convert.paddle", "convert checkpoints between Paddle and HF layouts"),
    "export-gguf": ("ernie45.convert.gguf_export", "export a GGUF file for llama.cpp / Ollama"),
    "split": ("ernie45.convert.split", "re-shard a safetensors checkpoint"),
    "verify": ("ernie45.convert.manifest", "check a checkpoint or GGUF file against its SHA-256 manifest"),
    "eval": ("ernie45.eval.cli", "C-Eval, CMMLU, CLUE and perplexity"),
    "export": ("ernie45.export.aoti", "export prefill/decode for the C++ runtime (AOTInductor)"),
    "info": ("ernie45.commands.info", "show a checkpoint's config, size and files"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ernie45 <command> [options]", "", "ERNIE 4.5 toolkit (PyTorch). Commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `ernie45 <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ernie45 import __version__

        print(f"ernie45 {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ernie45: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from ernie45.errors import ErnieError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        rc = module.main(rest)
    except ErnieError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("ernie45"):
            print(f"error: `ernie45 {name}` needs the optional package {e.name!r}; "
                  f"install the matching extra, e.g. pip install 'ernie45[all]'", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error for the user.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
