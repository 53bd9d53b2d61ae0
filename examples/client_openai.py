"""Use the ERNIE 4.5 server with the official `openai` SDK: chat, streaming, completions with logprobs.

ernie45 serve --model ERNIE-4.5-0.3B-PT          # in another terminal
python examples/client_openai.py --url http://127.0.0.1:8000/v1
"""

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused", help="the server's --api-key, if it has one")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id

    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "你好，请介绍一下你自己。"}],
        max_tokens=args.max_tokens,
    )
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage.prompt_tokens, "prompt +", reply.usage.completion_tokens, "completion tokens")

    print("stream: ", end="")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a short story."}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )  # vLLM-style extras go in extra_body
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n({chunk.usage.completion_tokens} tokens)")

    done = client.completions.create(
        model=model, prompt="床前明月光，", max_tokens=8, temperature=0, logprobs=2
    )
    choice = done.choices[0]
    print("completion:", choice.text)
    for token, logprob, top in zip(
        choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs
    ):
        print(f"  {token!r:>12} {logprob:8.3f}  alternatives: {top}")


if __name__ == "__main__":
    main()
