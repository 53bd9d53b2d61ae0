"""`ernie45 serve` under hostile or careless clients: every bad request gets a 4xx, and nobody else's request fails.

A schemathesis fuzz run drives the server with a few hundred requests generated from its own OpenAPI schema
(valid and invalid bodies) while a normal greedy request runs beside them; the other tests pin each rule.
"""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import pytest
from conftest import make_hf_model, save_hf
from test_serve import NAME, client, make_app, metric, running, wait_until

from ernie45.generation import sampling
from ernie45.generation.streaming import StopStringFilter, _overlap
from ernie45.serve.server import LOOPBACK_HOSTS, ServerConfig

ASK = [{"role": "user", "content": "床前明月光"}]
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("dense", max_position_embeddings=4096)
    return save_hf(hf, tmp_path_factory.mktemp("hard") / NAME, tokenizer_dir)


@pytest.fixture(scope="module")
def served(ckpt):
    app, tok, throttle = make_app(ckpt, max_queue_len=32)
    with running(app) as base:
        yield base, tok, throttle


def _alone(base: str) -> list[str]:
    return [client(base).chat.completions.create(model=NAME, messages=ASK, **GREEDY).choices[0].message.content]


# ---- failure isolation ------------------------------------------------------------------------------------
def test_tiny_temperature_is_greedy_and_the_neighbour_is_unharmed(served):
    """A temperature of 1e-45 used to make the logits inf and the draw NaN, failing the whole batch with 500."""
    base, _, throttle = served
    want = _alone(base)[0]

    async def go():
        c = client(base).with_options(max_retries=0)
        ac = __import__("openai").AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        try:
            normal = ac.chat.completions.create(model=NAME, messages=ASK, **GREEDY)
            tiny = ac.chat.completions.create(model=NAME, messages=ASK, **{**GREEDY, "temperature": 1e-45})
            return await asyncio.gather(normal, tiny)
        finally:
            await ac.close()
            c.close()

    normal, tiny = asyncio.run(go())
    assert normal.choices[0].message.content == want
    assert tiny.choices[0].message.content == want  # below 1e-5: greedy


def test_a_failing_row_fails_alone(served, monkeypatch):
    """Whatever one sequence's sampling raises mid-stream, it alone gets a 4xx; the sequence decoding beside it
    (sampled in the same steps) finishes with the tokens it has alone."""
    base, _, _ = served
    long = {**GREEDY, "max_tokens": 200}
    want = client(base).chat.completions.create(model=NAME, messages=ASK, **long).choices[0].message.content
    real, calls = sampling.apply_top_k, []

    def broken(scores, top_k, *a, **kw):
        if top_k == 7:  # this request's own parameter breaks its third draw, once it decodes beside the other
            calls.append(1)
            if len(calls) >= 3:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(scores, top_k, *a, **kw)

    monkeypatch.setattr(sampling, "apply_top_k", broken)
    openai = pytest.importorskip("openai")

    async def go():
        ac = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        try:
            normal = asyncio.ensure_future(ac.chat.completions.create(model=NAME, messages=ASK, **long))
            await asyncio.to_thread(wait_until, lambda: metric(base, "ernie45_num_requests_running") == 1, 30,
                                    "the first request running")
            bad = ac.chat.completions.create(model=NAME, messages=ASK, temperature=1.0, max_tokens=50,
                                             extra_body={"top_k": 7, "ignore_eos": True})
            return await asyncio.gather(normal, bad, return_exceptions=True)
        finally:
            await ac.close()

    normal, bad = asyncio.run(go())
    assert isinstance(bad, openai.BadRequestError), bad
    assert "generation failed for this request's parameters" in str(bad)
    assert len(calls) == 4  # the third draw failed in the shared step, then again when retried alone
    assert normal.choices[0].message.content == want
    assert httpx.get(f"{base}/health").status_code == 200


