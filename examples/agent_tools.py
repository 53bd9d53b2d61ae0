"""An agent turn against `ernie45 serve`: the model calls a tool, the tool runs here, the result goes back, and
the model answers. Uses the official `openai` client, or with --langchain a LangChain `ChatOpenAI` agent loop.

ernie45 serve --model ERNIE-4.5-21B-A3B-Thinking          # in another terminal (any checkpoint works)
python examples/agent_tools.py --url http://127.0.0.1:8000/v1
python examples/agent_tools.py --langchain

--force makes the first reply a call to get_weather (tool_choice naming it): the server then enforces the call
and its arguments' JSON schema with structured decoding, whatever the model.
"""

from __future__ import annotations

import argparse
import json

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "city name, e.g. 北京", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
QUESTION = "北京现在天气怎么样？"


def get_weather(city: str, unit: str = "celsius") -> str:
    """The tool: a real agent would call a weather service here."""
    return json.dumps({"city": city, "temperature": 25 if unit == "celsius" else 77, "unit": unit, "sky": "晴"},
                      ensure_ascii=False)


TOOLS = {"get_weather": get_weather}


def run_openai(url: str, api_key: str, force: bool, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key)
    model = client.models.list().data[0].id
    messages: list[dict] = [{"role": "user", "content": QUESTION}]
    choice = {"type": "function", "function": {"name": "get_weather"}} if force else "auto"
    reply = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=max_tokens
    ).choices[0].message
    reasoning = (reply.model_extra or {}).get("reasoning_content")
    if reasoning:
        print("reasoning:", reasoning)
    if not reply.tool_calls:
        print("answer (no tool call):", reply.content)
        return reply.content or ""
    messages.append(reply.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
    for call in reply.tool_calls:
        args = json.loads(call.function.arguments)
        result = TOOLS[call.function.name](**args)
        print(f"tool call: {call.function.name}({args}) -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="none", max_tokens=max_tokens)
    answer = final.choices[0].message.content or ""
    print("answer:", answer)
    return answer


def run_langchain(url: str, api_key: str, force: bool, max_tokens: int) -> str:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    model = OpenAI(base_url=url, api_key=api_key).models.list().data[0].id
    llm = ChatOpenAI(base_url=url, api_key=api_key, model=model, max_tokens=max_tokens)
    agent = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather" if force else "auto")
    history = [HumanMessage(QUESTION)]
    reply = agent.invoke(history)
    if not reply.tool_calls:
        print("answer (no tool call):", reply.content)
        return str(reply.content)
    history.append(reply)
    for call in reply.tool_calls:
        result = TOOLS[call["name"]](**call["args"])
        print(f"tool call: {call['name']}({call['args']}) -> {result}")
        history.append(ToolMessage(result, tool_call_id=call["id"]))
    final = llm.bind_tools([WEATHER_TOOL], tool_choice="none").invoke(history)
    print("answer:", final.content)
    return str(final.content)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    p.add_argument("--langchain", action="store_true", help="run the loop with LangChain's ChatOpenAI")
    p.add_argument("--force", action="store_true", help="force the first reply to call get_weather")
    p.add_argument("--max-tokens", type=int, default=512)
    args = p.parse_args()
    run = run_langchain if args.langchain else run_openai
    run(args.url, args.api_key, args.force, args.max_tokens)


if __name__ == "__main__":
    main()
