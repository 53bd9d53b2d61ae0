"""`ernie45 <command>`: a thin, lazy dispatcher.

Each command lives in its own module exposing `main(argv: list[str] | None) -> int | None` and `build_parser()`
(tests/test_cli_consistency.py checks that every command spells the shared options the same way); modules are
imported only when their command runs, so `ernie45 --help` never imports torch, gradio or FastAPI.
"""

from __future__ import annotations

import importlib
import os
import sys

# The groups `ernie45 --help` lists the commands under, in this order.
GROUPS: dict[str, str] = {
    "run": "use a model in the terminal",
    "tune": "prepare data, train and fine-tune",
    "serve": "serve a model over HTTP",
    "convert": "quantize, convert and export checkpoints",
    "evaluate": "score a model",
    "measure": "inspect checkpoints, time and load-test",
}

# name -> (module, group, one-line summary); each module has `build_parser()` and `main(argv)`.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("ernie45.commands.generate", "run", "continue a prompt (raw text, streamed)"),
    "chat": ("ernie45.commands.chat", "run", "multi-turn chat in the terminal"),
    "preprocess": ("ernie45.data.preprocess", "tune", "clean, dedup, tokenise and pack a corpus"),
    "train-tokenizer": ("ernie45.data.train_tokenizer", "tune", "train an ERNIE-format SentencePiece tokenizer"),
    "pretrain": ("ernie45.train.pretrain", "tune", "pre-train or continue pre-training on packed shards"),
    "finetune": ("ernie45.train.finetune", "tune", "SFT / LoRA / QLoRA / DPO fine-tuning"),
    "merge-lora": ("ernie45.train.merge", "tune", "merge a LoRA adapter into its base model"),
    "serve": ("ernie45.serve.server", "serve", "OpenAI-compatible HTTP server"),
    "webui": ("ernie45.webui", "serve", "Gradio streaming web chat"),
    "quantize": ("ernie45.quant.cli", "convert", "write a wint8 / wint4 / llm.int8 / nf4 checkpoint"),
    "convert": ("ernie45.convert.paddle", "convert", "convert checkpoints between Paddle and HF layouts"),
    "split": ("ernie45.convert.split", "convert", "re-shard a safetensors checkpoint"),
    "export-gguf": ("ernie45.convert.gguf_export", "convert", "export a GGUF file for llama.cpp / Ollama"),
    "export": ("ernie45.export.aoti", "convert", "export prefill/decode for the C++ runtime (AOTInductor)"),
    "verify": ("ernie45.convert.manifest", "convert", "check a checkpoint or GGUF file against its SHA-256 manifest"),
    "eval": ("ernie45.eval.cli", "evaluate", "C-Eval, CMMLU, CLUE and perplexity"),
    "moe-stats": ("ernie45.moe_stats", "evaluate", "MoE routing statistics and plots"),
    "info": ("ernie45.commands.info", "measure", "show a checkpoint's config, size, files and memory needs"),
    "bench": ("ernie45.bench", "measure", "prefill / decode throughput and first-token latency"),
    "loadtest": ("ernie45.serve.loadtest", "measure", "concurrent load test against a running server"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ernie45 <command> [options]", "", "ERNIE 4.5 toolkit (PyTorch)."]
    for group, title in GROUPS.items():
        lines += ["", f"{group}: {title}"]
        lines += [f"  {name.ljust(width)}  {summary}" for name, (_, g, summary) in COMMANDS.items() if g == group]
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
