"""`ernie45 generate`: continue a raw prompt (no chat template) and stream the text to stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from ernie45.chat_template import THINK_START
from ernie45.commands import (
    ReplyPrinter,
    add_model_args,
    add_parallel_args,
    add_reasoning_args,
    add_sampling_args,
    add_speculative_args,
    generation_kwargs,
    is_main_rank,
    load_model,
    report_speed,
    speculative_from_args,
)
from ernie45.errors import ErnieError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 generate",
        description="Continue a prompt with an ERNIE 4.5 model and stream the text to stdout. "
        "Reads the prompt from stdin when --prompt is not given.",
    )
    add_model_args(p)
    add_parallel_args(p)
    p.add_argument("--prompt", default=None, help="the text to continue (default: read stdin)")
    add_sampling_args(p, max_new_tokens=128)
    p.add_argument(
        "--num-beams", type=int, default=None, metavar="B", help="beam search (printed at the end)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"text", "token_ids", "prompt_token_ids", "finish_reason"} (with '
        '"reasoning" and "content" for a prompt that ends in <think>, "speculative" {"method", "drafted", '
        '"accepted"} with --speculative)',
    )
    add_speculative_args(p)
    g = p.add_argument_group("structured output (the continuation must follow it)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", help="a JSON Schema file; the output is JSON matching it")
    x.add_argument("--grammar", metavar="FILE", help="a Lark (llguidance) or GBNF (llama.cpp) grammar file")
    x.add_argument("--regex", metavar="PATTERN", help="a regular expression the whole output matches")
    add_reasoning_args(p)
    return p


def read_grammar(json_schema: str | None = None, grammar: str | None = None, regex: str | None = None) -> str | None:
    """The grammar source the --json-schema / --grammar / --regex flags ask for (None without them)."""
    from ernie45.generation import structured

    if regex is not None:
        return structured.regex_grammar(regex)
    path = json_schema or grammar
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ErnieError(f"cannot read {path}: {e.strerror}") from None
    if grammar is not None:
        return structured.lark_grammar(text)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ErnieError(f"{path} is not valid JSON: {e}") from None
    return structured.json_schema_grammar(schema)


def read_prompt(prompt: str | None, stdin: TextIO | None = None) -> str:
    """The --prompt text, else stdin without its final newline; ErnieError when there is none."""
    if prompt is None:
        stdin = stdin or sys.stdin
        if stdin.isatty():
            raise ErnieError("no prompt: pass --prompt TEXT or pipe the text on stdin")
        prompt = stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
        prompt = prompt[:-1] if prompt.endswith("\r") else prompt
    if not prompt:
        raise ErnieError("the prompt is empty")
    return prompt


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    out: TextIO | None = None,
    seed: int | None = None,
    grammar: str | None = None,
    hide_reasoning: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Continue `prompt`, writing the text to `out` as it is generated (beam search writes it at the end).

    `max_new_tokens` is capped so that prompt + continuation fits the context window. A prompt that ends in
    `<think>` (a Thinking model's chat prompt) gets its reasoning shown apart (`ReplyPrinter`). `grammar`: a
    structured-output source (`read_grammar`). `speculative=` (a `Speculative`) adds its counts as "speculative".

    Returns:
        {"text", "token_ids", "prompt_token_ids", "finish_reason"} (and "reasoning", "content" for a Thinking
        prompt) plus "stats" (the last `GenerationChunk`, None for beam search).
    """
    from ernie45.generation import resolve_config, stream_generate

    prompt_ids = tokenizer.encode(prompt)
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise ErnieError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise ErnieError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context window is {context}"
        )
    kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens", 128), context - len(prompt_ids))
    spec = kwargs.pop("speculative", None)
    cfg = resolve_config(model, **kwargs)
    if cfg.num_beams > 1:
        if grammar is not None:
            raise ErnieError("--json-schema / --grammar / --regex work with greedy and sampling, not beam search")
        if spec is not None:
            raise ErnieError("--speculative works with greedy and sampling, not beam search")
        return _beam_text(model, tokenizer, prompt_ids, out, seed, cfg)
    thinking = prompt.rstrip(" \n").endswith(THINK_START)
    printer = ReplyPrinter(out, reasoning=thinking, hide=hide_reasoning)
    text, ids, last = [], [], None
    for chunk in stream_generate(
        model, tokenizer, prompt_ids, seed=seed, grammar=grammar, skip_special_tokens=not thinking,
        speculative=spec, **kwargs
    ):
        ids.append(chunk.token)
        text.append(chunk.text)
        printer.write(chunk.text)
        last = chunk
    printer.finish()
    result = {
        "text": "".join(text),
        "token_ids": ids,
        "prompt_token_ids": prompt_ids,
        "finish_reason": last.finish_reason,
    }
    if thinking:
        result.update(reasoning=printer.reasoning, content=printer.content)
    if spec is not None and not isinstance(spec, str):
        result["speculative"] = spec.stats()  # a Speculative object; a method name keeps no counts
    return {**result, "stats": last}


def _beam_text(
    model: Any, tokenizer: Any, prompt_ids: list[int], out: TextIO | None, seed: int | None, cfg: Any
) -> dict[str, Any]:
    from ernie45.generation import generate
    from ernie45.generation.streaming import StopStringFilter

    seq = generate(model, [prompt_ids], tokenizer=tokenizer, seed=seed, generation_config=cfg)
    ids = seq[0, len(prompt_ids) :].tolist()
    eos = set(cfg.eos_token_ids)
    end = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
    reason = "stop" if end is not None else "length"
    ids = ids[:end] if end is not None else ids
    stop_filter = StopStringFilter(cfg.stop_string_list)
    text, hit = stop_filter.add(tokenizer.decode(ids, skip_special_tokens=True))
    text = text if hit else text + stop_filter.flush()
    if out is not None:
        out.write(text + "\n")
        out.flush()
    return {
        "text": text,
        "token_ids": ids,
        "prompt_token_ids": prompt_ids,
        "finish_reason": "stop" if hit else reason,
        "stats": None,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = generation_kwargs(args)
    spec = speculative_from_args(args)
    if spec is not None:
        kwargs["speculative"] = spec
    grammar = read_grammar(args.json_schema, args.grammar, args.regex)
    parallel = args.tp > 1 or args.ep > 1
    # Under torchrun only rank 0 reads stdin; the prompt is broadcast once the process group exists.
    prompt = read_prompt(args.prompt) if not parallel or os.environ.get("RANK", "0") == "0" else ""
    model, tokenizer = load_model(args.model, args.dtype, args.device, quantize=args.quantize,
                                  adapter=args.adapter, tp=args.tp, ep=args.ep)
    if parallel:
        import torch.distributed as dist

        box = [prompt]
        dist.broadcast_object_list(box, src=0)
        prompt = box[0]
    main_rank = is_main_rank()
    result = generate_text(
        model, tokenizer, prompt, out=None if args.json or not main_rank else sys.stdout, seed=args.seed,
        grammar=grammar, hide_reasoning=args.hide_reasoning, **kwargs,
    )
    stats = result.pop("stats")
    if args.json and main_rank:
        print(json.dumps(result, ensure_ascii=False))
    if args.verbose and stats is not None and main_rank:
        report_speed(stats)
        if spec is not None:
            print(f"speculative ({spec.method}): {spec.accepted} of {spec.drafted} draft tokens accepted in "
                  f"{spec.steps} passes", file=sys.stderr)
    if parallel:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
