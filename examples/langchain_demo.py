"""A LangChain chain over ERNIE 4.5: prompt template -> chat model -> output parser, streamed to the terminal.

    python examples/langchain_demo.py --model ERNIE-4.5-0.3B-PT --topic 春天
    python examples/langchain_demo.py --server-url http://127.0.0.1:8000/v1 --topic 春天

The first runs the model in this process (`ernie45.langchain.ChatErnie`); the second talks to a running
`ernie45 serve` through langchain-openai's `ChatOpenAI`. See docs/langchain.md.
"""

from __future__ import annotations

import argparse
import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate


def build_llm(args: argparse.Namespace):
    if args.server_url:
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            base_url=args.server_url,
            api_key=args.api_key or "EMPTY",
            model=args.served_model_name,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
    from ernie45.langchain import ChatErnie

    return ChatErnie(
        model=args.model, temperature=args.temperature, max_tokens=args.max_tokens, dtype=args.dtype
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled ernie-tiny)")
    p.add_argument(
        "--server-url",
        default=None,
        help="use a running ernie45 serve instead, e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument("--served-model-name", default="ERNIE-4.5-0.3B-PT", help="model id on the server")
    p.add_argument("--api-key", default=None, help="the server's API key")
    p.add_argument("--topic", default="春天", help="what the poem is about")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--dtype", default="auto", help="in-process model dtype: auto, float32, bfloat16 or float16"
    )
    args = p.parse_args()

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "你是一位擅长写古诗的诗人。"),
            ("human", "写一首关于{topic}的诗"),
        ]
    )
    chain = prompt | build_llm(args) | StrOutputParser()
    for piece in chain.stream({"topic": args.topic}):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
