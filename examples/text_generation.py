"""Basic text generation (the counterpart of Baidu ERNIE's examples/text_generation.py).

    python examples/text_generation.py                       # the bundled ernie-tiny model
    python examples/text_generation.py --model ERNIE-4.5-0.3B-PT --prompt "写一首关于春天的诗"
"""

import argparse

import torch

import ernie45


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled ernie-tiny)")
    p.add_argument("--prompt", default="写一首题为《春晓》的诗")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    model, tokenizer = ernie45.load(a.model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=a.max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.stop_token_ids)
    print(tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))


if __name__ == "__main__":
    main()
