"""`ernie45 serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints follow OpenAI and vLLM (ECOSYSTEM.md §6.1): `/v1/chat/completions`, `/v1/completions` (SSE
streaming, `n`, stop strings, logprobs, token-id prompts with `echo` for lm-eval), `/v1/models`, `/health`
(503 while the model loads), `/metrics` (Prometheus), `/tokenize`, `/detokenize` and `/tokenizer_info`
(which lets lm-eval use the server's tokenizer). Errors use OpenAI's nested `{"error": {...}}` form.

Under `torchrun ... serve --tp N`, rank 0 runs the HTTP front end and the engine; the other ranks only replay
the engine's model calls (`ernie45.serve.runner`). Should a rank fail, rank 0 answers 503 and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ernie45.checkpoint import parse_size
from ernie45.commands import add_parallel_args
from ernie45.errors import ErnieError
from ernie45.generation import structured
from ernie45.generation.structured import Grammar
from ernie45.serve.agent import (
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    ChatPlan,
    RequestError,
    output_grammar,
    plan_chat,
)
from ernie45.serve.engine import Engine, EngineArgs, EngineError, SamplingParams, TokenLogprob
from ernie45.serve.kv import KV_DTYPES
from ernie45.serve.metrics import ServerMetrics
from ernie45.serve.parsers import OutputStream, parse_output
from ernie45.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TopLogprob,
    Usage,
)

log = logging.getLogger("ernie45.serve")
access_log = logging.getLogger("ernie45.serve.access")

DEFAULT_MAX_BODY = 4 * 2**20
OPEN_PATHS = ("/health", "/metrics")  # reachable without the API key, as in vLLM
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})  # metric labels
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class APIError(Exception):
    """An error answered in OpenAI's form with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )
        return JSONResponse(body.model_dump(), status_code=self.status)


@dataclass
class ModelSource:
    """Where the model comes from: a checkpoint directory (loaded in the background) or a loaded model
    (e.g. this rank's tensor-parallel shard)."""

    path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantize: str | None = None
    adapter: str | None = None
    model: Any = None
    tokenizer: Any = None


@dataclass
class ServerConfig:
    served_model_name: str = "ernie45"
    api_key: str | None = None
    engine: EngineArgs = field(default_factory=EngineArgs)
    max_body_bytes: int = DEFAULT_MAX_BODY
    drain_timeout: float = 10.0
    reasoning_parser: str = "auto"  # auto: on when the rendered prompt ends in <think>
    tool_call_parser: str = "ernie45"
    allowed_hosts: frozenset[str] | None = None  # Host/Origin names a keyless server answers (None: any)


class _State:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.engine: Engine | None = None
        self.tokenizer: Any = None
        self.created = int(time.time())
        self.token_strs: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        """Valid token ids: the model's (embedding) vocabulary."""
        return self.ready().model.config.vocab_size

    def ready(self) -> Engine:
        if self.engine is None:
            raise APIError(
                503,
                "the model is still loading; retry when GET /health returns 200",
                "server_error",
                code="model_loading",
            )
        if self.engine.failed is not None:
            raise APIError(
                503,
                "the server lost a tensor-parallel rank and is stopping",
                "server_error",
                code="rank_failed",
            )
        return self.engine

    def token_str(self, tid: int) -> str:
        """A token as OpenAI logprobs show it: its text, or `bytes:\\xHH` for a lone UTF-8 byte."""
        s = self.token_strs.get(tid)
        if s is None:
            # Ids past the tokenizer (a model vocabulary padded for speed) decode to nothing.
            piece = self.tokenizer.convert_ids_to_tokens([tid])[0] if tid < self.tokenizer.vocab_size else ""
            m = _BYTE_PIECE.fullmatch(piece)
            s = f"bytes:\\x{m.group(1).lower()}" if m else piece.replace("\u2581", " ")
            self.token_strs[tid] = s
        return s

    def token_bytes(self, tid: int) -> list[int]:
        s = self.token_str(tid)
        return [int(s[8:], 16)] if s.startswith("bytes:\\x") else list(s.encode("utf-8"))


