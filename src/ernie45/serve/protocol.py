"""Request and response bodies of the OpenAI-compatible API (pydantic), as vLLM and the openai SDK spell them.

Reference: OpenAI's API reference for chat/completions, and vLLM's `entrypoints/openai/protocol.py` for the
sampling extras (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `stop_token_ids`, `ignore_eos`).
Unknown fields are ignored, as both servers do, so newer clients keep working. Streaming chunks are plain
dicts built in server.py (one per token, where a pydantic round trip per chunk would only cost time).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

MAX_N = 16  # choices per request: more would let one request fill the whole KV budget
MAX_STOP = 16
MAX_STOP_LEN = 256  # characters per stop string: the engine checks every one against every new token
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)
MAX_LOGPROBS = 20
MAX_TOOLS = 128
_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() also takes "²", " 5" and "-0"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict[str, Any] | None = None  # the API sends a JSON string


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, and tool-call arguments as objects (as
        transformers' templates and vLLM give them) where they are valid JSON."""
        if isinstance(self.content, list):
            text = "".join(p.text for p in self.content)
        else:
            text = self.content or ""
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                args: Any = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # shown as written
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            msg["tool_calls"] = calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        return msg


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(_Body):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: type json_schema needs a json_schema object")
        return self


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, validation_alias=AliasChoices("repetition_penalty", "repeat_penalty")
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # structured output: OpenAI's response_format, or vLLM's guided_* extras (one of them)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _check_common(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop: stop strings may have at most {MAX_STOP_LEN} characters")
        if len(self.logit_bias or {}) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries are allowed")
        for k, v in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias: keys must be token ids (digits), got {k!r}")
            if not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias: values must lie in [-100, 100], got {v}")
        if isinstance(self.guided_json, str):
            try:
                self.guided_json = json.loads(self.guided_json)
            except json.JSONDecodeError as e:
                raise ValueError(f"guided_json: not valid JSON: {e}") from None
        formats = [
            f
            for f in ("guided_json", "guided_regex", "guided_grammar", "guided_choice")
            if getattr(self, f) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            formats.append("response_format")
        if len(formats) > 1:
            raise ValueError(f"{formats[1]}: give only one of {', '.join(formats)}")
        return self

    def output_format(self) -> tuple[str, Any] | None:
        """The structured-output request as (kind, value): ("json", schema or None for any object, strict),
        ("regex", pattern), ("grammar", text) or ("choice", [str]); None for free text."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return "json", (None, False)
        if rf is not None and rf.type == "json_schema":
            spec = rf.json_schema
            return "json", (spec.json_schema or {}, bool(spec.strict))
        if self.guided_json is not None:
            return "json", (self.guided_json, False)
        if self.guided_regex is not None:
            return "regex", self.guided_regex
        if self.guided_grammar is not None:
            return "grammar", self.guided_grammar
        if self.guided_choice is not None:
            return "choice", self.guided_choice
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # FastDeploy's name: reasoning tokens a Thinking model may write before a forced call or structured answer
    reasoning_max_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in self.tools or []
        }:
            raise ValueError(f"tool_choice: the function {choice.function.name!r} is not among the tools")
        if self.forced_tool_call and self.output_format() is not None:
            raise ValueError("response_format: cannot be combined with a tool_choice that forces a call")
        return self

    @property
    def tool_choice_mode(self) -> str:
        """"none", "auto", "required" or "named" (tools given without tool_choice: "auto", as OpenAI)."""
        c = self.tool_choice
        if isinstance(c, NamedToolChoice):
            return "named"
        return c if c is not None else ("auto" if self.tools else "none")

    @property
    def forced_tool_call(self) -> bool:
        return self.tool_choice_mode in ("required", "named")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptType = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: PromptType
    # OpenAI's default; 0 is allowed (with echo it scores the prompt only, as lm-eval does).
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool = False  # vLLM: logprobs name tokens "token_id:123" (exact ids)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: each item is text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]  # role, content, and where present reasoning_content/reasoning and tool_calls
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ernie45"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
