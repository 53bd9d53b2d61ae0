"""Offline INT8/INT4 quantization (the counterpart of Baidu ERNIE's tools/quantize.py), over `ernie45 quantize`.

    python examples/quantize.py --model ERNIE-4.5-0.3B-PT --mode wint8 --out ERNIE-4.5-0.3B-wint8
    python examples/quantize.py --model ERNIE-4.5-0.3B-PT --mode llm.int8 --calib calib.jsonl --out out-int8
"""

import sys

from ernie45.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
