"""The decode loop of the Python API and the CLI: `generate` (transformers-compatible), `generate_step` (one yield
per token) and `stream_generate` (text deltas). Greedy and sampling live here, beam search in beam.py; the server,
web UI and LangChain run the serving engine's batched loop (`ernie45.serve.engine`), with the same processors.

Built for speed: a preallocated KV cache and output buffer, a prefill that computes only the last
position's logits, and a decode step (`decode_step`) with one host sync per token (the new token ids).
Semantics follow transformers 5.x `GenerationMixin._sample` (see docs/generate.md for the differences).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ernie45.errors import ErnieError
from ernie45.generation.beam import beam_search
from ernie45.generation.config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from ernie45.generation.decode import decode_step, pad_token_id
from ernie45.generation.prompt_cache import PromptCache
from ernie45.generation.sampling import apply_all, make_processors, make_sampler
from ernie45.generation.speculative import Speculative, resolve_speculative, speculative_decode
from ernie45.generation.streaming import IncrementalDetokenizer, StopStringFilter, ends_with_stop_string
from ernie45.generation.structured import Grammar, compile_grammar, mask_rows_


@dataclass
class Step:
    """One decoding step for a batch.

    `tokens` are this step's token per row (pad_token_id for rows already finished); `finish_reasons[i]`
    becomes "stop" (EOS or stop string) or "length" at the step row i finishes and stays set.
    `sequences` is a view (B, prompt + steps so far) of the output buffer; `scores` / `logits` are the
    processed / raw fp32 scores of this step when asked for.
    """

    tokens: list[int]
    finished: list[bool]
    finish_reasons: list[str | None]
    sequences: Tensor
    scores: Tensor | None = None
    logits: Tensor | None = None


@dataclass
class GenerationChunk:
    """A piece of streamed text (`stream_generate`). The last chunk has `finish_reason` set.

    Timing: `ttft` is the time to the first token (prefill), `prompt_tps` the prefill tokens/s (of the
    tokens prefilled: `cached_tokens` came from a `PromptCache`) and `generation_tps` the decode tokens/s
    after the first token.
    """

    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    ttft: float
    prompt_tps: float
    generation_tps: float
    cached_tokens: int = 0


# ---- configuration ---------------------------------------------------------------------------------
def model_generation_config(model: Any) -> GenerationConfig:
    """The model's own defaults: its checkpoint's generation_config.json, else its config's special tokens."""
    cfg = getattr(model, "generation_config", None)
    if isinstance(cfg, GenerationConfig):
        return cfg
    path = getattr(model, "name_or_path", None)
    try:
        cfg = GenerationConfig.from_pretrained(path) if path else None
    except ErnieError:
        cfg = None
    cfg = cfg or GenerationConfig.from_model_config(model.config)
    model.generation_config = cfg
    return cfg


def resolve_config(
    model: Any, generation_config: GenerationConfig | None = None, **kwargs: Any
) -> GenerationConfig:
    """Defaults < model's generation config < `generation_config` < keyword arguments; validated."""
    cfg = model_generation_config(model).merge(generation_config).update(**kwargs).with_defaults()
    cfg.validate()
    return cfg


