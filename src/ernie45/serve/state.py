"""What the HTTP server's modules share: its configuration (`ServerConfig`, `ModelSource`), one app's state
(`ServerState`, read by the middleware and the routes) and `APIError`, an error answered in OpenAI's form.

A module of its own so that `server` (the app and `ernie45 serve`), `guard`, `routes` and `streaming` import
these without importing one another.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from ernie45.serve.engine import Engine
from ernie45.serve.metrics import ServerMetrics
from ernie45.serve.protocol import ErrorInfo, ErrorResponse
from ernie45.serve.request import EngineArgs

DEFAULT_MAX_BODY = 4 * 2**20
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


class ServerState:
    """One app's engine (None while the model loads), tokenizer, metrics and token-name cache."""

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

