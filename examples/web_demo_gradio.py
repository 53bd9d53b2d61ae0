"""Web chat against an OpenAI-compatible endpoint: the ernie45 counterpart of Baidu's
`cookbook/simple_ernie_bot_demo.py` (text chat only; no file upload or web search).

    python examples/web_demo_gradio.py --server-port 8666 --model_map '{"ERNIE-4.5-0.3B-PT": "http://127.0.0.1:8000/v1"}'

Same flags as the upstream demo; the work is `ernie45 webui --server-url URL --served-model-name NAME`. Unlike the
upstream default (0.0.0.0), it listens on 127.0.0.1 unless `--server-name` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from ernie45.cli import main as ernie45_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server-port", type=int, default=8666, help="port of the web page")
    p.add_argument("--server-name", default="127.0.0.1", help="address of the web page")
    p.add_argument(
        "--model_map",
        required=True,
        help='JSON object with one model name and its endpoint, e.g. {"ERNIE-4.5": "http://127.0.0.1:8000/v1"}',
    )
    p.add_argument("--api-key", default=None, help="the endpoint's API key, if it needs one")
    a = p.parse_args()
    try:
        model_map = json.loads(a.model_map)
    except json.JSONDecodeError as e:
        p.error(f"--model_map is not valid JSON: {e}")
    if not isinstance(model_map, dict) or len(model_map) != 1:
        p.error("--model_map must be a JSON object with exactly one model name -> endpoint URL")
    name, url = next(iter(model_map.items()))
    argv = [
        "webui",
        "--server-url",
        str(url),
        "--served-model-name",
        str(name),
        "--host",
        a.server_name,
        "--port",
        str(a.server_port),
    ]
    if a.api_key:
        argv += ["--api-key", a.api_key]
    return ernie45_main(argv)


if __name__ == "__main__":
    sys.exit(main())
