"""LangChain chat model for ERNIE 4.5 running in this process: `from ernie45.langchain import ChatErnie`.

`ChatErnie(model="ERNIE-4.5-0.3B-PT")` is a `langchain_core` `BaseChatModel` with streaming (sync and async), stop
sequences, per-call parameters, `usage_metadata`, tool calling (`bind_tools`, with `tool_choice` enforced by
structured decoding), structured output (`with_structured_output`, function calling or JSON schema) and, for
Thinking models, the reasoning in `additional_kwargs["reasoning_content"]`. Construction only checks the path;
the weights load on the first call (once per instance, or share a loaded model with `ChatErnie.from_model`). To use a running
`ernie45 serve` instead, use langchain-openai's `ChatOpenAI(base_url="http://127.0.0.1:8000/v1")` (docs/langchain.md).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from ernie45.errors import ErnieError
from ernie45.serve.parsers import StreamEvent

# Per-call keyword arguments (`invoke(..., temperature=0)` or `.bind(...)`) that ChatErnie understands.
SAMPLING_PARAMS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed")
AGENT_PARAMS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")  # OpenAI's meaning
CALL_PARAMS = SAMPLING_PARAMS + AGENT_PARAMS


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
        # a per-call model name only labels traces; LangChain may pass its structured-output label through
        kwargs = {k: v for k, v in kwargs.items() if k not in ("model", "ls_structured_output_format")}
        unknown = sorted(set(kwargs) - set(CALL_PARAMS))
        if unknown:
            raise ValueError(
                f"ChatErnie does not accept {', '.join(unknown)} (it accepts {', '.join(CALL_PARAMS)})"
            )
        p = {k: getattr(self, k) for k in SAMPLING_PARAMS} | kwargs
        model, tok = self._loaded()
        from ernie45.generation import resolve_config
        from ernie45.serve.agent import RequestError, plan_chat
        from ernie45.serve.engine import SamplingParams
        from ernie45.serve.local import shared_engine
        from ernie45.serve.protocol import ChatCompletionRequest

        engine = shared_engine(model, tok)
        context = engine.max_model_len
        request = ChatCompletionRequest.model_validate(  # checks tools / tool_choice / response_format
            {"messages": to_chat_messages(messages), "max_tokens": int(p["max_tokens"])}
            | {k: p[k] for k in AGENT_PARAMS if p.get(k) is not None}
        )
        try:
            plan, _ = plan_chat(
                tok, request, eos_ids=sorted(engine.engine.eos_ids), max_model_len=context
            )
        except RequestError as e:
            raise ValueError(e.message) from None
        ids = plan.prompt
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
            grammar=plan.grammar,
            skip_special_tokens=not (plan.reasoning or plan.tools),  # the parsers need the markers
        )
        return engine, ids, params, plan

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """One reply, decoded by the model's shared serving engine (`ernie45.serve.local`)."""
        from ernie45.serve.parsers import parse_output

        engine, ids, params, plan = self._prepare(messages, stop, kwargs)
        text, out = "", None
        for out in engine.stream(ids, params):
            text += out.text
        finish, extra, calls = out.finish_reason, {}, []
        if plan.reasoning or plan.tools:
            parsed = parse_output(text, plan.reasoning, plan.tools, finish, plan.max_calls)
            text, finish, calls = parsed.content, parsed.finish_reason, parsed.tool_calls
            if parsed.reasoning is not None:
                extra["reasoning_content"] = parsed.reasoning
        message = AIMessage(
            content=text,
            additional_kwargs=extra,
            tool_calls=[
                {"name": c.name, "args": json.loads(c.arguments), "id": c.id, "type": "tool_call"} for c in calls
            ],
            usage_metadata=_usage(len(ids), out.num_output_tokens),
            response_metadata={"finish_reason": finish, "model_name": self.display_name},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text pieces as soon as whole characters are decoded (reasoning in `additional_kwargs`, each tool call
        whole in one `tool_call_chunks` item); the last chunk carries usage and finish reason."""
        from ernie45.serve.parsers import OutputStream

        engine, ids, params, plan = self._prepare(messages, stop, kwargs)
        parser = OutputStream(plan.reasoning, plan.tools, plan.max_calls) if plan.reasoning or plan.tools else None
        outputs = engine.stream(ids, params)
        try:
            for out in outputs:
                last = out.finish_reason is not None
                if parser is None:
                    pieces = [StreamEvent("content", out.text)]
                else:
                    pieces = parser.feed(out.text) + (parser.finish() if last else []) or [StreamEvent("content", "")]
                for k, ev in enumerate(pieces):
                    final = last and k == len(pieces) - 1
                    finish = (parser.finish_reason(out.finish_reason) if parser else out.finish_reason) if final else None
                    message = _chunk_message(ev)
                    if final:
                        message.usage_metadata = _usage(len(ids), out.num_output_tokens)
                        message.response_metadata = {"finish_reason": finish, "model_name": self.display_name}
                    chunk = ChatGenerationChunk(message=message)
                    if run_manager and ev.kind == "content" and ev.value:
                        run_manager.on_llm_new_token(ev.value, chunk=chunk)
                    yield chunk
        finally:
            outputs.close()  # a consumer that stops early also stops decoding

    # ---- tools and structured output ----------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools to the model (OpenAI function definitions, pydantic classes, functions or LangChain tools).

        `tool_choice`: "auto" (default), "none", "any"/"required"/True (some call), or a tool's name (that call);
        a forced call is enforced by structured decoding, so its arguments always match the tool's schema.
        """
        from langchain_core.utils.function_calling import convert_to_openai_tool

        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _tool_choice(tool_choice, formatted)
        elif tool_choice is False:
            kwargs["tool_choice"] = "none"
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: str = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Replies parsed into `schema` (a pydantic class, TypedDict or JSON schema), as ChatOpenAI does.

        `method`: "function_calling" (a forced tool call), "json_schema" (`response_format` json_schema) or
        "json_mode" (a JSON object: the schema's when one is given). All are enforced by structured decoding.
        """
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
        from langchain_core.runnables import RunnableMap, RunnablePassthrough
        from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
        from langchain_core.utils.pydantic import is_basemodel_subclass

        if kwargs:
            raise ValueError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic v2 or v1
        if method == "function_calling":
            if schema is None:
                raise ValueError("with_structured_output(method='function_calling') needs a schema")
            tool = convert_to_openai_tool(schema, strict=strict)
            name = tool["function"]["name"]
            llm = self.bind_tools([tool], tool_choice=name, parallel_tool_calls=False,
                                  ls_structured_output_format={"kwargs": {"method": method}, "schema": tool})
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_schema":
            if schema is None:
                raise ValueError("with_structured_output(method='json_schema') needs a schema")
            js = convert_to_json_schema(schema)
            fmt = {"type": "json_schema",
                   "json_schema": {"name": js.get("title", "response"), "schema": js, "strict": bool(strict)}}
            llm = self.bind(response_format=fmt, ls_structured_output_format={"kwargs": {"method": method}, "schema": js})
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        elif method == "json_mode":
            # any JSON object; with a schema, that schema (loosely: not strict), which the prompt asks for anyway
            fmt = ({"type": "json_schema", "json_schema": {"name": "response", "schema": convert_to_json_schema(schema)}}
                   if schema is not None else {"type": "json_object"})
            llm = self.bind(response_format=fmt,
                            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema})
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be function_calling, json_schema or json_mode, got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


def _tool_choice(choice: dict | str | bool, tools: list[dict[str, Any]]) -> dict | str:
    """LangChain's tool_choice spellings -> OpenAI's."""
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        return {"type": "function", "function": {"name": choice}}
    return choice


def _chunk_message(ev: StreamEvent) -> AIMessageChunk:
    if ev.kind == "reasoning":
        return AIMessageChunk(content="", additional_kwargs={"reasoning_content": ev.value})
    if ev.kind == "tool_call":
        fn = ev.value["function"]
        return AIMessageChunk(
            content="",
            tool_call_chunks=[
                {"name": fn["name"], "args": fn["arguments"], "id": ev.value["id"], "index": ev.value["index"],
                 "type": "tool_call_chunk"}
            ],
        )
    return AIMessageChunk(content=ev.value)


def _usage(prompt: int, completion: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> OpenAI-style chat messages (system, user, assistant with its tool calls, tool)."""
    roles = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant", ToolMessage: "tool"}
    out = []
    for m in messages:
        role = next((r for t, r in roles.items() if isinstance(m, t)), None)
        if isinstance(m, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(m.role, m.role)
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(
                f"ChatErnie cannot send a {type(m).__name__} (role {getattr(m, 'role', m.type)!r}); "
                "it takes system, human, AI and tool messages"
            )
        msg: dict[str, Any] = {"role": role, "content": m.text if not isinstance(m.content, str) else m.content}
        if isinstance(m, AIMessage) and m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("args") or {}, ensure_ascii=False)}}
                for c in m.tool_calls
            ]
        if isinstance(m, ToolMessage):
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out
