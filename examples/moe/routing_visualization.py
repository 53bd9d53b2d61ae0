"""Which experts does a MoE model use for a few prompts? Draws the layer x expert load heatmap.

    python examples/moe/routing_visualization.py --model ERNIE-4.5-21B-A3B-PT --out moe_heatmap.png "床前明月光" "Hello"

A short script over `ernie45.moe_stats`; `ernie45 moe-stats --model DIR --data FILE --out DIR` does the same
for a whole data file and also writes the token -> expert grid, the imbalance figures and a JSON report.
"""

from __future__ import annotations

import argparse
import sys

import ernie45
from ernie45.moe_stats import collect_routing, plot_heatmap

PROMPTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "The quick brown fox jumps over the lazy dog."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="ernie-tiny-moe", help="MoE checkpoint directory (default: the bundled one)"
    )
    p.add_argument("--out", default="moe_heatmap.png", help="PNG to write")
    p.add_argument("prompts", nargs="*", default=PROMPTS, help="texts to route (default: two samples)")
    args = p.parse_args()

    model, tokenizer = ernie45.load(args.model)
    if not model.config.is_moe:
        p.error(f"{args.model} is a dense model; routing needs a MoE model")
    stats = collect_routing(model, [tokenizer.encode(t) for t in args.prompts])
    plot_heatmap(stats, args.out, f"expert load over {stats.tokens} tokens (1 = uniform)")
    for f in stats.layer_figures():
        busiest = max(range(stats.num_experts), key=lambda e: f["counts"][e])
        print(
            f"layer {f['layer']:2d}: CV {f['cv']:.3f}  max/mean {f['max_over_mean']:.2f}  "
            f"entropy/log(E) {f['normalized_entropy']:.3f}  busiest expert {busiest}"
        )
    print(f"aux loss {stats.aux_loss:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
