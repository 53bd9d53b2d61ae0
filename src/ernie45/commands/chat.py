"""`ernie45 chat`: a multi-turn terminal chat with the model's chat template, streaming each reply.

Commands: `/clear` starts a new conversation (the system prompt stays), `/exit` (or end of input) quits.
Works non-interactively too: each stdin line is one user message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from ernie45.commands import (
    ReplyPrinter,
    add_model_args,
    add_reasoning_args,
    add_sampling_args,
    add_speculative_args,
    generation_kwargs,
    load_model,
    report_speed,
    speculative_from_args,
)
from ernie45.errors import ErnieError

HELP = "type a message; /clear starts over, /exit quits"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 chat", description=f"Chat with an ERNIE 4.5 model ({HELP}).")
    add_model_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    add_sampling_args(p, max_new_tokens=512)
    add_speculative_args(p)
    add_reasoning_args(p)
    return p


def fit_history(
    tokenizer: Any, messages: list[dict[str, str]], context: int, max_new_tokens: int
) -> tuple[list[dict[str, str]], list[int]]:
    """Drop the oldest turns (never the system prompt or the new message) until the prompt leaves room for
    `max_new_tokens` in the context window. Returns the kept messages and the prompt ids.

    Raises ErnieError when the system prompt and the new message alone fill the window.
    """
    messages = list(messages)
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        first = 1 if messages[0]["role"] == "system" else 0
        if len(ids) + max_new_tokens <= context or len(messages) - first <= 1:
            break
        del messages[first : first + 2 if messages[first]["role"] == "user" else first + 1]
    if len(ids) >= context:
        raise ErnieError(
            f"the message is too long: the prompt has {len(ids)} tokens but the model's context "
            f"window is {context}"
        )
    return messages, ids


def chat(
    model: Any,
    tokenizer: Any,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    verbose: bool = False,
    seed: int | None = None,
    hide_reasoning: bool = False,
    **kwargs: Any,
) -> int:
    """Run the chat loop until /exit or end of input; returns the exit code. A Thinking model's reasoning is
    shown dimmed (or hidden with `hide_reasoning`) and kept out of the history, as its template does."""
    import torch

    from ernie45.chat_template import is_thinking_template
    from ernie45.generation import PromptCache, resolve_config, stream_generate

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = stdin.isatty()
    spec = kwargs.pop("speculative", None)
    cfg = resolve_config(model, **kwargs)
    if "eos_token_id" not in kwargs:
        kwargs["eos_token_id"] = list(dict.fromkeys(cfg.eos_token_ids + tokenizer.stop_token_ids))
    max_new = kwargs.pop("max_new_tokens", cfg.max_new_tokens or 512)
    context = model.config.max_position_embeddings
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    history = PromptCache()  # each turn prefills only what the conversation added since the last one
    thinking = is_thinking_template(tokenizer.chat_template)
    if interactive:
        print(f"ernie45 chat: {HELP}", file=err)
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        line = stdin.readline()
        if not line:
            if interactive:
                out.write("\n")
            return 0
        text = line.rstrip("\r\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/clear":
            messages = list(start)
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not command:
            continue
        try:
            messages, prompt_ids = fit_history(
                tokenizer, messages + [{"role": "user", "content": text}], context, max_new
            )
        except ErnieError as e:
            print(f"error: {e}", file=err, flush=True)
            continue
        printer, last = ReplyPrinter(out, reasoning=thinking, hide=hide_reasoning), None
        for chunk in stream_generate(
            model,
            tokenizer,
            prompt_ids,
            generator=generator,
            max_new_tokens=min(max_new, context - len(prompt_ids)),
            prompt_cache=history,
            skip_special_tokens=not thinking,
            speculative=spec,
            **kwargs,
        ):
            printer.write(chunk.text)
            last = chunk
        printer.finish()
        messages.append({"role": "assistant", "content": printer.content})
        if verbose:
            report_speed(last, err)
            if spec is not None and not isinstance(spec, str):
                print(f"speculative ({spec.method}): {spec.accepted} of {spec.drafted} draft tokens accepted",
                      file=err, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = generation_kwargs(args)
    spec = speculative_from_args(args)
    if spec is not None:
        kwargs["speculative"] = spec
    model, tokenizer = load_model(args.model, args.dtype, args.device, quantize=args.quantize, adapter=args.adapter)
    return chat(model, tokenizer, system=args.system, verbose=args.verbose, seed=args.seed,
                hide_reasoning=args.hide_reasoning, **kwargs)
