"""Every `ernie45` command spells the shared options the same way. Each command's argparse parser is built through
cli.py's table (`build_parser()`; `ernie45 bench`'s own subcommands too) and checked, nothing is run: `--dtype`
takes the same seven spellings, a checkpoint is `--model`, an output `--out`, a reply length `--max-new-tokens`,
inference commands take `--quantize` and `--adapter`, `--device` defaults to auto; `ernie45 --help` lists every
command once, under a group."""

from __future__ import annotations

import argparse
import importlib

import pytest

from ernie45.cli import COMMANDS, GROUPS
from ernie45.cli import main as cli
from ernie45.commands import parse_args
from ernie45.errors import ErnieError

DTYPE_SPELLINGS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short -> long
# Commands that read a checkpoint (`--model DIR`), write something (`--out`), run a model (`--quantize`, `--adapter`).
LOADS_CHECKPOINT = {"generate", "chat", "serve", "webui", "quantize", "merge-lora", "finetune", "pretrain", "eval",
                    "moe-stats", "convert", "split", "export-gguf", "export", "info", "verify"}
WRITES = {"quantize", "merge-lora", "finetune", "pretrain", "preprocess", "train-tokenizer", "eval", "moe-stats",
          "convert", "split", "export-gguf", "export", "bench", "bench serve", "bench grammar", "loadtest"}
INFERENCE = {"generate", "chat", "serve", "webui", "eval"}
# Other spellings of the same things: each may survive only as a hidden alias of the canonical flag.
REPLY_LENGTH = {"--max-tokens", "--gen-len", "--output-len", "--new-tokens", "--num-tokens", "--max-new-tokens"}
OTHER_OUTPUTS = {"--output", "--output-dir", "--out-dir", "--save-dir", "--dst", "--dest"}
OTHER_MODELS = {"--model-dir", "--model-path", "--checkpoint", "--ckpt", "--src", "--base-model"}


def parsers(name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """(`name`, its parser), then `(name sub, parser)` for the subcommands its module dispatches to."""
    module = importlib.import_module(COMMANDS[name][0])
    out = [(name, module.build_parser())]
    for sub, sub_module in getattr(module, "SUBCOMMANDS", {}).items():
        out.append((f"{name} {sub}", importlib.import_module(sub_module).build_parser()))
    return out


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in p._actions for flag in a.option_strings}


@pytest.fixture(params=sorted(COMMANDS))
def command(request) -> list[tuple[str, argparse.ArgumentParser]]:
    return parsers(request.param)


def test_every_command_has_a_parser_named_after_it(command):
    for name, p in command:
        assert isinstance(p, argparse.ArgumentParser) and p.prog == f"ernie45 {name}", name


def test_dtype_takes_the_seven_spellings(command):
    for name, p in command:
        action = options(p).get("--dtype")
        if action is None:
            continue
        assert action.type is not None, f"{name}: --dtype has no type normalising its spellings"

        def parsed(spelling: str, action=action, name=name):
            value = action.type(spelling)
            assert action.choices is None or value in action.choices, f"{name} --dtype refuses {spelling}"
            return value

        parsed("auto")
        for short, long in DTYPE_SPELLINGS.items():
            assert parsed(short) == parsed(long), f"{name}: --dtype {short} and {long} differ"
            assert parsed(long.upper()) == parsed(long), name


def test_checkpoint_is_model_and_output_is_out(command):
    for name, p in command:
        flags = options(p)
        if name in LOADS_CHECKPOINT:
            assert "--model" in flags, f"{name} reads a checkpoint but has no --model"
            bare = [a for a in p._actions if not a.option_strings and a.nargs not in ("?", "*")]
            assert not bare, f"{name}: a required positional ({bare[0].metavar}); --model / --out must suffice"
        if name in WRITES:
            assert "--out" in flags, f"{name} writes but has no --out"
        for flag in (OTHER_OUTPUTS | OTHER_MODELS) & set(flags):
            assert flags[flag].help == argparse.SUPPRESS, f"{name}: {flag} instead of --model / --out"


def test_reply_length_is_max_new_tokens(command):
    for name, p in command:
        flags = options(p)
        lengths = REPLY_LENGTH & set(flags)
        if not lengths:
            continue
        canonical = flags.get("--max-new-tokens")
        assert canonical is not None and canonical.help != argparse.SUPPRESS, \
            f"{name}: {sorted(lengths)} instead of --max-new-tokens"
        for flag in lengths - {"--max-new-tokens"}:
            alias = flags[flag]
            assert alias.dest == canonical.dest and alias.help == argparse.SUPPRESS, \
                f"{name}: {flag} is not a hidden alias of --max-new-tokens"


def test_inference_commands_take_quantize_and_adapter(command):
    for name, p in command:
        if name in INFERENCE:
            assert {"--quantize", "--adapter"} <= set(options(p)), f"{name} runs a model: --quantize, --adapter"


def test_device_defaults_to_auto(command):
    for name, p in command:
        action = options(p).get("--device")
        assert action is None or action.default == "auto", f"{name}: --device defaults to {action.default!r}"


def test_help_lists_every_command_once_under_a_group(capsys):
    assert cli(["--help"]) == 0
    group, seen = None, {}
    for line in capsys.readouterr().out.splitlines():
        head = line.split(":")[0]
        if not line.startswith(" ") and head in GROUPS:
            group = head
        elif line.startswith("  ") and line.split()[0] in COMMANDS:
            assert group is not None, line
            seen.setdefault(line.split()[0], []).append(group)
    assert seen == {name: [g] for name, (_, g, _) in COMMANDS.items()}
    assert set(GROUPS) == {"run", "tune", "serve", "convert", "evaluate", "measure"}


def test_positional_paths_and_flags_mean_the_same():
    p = parsers("convert")[0][1]
    base = ["--from", "hf", "--to", "paddle"]
    for argv in (["A", "B"], ["--model", "A", "--out", "B"], ["A", "--out", "B"], ["A", "B", "--model", "A"],
                 ["A", "--quiet", "B"]):
        args = parse_args(p, base + argv)
        assert (args.model, args.out) == ("A", "B"), argv
        assert not hasattr(args, "model_arg") and not hasattr(args, "out_arg")
    with pytest.raises(ErnieError, match="the checkpoint is given twice, as 'A' and --model 'C'"):
        parse_args(p, base + ["A", "B", "--model", "C"])
    with pytest.raises(ErnieError, match="no output given: pass --out"):
        parse_args(p, base + ["--model", "A"])


def test_old_spellings_still_parse(capsys):
    from ernie45.webui import DEFAULT_MAX_TOKENS

    webui = parsers("webui")[0][1]
    assert webui.parse_args(["--max-tokens", "30"]).max_new_tokens == 30
    assert webui.parse_args([]).max_new_tokens == DEFAULT_MAX_TOKENS
    bench = dict(parsers("bench"))
    assert bench["bench"].parse_args(["--gen-len", "7", "--dtype", "float32,bf16"]).max_new_tokens == 7
    assert bench["bench"].parse_args(["--dtype", "float32,bfloat16,wint8"]).dtype == "fp32,bf16,wint8"
    assert bench["bench serve"].parse_args(["--output-len", "9"]).max_new_tokens == 9
    assert bench["bench grammar"].parse_args(["--gen-len", "9"]).max_new_tokens == 9
    assert parsers("generate")[0][1].parse_args(["--dtype", "bf16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit) as e:
        cli(["generate", "--dtype", "int8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "int8" in err and all(s in err for s in ("fp32", "bfloat16", "float16", "auto"))
