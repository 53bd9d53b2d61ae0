"""Start the ERNIE 4.5 web service: an OpenAI-compatible HTTP server (continuous batching, streaming).

The ernie45 counterpart of a deploy/serving "web service" script; every flag of `ernie45 serve` works here:

    python examples/ernie_web_service.py --model ERNIE-4.5-0.3B-PT --port 8000 --max-num-seqs 8

Then query it with examples/client.py or examples/client_openai.py. See docs/serve.md.
"""

import sys

from ernie45.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
