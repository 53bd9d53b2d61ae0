"""The OpenAI-compatible server: real uvicorn on a free loopback port, driven by the official clients.

Greedy outputs are checked against transformers (a plain argmax loop over `Ernie4_5ForCausalLM`), alone and
batched; logprobs against its log-softmax; lm-eval's own parser reads the echo logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.errors import ErnieError
from ernie45.serve import server as server_mod
from ernie45.serve.engine import Engine, EngineArgs, EngineError, SamplingParams
from ernie45.serve.server import ModelSource, ServerConfig, create_app

uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny"
PROMPTS = [
    "床前明月光",
    "The quick brown fox",
    "知识就是力量。",
    "Hello world!",
    "白日依山尽",
    "Time flies",
    "春眠不觉晓，处处闻啼鸟。",
    "ERNIE 4.5 is",
]


# ---- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("dense", max_position_embeddings=4096)
    return hf, save_hf(hf, tmp_path_factory.mktemp("serve") / NAME, tokenizer_dir)


def wait_until(check, timeout: float = 60.0, what: str = "condition"):
    """Poll `check()` until it returns a truthy value (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def health(base: str) -> int:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code
    except httpx.TransportError:
        return 0


@contextlib.contextmanager
def running(app, wait_ready: bool = True):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: health(base) == 200 if wait_ready else health(base) in (200, 503), what="/health")
        yield base
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
    assert not thread.is_alive()


@contextlib.contextmanager
def cli_server(command: str, model_dir: str | None = None):
    """Run a documented `ernie45 serve ... --port 8000` command line in a subprocess on a free port (fp32, and
    `--model` replaced by `model_dir` when given); yields a `ServerRun` once it is healthy. On exit it gets Ctrl-C,
    must end cleanly, and leaves its output in `ServerRun.output`."""
    import shlex
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
    sock.close()
    args = shlex.split(command.replace("8000", port))
    assert args[:2] == ["ernie45", "serve"]
    if model_dir is not None:
        args[args.index("--model") + 1] = model_dir
    proc = subprocess.Popen([sys.executable, "-m", "ernie45", *args[1:], "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    run = ServerRun(base, port)
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            return health(base) == 200

        wait_until(up, timeout=120, what="server start")
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        run.output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, run.output


class ServerRun:
    """A `cli_server`: its base URL and port, and (after it stopped) its stdout + stderr."""

    def __init__(self, base: str, port: str):
        self.base, self.port, self.output = base, port, ""


class Throttle:
    """Wraps a model's forward so a test decides how many more forward calls (engine steps) may run.

    This pins the engine mid-request deterministically (a slot stays busy, a request cannot finish early).
    """

    def __init__(self, model):
        self.cond = threading.Condition()
        self.left: int | None = None  # None: unlimited
        inner = model.forward

        def forward(*args, **kwargs):
            with self.cond:
                assert self.cond.wait_for(lambda: self.left is None or self.left > 0, timeout=60)
                if self.left is not None:
                    self.left -= 1
            return inner(*args, **kwargs)

        model.forward = forward

    def allow(self, n: int | None) -> None:
        with self.cond:
            self.left = n
            self.cond.notify_all()


def make_app(path: str, api_key: str | None = None, **engine_kw):
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    throttle = Throttle(model)
    engine = EngineArgs(**{"max_num_seqs": 4, "max_model_len": 2048, **engine_kw})
    app = create_app(ModelSource(model=model, tokenizer=tok), ServerConfig(NAME, api_key, engine))
    return app, tok, throttle


@pytest.fixture(scope="module")
def served(ckpt):
    app, tok, throttle = make_app(ckpt[1])
    with running(app) as base:
        yield base, ckpt[0], tok, throttle


def hf_greedy(hf, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers reference: n argmax steps (full forward each step); also each step's log-softmax."""
    ids, out, lps = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            lps.append(torch.log_softmax(logits, -1))
            ids.append(int(logits.argmax()))
            out.append(ids[-1])
    return out, lps


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# ---- endpoints and formats ----------------------------------------------------------------------------
def test_models_health_tokenize_metrics(served):
    base, _, tok, _ = served
    models = client(base).models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].max_model_len == 2048
    r = httpx.post(f"{base}/tokenize", json={"prompt": "床前明月光"}).json()
    assert r["tokens"] == tok.encode("床前明月光") and r["count"] == len(r["tokens"])
    r = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert r["tokens"] == chat_ids(tok, "hi")
    assert httpx.post(f"{base}/detokenize", json={"tokens": tok.encode("白日依山尽")}).json() == {
        "prompt": "白日依山尽"
    }
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 2048
    text = httpx.get(f"{base}/metrics").text
    for name in (
        "ernie45_num_requests_running",
        "ernie45_num_requests_waiting",
        "ernie45_time_to_first_token_seconds",
        "ernie45_time_per_output_token_seconds",
        "ernie45_generation_tokens_total",
    ):
        assert name in text


def test_greedy_chat_and_completion_equal_transformers(served):
    base, hf, tok, _ = served
    c = client(base)
    want, _ = hf_greedy(hf, chat_ids(tok, "你好"), 12)
    r = c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "你好"}], max_tokens=12, **GREEDY
    )
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_ids(tok, "你好")), 12)
    ids = tok.encode("床前明月光")
    want, _ = hf_greedy(hf, ids, 10)
    for prompt in ("床前明月光", ids):  # text and token-id prompts
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, **GREEDY)
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)


