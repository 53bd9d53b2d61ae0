"""`ernie45 webui`: a Gradio chat in the browser, streaming each reply token by token.

Two back ends: the model loaded in this process (`--model DIR`, decoded with `ernie45.generation`), or a running
`ernie45 serve` / any OpenAI-compatible server (`--server-url URL`), reached with the `openai` client. The page has
multi-turn history, a system prompt, temperature / top-p / max-new-tokens controls and a stop button; stopping
closes the reply's generator, which ends decoding (in-process) or closes the HTTP stream (the server then aborts
the request). Binds 127.0.0.1 unless told otherwise; `--auth USER:PASSWORD` (or $ERNIE45_WEBUI_AUTH) asks for a
login, and `--share` (a public gradio.live link) is never on by default and refused without one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from ernie45.commands import (
    add_device_arg,
    add_dtype_arg,
    add_inference_args,
    add_max_new_tokens_arg,
    add_model_arg,
)
from ernie45.errors import ErnieError
from ernie45.serve.parsers import StreamEvent

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_TEMPERATURE = 0.95  # ERNIEKit's chat defaults (ARCHITECTURE.md §6.5), used for a server
DEFAULT_TOP_P = 0.7
DEFAULT_MAX_TOKENS = 512
REASONING_TITLE = "Reasoning"
AUTH_ENV = "ERNIE45_WEBUI_AUTH"
MAX_UPLOAD = "1mb"  # the chat takes no files: Gradio's upload routes only need to refuse big bodies


class LocalBackend:
    """Decodes with the model in this process, through the serving engine (`ernie45.serve.local.LocalEngine`):
    several tabs are batched together, and a conversation's next turn reuses its cached prefix."""

    def __init__(self, model: Any, tokenizer: Any, name: str):
        from ernie45.chat_template import is_thinking_template
        from ernie45.generation import resolve_config
        from ernie45.serve.local import shared_engine

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.engine = shared_engine(model, tokenizer)
        self.context = self.engine.max_model_len
        cfg = resolve_config(model)
        self.eos = list(dict.fromkeys(cfg.eos_token_ids + tokenizer.stop_token_ids))
        sampled = bool(cfg.do_sample)
        self.temperature = float(cfg.temperature) if sampled else 0.0
        self.top_p = float(cfg.top_p) if sampled else 1.0
        self.thinking = is_thinking_template(tokenizer.chat_template)
        self.where = f"in-process on {model.device}"

    def stream(
        self, messages: list[dict[str, str]], temperature: float, top_p: float, max_tokens: int
    ) -> Iterator[StreamEvent]:
        """The reply to `messages` as ("reasoning" | "content", text) deltas (reasoning: a Thinking model's);
        the oldest turns are dropped when the context is full."""
        from ernie45.commands.chat import fit_history
        from ernie45.serve.engine import SamplingParams
        from ernie45.serve.parsers import ReasoningParser

        _, ids = fit_history(self.tokenizer, messages, self.context, max_tokens)
        params = SamplingParams(
            max_tokens=min(max_tokens, self.context - len(ids)),
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=tuple(self.eos),
            skip_special_tokens=not self.thinking,  # the reasoning markers may be special tokens
        )
        parser = ReasoningParser() if self.thinking else None
        outputs = self.engine.stream(ids, params)
        try:
            for out in outputs:
                if parser is None:
                    if out.text:
                        yield StreamEvent("content", out.text)
                    continue
                yield from parser.feed(out.text)
                if out.finish_reason is not None:
                    yield from parser.finish()
        finally:
            outputs.close()  # the stop button: the engine drops the sequence at its next step


class OpenAIBackend:
    """Streams from an OpenAI-compatible server such as `ernie45 serve`."""

    def __init__(
        self, server_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0
    ):
        import openai

        self.openai = openai
        base = server_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        # A local server needs no key, but the client insists on one.
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0
        )
        try:
            ids = [m.id for m in self.client.models.list().data]
        except openai.APIError as e:
            raise ErnieError(f"cannot use the server at {self.base_url}: {_api_message(e)}") from None
        if model is not None and model not in ids:
            raise ErnieError(
                f"the server at {self.base_url} does not serve {model!r} (it has: {', '.join(ids)})"
            )
        if not ids:
            raise ErnieError(f"the server at {self.base_url} lists no models")
        self.name = model or ids[0]
        self.context = None
        self.temperature, self.top_p = DEFAULT_TEMPERATURE, DEFAULT_TOP_P
        self.where = f"via {self.base_url}"

    def stream(
        self, messages: list[dict[str, str]], temperature: float, top_p: float, max_tokens: int
    ) -> Iterator[StreamEvent]:
        """The reply as ("reasoning" | "content", text) deltas: the server's reasoning_content, then content."""
        try:
            stream = self.client.chat.completions.create(
                model=self.name,
                messages=messages,
                stream=True,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
            )
            try:
                for chunk in stream:
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta
                    thought = (delta.model_extra or {}).get("reasoning_content")
                    if thought:
                        yield StreamEvent("reasoning", thought)
                    if delta.content:
                        yield StreamEvent("content", delta.content)
            finally:
                stream.close()  # the stop button: the server sees the disconnect and aborts the request
        except self.openai.APIError as e:
            raise ErnieError(_api_message(e)) from None


