"""From a request's engine outputs to what its client receives: the SSE event streams of chat and text
completions (`chat_events`, `completion_events`), a non-streaming request's collected results (`collect`),
and the OpenAI forms of logprobs and usage.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ernie45.serve.agent import ChatPlan
from ernie45.serve.parsers import OutputStream
from ernie45.serve.protocol import (
    ChatCompletionRequest,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from ernie45.serve.request import EngineError, TokenLogprob
from ernie45.serve.state import ServerState


@dataclass
class _Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


async def collect(request: Request, group, n: int) -> list[_Result] | None:
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


class EventStream(StreamingResponse):
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


def usage_dict(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)).model_dump()


async def chat_events(
    st: ServerState,
    req: ChatCompletionRequest,
    group,
    rid: str,
    created: int,
    prompt_len: int,
    plan: ChatPlan,
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
    streams = [OutputStream(plan.reasoning, plan.tools, plan.max_calls) for _ in range(req.n)] if parsing else None

    def chunk(i: int, delta: dict, finish: str | None = None, lps: list | None = None) -> str:
        choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
        usage = usage_dict(prompt_len, sum(counts), cached[0]) if continuous else None
        return _sse({**base, "choices": [choice], "usage": usage})

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, out in group:
            counts[i], cached[i] = out.num_output_tokens, out.num_cached_tokens
            lps = None
            if req.logprobs and out.logprobs:
                lps = {"content": [chat_logprob(st, t).model_dump() for t in out.logprobs]}
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
            deltas = [ev.delta() for ev in events] or [{}]  # still one event per token
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                yield chunk(i, delta, finish if last else None, lps if k == 0 else None)
    except EngineError as e:
        yield _sse_error(e)
    else:
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage_dict(prompt_len, sum(counts), cached[0])})
    yield "data: [DONE]\n\n"


async def completion_events(
    st: ServerState,
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
                as_ids = req.return_tokens_as_token_ids
                logprobs = completion_logprobs(st, ids, lps, prefix, as_ids).model_dump()
            usage = (
                usage_dict(prompt_total, sum(counts), sum(cached[:: req.n]))
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
            yield _sse({**base, "choices": [], "usage": usage_dict(prompt_total, sum(counts), sum(cached[:: req.n]))})
    yield "data: [DONE]\n\n"


def chat_logprob(st: ServerState, t: TokenLogprob) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=st.token_str(t.token_id),
        logprob=t.logprob,
        bytes=st.token_bytes(t.token_id),
        top_logprobs=[
            TopLogprob(token=st.token_str(i), logprob=v, bytes=st.token_bytes(i)) for i, v in t.top
        ],
    )


def completion_logprobs(
    st: ServerState, ids: list[int], lps: list[TokenLogprob | None], prefix: str, as_ids: bool = False
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
