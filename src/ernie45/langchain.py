"""LangChain chat model for ERNIE 4.5 running in this process: `from ernie45.langchain import ChatErnie`.

`ChatErnie(model="ERNIE-4.5-0.3B-PT")` is a `langchain_core` `BaseChatModel` with streaming (sync and async), stop
sequences, per-call parameters and `usage_metadata`. Construction only checks the path; the weights load on the
first call (once per instance, or share a loaded model with `ChatErnie.from_model`). To use a running
`ernie45 serve` instead, use langchain-openai's `ChatOpenAI(base_url="http://127.0.0.1:8000/v1")` (docs/langchain.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from ernie45.errors import ErnieError

# Per-call keyword arguments (`invoke(..., temperature=0)` or `.bind(...)`) that ChatErnie understands.
CALL_PARAMS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed")


class ChatErnie(BaseChatModel):
    """ERNIE 4.5 chat model running in-process, decoded by the serving engine (`ernie45.serve.local`): concurrent
    calls on one model are batched, and a conversation's next turn reuses its cached prefix.

    Example:
        ```python
        from ernie45.langchain import ChatErnie

        llm = ChatErnie(model="ERNIE-4.5-0.3B-PT", temperature=0, max_tokens=128)
        print(llm.invoke("写一首关于春天的诗").content)
        for chunk in llm.stream("你好"):
            print(chunk.content, end="", flush=True)
        ```

    `temperature=None` (the default) uses the checkpoint's generation_config.json; 0 is greedy, > 0 samples.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str | None = Field(default=None, alias="model")
    """Checkpoint directory or bundled model name (None: the bundled ernie-tiny)."""
    dtype: str = "auto"
    device: str = "auto"
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    max_tokens: int = Field(default=512, ge=1)
    """Maximum new tokens per reply (clipped to what the context window leaves)."""
    stop: list[str] | None = None
    """Stop sequences: the reply ends before the first one (it is not included)."""
    seed: int | None = None
    """Makes sampling reproducible."""
    streaming: bool = False
    """If True, `invoke` streams internally (callbacks receive every token)."""

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check_path(self, info: ValidationInfo) -> ChatErnie:
        if not (info.context or {}).get("preloaded"):
            from ernie45.models import resolve_model_path

            resolve_model_path(self.model_name)  # a wrong path fails here, not at the first call
        return self

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, **kwargs: Any) -> ChatErnie:
        """Wrap an already loaded model (`ernie45.load(...)`), e.g. to share one model between several chains."""
        path = getattr(model, "name_or_path", None)
        kwargs.setdefault("model", os.path.normpath(path) if path else "ernie45")
        chat = cls.model_validate(kwargs, context={"preloaded": True})
        chat._model, chat._tokenizer = model, tokenizer
        return chat

    # ---- LangChain plumbing -------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "ernie45"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.display_name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    @property
    def display_name(self) -> str:
        from ernie45.models import DEFAULT

        return os.path.basename(os.path.normpath(self.model_name)) if self.model_name else DEFAULT

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="ernie45",
            ls_model_name=kwargs.get("model") or self.display_name,
            ls_model_type="chat",
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    # ---- generation ---------------------------------------------------------------------------------------
    def _loaded(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                import ernie45

                self._model, self._tokenizer = ernie45.load(
                    self.model_name, dtype=self.dtype, device=self.device
                )
        return self._model, self._tokenizer

    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Any, list[int], Any]:
        """(the model's shared engine, prompt ids, sampling parameters) for one call."""
        kwargs = {k: v for k, v in kwargs.items() if k != "model"}  # a per-call model name only labels traces
        unknown = sorted(set(kwargs) - set(CALL_PARAMS))
        if unknown:
            raise ValueError(
                f"ChatErnie does not accept {', '.join(unknown)} (it accepts {', '.join(CALL_PARAMS)})"
            )
        p = {k: getattr(self, k) for k in CALL_PARAMS} | kwargs
        model, tok = self._loaded()
        from ernie45.generation import resolve_config
        from ernie45.serve.engine import SamplingParams
        from ernie45.serve.local import shared_engine

        engine = shared_engine(model, tok)
        ids = tok.apply_chat_template(to_chat_messages(messages), add_generation_prompt=True, tokenize=True)
        context = engine.max_model_len
        if len(ids) >= context:
            raise ErnieError(f"the prompt has {len(ids)} tokens but the model's context window is {context}")
        given = {k: p[k] for k in ("top_p", "top_k", "repetition_penalty") if p[k] is not None}
        if p["temperature"] is not None:
            given.update(temperature=p["temperature"], do_sample=p["temperature"] > 0)
        cfg = resolve_config(model, **given)  # unset parameters: the checkpoint's generation_config.json
        sampled = bool(cfg.do_sample) and (cfg.temperature or 0) > 0
        params = SamplingParams(
            max_tokens=min(int(p["max_tokens"]), context - len(ids)),
            temperature=float(cfg.temperature) if sampled else 0.0,
            top_p=float(cfg.top_p or 1.0) if sampled else 1.0,
            top_k=int(cfg.top_k or 0) if sampled else 0,
            repetition_penalty=float(cfg.repetition_penalty or 1.0),
            stop=tuple(s for s in (stop if stop is not None else self.stop) or [] if s),
            stop_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + tok.stop_token_ids)),
            seed=p["seed"],
        )
        return engine, ids, params

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """One reply, decoded by the model's shared serving engine (`ernie45.serve.local`)."""
        engine, ids, params = self._prepare(messages, stop, kwargs)
        text, out = "", None
        for out in engine.stream(ids, params):
            text += out.text
        message = AIMessage(
            content=text,
            usage_metadata=_usage(len(ids), out.num_output_tokens),
            response_metadata={"finish_reason": out.finish_reason, "model_name": self.display_name},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text pieces as soon as whole characters are decoded; the last chunk carries usage and finish reason."""
        engine, ids, params = self._prepare(messages, stop, kwargs)
        outputs = engine.stream(ids, params)
        try:
            for out in outputs:
                last = out.finish_reason is not None
                message = AIMessageChunk(
                    content=out.text,
                    usage_metadata=_usage(len(ids), out.num_output_tokens) if last else None,
                    response_metadata={"finish_reason": out.finish_reason, "model_name": self.display_name}
                    if last
                    else {},
                )
                chunk = ChatGenerationChunk(message=message)
                if run_manager and out.text:
                    run_manager.on_llm_new_token(out.text, chunk=chunk)
                yield chunk
        finally:
            outputs.close()  # a consumer that stops early also stops decoding


def _usage(prompt: int, completion: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> the chat template's {"role", "content"} dicts (system, user, assistant)."""
    roles = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}
    out = []
    for m in messages:
        role = next((r for t, r in roles.items() if isinstance(m, t)), None)
        if isinstance(m, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(m.role, m.role)
        if role not in ("system", "user", "assistant"):
            raise ValueError(
                f"ChatErnie cannot send a {type(m).__name__} (role {getattr(m, 'role', m.type)!r}); "
                "it takes system, human and AI messages"
            )
        out.append({"role": role, "content": m.text if not isinstance(m.content, str) else m.content})
    return out
