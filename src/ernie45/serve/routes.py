"""The HTTP endpoints (`install_routes`): `/health`, `/metrics`, `/v1/models`, `/tokenizer_info`, `/tokenize`,
`/detokenize`, `/v1/chat/completions` and `/v1/completions`, with the request checks they share (model name,
token ids, context length) and the translation of a request into the engine's `SamplingParams`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ernie45.errors import ErnieError
from ernie45.generation import structured
from ernie45.generation.structured import Grammar
from ernie45.serve.agent import RequestError, output_grammar, plan_chat
from ernie45.serve.engine import Engine
from ernie45.serve.parsers import parse_output
from ernie45.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    Usage,
)
from ernie45.serve.request import SamplingParams
from ernie45.serve.state import APIError, ServerConfig, ServerState
from ernie45.serve.streaming import (
    EventStream,
    chat_events,
    chat_logprob,
    collect,
    completion_events,
    completion_logprobs,
    usage_dict,
)


def install_routes(app: FastAPI, st: ServerState) -> None:
    cfg = st.config

    @app.get("/health")
    async def health() -> Response:
        if st.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if st.engine.failed is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = st.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models() -> ModelList:
        st.ready()
        return ModelList(
            data=[
                ModelCard(
                    id=cfg.served_model_name,
                    created=st.created,
                    root=cfg.served_model_name,
                    max_model_len=cfg.engine.max_model_len,
                )
            ]
        )

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        st.ready()
        tok = st.tokenizer
        return {
            "tokenizer_class": "LlamaTokenizer",
            "eos_token": tok.special_tokens_map.get("eos_token"),
            "bos_token": tok.special_tokens_map.get("bos_token"),
            "pad_token": tok.special_tokens_map.get("pad_token"),
            "chat_template": tok.chat_template,
            "model_max_length": cfg.engine.max_model_len,
            "vocab_size": tok.vocab_size,
        }

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        st.ready()
        _check_model(req.model, cfg)
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            try:
                ids = await asyncio.to_thread(
                    st.tokenizer.apply_chat_template,
                    [m.as_template_dict() for m in req.messages],
                    add_generation_prompt=req.add_generation_prompt,
                    tokenize=True,
                    tools=tools,
                )
            except ErnieError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
        else:
            ids = await asyncio.to_thread(st.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": cfg.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        st.ready()
        _check_model(req.model, cfg)
        _check_ids(req.tokens, st.vocab_size, "tokens")
        return {"prompt": await asyncio.to_thread(st.tokenizer.decode, req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        engine = st.ready()
        _check_model(req.model, cfg)
        try:
            plan, max_tokens = await asyncio.to_thread(
                plan_chat,
                st.tokenizer,
                req,
                eos_ids=sorted(engine.eos_ids),
                max_model_len=cfg.engine.max_model_len,
                reasoning_parser=cfg.reasoning_parser,
                tool_call_parser=cfg.tool_call_parser,
            )
        except RequestError as e:
            raise APIError(400, e.message, param=e.param) from None
        prompt = plan.prompt
        _check_length(len(prompt), req.max_new_tokens, cfg.engine.max_model_len, "messages")
        params = _params(req, st, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, None)
        parsing = plan.reasoning or plan.tools
        # the markers may be special tokens: the parsers need them in the text (stop tokens add no text)
        params = replace(params, grammar=plan.grammar, skip_special_tokens=params.skip_special_tokens and not parsing)
        group = engine.submit([prompt] * req.n, [_with_seed(params, i) for i in range(req.n)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return EventStream(chat_events(st, req, group, rid, created, len(prompt), plan), group.abort)
        results = await collect(request, group, req.n)
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            message, finish = {"role": "assistant", "content": r.text}, r.finish_reason
            if parsing:
                parsed = parse_output(r.text, plan.reasoning, plan.tools, r.finish_reason, plan.max_calls)
                message, finish = parsed.message(), parsed.finish_reason
            lps = ChatLogprobs(content=[chat_logprob(st, t) for t in r.logprobs]) if req.logprobs else None
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=lps))
        completion = sum(r.num_output_tokens for r in results)
        return JSONResponse(
            ChatCompletionResponse(
                id=rid,
                created=created,
                model=cfg.served_model_name,
                choices=choices,
                usage=Usage(**usage_dict(len(prompt), completion, results[0].num_cached_tokens)),
            ).model_dump()
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        engine = st.ready()
        _check_model(req.model, cfg)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # an explicit null: OpenAI's default
        if len(req.prompts()) * req.n > cfg.engine.max_queue_len:
            raise APIError(
                400,
                f"prompt: {len(req.prompts())} prompts x n={req.n} sequences exceed what the server queues "
                f"({cfg.engine.max_queue_len})",
                param="prompt",
            )

        def encode_all() -> list[list[int]]:  # off the event loop: a long text takes a while to tokenize
            return [st.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts()]

        prompts = await asyncio.to_thread(encode_all)
        for ids in prompts:
            _check_ids(ids, st.vocab_size, "prompt")
            _check_length(len(ids), max_tokens, cfg.engine.max_model_len, "prompt")
        k = req.logprobs
        params = _params(req, st, max_tokens, k, k if req.echo and k is not None else None)
        if (fmt := req.output_format()) is not None:
            params = replace(params, grammar=await asyncio.to_thread(_compile_output, st, engine, fmt))
        flat = [p for p in prompts for _ in range(req.n)]
        group = engine.submit(flat, [_with_seed(params, i % req.n) for i in range(len(flat))])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [""] * len(flat)
        if req.echo:
            echo = await asyncio.to_thread(
                lambda: [st.tokenizer.decode(p, skip_special_tokens=req.skip_special_tokens) for p in flat]
            )
        if req.stream:
            return EventStream(completion_events(st, req, group, rid, created, flat, echo), group.abort)
        results = await collect(request, group, len(flat))
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            lp = None
            if k is not None:
                tokens = (r.prompt_logprobs or []) + r.logprobs if req.echo else r.logprobs
                ids = (flat[i] if req.echo else []) + r.token_ids
                lp = completion_logprobs(st, ids, tokens, echo[i], req.return_tokens_as_token_ids)
            choices.append(
                CompletionChoice(index=i, text=echo[i] + r.text, logprobs=lp, finish_reason=r.finish_reason)
            )
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(r.num_output_tokens for r in results)
        return JSONResponse(
            CompletionResponse(
                id=rid,
                created=created,
                model=cfg.served_model_name,
                choices=choices,
                usage=Usage(**usage_dict(prompt_tokens, completion, sum(r.num_cached_tokens for r in results[:: req.n]))),
            ).model_dump()
        )


# ---- request helpers ----------------------------------------------------------------------------------
def _check_model(name: str | None, cfg: ServerConfig) -> None:
    if name and name != cfg.served_model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist (this server serves {cfg.served_model_name!r})",
            "not_found_error",
            param="model",
            code="model_not_found",
        )


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)


def _check_length(prompt_len: int, max_tokens: int | None, limit: int, param: str) -> None:
    if prompt_len == 0:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    if prompt_len >= limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but the {param} take "
            f"{prompt_len} tokens; shorten them",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but {prompt_len} prompt "
            f"tokens + max_tokens {max_tokens} = {prompt_len + max_tokens}; lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _compile_output(st: ServerState, engine: Engine, fmt: tuple[str, Any]) -> Grammar:
    """A completion's structured-output grammar (no chat template, so no reasoning wrapper)."""
    try:
        return structured.compile_grammar(st.tokenizer, output_grammar(fmt), sorted(engine.eos_ids))
    except ErnieError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None


def _params(
    req, st: ServerState, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
) -> SamplingParams:
    """SamplingParams from a request, with OpenAI's defaults (temperature 1, top_p 1, no top-k)."""
    vocab = st.vocab_size
    _check_ids(req.stop_token_ids or [], vocab, "stop_token_ids")
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    _check_ids(list(bias), vocab, "logit_bias")
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=bias or None,
    )


def _with_seed(p: SamplingParams, i: int) -> SamplingParams:
    """Choice i of a seeded request uses seed + i, so the n choices differ but each is reproducible."""
    if p.seed is None or i == 0:
        return p
    return SamplingParams(**{**p.__dict__, "seed": p.seed + i})