def _api_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", None) or e)


def content_text(content: Any) -> str:
    """The text of a Gradio message: a string, a list of parts, or a component/file payload (no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content["text"] if isinstance(content.get("text"), str) else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def to_messages(message: Any, history: list[dict[str, Any]], system_prompt: str = "") -> list[dict[str, str]]:
    """Gradio's history (OpenAI-style dicts) plus the new message -> chat-template messages."""
    out = (
        [{"role": "system", "content": system_prompt.strip()}]
        if system_prompt and system_prompt.strip()
        else []
    )
    for m in history:
        text = content_text(m.get("content"))
        if (m.get("metadata") or {}).get("title"):
            continue  # a reasoning block: the chat template keeps only answers
        if m.get("role") in ("user", "assistant") and text:
            out.append({"role": m["role"], "content": text})
    out.append({"role": "user", "content": content_text(message)})
    return out


def make_chat_fn(backend: Any):
    """The ChatInterface function: yields the reply so far after every new piece of text. A reply with
    reasoning (a Thinking model) is two messages: the reasoning in a collapsible block, then the answer."""

    def chat(
        message: Any,
        history: list[dict[str, Any]],
        system_prompt: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> Iterator[str | list[dict[str, Any]]]:
        import gradio as gr

        messages = to_messages(message, history, system_prompt)
        thought, text = "", ""

        def reply(done: bool) -> str | list[dict[str, Any]]:
            if not thought:
                return text
            block = {"title": REASONING_TITLE, "status": "done" if done or text else "pending"}
            return [{"role": "assistant", "content": thought, "metadata": block}, {"role": "assistant", "content": text}]

        try:
            for kind, delta in backend.stream(messages, float(temperature), float(top_p), int(max_tokens)):
                if kind == "reasoning":
                    thought += delta
                else:
                    text += delta
                yield reply(False)
        except ErnieError as e:
            raise gr.Error(str(e)) from None
        yield reply(True)

    return chat


def build_demo(
    backend: Any,
    system_prompt: str = "",
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    concurrency_limit: int | None = 1,
):
    """The Gradio app (not launched). Slider starting values default to the back end's (the checkpoint's)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    limit = backend.context - 1 if backend.context else max(4096, max_tokens)  # the prompt needs a token
    inputs = [
        gr.Textbox(value=system_prompt, label="System prompt", lines=2),
        gr.Slider(
            0.0,
            2.0,
            value=backend.temperature if temperature is None else temperature,
            step=0.05,
            label="Temperature (0 = greedy)",
        ),
        gr.Slider(0.05, 1.0, value=backend.top_p if top_p is None else top_p, step=0.05, label="Top-p"),
        gr.Slider(1, limit, value=min(max_tokens, limit), step=1, label="Max new tokens"),
    ]
    return gr.ChatInterface(
        make_chat_fn(backend),
        additional_inputs=inputs,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        chatbot=gr.Chatbot(label=backend.name, height=520),
        title="ERNIE 4.5 chat",
        description=f"**{backend.name}**, {backend.where}",
        analytics_enabled=False,
        concurrency_limit=concurrency_limit,
        fill_height=True,
    )


def make_backend(
    model: str | None = None,
    server_url: str | None = None,
    api_key: str | None = None,
    served_model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str | None = None,
    adapter: str | None = None,
) -> Any:
    """The in-process back end for `model` (None: the bundled model), or the server one for `server_url`."""
    if server_url:
        if model:
            raise ErnieError(
                "give either --model (load it here) or --server-url (use a running server), not both"
            )
        if quantize or adapter:
            raise ErnieError("--quantize and --adapter apply to a model loaded here, not with --server-url")
        if not server_url.startswith(("http://", "https://")):
            raise ErnieError(f"--server-url must start with http:// or https://, got {server_url!r}")
        return OpenAIBackend(server_url, api_key, served_model)
    if served_model:
        raise ErnieError("--served-model-name only applies with --server-url")
    from ernie45.commands import load_model
    from ernie45.models import resolve_model_path

    path = resolve_model_path(model)
    m, tok = load_model(path, dtype, device, quantize=quantize, adapter=adapter)
    return LocalBackend(m, tok, os.path.basename(os.path.normpath(path)))


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """`USER:PASSWORD[,USER:PASSWORD...]` -> Gradio's `auth` list; None when not set. A password may hold ':'
    (the user ends at the first one). The error never repeats the value: it holds passwords."""
    if spec is None:
        return None
    pairs = []
    for item in spec.split(","):
        user, _, password = item.partition(":")
        user = user.strip()  # Gradio strips the user name typed at login
        if not user or not password:
            raise ErnieError(
                f"--auth (or ${AUTH_ENV}) must be USER:PASSWORD, several separated by commas, "
                "each with a non-empty user and password"
            )
        pairs.append((user, password))
    return pairs


def launch(
    demo: Any,
    host: str,
    port: int,
    share: bool = False,
    auth: list[tuple[str, str]] | None = None,
    **kw: Any,
) -> None:
    """Queue and serve `demo`: the login (if any) guards the page and every API route; uploads are capped."""
    demo.queue(max_size=64).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        max_file_size=MAX_UPLOAD,
        inbrowser=False,
        show_error=True,
        **kw,
    )


def webui(
    model: str | None = None,
    *,
    server_url: str | None = None,
    api_key: str | None = None,
    served_model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: str | None = None,
    system_prompt: str = "",
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str | None = None,
    adapter: str | None = None,
) -> None:
    """Serve the chat page until interrupted. `auth`: `USER:PASSWORD` pairs, comma-separated (`parse_auth`).
    `quantize`, `adapter`: as `ernie45 generate --quantize / --adapter`, for the model loaded here."""
    if not 0 < port < 65536:
        raise ErnieError(f"--port must be between 1 and 65535, got {port}")
    if temperature is not None and not 0 <= temperature <= 2:
        raise ErnieError(f"--temperature must be in [0, 2], got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ErnieError(f"--top-p must be in (0, 1], got {top_p}")
    if max_tokens < 1:
        raise ErnieError(f"--max-tokens must be >= 1, got {max_tokens}")
    logins = parse_auth(auth)
    if share and logins is None:
        raise ErnieError(
            f"--share puts the chat on a public gradio.live link: give --auth USER:PASSWORD (or set ${AUTH_ENV})"
        )
    backend = make_backend(model, server_url, api_key, served_model, dtype, device, quantize, adapter)
    if backend.context is not None and max_tokens >= backend.context:
        raise ErnieError(f"--max-tokens must be below the model's context window ({backend.context})")
    if host not in LOOPBACK and logins is None:
        print(
            f"warning: listening on {host}: anyone who can reach this address can use the chat "
            "(--auth USER:PASSWORD asks for a login)",
            file=sys.stderr,
        )
    # Both back ends batch concurrent replies: the in-process engine up to its sequence count, a server more.
    from ernie45.serve.local import LOCAL_MAX_NUM_SEQS

    demo = build_demo(
        backend,
        system_prompt,
        temperature,
        top_p,
        max_tokens,
        concurrency_limit=LOCAL_MAX_NUM_SEQS if isinstance(backend, LocalBackend) else 16,
    )
    try:
        launch(demo, host, port, share, logins)
    except OSError as e:
        raise ErnieError(f"cannot listen on {host}:{port}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 webui",
        description="Streaming web chat (Gradio) with the model "
        "loaded here or with a running `ernie45 serve`.",
    )
    add_model_arg(p, "checkpoint directory or bundled model name to load here (default: the bundled ernie-tiny)",
                  required=False)
    p.add_argument(
        "--server-url",
        default=None,
        metavar="URL",
        help="use a running OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("ERNIE45_API_KEY"),
        help="the server's API key (default: $ERNIE45_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model id on the server (default: the first one it lists)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--auth",
        default=os.environ.get(AUTH_ENV) or None,
        metavar="USER:PASSWORD",
        help=f"ask for this login (several: comma-separated) before showing the chat (default: ${AUTH_ENV})",
    )
    p.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link (off by default; needs --auth)",
    )
    p.add_argument("--system", default="", metavar="TEXT", help="initial system prompt")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="initial temperature, 0 = greedy (default: the checkpoint's; 0.95 with --server-url)",
    )
    p.add_argument(
        "--top-p", type=float, default=None, metavar="P", help="initial top-p (default: the checkpoint's)"
    )
    add_max_new_tokens_arg(p, DEFAULT_MAX_TOKENS, f"initial max new tokens per reply (default {DEFAULT_MAX_TOKENS})",
                           old=("--max-tokens",))
    add_dtype_arg(p)
    add_device_arg(p)
    add_inference_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    webui(
        args.model,
        server_url=args.server_url,
        api_key=args.api_key,
        served_model=args.served_model_name,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=args.auth,
        system_prompt=args.system,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        adapter=args.adapter,
    )
    return 0
