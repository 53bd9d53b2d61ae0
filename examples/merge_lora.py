"""Merge a LoRA adapter into its base model: the ernie45 counterpart of Baidu's `tools/merge_lora.py`.

    python examples/merge_lora.py --model_name_or_path BASE --lora_path ADAPTER --merge_lora_model_path OUT

Same flags as the Paddle script; the work is `ernie45 merge-lora --model BASE --adapter ADAPTER --out OUT`.
"""

from __future__ import annotations

import argparse
import sys

from ernie45.cli import main as ernie45_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", required=True, help="base checkpoint directory")
    p.add_argument("--lora_path", required=True, help="LoRA adapter directory (PEFT layout)")
    p.add_argument("--merge_lora_model_path", required=True, help="where to write the merged checkpoint")
    p.add_argument("--dtype", default="auto", help="output dtype (auto keeps the base dtype)")
    a = p.parse_args()
    return ernie45_main(
        [
            "merge-lora",
            "--model",
            a.model_name_or_path,
            "--adapter",
            a.lora_path,
            "--out",
            a.merge_lora_model_path,
            "--dtype",
            a.dtype,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
