"""Chat templates: rendering as transformers does (sandboxed Jinja, its `tojson`, `raise_exception`,
`strftime_now`), the ERNIE 4.5 Thinking prompt format for checkpoints that ship no template able to show tools,
and the Thinking-template check.
"""

from __future__ import annotations

import json
from typing import Any

THINK_START = "<think>"

# The Thinking prompt format (docs/THINKING_TOOLS_MTP.md §1), for tokenizers that ship no chat template.
# History assistant turns lose their reasoning (as PaddleFormers' template does); a turn with calls renders
# them after the (optional) response, each `<tool_call>{json}\n</tool_call>\n`; a `tool` message is a user turn.
THINKING_CHAT_TEMPLATE = r"""
{%- macro text(c) -%}
    {%- if c is string -%}{{- c -}}
    {%- elif c is mapping -%}{{- c.text if c.text is defined else '' -}}
    {%- elif c is iterable -%}
        {%- for p in c -%}{{- p if p is string else (p.text if p is mapping and p.text is defined else '') -}}{%- endfor -%}
    {%- elif c is not none and c is defined -%}{{- c | string -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system='', rest=messages) -%}
{%- if messages and messages[0].role in ['system', 'developer'] -%}
    {%- set ns.system = text(messages[0].content) -%}
    {%- set ns.rest = messages[1:] -%}
{%- endif -%}
{{- '<|im_start|>system\n' -}}
{%- if ns.system -%}{{- '<system_setting>\n' + ns.system + '\n</system_setting>\n\n' -}}{%- endif -%}
{{- '<global_setting>\nthink_mode=True\n</global_setting>' -}}
{%- if tools -%}
    {{- '\n<tool_list>\n[' -}}
    {%- for tool in tools -%}
        {%- if not loop.first -%}{{- ', ' -}}{%- endif -%}
        {%- if tool.function is defined -%}{{- tool | tojson -}}
        {%- else -%}{{- {'type': 'function', 'function': tool} | tojson -}}
        {%- endif -%}
    {%- endfor -%}
    {{- ']\n</tool_list>\n' -}}
{%- endif -%}
{{- '<|im_end|>\n\n' -}}
{%- for message in ns.rest -%}
    {%- if message.role == 'user' -%}
        {{- '<|im_start|>user\n' + text(message.content) + '<|im_end|>\n\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set content = text(message.content) -%}
        {%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if content or not message.tool_calls -%}
            {{- '<response>\n' + content + '\n</response>\n' -}}
        {%- endif -%}
        {%- for call in message.tool_calls or [] -%}
            {%- set fn = call.function if call.function is defined else call -%}
            {%- set args = fn.arguments if fn.arguments is defined and fn.arguments is not none else {} -%}
            {{- '<tool_call>{"name": ' -}}{{- fn.name | tojson -}}{{- ', "arguments": ' -}}
            {%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
            {{- '}\n</tool_call>\n' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n\n' -}}
    {%- elif message.role == 'tool' -%}
        {{- '<|im_start|>user\n<tool_response>\n' + text(message.content) + '\n</tool_response><|im_end|>\n\n' -}}
    {%- elif message.role in ['system', 'developer'] -%}
        {{- '<|im_start|>system\n<system_setting>\n' + text(message.content) + '\n</system_setting><|im_end|>\n\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}
""".strip()


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # transformers' chat-template `tojson` (plain json.dumps, no HTML escaping), not Jinja's
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(fmt)


def render_chat_template(
    chat_template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render a chat template as transformers' `apply_chat_template(tokenize=False)` does (sandboxed Jinja,
    trim_blocks/lstrip_blocks, its `tojson`, `raise_exception` and `strftime_now`)."""
    return compile_template(chat_template).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
    )


def compile_template(chat_template: str):
    """The template compiled in transformers' environment (trim_blocks/lstrip_blocks, loop controls)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(chat_template)


def is_thinking_template(chat_template: str | None, **kwargs: Any) -> bool:
    """True when the template's generation prompt ends in `<think>` (a Thinking model); False for a template
    that does not render. `kwargs` go to the template (e.g. `chat_template_kwargs`)."""
    if not chat_template or not isinstance(chat_template, str):
        return False
    try:
        text = render_chat_template(
            chat_template, [{"role": "user", "content": "Hello"}], add_generation_prompt=True, **kwargs
        )
    except Exception:  # any template error, undefined call, sandbox refusal: not a template we can use
        return False
    return text.rstrip(" \n").endswith(THINK_START)
