"""Query the ERNIE 4.5 web service over plain HTTP (no SDK): one question, or a JSONL file of them.

    python examples/client.py --question "你好，请介绍一下你自己。"
    python examples/client.py --queries queries.jsonl --stream     # one {"question": ...} (or {"messages": [...]}) per line

Prints each answer; with --stream the text appears as it is generated (Server-Sent Events).
"""

import argparse
import json
import sys

import httpx


def ask(
    client: httpx.Client,
    url: str,
    model: str,
    messages: list[dict],
    max_tokens: int,
    temperature: float,
    stream: bool,
) -> str:
    """Send one chat request; print and return the answer."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if not stream:
        r = client.post(url, json=body)
        if r.status_code != 200:
            sys.exit(f"error {r.status_code}: {r.json()['error']['message']}")
        text = r.json()["choices"][0]["message"]["content"]
        print(text)
        return text
    parts = []
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            sys.exit(f"error {r.status_code}: {json.loads(r.read())['error']['message']}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                sys.exit(f"error: {event['error']['message']}")
            delta = event["choices"][0]["delta"].get("content") or ""
            parts.append(delta)
            print(delta, end="", flush=True)
    print()
    return "".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    p.add_argument("--question", help="one question")
    p.add_argument("--queries", help='JSONL file: {"question": ...} or {"messages": [...]} per line')
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--api-key", help="if the server was started with --api-key")
    args = p.parse_args()
    if not (args.question or args.queries):
        p.error("give --question or --queries")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        if args.queries:
            with open(args.queries, encoding="utf-8") as f:
                items = [json.loads(line) for line in f if line.strip()]
        else:
            items = [{"question": args.question}]
        for item in items:
            messages = item.get("messages") or [{"role": "user", "content": item["question"]}]
            if args.system:
                messages = [{"role": "system", "content": args.system}, *messages]
            ask(
                client,
                "/v1/chat/completions",
                model,
                messages,
                args.max_tokens,
                args.temperature,
                args.stream,
            )


if __name__ == "__main__":
    main()
