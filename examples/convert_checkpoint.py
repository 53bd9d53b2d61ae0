"""Convert checkpoints (the counterpart of Baidu ERNIE's tools/convert_checkpoint.py), over `ernie45 convert`.

    python examples/convert_checkpoint.py --from hf --to paddle ERNIE-4.5-0.3B-PT ERNIE-4.5-0.3B-Paddle
    python examples/convert_checkpoint.py --from paddle --to hf ERNIE-4.5-0.3B-Paddle ERNIE-4.5-0.3B-PT
"""

import sys

from ernie45.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