# ---- bounded work per request -----------------------------------------------------------------------------
def test_stop_string_holdback_matches_the_definition():
    """`_overlap` (what may still become a stop string) equals the brute-force definition on random text."""
    rng = random.Random(0)
    for _ in range(3000):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        want = max((k for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])), default=0)
        if stop in text:
            continue  # a hit is handled before the hold-back
        assert _overlap(text, stop) == want, (text, stop)
    f = StopStringFilter(["aaab"])
    assert f.add("aaaaaa") == ("aaa", False) and f.add("b") == ("", True)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"stop": ["x" * 257]}, "stop"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"--5": 1}}, "logit_bias"),
        ({"logit_bias": {" 5": 1}}, "logit_bias"),
        ({"logit_bias": {"-0": 1}}, "logit_bias"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"eos_token": "x"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"n": 16, "extra_big_queue_check": True}, "n"),
    ],
)
def test_bounded_parameters_are_400(ckpt, served, extra, param):
    base = served[0]
    if extra.pop("extra_big_queue_check", False):  # n beyond what the queue can ever hold: 400, not 429
        app, _, _ = make_app(ckpt, max_queue_len=8)
        with running(app) as small:
            r = httpx.post(f"{small}/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **extra})
            assert r.status_code == 400, r.text
            r = httpx.post(f"{small}/v1/completions", json={"prompt": ["a"] * 9, "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        return
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()


def test_logit_bias_tensors_are_built_once(served, monkeypatch):
    """logit_bias applies (a biased token wins greedy decoding), and its tensors are built once when the request
    arrives, not once per generated token."""
    import torch

    base, tok, _ = served
    target = tok.encode("月")[-1]
    bias = {str(target): 100, "7": -5}
    made = []
    real = torch.tensor

    def recording(data, *a, **kw):
        made.append(data if isinstance(data, list) else None)
        return real(data, *a, **kw)

    monkeypatch.setattr(torch, "tensor", recording)
    r = client(base).chat.completions.create(model=NAME, messages=ASK, temperature=0, max_tokens=12,
                                             logit_bias=bias, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode([target] * 12)
    assert made.count([target, 7]) == 1 and made.count([100.0, -5.0]) == 1


def test_tokenization_runs_off_the_event_loop(served, monkeypatch):
    """While a completion's prompt is being tokenized, /health still answers (the event loop is free)."""
    base, tok, _ = served
    release = threading.Event()
    real = tok.encode

    def slow(text, *a, **kw):
        if text == "slow prompt":
            assert release.wait(30), "/health never answered while tokenizing"
        return real(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", slow)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        f"{base}/v1/completions", json={"prompt": "slow prompt", "max_tokens": 2}, timeout=60)))
    t.start()
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    release.set()
    t.join(60)
    assert result["r"].status_code == 200


# ---- HTTP layer -----------------------------------------------------------------------------------------------
def test_metrics_labels_are_bounded(served):
    base = served[0]
    for i in range(5):
        httpx.request(f"WEIRD{i}", f"{base}/v1/models")
        httpx.get(f"{base}/no/such/path/{i}")
    text = httpx.get(f"{base}/metrics").text
    assert 'method="OTHER"' in text and "WEIRD" not in text and "/no/such" not in text


def test_chunked_body_over_the_limit_is_413(ckpt):
    app, _, _ = make_app(ckpt)
    with running(app) as base:
        def body():
            for _ in range(5 * 1024):
                yield b" " * 1024  # 5 MiB of whitespace, sent without a Content-Length

        r = httpx.post(f"{base}/v1/chat/completions", content=body(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"


def test_host_and_origin_checked_on_a_keyless_loopback_server(ckpt):
    import ernie45
    from ernie45.serve.engine import EngineArgs
    from ernie45.serve.server import ModelSource, create_app

    model, tok = ernie45.load(ckpt, dtype="float32", device="cpu")
    cfg = ServerConfig(NAME, None, EngineArgs(max_num_seqs=2, max_model_len=512),
                       allowed_hosts=LOOPBACK_HOSTS | {"my-box.lan"})
    with running(create_app(ModelSource(model=model, tokenizer=tok), cfg)) as base:
        port = base.rsplit(":", 1)[1]
        get = lambda **h: httpx.get(f"{base}/v1/models", headers=h).status_code  # noqa: E731
        assert get() == 200
        assert get(host=f"localhost:{port}") == 200 and get(host=f"[::1]:{port}") == 200
        assert get(host=f"my-box.lan:{port}") == 200
        assert get(host="evil.example") == 403
        assert get(origin="http://evil.example") == 403 and get(origin="null") == 403
        assert get(origin=f"http://127.0.0.1:{port}") == 200
    cfg = ServerConfig(NAME, "key", EngineArgs(max_num_seqs=2, max_model_len=512), allowed_hosts=LOOPBACK_HOSTS)
    with running(create_app(ModelSource(model=model, tokenizer=tok), cfg)) as base:  # a key: any host
        r = httpx.get(f"{base}/v1/models", headers={"host": "evil.example", "authorization": "Bearer key"})
        assert r.status_code == 200


def test_empty_api_key_is_an_error(ckpt, capsys, monkeypatch):
    from ernie45.cli import main as cli

    assert cli(["serve", "--model", ckpt, "--api-key", ""]) == 1
    assert "API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("ERNIE45_API_KEY", " ")
    assert cli(["serve", "--model", ckpt]) == 1
    assert "API key is empty" in capsys.readouterr().err


# ---- fuzzing ------------------------------------------------------------------------------------------------
def test_fuzzed_requests_never_5xx_and_a_normal_request_completes(served):
    """schemathesis generates valid and invalid bodies for every POST endpoint from the server's own OpenAPI
    schema (valid ones with max_tokens clamped, so the run stays short); no answer may be a 5xx, /health stays
    200, and a greedy request sent again and again alongside always returns its tokens."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    base = served[0]
    want = _alone(base)[0]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    stop, normal_runs, failures = threading.Event(), [], []

    def neighbour():
        c = client(base)
        while not stop.is_set():
            got = c.chat.completions.create(model=NAME, messages=ASK, **GREEDY).choices[0].message.content
            normal_runs.append(got == want)

    t = threading.Thread(target=neighbour)
    t.start()
    statuses: dict[int, int] = {}

    def clamp(case):
        if isinstance(case.body, dict):
            for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
                if isinstance(case.body.get(key), int) and case.body[key] > 4:
                    case.body[key] = 4
            if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
                case.body["n"] = 2
        return case

    try:
        for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = schema[path]["POST"].as_strategy(generation_mode=mode).map(clamp)

                @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def run(case):
                    r = case.call(base_url=base, timeout=60)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code >= 500:
                        failures.append((case.path, case.body, r.status_code, r.text[:300]))

                run()
    finally:
        stop.set()
        t.join(120)
    assert not failures, failures[:5]
    assert sum(statuses.values()) >= 300 and statuses.get(400, 0) > 50 and statuses.get(200, 0) > 20, statuses
    assert httpx.get(f"{base}/health").status_code == 200
    assert normal_runs and all(normal_runs)
