"""`ernie45 serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints follow OpenAI and vLLM (ECOSYSTEM.md §6.1): `/v1/chat/completions`, `/v1/completions` (SSE
streaming, `n`, stop strings, logprobs, token-id prompts with `echo` for lm-eval), `/v1/models`, `/health`
(503 while the model loads), `/metrics` (Prometheus), `/tokenize`, `/detokenize` and `/tokenizer_info`
(which lets lm-eval use the server's tokenizer). Errors use OpenAI's nested `{"error": {...}}` form.

This module loads the model, assembles the app (`create_app`) and is the command (`serve`, `build_parser`,
`main`: `ernie45 serve` runs this module). The app's parts live beside it: `state` (configuration and shared
state), `guard` (middleware and error handlers), `routes` (the endpoints) and `streaming` (SSE events,
logprobs and usage).

Under `torchrun ... serve --tp N`, rank 0 runs the HTTP front end and the engine; the other ranks only replay
the engine's model calls (`ernie45.serve.follower`). Should a rank fail, rank 0 answers 503 and exits
non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from ernie45.commands import (
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_parallel_args,
    add_speculative_args,
)
from ernie45.errors import ErnieError
from ernie45.serve.agent import REASONING_PARSERS, TOOL_CALL_PARSERS
from ernie45.serve.engine import Engine
from ernie45.serve.follower import follow
from ernie45.serve.guard import Guard, install_error_handlers
from ernie45.serve.kv import KV_DTYPES
from ernie45.serve.request import EngineArgs
from ernie45.serve.routes import install_routes
from ernie45.serve.state import DEFAULT_MAX_BODY, ModelSource, ServerConfig, ServerState
from ernie45.utils import parse_size

log = logging.getLogger("ernie45.serve")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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
    st = ServerState(config)

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
    app.add_middleware(Guard, state=st)
    install_error_handlers(app)
    install_routes(app, st)
    return app


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
    speculative: str | None = None,
    num_speculative_tokens: int | None = None,
    draft_vocab_size: int | None = None,
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
        speculative, num_speculative_tokens, draft_vocab_size: "ngram" (prompt lookup) or "mtp" (the checkpoint's
            MTP layer) drafts tokens and verifies them in one pass while a single sequence decodes
            (docs/speculative.md); answers are unchanged. `draft_vocab_size`: mtp drafts score that many tokens.
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

    from ernie45.checkpoint import load_config
    from ernie45.models import resolve_model_path

    path = resolve_model_path(model)
    mcfg = load_config(path)
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
    _check_speculative(speculative, num_speculative_tokens, draft_vocab_size, parallel, path, mcfg)
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
            speculative=speculative,
            num_speculative_tokens=num_speculative_tokens,
            draft_vocab_size=draft_vocab_size,
        ),
        max_body_bytes=max_body_bytes,
        drain_timeout=min(shutdown_timeout, 10.0),
        reasoning_parser=reasoning_parser,
        tool_call_parser=tool_call_parser,
        # a keyless server on loopback answers loopback names only (and the listed ones): see `guard`
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
            follow(model, config.engine, rank)
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


def _check_range(flag: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ErnieError(f"{flag} must be between {lo} and {hi}, got {value}")


def _check_speculative(method: str | None, k: int | None, vocab: int | None, parallel: bool, path: str,
                       mcfg) -> None:
    """One-line errors for the speculative flags, before the model loads."""
    from ernie45.commands import speculative_from_args
    from ernie45.commands.info import _mtp_storage

    speculative_from_args(argparse.Namespace(speculative=method, num_speculative_tokens=k, draft_vocab_size=vocab))
    if method != "mtp":
        return
    if parallel and vocab is not None:
        raise ErnieError("--draft-vocab-size does not apply under --tp / --ep (the sharded head reads every row anyway)")
    if not _mtp_storage(path, mcfg):
        raise ErnieError(f"--speculative mtp: {path} has no MTP layer (num_nextn_predict_layers > 0 and "
                         "model.mtp_* weights); use --speculative ngram, or a checkpoint that ships the MTP head")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 serve",
        description="OpenAI-compatible HTTP server with continuous "
        "batching (chat/completions, streaming, /metrics).",
    )
    add_model_arg(p, "checkpoint directory or bundled model name (default: the bundled model)", required=False)
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
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter directory (PEFT layout) to merge on load")
    add_dtype_arg(p)
    add_device_arg(p)
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
    add_speculative_args(p)
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
        speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        draft_vocab_size=args.draft_vocab_size,
    )
    return 0