def test_stream_include_usage_and_n(served):
    base, hf, tok, _ = served
    c = client(base)
    msgs = [{"role": "user", "content": "hello"}]
    full = (
        c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, **GREEDY)
        .choices[0]
        .message.content
    )
    chunks = list(
        c.chat.completions.create(
            model=NAME,
            messages=msgs,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # n=2 with a seed: two different samples, reproducible across requests.
    kw = dict(
        model=NAME,
        messages=msgs,
        max_tokens=16,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1] and texts == [ch.message.content for ch in b.choices]
    assert texts[0] != texts[1] and a.usage.completion_tokens == 32
    streamed = {0: "", 1: ""}
    for ch in c.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == texts


def test_stop_string_cuts_output(served):
    base, *_ = served
    c = client(base)
    # Seeded sampling (greedy text of a random model is one repeated token): the same text both times.
    kw = dict(
        model=NAME,
        prompt="The quick brown fox",
        max_tokens=32,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    text = c.completions.create(**kw).choices[0].text
    k = next(
        k
        for k in range(4, len(text) - 1)
        if text.find(text[k : k + 2]) == k and "\ufffd" not in text[k : k + 2]
    )
    r = c.completions.create(stop=["@@never@@", text[k : k + 2]], **kw)
    assert r.choices[0].text == text[:k] and r.choices[0].finish_reason == "stop"


def test_logprobs_equal_transformers(served):
    base, hf, tok, _ = served
    r = client(base).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    _, lps = hf_greedy(hf, chat_ids(tok, "hi"), 5)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry, ref in zip(content, lps):
        top = ref.topk(3)
        assert entry.logprob == pytest.approx(top.values[0].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_echo_logprobs_parsed_by_lm_eval(served):
    """lm-eval local-completions: token-id prompts, echo + logprobs=1 + max_tokens=1, parsed by lm-eval itself."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    base, hf, tok, _ = served
    ctx, conts = tok.encode("春眠不觉晓，"), [tok.encode("处处闻啼鸟。"), tok.encode("知识就是力量。")]
    prompts = [ctx + cont for cont in conts]
    body = {
        "model": NAME,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "seed": 1234,
    }
    out = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
    got = LocalCompletionsAPI.parse_logprobs(out, tokens=prompts, ctxlens=[len(ctx)] * 2)
    for (ll, greedy), ids in zip(got, prompts):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        steps = range(len(ctx) - 1, len(ids) - 1)
        ref = sum(lp[t, ids[t + 1]].item() for t in steps)
        assert ll == pytest.approx(ref, abs=1e-3)
        assert greedy == all(lp[t].argmax().item() == ids[t + 1] for t in steps)
    # max_tokens=0 scores the prompt only
    body.update(max_tokens=0, prompt=prompts[0])
    choice = httpx.post(f"{base}/v1/completions", json=body).json()["choices"][0]
    assert choice["logprobs"]["token_logprobs"][0] is None and len(choice["logprobs"]["tokens"]) == len(
        prompts[0]
    )


MC_ROWS = [
    ("床前明月光，", ["疑是地上霜。", "黄河入海流。", "花落知多少。"], 0),
    ("白日依山尽，", ["疑是地上霜。", "黄河入海流。", "夜来风雨声。"], 1),
    ("The quick brown fox", ["jumps over the lazy dog.", "is power.", "flies like an arrow."], 0),
    ("Knowledge is", ["power.", "a fox.", "the moon."], 0),
    ("春眠不觉晓，", ["处处闻啼鸟。", "低头思故乡。", "更上一层楼。"], 0),
    ("Time flies like", ["an arrow.", "the dog.", "power."], 0),
]


@pytest.mark.slow
def test_lm_eval_local_completions_matches_in_process(served, ckpt, tmp_path):
    """lm-eval's local-completions through the server scores a multiple-choice task exactly as lm-eval's
    in-process HFLM does on the same weights (same per-choice loglikelihoods, same accuracy)."""
    lm_eval = pytest.importorskip("lm_eval")
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    base, hf, *_ = served
    rows = [{"question": q, "choices": c, "label": label} for q, c, label in MC_ROWS]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/mc.jsonl\n"
        f"  cache_dir: {tmp_path}/cache\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n'
    )
    tasks = TaskManager(include_path=str(tmp_path))
    remote = lm_eval.simple_evaluate(
        model="local-completions",
        tasks=["tiny_mc"],
        task_manager=tasks,
        log_samples=True,
        model_args={
            "model": NAME,
            "base_url": f"{base}/v1/completions",
            "num_concurrent": 2,
            "tokenizer_backend": "remote",
        },
    )
    local = lm_eval.simple_evaluate(
        model=HFLM(
            pretrained=hf, tokenizer=transformers.AutoTokenizer.from_pretrained(ckpt[1]), batch_size=1
        ),
        tasks=["tiny_mc"],
        task_manager=tasks,
        log_samples=True,
    )
    assert remote["results"]["tiny_mc"]["acc,none"] == local["results"]["tiny_mc"]["acc,none"]
    for a, b in zip(remote["samples"]["tiny_mc"], local["samples"]["tiny_mc"]):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-3)


def test_langchain_chat_openai(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    base, hf, tok, _ = served
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{base}/v1",
        api_key="none",
        model=NAME,
        temperature=0,
        max_tokens=8,
        extra_body={"ignore_eos": True},
        max_retries=0,
    )
    want = tok.decode(hf_greedy(hf, chat_ids(tok, "你好"), 8)[0], skip_special_tokens=True)
    assert llm.invoke("你好").content == want
    assert "".join(ch.content for ch in llm.stream("你好")) == want


# ---- continuous batching -------------------------------------------------------------------------------
def test_concurrent_requests_equal_alone(served):
    """8 requests of different lengths through 4 slots: joins, leaves and row moves change no token."""
    base, hf, tok, _ = served
    lengths = [5, 23, 9, 17, 3, 30, 12, 20]

    async def go():
        c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(
                *[
                    c.completions.create(model=NAME, prompt=p, max_tokens=n, **GREEDY)
                    for p, n in zip(PROMPTS, lengths)
                ]
            )
        finally:
            await c.close()

    results = asyncio.run(go())
    for p, n, r in zip(PROMPTS, lengths, results):
        want, _ = hf_greedy(hf, tok.encode(p), n)
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True), p
        assert r.usage.completion_tokens == n


def test_moe_concurrent_requests_equal_alone(tmp_path, tokenizer_dir):
    hf = make_hf_model("moe", bias_scale=0.3, max_position_embeddings=1024)
    app, tok, _ = make_app(save_hf(hf, tmp_path / "moe", tokenizer_dir), max_num_seqs=3, max_model_len=256)
    lengths = [6, 14, 3, 9]

    async def go(base):
        c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(
                *[
                    c.completions.create(model=NAME, prompt=p, max_tokens=n, **GREEDY)
                    for p, n in zip(PROMPTS, lengths)
                ]
            )
        finally:
            await c.close()

    with running(app) as base:
        results = asyncio.run(go(base))
    for p, n, r in zip(PROMPTS, lengths, results):
        assert r.choices[0].text == tok.decode(
            hf_greedy(hf, tok.encode(p), n)[0], skip_special_tokens=True
        ), p


def test_client_disconnect_frees_slot(served):
    base, *_, throttle = served
    aborted = metric(base, "ernie45_requests_total", '{outcome="abort"}')
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1900,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    try:
        throttle.allow(3)  # prefill + 2 decode steps, then the engine waits: the request cannot finish
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as resp:
            lines = [line for line, _ in zip(resp.iter_lines(), range(6)) if line]
        assert len(lines) == 3 and all(line.startswith("data: {") for line in lines)
        throttle.allow(None)
        wait_until(
            lambda: metric(base, "ernie45_requests_total", '{outcome="abort"}') == aborted + 1, what="abort"
        )
        # a non-streaming request whose client gives up is aborted too
        throttle.allow(1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        throttle.allow(None)
        wait_until(
            lambda: metric(base, "ernie45_requests_total", '{outcome="abort"}') == aborted + 2, what="abort"
        )
    finally:
        throttle.allow(None)
    wait_until(lambda: metric(base, "ernie45_num_requests_running") == 0, what="free slots")
    assert (
        client(base)
        .completions.create(model=NAME, prompt="hi", max_tokens=3, **GREEDY)
        .usage.completion_tokens
        == 3
    )


# ---- errors ---------------------------------------------------------------------------------------------
BAD = [  # (body or raw bytes, status, param)
    (b'{"model": "tiny", "messages": [', 400, None),
    (b"[]", 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "often"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2040}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "字" * 3000}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_chat_requests(served, body, status, param):
    base = served[0]
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{base}/v1/chat/completions", timeout=30, **kw)
    err = r.json()["error"]
    assert r.status_code == status, err
    assert err["message"] and err["param"] == param and err["type"]


def test_other_bad_requests_and_server_survives(served):
    base, _, tok, _ = served
    post = lambda path, **kw: httpx.post(f"{base}{path}", timeout=30, **kw)  # noqa: E731
    assert post("/v1/completions", json={"prompt": [5, 10**6]}).json()["error"]["param"] == "prompt"
    r = post("/v1/completions", json={"prompt": [10 + i % 300 for i in range(2100)]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post("/v1/completions", json={"prompt": "hi", "max_tokens": None, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 16  # an explicit null means OpenAI's default
    r = post(
        "/v1/completions", json={"prompt": ["床前", "明月"], "n": 2, "max_tokens": 3, "temperature": 0}
    ).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3] and r["choices"][0]["text"] == r["choices"][1][
        "text"
    ]
    assert r["usage"]["prompt_tokens"] == len(tok.encode("床前")) + len(tok.encode("明月"))
    r = post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = post(
        "/v1/chat/completions",
        content=b"{" + b" " * (10 * 2**20) + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    r = httpx.get(f"{base}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{base}/v1/chat/completions").status_code == 405
    c = client(base)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.param == "model"
    assert health(base) == 200
    assert c.completions.create(model=NAME, prompt="hi", max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_api_key_and_queue_full(ckpt):
    app, tok, throttle = make_app(ckpt[1], api_key="sekret", max_num_seqs=1, max_queue_len=1)
    with running(app) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()
        with pytest.raises(openai.AuthenticationError):
            client(base, api_key="wrong").models.list()
        assert httpx.get(f"{base}/metrics").status_code == 200  # open, like /health
        c = client(base, api_key="sekret")
        long = {"model": NAME, "prompt": "hi", "max_tokens": 50, "stream": True}
        headers = {"Authorization": "Bearer sekret"}
        try:
            throttle.allow(0)  # A takes the only slot and stays there
            engine = app.state.server.engine
            with httpx.stream("POST", f"{base}/v1/completions", json=long, headers=headers, timeout=60) as a:
                wait_until(lambda: engine.stats()["waiting"] == 0, what="A admitted")
                with httpx.stream(
                    "POST", f"{base}/v1/completions", json=long, headers=headers, timeout=60
                ) as b:
                    assert a.status_code == b.status_code == 200  # B waits in the queue (length 1)
                    with pytest.raises(openai.RateLimitError) as e:
                        c.completions.create(model=NAME, prompt="x", max_tokens=2)
                    assert e.value.code == "queue_full"
                    throttle.allow(None)
                    assert [x for x in b.iter_lines() if x][-1] == "data: [DONE]"
        finally:
            throttle.allow(None)
        assert metric(base, "ernie45_requests_rejected_total") == 1
        wait_until(lambda: metric(base, "ernie45_num_requests_running") == 0, what="free slots")
        assert (
            c.completions.create(model=NAME, prompt="hi", max_tokens=2, **GREEDY).usage.completion_tokens == 2
        )


def test_health_503_while_loading(ckpt, monkeypatch):
    gate = threading.Event()
    real = server_mod.load_model

    def slow_load(source):
        gate.wait(60)
        return real(ModelSource(path=source.path, dtype="float32", device="cpu"))

    monkeypatch.setattr(server_mod, "load_model", slow_load)
    cfg = ServerConfig(NAME, None, EngineArgs(max_num_seqs=2, max_model_len=256))
    with running(create_app(ModelSource(path=ckpt[1]), cfg), wait_ready=False) as base:
        assert health(base) == 503
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        gate.set()
        wait_until(lambda: health(base) == 200, what="model loaded")
        assert (
            client(base).completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens
            == 2
        )


def test_engine_shutdown_ends_requests_cleanly(ckpt):
    model, tok = ernie45.load(ckpt[1], dtype="float32", device="cpu")
    engine = Engine(model, tok, EngineArgs(max_num_seqs=1, max_model_len=2048))
    engine.start()

    async def go():
        running_ = engine.submit([tok.encode("hi")], [SamplingParams(max_tokens=1900, ignore_eos=True)])
        queued = engine.submit([tok.encode("ho")], [SamplingParams(max_tokens=4)])
        first = await anext(aiter(running_))
        assert first[1].token_ids
        await asyncio.to_thread(engine.shutdown, 0.0)
        for group in (running_, queued):
            with pytest.raises(EngineError) as e:
                async for _ in group:
                    pass
            assert e.value.status == 503
        with pytest.raises(EngineError):
            engine.submit([tok.encode("x")], [SamplingParams()])

    asyncio.run(go())
    assert engine.stats()["running"] == 0


def test_request_timeout_running_and_queued(ckpt):
    model, tok = ernie45.load(ckpt[1], dtype="float32", device="cpu")
    throttle = Throttle(model)
    engine = Engine(model, tok, EngineArgs(max_num_seqs=1, max_model_len=256, request_timeout=0.2))
    engine.start()

    async def go():
        throttle.allow(1)  # the prefill of the first request runs; then the engine is held
        first = engine.submit([tok.encode("hi")], [SamplingParams(max_tokens=50, ignore_eos=True)])
        queued = engine.submit([tok.encode("ho")], [SamplingParams(max_tokens=5)])
        deadline = time.monotonic() + 0.2
        await asyncio.to_thread(wait_until, lambda: time.monotonic() > deadline, 10, "the deadline")
        throttle.allow(None)
        for group in (first, queued):
            with pytest.raises(EngineError) as e:
                async for _ in group:
                    pass
            assert e.value.status == 408 and e.value.code == "request_timeout"

    asyncio.run(go())
    assert engine.metrics.registry.get_sample_value("ernie45_requests_total", {"outcome": "timeout"}) == 2
    engine.shutdown(0.0)


def test_cli_rejects_bad_flags(ckpt, tmp_path):
    with pytest.raises(ErnieError, match="not found"):
        server_mod.main(["--model", str(tmp_path / "missing")])
    with pytest.raises(ErnieError, match="--max-num-seqs"):
        server_mod.main(["--model", ckpt[1], "--max-num-seqs", "0"])
    with pytest.raises(ErnieError, match="--max-model-len"):
        server_mod.main(["--model", ckpt[1], "--max-model-len", "100000"])
    with pytest.raises(SystemExit):
        server_mod.main(["--model", ckpt[1], "--no-such-flag"])
    with pytest.raises(ErnieError, match="--block-size"):
        server_mod.main(["--model", ckpt[1], "--block-size", "0"])
    with pytest.raises(ErnieError, match="invalid size '12XB'"):
        server_mod.main(["--model", ckpt[1], "--kv-cache-memory", "12XB"])
    with pytest.raises(ErnieError, match="--max-num-batched-tokens"):
        server_mod.main(["--model", ckpt[1], "--max-num-batched-tokens", "4"])
    with pytest.raises(SystemExit):  # argparse: not one of auto, int8
        server_mod.main(["--model", ckpt[1], "--kv-cache-dtype", "fp8"])


def test_access_log_is_json(served, caplog):
    base = served[0]
    with caplog.at_level("INFO", logger="ernie45.serve.access"):
        httpx.get(f"{base}/health", headers={"x-request-id": "abc123"})
        wait_until(lambda: any("abc123" in r.getMessage() for r in caplog.records), what="access log")
    entry = json.loads(next(r.getMessage() for r in caplog.records if "abc123" in r.getMessage()))
    assert entry["path"] == "/health" and entry["status"] == 200 and entry["method"] == "GET"


def test_examples_run_against_server(served, tmp_path):
    """examples/client.py (plain HTTP, streaming, a JSONL of queries) and examples/client_openai.py."""
    import subprocess
    import sys

    base = served[0]
    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"question": "你好"}\n{"messages": [{"role": "user", "content": "Hello"}]}\n')
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "client.py"),
            "--url",
            base,
            "--queries",
            str(queries),
            "--stream",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.count("\n") >= 2, r.stderr
    r = subprocess.run(
        [sys.executable, os.path.join(root, "client_openai.py"), "--url", f"{base}/v1", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "chat:" in r.stdout and "completion:" in r.stdout, r.stderr
    r = subprocess.run(
        [sys.executable, os.path.join(root, "ernie_web_service.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "--max-num-seqs" in r.stdout


def test_adapter_and_quantize_on_load(ckpt, tmp_path):
    """--adapter merges a PEFT LoRA adapter (same logits as PEFT running it), --quantize swaps the Linears."""
    peft = pytest.importorskip("peft")
    model, tok = ernie45.load(ckpt[1], dtype="float32", device="cpu")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok.encode("床前明月光")])
    with torch.no_grad():
        want = lora(ids).logits
    merged, _ = server_mod.load_model(
        ModelSource(path=ckpt[1], dtype="float32", device="cpu", adapter=str(tmp_path / "adapter"))
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=1e-5)
    quant, _ = server_mod.load_model(
        ModelSource(path=ckpt[1], dtype="float32", device="cpu", quantize="wint8")
    )
    assert type(quant.model.layers[0].mlp.down_proj) is not torch.nn.Linear
    assert quant.config.quantization_config["quant_method"]
    with pytest.raises(ErnieError, match="--quantize"):
        server_mod.main(["--model", ckpt[1], "--quantize", "int3"])
    with pytest.raises(ErnieError, match="adapter"):
        server_mod.main(["--model", ckpt[1], "--adapter", str(tmp_path)])