# ---- model loading ---------------------------------------------------------------------------------
def load_model(source: ModelSource):
    """Load the checkpoint, merge `source.adapter` into it and quantize it (`source.quantize`), in that order.

    The adapter is merged rather than run beside the weights: serving then decodes at base-model speed.
    Returns (model, tokenizer).
    """
    import ernie45
    from ernie45.quant.stream import STREAM_MODES

    stream = source.quantize in STREAM_MODES and not source.adapter  # quantized tensor by tensor while loading
    model, tokenizer = ernie45.load(source.path, dtype=source.dtype, device=source.device,
                                    quantize=source.quantize if stream else None)
    if source.adapter:
        from ernie45.train.lora import load_adapter

        load_adapter(model, source.adapter, merge=True)
    if source.quantize and not stream:
        from ernie45.quant import quantize_model

        quantize_model(model, source.quantize, tokenizer=tokenizer, progress=False)
    from ernie45.fast import optimize_for_inference

    optimize_for_inference(model)  # the C decode step where it applies (the engine batches it), oneDNN prefill
    return model, tokenizer


# ---- app ---------------------------------------------------------------------------------------------
def create_app(
    source: ModelSource,
    config: ServerConfig | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app. With `source.model` set it serves that model at once; otherwise it loads
    `source.path` in a background thread and answers 503 until ready. `on_fatal` hears of a failed load or
    of a tensor-parallel engine that stopped (a lost rank): the server should then exit."""
    config = config or ServerConfig()
    st = _State(config)

    def start_engine(model, tokenizer) -> None:
        engine = Engine(model, tokenizer, config.engine, st.metrics, on_fatal=on_fatal)
        engine.start()
        st.tokenizer, st.engine = tokenizer, engine
        log.info(
            "ready: serving %r (max_num_seqs=%d, max_model_len=%d)",
            config.served_model_name,
            config.engine.max_num_seqs,
            config.engine.max_model_len,
        )

    def load_in_background() -> None:
        try:
            start_engine(*load_model(source))
        except BaseException as e:  # reported to the CLI, which stops the server
            log.error("could not load the model: %s", e)
            if on_fatal is not None:
                on_fatal(e)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if source.model is not None:
            start_engine(source.model, source.tokenizer)
        else:
            threading.Thread(target=load_in_background, name="ernie45-load", daemon=True).start()
        yield
        if st.engine is not None:
            await asyncio.to_thread(st.engine.shutdown, config.drain_timeout)

    app = FastAPI(title="ernie45", lifespan=lifespan)
    app.state.server = st
    app.add_middleware(_Guard, state=st)
    _install_error_handlers(app)
    _install_routes(app, st)
    return app


class _Guard:
    """Pure ASGI middleware: body-size limit, API key, request id, JSON access log and HTTP metrics.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched.
    """

    def __init__(self, app, state: _State):
        self.app, self.st = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        cfg = self.st.config
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        status = 500
        received = 0

        too_large = False  # the body outgrew the limit while the app read it: answer 413, whatever the app says

        started = False

        async def send_with_id(message) -> None:
            nonlocal status, started
            if too_large:
                return
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))],
                }
            await send(message)

        async def receive_limited():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cfg.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        try:
            length = headers.get(b"content-length")
            error = None
            if not _host_allowed(headers, cfg):
                error = APIError(
                    403,
                    "this Host/Origin is not allowed (a loopback server without an API key answers only "
                    "loopback names; add others with --allowed-hosts)",
                    "permission_error",
                    code="host_not_allowed",
                )
            elif length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
                error = _too_large(cfg.max_body_bytes)
            elif cfg.api_key and scope["path"] not in OPEN_PATHS and not _authorized(headers, cfg.api_key):
                error = APIError(
                    401,
                    "invalid or missing API key (send Authorization: Bearer <key>)",
                    "authentication_error",
                    code="invalid_api_key",
                )
            try:
                if error is None:
                    await self.app(scope, receive_limited, send_with_id)
            except _BodyTooLarge:
                pass
            if too_large:
                error, too_large = _too_large(cfg.max_body_bytes), False
            if error is not None and not started:
                await error.response()(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            self.st.metrics.http.labels(method, route, str(status)).inc()
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "request_id": rid,
                        "client": f"{client[0]}:{client[1]}" if client else None,
                        "method": scope["method"][:16],
                        "path": scope["path"][:256],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    }
                )
            )


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")


def _host_allowed(headers: dict[bytes, bytes], cfg: ServerConfig) -> bool:
    """DNS-rebinding guard for a keyless server bound to loopback: a browser page on another site can make
    requests to 127.0.0.1 under its own host name, so only loopback names (and --allowed-hosts) may appear in
    Host and Origin. Servers with an API key or bound elsewhere answer any host."""
    if cfg.api_key or cfg.allowed_hosts is None:
        return True
    for name, value in ((b"host", headers.get(b"host")), (b"origin", headers.get(b"origin"))):
        if value is None:
            continue
        text = value.decode("latin-1").strip().lower()
        if name == b"origin":
            if text == "null":
                return False
            text = text.split("://", 1)[-1]
        host = text.rsplit("]", 1)[0].lstrip("[") if text.startswith("[") else text.split(":", 1)[0]
        if host not in cfg.allowed_hosts:
            return False
    return True


def _authorized(headers: dict[bytes, bytes], key: str) -> bool:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = auth.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return APIError(e.status, e.message, e.type, code=e.code).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type_).response()

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "internal server error", "server_error").response()


def _validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming the parameter, e.g. param="max_tokens"."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()
        )
    # pydantic names union members and validators in the location ("str", "list[int]", "function-after[...]").
    loc = [x for x in loc if not ("[" in x or x in ("str", "int", "float", "bool"))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if param and not msg.startswith(param):
        msg = f"{param}: {msg}"
    if param is None and ":" in msg:  # a model-level check that names its field ("stop: ...")
        param = msg.split(":", 1)[0]
    return APIError(400, msg, param=param)


def _install_routes(app: FastAPI, st: _State) -> None:
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
            return _EventStream(_chat_events(st, req, group, rid, created, len(prompt), plan), group.abort)
        results = await _collect(request, group, req.n)
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            message, finish = {"role": "assistant", "content": r.text}, r.finish_reason
            if parsing:
                parsed = parse_output(r.text, plan.reasoning, plan.tools, r.finish_reason)
                parsed.tool_calls = parsed.tool_calls[: plan.max_calls]
                message, finish = parsed.message(), parsed.finish_reason
            lps = ChatLogprobs(content=[_chat_lp(st, t) for t in r.logprobs]) if req.logprobs else None
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=lps))
        completion = sum(r.num_output_tokens for r in results)
        return JSONResponse(
            ChatCompletionResponse(
                id=rid,
                created=created,
                model=cfg.served_model_name,
                choices=choices,
                usage=Usage(**_usage(len(prompt), completion, results[0].num_cached_tokens)),
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
            return _EventStream(_completion_events(st, req, group, rid, created, flat, echo), group.abort)
        results = await _collect(request, group, len(flat))
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            lp = None
            if k is not None:
                tokens = (r.prompt_logprobs or []) + r.logprobs if req.echo else r.logprobs
                ids = (flat[i] if req.echo else []) + r.token_ids
                lp = _completion_lp(st, ids, tokens, echo[i], req.return_tokens_as_token_ids)
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
                usage=Usage(**_usage(prompt_tokens, completion, sum(r.num_cached_tokens for r in results[:: req.n]))),
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


def _compile_output(st: _State, engine: Engine, fmt: tuple[str, Any]) -> Grammar:
    """A completion's structured-output grammar (no chat template, so no reasoning wrapper)."""
    try:
        return structured.compile_grammar(st.tokenizer, output_grammar(fmt), sorted(engine.eos_ids))
    except ErnieError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None


def _params(
    req, st: _State, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
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


@dataclass
class _Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


async def _collect(request: Request, group, n: int) -> list[_Result] | None:
    """Run a non-streaming request to the end; None (and the request aborted) if the client went away."""
    results = [_Result() for _ in range(n)]

    async def consume() -> None:
        async for i, out in group:
            r = results[i]
            r.text += out.text
            r.token_ids += out.token_ids
            r.logprobs += out.logprobs or []
            if out.prompt_logprobs is not None:
                r.prompt_logprobs = out.prompt_logprobs
            r.finish_reason, r.num_output_tokens = out.finish_reason, out.num_output_tokens
            r.num_cached_tokens = out.num_cached_tokens

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            group.abort()
            work.cancel()  # takes effect at the task's next step: until then it is neither done nor cancelled
        watch.cancel()
    if not work.done() or work.cancelled():
        return None
    work.result()  # re-raises an EngineError
    return results


class _EventStream(StreamingResponse):
    """SSE response that aborts its request however the stream ends (done, error or client disconnect)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_error(e: EngineError) -> str:
    return _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)).model_dump()


async def _chat_events(
    st: _State, req: ChatCompletionRequest, group, rid: str, created: int, prompt_len: int, plan: ChatPlan
) -> AsyncIterator[str]:
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    base = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": st.config.served_model_name,
    }
    counts, cached = [0] * req.n, [0] * req.n
    parsing = plan.reasoning or plan.tools
    streams = [OutputStream(plan.reasoning, plan.tools) for _ in range(req.n)] if parsing else None

    def chunk(i: int, delta: dict, finish: str | None = None, lps: list | None = None) -> str:
        choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
        usage = _usage(prompt_len, sum(counts), cached[0]) if continuous else None
        return _sse({**base, "choices": [choice], "usage": usage})

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, out in group:
            counts[i], cached[i] = out.num_output_tokens, out.num_cached_tokens
            lps = None
            if req.logprobs and out.logprobs:
                lps = {"content": [_chat_lp(st, t).model_dump() for t in out.logprobs]}
            if streams is None:
                # One event per generated token, even while its text is held back (a partial UTF-8 character
                # or stop string), so clients can time every token; the final event has an empty delta.
                delta = {"content": out.text} if out.token_ids or out.text else {}
                yield chunk(i, delta, out.finish_reason, lps)
                continue
            events = streams[i].feed(out.text)
            finish = None
            if out.finish_reason is not None:
                events += streams[i].finish()
                finish = streams[i].finish_reason(out.finish_reason)
            deltas = [
                ev.delta()
                for ev in events
                if not (ev.kind == "tool_call" and plan.max_calls is not None and ev.value["index"] >= plan.max_calls)
            ] or [{}]  # still one event per token
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                yield chunk(i, delta, finish if last else None, lps if k == 0 else None)
    except EngineError as e:
        yield _sse_error(e)
    else:
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_len, sum(counts), cached[0])})
    yield "data: [DONE]\n\n"


async def _completion_events(
    st: _State,
    req: CompletionRequest,
    group,
    rid: str,
    created: int,
    prompts: list[list[int]],
    echo: list[str],
) -> AsyncIterator[str]:
    opts = req.stream_options
    base = {"id": rid, "object": "text_completion", "created": created, "model": st.config.served_model_name}
    counts, cached = [0] * len(prompts), [0] * len(prompts)
    started = [False] * len(prompts)
    prompt_total = sum(len(p) for p in prompts[:: req.n])
    try:
        async for i, out in group:
            counts[i], cached[i] = out.num_output_tokens, out.num_cached_tokens
            text, ids, lps = out.text, list(out.token_ids), list(out.logprobs or [])
            prefix = ""
            if not started[i]:
                started[i] = True
                if req.echo:
                    prefix, ids = echo[i], prompts[i] + ids
                    lps = (out.prompt_logprobs or []) + lps
            logprobs = None
            if req.logprobs is not None:
                logprobs = _completion_lp(st, ids, lps, prefix, req.return_tokens_as_token_ids).model_dump()
            usage = (
                _usage(prompt_total, sum(counts), sum(cached[:: req.n]))
                if opts and opts.continuous_usage_stats
                else None
            )
            yield _sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "text": prefix + text,
                            "logprobs": logprobs,
                            "finish_reason": out.finish_reason,
                        }
                    ],
                    "usage": usage,
                }
            )
    except EngineError as e:
        yield _sse_error(e)
    else:
        if opts and opts.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_total, sum(counts), sum(cached[:: req.n]))})
    yield "data: [DONE]\n\n"


def _chat_lp(st: _State, t: TokenLogprob) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=st.token_str(t.token_id),
        logprob=t.logprob,
        bytes=st.token_bytes(t.token_id),
        top_logprobs=[
            TopLogprob(token=st.token_str(i), logprob=v, bytes=st.token_bytes(i)) for i, v in t.top
        ],
    )


def _completion_lp(
    st: _State, ids: list[int], lps: list[TokenLogprob | None], prefix: str, as_ids: bool = False
) -> CompletionLogprobs:
    """OpenAI's legacy completions logprobs; `text_offset` counts characters from the start of the text.
    `as_ids`: tokens are named `token_id:N` (vLLM's `return_tokens_as_token_ids`)."""
    name = (lambda i: f"token_id:{i}") if as_ids else st.token_str
    out = CompletionLogprobs()
    offset = 0
    for tid, t in zip(ids, lps):
        s = name(tid)
        out.tokens.append(s)
        out.text_offset.append(offset)
        offset += len(s)
        if t is None:  # the first prompt token has no context, hence no logprob
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            top = {name(i): v for i, v in t.top}
            top.setdefault(s, t.logprob)  # the chosen token is always listed, as vLLM does
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append(top)
    return out


# ---- CLI ------------------------------------------------------------------------------------------------
def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_num_seqs: int = 8,
    max_model_len: int | None = None,
    max_num_batched_tokens: int | None = None,
    max_queue_len: int = 256,
    request_timeout: float = 600.0,
    quantize: str | None = None,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_body_bytes: int = DEFAULT_MAX_BODY,
    shutdown_timeout: float = 30.0,
    threads: int | None = None,
    tp: int = 1,
    ep: int = 1,
    block_size: int = 16,
    kv_cache_memory: str | int | None = None,
    enable_prefix_caching: bool = True,
    kv_cache_dtype: str = "auto",
    reasoning_parser: str = "auto",
    tool_call_parser: str = "ernie45",
    allowed_hosts: list[str] | None = None,
) -> None:
    """Serve a checkpoint over HTTP until interrupted (Ctrl-C / SIGTERM shut down gracefully).

    Args:
        model: checkpoint directory, or None / a bundled name for the bundled model.
        host, port: where to listen; the default binds loopback only.
        api_key: if set, every endpoint but /health and /metrics needs `Authorization: Bearer <key>`.
        max_num_seqs: sequences admitted at once (prefilling or decoding).
        max_model_len: context length per sequence (prompt + output).
        max_num_batched_tokens: tokens one engine step computes (decode tokens plus prompt chunks).
        max_queue_len: requests allowed to wait for KV-cache blocks; more are answered with 429.
        request_timeout: seconds a request may take from arrival before it ends with an error.
        shutdown_timeout: seconds in-flight requests get to finish on shutdown.
        reasoning_parser: "auto" splits reasoning from content when a chat prompt ends in `<think>` (a Thinking
            model's template), "ernie45" always, "none" never.
        tool_call_parser: "ernie45" turns `<tool_call>` blocks into `tool_calls` when a request has tools.
        allowed_hosts: more Host/Origin names a keyless loopback server answers (DNS-rebinding guard).
        threads: CPU threads for the model; default all cores (shared among the ranks). The HTTP loop only
            formats and sends events, so it needs no core of its own: on a 2-core machine all cores decoded a
            0.3B bf16 stream at 71 tok/s against 46 with one core kept free, with a lower p99 inter-token latency.
        tp, ep: tensor- and expert-parallel sizes (run under `torchrun --nproc-per-node tp`): rank 0 serves
            HTTP, the other ranks follow its engine.
        block_size: positions per KV-cache block (the unit of allocation and of prefix sharing).
        kv_cache_memory: the KV pool's size ("4GB", "512MB" or bytes); default room for max_num_seqs
            sequences of max_model_len, at most half the memory available at start.
        enable_prefix_caching: reuse the cached keys/values of prompt prefixes seen before.
        kv_cache_dtype: "auto" (the model dtype) or "int8" (per-row scales; half the memory of bf16).
    """
    import torch
    import uvicorn

    from ernie45.config import ErnieConfig
    from ernie45.models import resolve_model_path

    path = resolve_model_path(model)
    mcfg = ErnieConfig.from_pretrained(path)
    max_model_len = max_model_len or min(mcfg.max_position_embeddings, 4096)
    _check_range("--port", port, 0, 65535)
    _check_range("--max-num-seqs", max_num_seqs, 1, 4096)
    _check_range("--max-model-len", max_model_len, 2, mcfg.max_position_embeddings)
    _check_range("--max-queue-len", max_queue_len, 1, 1_000_000)
    _check_range("--max-body-bytes", max_body_bytes, 1024, 2**31)
    if request_timeout <= 0 or shutdown_timeout < 0:
        raise ErnieError("--request-timeout must be > 0 and --shutdown-timeout >= 0")
    _check_range("--block-size", block_size, 1, 1024)
    batched = max_num_batched_tokens or 2048
    _check_range("--max-num-batched-tokens", batched, max(block_size, max_num_seqs + 1), 2**31)
    kv_bytes = None if kv_cache_memory is None else parse_size(kv_cache_memory)
    if kv_cache_dtype not in KV_DTYPES:
        raise ErnieError(f"--kv-cache-dtype must be one of {', '.join(KV_DTYPES)}, got {kv_cache_dtype!r}")
    parallel = tp > 1 or ep > 1
    if parallel:
        if quantize or adapter:
            raise ErnieError("--tp/--ep cannot be combined with --quantize or --adapter yet")
        from ernie45.parallel import check_split

        check_split(mcfg, tp, ep)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, ncpu // tp) if threads is None else threads
    _check_range("--threads", threads, 1, 4096)
    torch.set_num_threads(threads)
    if adapter:
        from ernie45.train.lora import resolve_adapter_dir

        adapter = resolve_adapter_dir(adapter)
    if quantize:
        from ernie45.quant import MODES

        if quantize not in MODES:
            raise ErnieError(f"--quantize must be one of {', '.join(MODES)}, got {quantize!r}")
    if api_key is not None and not api_key.strip():
        raise ErnieError("the API key is empty (--api-key or ERNIE45_API_KEY): give a key, or unset it")
    if host not in LOOPBACK_HOSTS and not api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this address can use the model", host
        )
    config = ServerConfig(
        served_model_name=served_model_name or os.path.basename(os.path.normpath(path)),
        api_key=api_key,
        engine=EngineArgs(
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            max_queue_len=max_queue_len,
            max_num_batched_tokens=batched,
            request_timeout=request_timeout,
            block_size=block_size,
            kv_cache_memory=kv_bytes,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
        ),
        max_body_bytes=max_body_bytes,
        drain_timeout=min(shutdown_timeout, 10.0),
        reasoning_parser=reasoning_parser,
        tool_call_parser=tool_call_parser,
        # a keyless server on loopback answers loopback names only (and the listed ones): see _host_allowed
        allowed_hosts=(LOOPBACK_HOSTS | {host} | {h.strip().lower() for h in allowed_hosts or []})
        if host in LOOPBACK_HOSTS
        else None,
    )
    source = ModelSource(path=path, dtype=dtype, device=device, quantize=quantize, adapter=adapter)
    if parallel:
        import torch.distributed as dist

        from ernie45.parallel import init_distributed, load_parallel
        from ernie45.tokenizer import Tokenizer

        rank, world = init_distributed(device)
        if world != tp:
            raise ErnieError(f"--tp {tp} needs {tp} processes, but torchrun started {world}")
        # Loaded before the HTTP side starts (no 503-while-loading phase), so that shutdown always finds an
        # engine to drain and followers to release.
        model = load_parallel(path, tp, ep, dtype=dtype, device=device)
        if rank > 0:
            _follow(model, config.engine, rank)
            dist.destroy_process_group()
            return
        source = ModelSource(model=model, tokenizer=Tokenizer.from_pretrained(path))
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(source, config, on_fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            access_log=False,
            log_level="info",
            timeout_graceful_shutdown=shutdown_timeout,
        )
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        server.run()
    if failure:
        what = "a tensor-parallel rank failed" if parallel else "could not load the model"
        raise ErnieError(f"{what}: {failure[0]}")
    if parallel:
        dist.destroy_process_group()


def _follow(model, args: EngineArgs, rank: int) -> None:
    """Ranks > 0: replay rank 0's engine steps on this rank's shard until rank 0 stops."""
    import torch

    from ernie45.serve.kv import kv_cache_blocks
    from ernie45.serve.runner import ModelRunner

    runner = ModelRunner(
        model, kv_cache_blocks(model, args), args.block_size, room=3 * args.max_num_seqs, kv_dtype=args.kv_cache_dtype
    )
    # Rank 0 decides when to stop: on Ctrl-C / SIGTERM it drains its requests (which needs every rank), then
    # releases the followers. If rank 0 is gone instead, the next collective fails and this rank exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.info("rank %d: following rank 0", rank)
    try:
        with torch.inference_mode():
            runner.follow()
    except RuntimeError as e:  # gloo reports a lost peer as a plain RuntimeError, NCCL as DistError
        raise ErnieError(f"rank {rank} stopped: {e}") from None
    log.info("rank %d: stopped", rank)


def _check_range(flag: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ErnieError(f"{flag} must be between {lo} and {hi}, got {value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 serve",
        description="OpenAI-compatible HTTP server with continuous "
        "batching (chat/completions, streaming, /metrics).",
    )
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("ERNIE45_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $ERNIE45_API_KEY, else no key)",
    )
    p.add_argument("--served-model-name", help="model id clients send (default: the directory name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences served at once (default: 8)")
    p.add_argument(
        "--max-model-len", type=int, help="context length per sequence (default: min(model, 4096))"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens one step computes: decode tokens plus prompt chunks (default: 2048); long prompts are "
        "prefilled in chunks, kept short while other streams decode",
    )
    p.add_argument(
        "--kv-cache-memory",
        help="size of the paged KV cache, e.g. 4GB or 512MB (default: room for --max-num-seqs sequences of "
        "--max-model-len, at most half the available memory); pages are backed only once used",
    )
    p.add_argument("--block-size", type=int, default=16, help="positions per KV-cache block (default: 16)")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="auto: the model dtype; int8: 8-bit keys/values with per-row scales, half of bf16's memory",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes seen before, e.g. an agent's system prompt and earlier "
        "turns (default: on)",
    )
    p.add_argument("--max-queue-len", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--quantize", help="quantize on load: wint8, wint4, llm.int8 or nf4")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT layout) to merge on load")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: all cores)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on Ctrl-C / SIGTERM",
    )
    p.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=REASONING_PARSERS,
        help="split a Thinking model's reasoning from its answer (reasoning_content): auto = when the chat "
        "prompt ends in <think> (default), ernie45 = always, none = never",
    )
    p.add_argument(
        "--tool-call-parser",
        default="ernie45",
        choices=TOOL_CALL_PARSERS,
        help="turn <tool_call> blocks into OpenAI tool_calls when a request has tools (default: ernie45)",
    )
    p.add_argument(
        "--allowed-hosts",
        type=lambda v: [h for h in v.split(",") if h.strip()],
        default=None,
        metavar="NAMES",
        help="comma list of extra Host names a keyless loopback server answers (it refuses other Host/Origin "
        "headers, a guard against DNS rebinding)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM command lines; tool_choice auto is always on here",
    )
    add_parallel_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue_len=args.max_queue_len,
        request_timeout=args.request_timeout,
        quantize=args.quantize,
        adapter=args.adapter,
        dtype=args.dtype,
        device=args.device,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        threads=args.threads,
        tp=args.tp,
        ep=args.ep,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        allowed_hosts=args.allowed_hosts,
    )
    return 0