def resolve_lengths(cfg: GenerationConfig, prompt_len: int, context: int) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) as transformers derives them from max/min_new_tokens and max/min_length."""
    if cfg.max_new_tokens is not None:
        max_new = cfg.max_new_tokens
    elif cfg.max_length is not None:
        max_new = cfg.max_length - prompt_len
        if max_new < 1:
            raise ErnieError(
                f"the prompt ({prompt_len} tokens) already reaches max_length={cfg.max_length}; "
                "set max_new_tokens instead"
            )
    else:
        max_new = min(DEFAULT_MAX_NEW_TOKENS + prompt_len, context) - prompt_len
    if cfg.min_new_tokens is not None:
        min_new = cfg.min_new_tokens
    else:
        min_new = max(0, (cfg.min_length or 0) - prompt_len)
    return max_new, min_new


def prepare_inputs(model: Any, input_ids: Any, attention_mask: Any = None) -> tuple[Tensor, Tensor | None]:
    """Prompt ids (B, S) and mask on the model's device; the mask is None when there is no padding.

    Accepts a tensor or nested lists; a 1-D prompt becomes a batch of one. Raises ErnieError for an empty
    prompt, ids outside the vocabulary, right padding, or a prompt that fills the context window.
    """
    dev = model.device
    try:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=dev)
    except (ValueError, TypeError) as e:
        raise ErnieError(f"input_ids must be a tensor or a (rectangular) list of token ids: {e}") from None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ErnieError(f"input_ids must have shape (batch, length), got {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ErnieError("the prompt is empty")
    vocab = model.config.vocab_size
    lo, hi = ids.aminmax()
    if int(lo) < 0 or int(hi) >= vocab:
        raise ErnieError(f"input_ids must lie in [0, {vocab}), got values in [{int(lo)}, {int(hi)}]")
    context = model.config.max_position_embeddings
    if ids.shape[1] >= context:
        raise ErnieError(f"the prompt has {ids.shape[1]} tokens but the model's context window is {context}")
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=dev).long()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ErnieError(
                f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}"
            )
        if bool(mask.all()):
            mask = None
        elif not bool(mask[:, -1].all()):
            raise ErnieError("right padding found: pad batched prompts on the left (padding_side='left')")
    return ids, mask


def make_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """An explicit generator from `seed`; None keeps the global RNG (what transformers uses)."""
    if generator is not None or seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


# ---- the decode loop -------------------------------------------------------------------------------
@torch.inference_mode()
def _decode(
    model: Any,
    ids: Tensor,
    mask: Tensor | None,
    cfg: GenerationConfig,
    max_new: int,
    min_new: int,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    prompt_cache: PromptCache | None = None,
    grammar: Grammar | None = None,
    speculative: Speculative | None = None,
) -> Iterator[Step]:
    if speculative is not None:  # one sequence, drafts verified k + 1 at a time (speculative.py)
        for fields in speculative_decode(model, ids, cfg, max_new, min_new, speculative, tokenizer, generator,
                                         output_scores, output_logits, prompt_cache):
            yield Step(*fields)
        return
    B, S = ids.shape
    dev = ids.device
    eos = cfg.eos_token_ids
    eos_set = set(eos)
    stops = cfg.stop_string_list
    pad = pad_token_id(cfg)
    total = S + max_new
    seq = torch.full((B, total), pad, dtype=torch.long, device=dev)  # output buffer, written in place
    seq[:, :S] = ids
    mask_buf = None
    if mask is not None:
        mask_buf = torch.ones((B, total), dtype=torch.long, device=dev)
        mask_buf[:, :S] = mask
        positions = mask.sum(-1, keepdim=True)  # (B, 1): next position of each row, padding excluded
        ignore_before = (mask != 0).int().argmax(dim=1)  # leading pads, skipped by the repetition penalty
    else:
        positions = torch.full((B, 1), S, dtype=torch.long, device=dev)
        ignore_before = None
    processors = make_processors(
        prompt_len=S,
        repetition_penalty=cfg.repetition_penalty,
        presence_penalty=cfg.presence_penalty,
        frequency_penalty=cfg.frequency_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        min_new_tokens=min_new,
        eos_token_ids=eos,
        ignore_before=ignore_before,
        device=dev,
    )
    sampler = make_sampler(
        do_sample=cfg.do_sample,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        generator=generator,
    )
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev) if eos else None
    pad_t = torch.tensor(pad, dtype=torch.long, device=dev)

    guides = [grammar.guide() for _ in range(B)] if grammar is not None else None
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    finished = [False] * B
    reasons: list[str | None] = [None] * B
    generated: list[list[int]] = [[] for _ in range(B)]

    taken = None
    if prompt_cache is not None and B == 1 and mask is None:
        taken = prompt_cache.take(model, ids[0].tolist(), total - 1)
    cache, reused = taken or (model.new_cache(B, total - 1), 0)  # the last token is never fed back
    try:
        fast = getattr(model, "fast_decoder", None)  # a short prompt: the rows of one C step (ernie45.fast)
        logits = fast.prefill(ids[:, reused:], cache) if fast is not None and mask is None else None
        if logits is None:
            logits = model(ids[:, reused:], attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        for step in range(max_new):
            cur = S + step
            raw = logits.float()
            scores = apply_all(processors, seq[:, :cur], raw)
            if guides is not None:  # the grammar last: it overrides what the processors left
                live = [None if done else g for g, done in zip(guides, finished)]
                scores = mask_rows_(scores.clone() if scores is raw else scores, live)
            tokens = torch.where(unfinished, sampler(scores), pad_t)  # finished rows get padding
            seq[:, cur] = tokens
            if eos_t is not None:
                unfinished &= ~(tokens[:, None] == eos_t).any(-1)
            token_list = tokens.tolist()  # the one host sync of the step
            for i, t in enumerate(token_list):
                if finished[i]:
                    continue
                if guides is not None and not guides[i].accept(t) and t not in eos_set:
                    finished[i], reasons[i] = True, "stop"  # cannot happen: the mask allowed t
                    unfinished[i] = False
                    continue
                if stops:
                    generated[i].append(t)
                if t in eos_set:
                    finished[i], reasons[i] = True, "stop"
                elif stops and ends_with_stop_string(tokenizer, generated[i], stops):
                    finished[i], reasons[i] = True, "stop"
                    unfinished[i] = False
                elif step == max_new - 1:
                    finished[i], reasons[i] = True, "length"
            yield Step(
                token_list,
                list(finished),
                list(reasons),
                seq[:, : cur + 1],
                scores if output_scores else None,
                raw if output_logits else None,
            )
            if all(finished):
                break
            step_mask = mask_buf[:, : cur + 1] if mask_buf is not None else None
            logits = decode_step(model, tokens[:, None], cache, step_mask, positions)
            positions += 1
    finally:
        if taken is not None:  # the tokens whose keys/values the cache now holds, for the next call
            prompt_cache.keep(seq[0, : cache.length].tolist())


def _start(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    generation_config: GenerationConfig | None,
    tokenizer: Any,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None, GenerationConfig, int, int]:
    cfg = resolve_config(model, generation_config, **kwargs)
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    if cfg.stop_string_list and tokenizer is None:
        raise ErnieError("stop_strings needs the tokenizer: pass tokenizer=...")
    max_new, min_new = resolve_lengths(cfg, ids.shape[1], model.config.max_position_embeddings)
    return ids, mask, cfg, max_new, min_new


def _grammar(grammar: Grammar | str | None, tokenizer: Any, cfg: GenerationConfig) -> Grammar | None:
    """A compiled grammar, or a grammar source (`ernie45.generation.structured`) compiled for `tokenizer`."""
    if grammar is None:
        return None
    if cfg.num_beams > 1:
        raise ErnieError("grammar-constrained decoding works with greedy and sampling, not beam search")
    if isinstance(grammar, Grammar):
        return grammar
    if tokenizer is None:
        raise ErnieError("a grammar needs the tokenizer: pass tokenizer=...")
    return compile_grammar(tokenizer, grammar, cfg.eos_token_ids)


def _expand(ids: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
    """Repeat each prompt n times (num_return_sequences), as transformers does before decoding."""
    if n == 1:
        return ids, mask
    return ids.repeat_interleave(n, dim=0), (mask.repeat_interleave(n, dim=0) if mask is not None else None)


def generate_step(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    generation_config: GenerationConfig | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    prompt_cache: PromptCache | None = None,
    grammar: Grammar | str | None = None,
    speculative: Speculative | str | None = None,
    num_speculative_tokens: int | None = None,
    **kwargs: Any,
) -> Iterator[Step]:
    """Greedy / sampled decoding as an iterator of `Step`s: what the web UI and LangChain consume.

    Takes the same generation keywords as `generate` (except beam search). Arguments are checked here,
    before the first step; closing the iterator early stops decoding. `prompt_cache`: a `PromptCache` whose
    cached prefix of the prompt (one sequence) is reused instead of prefilled again. `grammar`: structured
    output (see `generate`). `speculative` / `num_speculative_tokens`: see `generate`.
    """
    ids, mask, cfg, max_new, min_new = _start(
        model, input_ids, attention_mask, generation_config, tokenizer, kwargs
    )
    if cfg.num_beams > 1:
        raise ErnieError("generate_step decodes greedily or by sampling; use generate() for beam search")
    spec = _speculative(model, speculative, num_speculative_tokens, ids, mask, cfg, grammar)
    ids, mask = _expand(ids, mask, cfg.num_return_sequences)
    return _decode(
        model,
        ids,
        mask,
        cfg,
        max_new,
        min_new,
        tokenizer,
        make_generator(seed, generator, ids.device),
        output_scores,
        output_logits,
        prompt_cache,
        _grammar(grammar, tokenizer, cfg),
        spec,
    )


def _speculative(model: Any, speculative: Any, k: int | None, ids: Tensor, mask: Tensor | None,
                 cfg: GenerationConfig, grammar: Any = None) -> Speculative | None:
    """The checked `speculative=` argument: one unpadded sequence, greedy or sampling, no grammar."""
    spec = resolve_speculative(model, speculative, k)
    if spec is not None and grammar is not None:
        raise ErnieError("speculative decoding does not combine with grammar-constrained decoding")
    if spec is not None and (ids.shape[0] != 1 or mask is not None or cfg.num_return_sequences != 1):
        raise ErnieError("speculative decoding runs one sequence (batch 1, num_return_sequences=1)")
    if spec is not None and cfg.num_beams > 1:
        raise ErnieError("speculative decoding works with greedy and sampling, not beam search")
    return spec


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    num_return_sequences: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Any = None,
    generation_config: GenerationConfig | None = None,
    prompt_cache: PromptCache | None = None,
    grammar: Grammar | str | None = None,
    speculative: Speculative | str | None = None,
    num_speculative_tokens: int | None = None,
) -> Tensor:
    """transformers-style `generate`: returns (B * num_return_sequences, prompt + new) token ids.

    Same keywords, defaults and results as transformers 5.x `model.generate` (greedy unless `do_sample`,
    `top_k=50` when sampling, 20 new tokens unless told otherwise, finished rows padded with
    `pad_token_id`). Greedy and beam search give transformers' exact token ids; sampling draws what
    transformers draws from the same RNG state (`seed=` uses a private generator instead).

    Args:
        model: an `ErnieForCausalLM`.
        input_ids: (B, S) prompt ids (tensor or lists); batches are left padded.
        attention_mask: (B, S) 1 for tokens, 0 for padding.
        stop_strings: stop a row once its generated text contains one (needs `tokenizer`).
        seed / generator: sampling randomness; neither means the global torch RNG.
        streamer: an object with `put(ids)` / `end()` (ernie45's or transformers' streamers), batch 1.
        generation_config: a `GenerationConfig` layered over the checkpoint's; keywords win over both.
        prompt_cache: a `PromptCache` kept between calls (one unpadded sequence): the part of the prompt it
            already holds is not prefilled again (a chat's earlier turns).
        grammar: structured output: every row's continuation follows it and ends (EOS) when it is complete. A
            source from `ernie45.generation.structured` (`json_schema_grammar(schema)`, `regex_grammar`,
            `lark_grammar`) compiled with `tokenizer`, or a `compile_grammar` result. Not with beam search.
        speculative: "mtp" (the checkpoint's MTP head) or "ngram" (prompt lookup), or a `Speculative` (whose
            `drafted` / `accepted` counts grow with each call): draft `num_speculative_tokens` tokens and verify
            them in one pass (docs/speculative.md). Greedy output is that of plain decoding; sampling keeps the
            distribution. One sequence, no beams, no grammar.
    """
    params = dict(
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        min_new_tokens=min_new_tokens,
        min_length=min_length,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop_strings=stop_strings,
    )
    ids, mask, cfg, max_new, min_new = _start(
        model, input_ids, attention_mask, generation_config, tokenizer, params
    )
    gen = make_generator(seed, generator, ids.device)
    compiled = _grammar(grammar, tokenizer, cfg)
    spec = _speculative(model, speculative, num_speculative_tokens, ids, mask, cfg, compiled)
    if cfg.num_beams > 1:
        if streamer is not None:
            raise ErnieError("streaming is not supported with beam search (num_beams > 1)")
        return beam_search(model, ids, mask, cfg, max_new, min_new, tokenizer, gen)
    ids, mask = _expand(ids, mask, cfg.num_return_sequences)
    if streamer is not None:
        streamer.put(ids.cpu())
    out = ids
    steps = _decode(
        model, ids, mask, cfg, max_new, min_new, tokenizer, gen, prompt_cache=prompt_cache, grammar=compiled,
        speculative=spec,
    )
    for step in steps:
        if streamer is not None:
            streamer.put(torch.tensor(step.tokens))
        out = step.sequences
    if streamer is not None:
        streamer.end()
    return out.clone()


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    skip_special_tokens: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    generation_config: GenerationConfig | None = None,
    prompt_cache: PromptCache | None = None,
    grammar: Grammar | str | None = None,
    speculative: Speculative | str | None = None,
    num_speculative_tokens: int | None = None,
    **kwargs: Any,
) -> Iterator[GenerationChunk]:
    """Stream one continuation of `prompt` (text, encoded without special tokens, or ids) as text chunks.

    Text never contains a broken character or any part of a stop string; generation stops at the first
    stop string, whose text is left out (`finish_reason="stop"`, as in OpenAI's API). Keywords are those
    of `generate` (no beam search); they are checked before the first chunk. `prompt_cache`: keep the KV
    cache between calls (a chat's turns), so only the prompt's new tokens are prefilled. `grammar`: structured
    output (see `generate`).
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    cfg = resolve_config(model, generation_config, **kwargs)
    if cfg.num_beams > 1 or cfg.num_return_sequences > 1:
        raise ErnieError("stream_generate makes one sequence; use generate() for beams or several sequences")
    stops = cfg.stop_string_list
    eos = set(cfg.eos_token_ids)
    steps = generate_step(
        model, [ids], seed=seed, generator=generator, generation_config=cfg, stop_strings=[],
        prompt_cache=prompt_cache, tokenizer=tokenizer, grammar=grammar, speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
    )

    def chunks() -> Iterator[GenerationChunk]:
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        stop_filter = StopStringFilter(stops)
        ttft, n, t0, cached = 0.0, 0, time.perf_counter(), 0
        try:
            for step in steps:
                n += 1
                now = time.perf_counter()
                if n == 1:
                    ttft = now - t0
                    cached = prompt_cache.reused if prompt_cache is not None else 0
                token = step.tokens[0]
                # an end token adds no text (it would, decoded with its special tokens kept)
                text, hit = stop_filter.add("" if token in eos else detok.add(token))
                reason = "stop" if hit else step.finish_reasons[0]
                if reason is not None and not hit:
                    tail, hit = stop_filter.add(detok.flush())
                    text += tail + stop_filter.flush()
                    reason = "stop" if hit else reason
                yield GenerationChunk(
                    text=text,
                    token=token,
                    finish_reason=reason,
                    prompt_tokens=len(ids),
                    generation_tokens=n,
                    ttft=ttft,
                    prompt_tps=(len(ids) - cached) / max(ttft, 1e-9),
                    cached_tokens=cached,
                    generation_tps=(n - 1) / max(now - t0 - ttft, 1e-9) if n > 1 else 0.0,
                )
                if reason is not None:
                    return
        finally:
            steps.close()

    return chunks()
