"""`ernie45 webui`: the chat function against `generate`, the Gradio app over HTTP (streaming, history, stop),
the server back end against a real `ernie45 serve`, CLI errors, and a headless-Chromium end-to-end test."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.cli import main as cli
from ernie45.errors import ErnieError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPT = "你好，请介绍一下你自己。"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# ---- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads spin badly when the CPUs are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    """A tiny dense model whose vocabulary equals the tokenizer's, so every generated token shows as text."""
    hf = make_hf_model("dense", vocab_size=400, max_position_embeddings=1024)
    return save_hf(hf, tmp_path_factory.mktemp("webui") / "tiny-chat", tokenizer_dir)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return ernie45.load(ckpt, dtype="float32", device="cpu")


def reference(model, tok, messages, max_new: int) -> str:
    """What the reply must be: greedy `generate` on the chat template, decoded."""
    from ernie45.generation import generate

    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    eos = list(dict.fromkeys(model.config.eos_token_ids + tok.stop_token_ids))
    out = generate(model, [ids], max_new_tokens=max_new, eos_token_id=eos)
    return tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float = 90.0, what: str = "condition"):
    """Poll `check()` until truthy (a deadline, never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """Wraps `model.forward`: counts calls and lets a test decide how many more may run."""

    def __init__(self, model):
        self.cond = threading.Condition()
        self.left: int | None = None  # None: unlimited
        self.calls = 0
        self.model, self.inner = model, model.forward

        def forward(*args, **kwargs):
            with self.cond:
                assert self.cond.wait_for(lambda: self.left is None or self.left > 0, timeout=60)
                if self.left is not None:
                    self.left -= 1
                self.calls += 1
            return self.inner(*args, **kwargs)

        model.forward = forward

    def allow(self, n: int | None) -> None:
        with self.cond:
            self.left = n
            self.cond.notify_all()

    def remove(self) -> None:
        self.allow(None)
        self.model.forward = self.inner


class Watched:
    """A back end wrapper that records each request's messages and whether its stream was closed."""

    def __init__(self, backend):
        self.backend, self.requests, self.closed = backend, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def stream(self, messages, *args):
        self.requests.append(messages)
        try:
            yield from self.backend.stream(messages, *args)
        finally:
            self.closed.set()


def doc_commands(prefix: str) -> list[str]:
    with open(os.path.join(ROOT, "docs", "webui.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    return [ln for b in blocks for ln in b.splitlines() if ln.startswith(prefix)]


# ---- the chat function ---------------------------------------------------------------------------------------
def test_history_and_content_normalised():
    from ernie45.webui import content_text, to_messages

    history = [
        {"role": "user", "content": [{"type": "text", "text": "床前"}, {"type": "text", "text": "明月光"}]},
        {"role": "assistant", "content": "疑是地上霜"},
        {"role": "user", "content": {"path": "/tmp/x.png", "mime_type": "image/png"}},  # a file: no text
        {"role": "assistant", "content": {"text": "ok", "files": []}},
    ]
    assert to_messages("举头望明月", history, "  你是诗人。 ") == [
        {"role": "system", "content": "你是诗人。"},
        {"role": "user", "content": "床前明月光"},
        {"role": "assistant", "content": "疑是地上霜"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "举头望明月"},
    ]
    assert to_messages({"text": "hi", "files": []}, [], "") == [{"role": "user", "content": "hi"}]
    assert content_text(None) == ""


def test_local_reply_streams_and_equals_generate(loaded):
    from ernie45.webui import LocalBackend, make_chat_fn

    model, tok = loaded
    chat = make_chat_fn(LocalBackend(model, tok, "tiny"))
    outs = list(chat(PROMPT, [], "", 0.0, 1.0, 40))
    want = reference(model, tok, [{"role": "user", "content": PROMPT}], 40)
    assert outs[-1] == want and len(want) > 10
    assert len(set(map(len, outs))) >= 10  # it grew step by step ...
    assert all(b.startswith(a) for a, b in zip(outs, outs[1:]))  # ... and only ever by appending
    # A second turn with a system prompt sees the whole conversation through the chat template.
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": outs[-1]}]
    second = list(chat("再说一遍。", history, "你是助手。", 0.0, 1.0, 12))[-1]
    messages = [
        {"role": "system", "content": "你是助手。"},
        *history,
        {"role": "user", "content": "再说一遍。"},
    ]
    assert second == reference(model, tok, messages, 12)


def test_tabs_are_batched_by_one_engine(loaded):
    """Two tabs replying at once share the model's one in-process engine (decode steps of two rows), and each
    reply equals its greedy reference."""
    from concurrent.futures import ThreadPoolExecutor

    from ernie45.webui import LocalBackend, make_chat_fn

    model, tok = loaded
    a, b = LocalBackend(model, tok, "tiny"), LocalBackend(model, tok, "tiny")
    assert a.engine is b.engine
    rows = []
    runner = a.engine.engine.runner
    inner = runner.decode

    def decode(tokens, positions, tables, want=None):
        rows.append(len(tokens))
        return inner(tokens, positions, tables, want)

    runner.decode = decode
    try:
        asks = [PROMPT, "写一首关于秋天的诗"]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda ab: list(make_chat_fn(ab[0])(ab[1], [], "", 0.0, 1.0, 30))[-1],
                                zip((a, b), asks)))
    finally:
        runner.decode = inner
    assert got == [reference(model, tok, [{"role": "user", "content": q}], 30) for q in asks]
    assert max(rows) == 2


def test_stop_ends_decoding(loaded):
    from ernie45.webui import LocalBackend, make_chat_fn

    model, tok = loaded
    gate = Gate(model)
    try:
        backend = LocalBackend(model, tok, "tiny")
        reply = make_chat_fn(backend)(PROMPT, [], "", 0.0, 1.0, 500)
        for _ in range(3):
            next(reply)
        reply.close()  # what Gradio does when the stop button is pressed
        # the engine thread runs ahead of the reader by a step or two, then drops the sequence
        wait_until(lambda: backend.engine.engine.stats()["running"] == 0, what="the sequence to be dropped")
        calls = gate.calls
        assert calls <= 8
        gate.allow(0)  # any further decode step would now block and fail the assertion inside forward
        assert gate.calls == calls
    finally:
        gate.remove()


def test_errors_reach_the_page_as_gradio_errors(loaded):
    from ernie45.webui import LocalBackend, make_chat_fn

    model, tok = loaded
    chat = make_chat_fn(LocalBackend(model, tok, "tiny"))
    with pytest.raises(gr.Error, match="too long"):
        list(chat("床前明月光" * 400, [], "", 0.0, 1.0, 8))


# ---- the Gradio app over HTTP --------------------------------------------------------------------------------
@contextlib.contextmanager
def launched(backend, **kw):
    from ernie45.webui import build_demo

    demo = build_demo(backend, **kw)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_gradio_app_streams_keeps_history_and_stops(loaded):
    from gradio_client import Client

    from ernie45.webui import LocalBackend

    model, tok = loaded
    backend = Watched(LocalBackend(model, tok, "tiny"))
    with launched(backend, temperature=0.0, max_tokens=30) as url:
        client = Client(url, verbose=False)
        job = client.submit(PROMPT, "", 0.0, 1.0, 30, api_name="/chat")
        final = job.result(timeout=120)
        assert final == reference(model, tok, [{"role": "user", "content": PROMPT}], 30)
        assert len({len(o) for o in job.outputs()}) >= 5  # streamed, not sent once at the end
        client.predict("再说一遍。", "你是助手。", 0.0, 1.0, 5, api_name="/chat")
        assert backend.requests[-1] == [
            {"role": "system", "content": "你是助手。"},
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": final},
            {"role": "user", "content": "再说一遍。"},
        ]
        # Stop: cancel while decoding is held mid-reply; the reply's generator must be closed.
        gate = Gate(model)
        try:
            backend.closed.clear()
            gate.allow(4)
            job = client.submit(PROMPT, "", 0.0, 1.0, 900, api_name="/chat")
            wait_until(lambda: job.outputs(), what="the first streamed piece")
            # Gradio closes the generator once its current step returns, so cancel from another thread
            # and then let the held step finish.
            cancel = threading.Thread(target=job.cancel)
            cancel.start()
            gate.allow(None)
            cancel.join(60)
            assert backend.closed.wait(60)
            assert gate.calls < 100  # far from the 900 tokens asked for
        finally:
            gate.remove()


# ---- talking to a running `ernie45 serve` ----------------------------------------------------------------------
@contextlib.contextmanager
def serving(model, tok, api_key: str | None = None):
    uvicorn = pytest.importorskip("uvicorn")
    from ernie45.serve.engine import EngineArgs
    from ernie45.serve.server import ModelSource, ServerConfig, create_app

    app = create_app(
        ModelSource(model=model, tokenizer=tok),
        ServerConfig("tiny-chat", api_key, EngineArgs(max_num_seqs=2, max_model_len=1024)),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started and app.state.server.engine is not None, what="the server")
        yield base, app.state.server.engine
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def test_server_backend_matches_in_process(loaded):
    from ernie45.webui import build_parser, make_backend, make_chat_fn

    model, tok = loaded
    want = reference(model, tok, [{"role": "user", "content": PROMPT}], 40)
    with serving(model, tok, api_key="sekret") as (base, engine):
        # The documented command, pointed at this server.
        line = doc_commands("ernie45 webui --server-url")[0]
        argv = [a.replace("http://127.0.0.1:8000", base) for a in shlex.split(line)[2:]] + [
            "--api-key",
            "sekret",
        ]
        args = build_parser().parse_args(argv)
        backend = make_backend(server_url=args.server_url, api_key=args.api_key)
        assert backend.name == "tiny-chat" and backend.base_url == base + "/v1"
        outs = list(make_chat_fn(backend)(PROMPT, [], "", 0.0, 1.0, 40))
        assert outs[-1] == want and len(set(map(len, outs))) >= 5

        with pytest.raises(ErnieError, match="cannot use the server"):
            make_backend(server_url=base, api_key="wrong")
        with pytest.raises(ErnieError, match="does not serve 'other'"):
            make_backend(server_url=base, api_key="sekret", served_model="other")
        with pytest.raises(gr.Error, match="max_tokens|context"):
            list(make_chat_fn(backend)(PROMPT, [], "", 0.0, 1.0, 5000))

        # Stop: closing the reply closes the HTTP stream, and the server aborts the request.
        gate = Gate(model)
        try:
            gate.allow(4)
            reply = make_chat_fn(backend)(PROMPT, [], "", 0.0, 1.0, 900)
            next(reply)
            reply.close()
            gate.allow(None)
            wait_until(lambda: engine.stats()["running"] == 0, what="the server to drop the request")
            assert gate.calls < 100
        finally:
            gate.remove()


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], "--port must be between 1 and 65535"),
        (["--temperature", "3"], "--temperature must be in [0, 2]"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--model", "nope-dir", "--server-url", "http://127.0.0.1:1/v1"], "not both"),
        (["--server-url", "ftp://x"], "must start with http"),
        (["--model", "/nonexistent/model"], "model path not found"),
        (["--server-url", "http://127.0.0.1:{port}/v1"], "cannot use the server at http://127.0.0.1:"),
        (["--served-model-name", "x", "--model", "{ckpt}"], "only applies with --server-url"),
    ],
)
def test_cli_errors_are_one_line(argv, message, ckpt, capsys):
    argv = [a.format(port=free_port(), ckpt=ckpt) for a in argv]
    assert cli(["webui", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_max_tokens_checked_against_context(ckpt, capsys):
    assert cli(["webui", "--model", ckpt, "--max-tokens", "1024"]) == 1
    assert "below the model's context window (1024)" in capsys.readouterr().err


# ---- end to end in a browser ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_browser_chat_streams(ckpt, loaded, tmp_path):
    """Headless Chromium opens the page started by the documented command, sends a message and watches the
    answer grow until it equals the greedy reply; the screenshot is kept as a test artifact."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    model, tok = loaded
    want = reference(model, tok, [{"role": "user", "content": PROMPT}], 120)
    port = free_port()
    line = doc_commands("ernie45 webui --model")[0]
    argv = [{"ERNIE-4.5-0.3B-PT": ckpt, "7860": str(port)}.get(a, a) for a in shlex.split(line)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ernie45",
            *argv,
            "--temperature",
            "0",
            "--max-tokens",
            "120",
            "--dtype",
            "float32",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: server.poll() is not None or _http_ok(url), timeout=180, what="the web UI")
        assert server.poll() is None, server.stdout.read()
        with sync_api.sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1000, "height": 720},
            )
            try:
                page = ctx.new_page()
                page.goto(url, wait_until="domcontentloaded")
                # Record every length the answer takes, from inside the page, as the DOM changes.
                page.evaluate("""() => {
                    window.lengths = [];
                    new MutationObserver(() => {
                        const bots = document.querySelectorAll('[data-testid="bot"]');
                        if (bots.length) window.lengths.push(bots[bots.length - 1].innerText.trim().length);
                    }).observe(document.body, {subtree: true, childList: true, characterData: true});
                }""")
                box = page.locator("textarea").first
                box.fill(PROMPT)
                box.press("Enter")
                try:
                    page.wait_for_function(
                        """want => { const b = document.querySelectorAll('[data-testid="bot"]');
                                     return b.length && b[b.length - 1].innerText.trim() === want; }""",
                        arg=want.strip(),
                        timeout=120_000,
                    )
                except sync_api.TimeoutError:
                    shown = page.locator('[data-testid="bot"]').last.inner_text()
                    pytest.fail(f"the page shows {shown!r}, expected {want!r}")
                shot = tmp_path / "webui.png"
                page.screenshot(path=str(shot))
                lengths = page.evaluate("window.lengths")
            finally:
                ctx.close()
        partial = {n for n in lengths if 0 < n < len(want.strip())}
        assert len(partial) >= 2, lengths  # the answer was seen growing
        assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(30)


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_upstream_style_example(monkeypatch, capsys):
    """examples/web_demo_gradio.py maps Baidu's demo flags onto `ernie45 webui --server-url`."""
    import runpy

    script = os.path.join(ROOT, "examples", "web_demo_gradio.py")
    port = free_port()
    monkeypatch.setattr(sys, "argv", [script, "--model_map", f'{{"m": "http://127.0.0.1:{port}/v1"}}'])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 1
    assert f"error: cannot use the server at http://127.0.0.1:{port}/v1" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [script, "--model_map", "[1, 2]"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 2 and "exactly one model" in capsys.readouterr().err


def test_chinese_guide_has_the_same_commands():
    def code(doc: str) -> list[str]:
        with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
            return re.findall(r"```(?:python|bash)\n(.*?)```", f.read(), re.S)

    assert code("webui_zh.md") == code("webui.md")


# ---- Thinking models: the reasoning in a collapsible block -------------------------------------------------
def test_reasoning_block_streams_then_answer(thinking_ckpt):
    """A Thinking model's reply is two messages: the reasoning (Gradio's collapsible "metadata.title" block,
    pending while it grows, done once the answer starts) and the answer; the next turn sends only the answer."""
    import dataclasses
    import json

    from ernie45.generation import structured
    from ernie45.webui import REASONING_TITLE, LocalBackend, make_chat_fn, to_messages

    path, ids = thinking_ckpt[1], thinking_ckpt[2]
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    backend = LocalBackend(model, tok, "thinking")
    assert backend.thinking
    parts = ["想一想。\n", "</think>", "\n\n", "<response>", "\n春眠不觉晓\n", "</response>", "\n"]
    lark = "start: " + " ".join(f"<[{ids[p]}]>" if p in ids else json.dumps(p, ensure_ascii=False) for p in parts)
    grammar = structured.compile_grammar(tok, structured.lark_grammar(lark), backend.eos)
    inner = backend.engine.stream
    backend.engine.stream = lambda prompt, params: inner(prompt, dataclasses.replace(params, grammar=grammar))
    outs = list(make_chat_fn(backend)("写诗", [], "", 1.0, 1.0, 60))
    thought, answer = outs[-1]
    assert thought == {"role": "assistant", "content": "想一想。",
                       "metadata": {"title": REASONING_TITLE, "status": "done"}}
    assert answer == {"role": "assistant", "content": "春眠不觉晓"}
    growing = [o for o in outs if isinstance(o, list) and not o[1]["content"]]
    assert growing and all(o[0]["metadata"]["status"] == "pending" for o in growing)
    history = [{"role": "user", "content": "写诗"}, thought, answer]
    assert to_messages("再来", history) == [
        {"role": "user", "content": "写诗"},
        {"role": "assistant", "content": "春眠不觉晓"},
        {"role": "user", "content": "再来"},
    ]


# ---- login and public links ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--share"], "--share puts the chat on a public gradio.live link: give --auth"),
        (["--auth", "alice"], "must be USER:PASSWORD"),
        (["--auth", ":s3cret"], "must be USER:PASSWORD"),
        (["--auth", "alice:"], "must be USER:PASSWORD"),
        (["--auth", "alice:s3cret,"], "must be USER:PASSWORD"),
        (["--auth", " :s3cret", "--share"], "must be USER:PASSWORD"),
    ],
)
def test_share_needs_auth_and_auth_is_checked(argv, message, capsys):
    """Refused before the model loads, in one line that never repeats the password."""
    assert cli(["webui", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert "s3cret" not in err


def test_auth_from_the_environment(monkeypatch, capsys):
    from ernie45.webui import AUTH_ENV, parse_auth

    assert parse_auth("alice:pa:ss, bob:x") == [("alice", "pa:ss"), ("bob", "x")]
    monkeypatch.setenv(AUTH_ENV, "alice")
    assert cli(["webui"]) == 1
    assert f"${AUTH_ENV}" in capsys.readouterr().err
    # A login from the environment lets --share through: the next check to fail is the model path.
    monkeypatch.setenv(AUTH_ENV, "alice:s3cret")
    assert cli(["webui", "--share", "--model", "/nonexistent/model"]) == 1
    assert "model path not found" in capsys.readouterr().err


class Echo:
    """A back end that answers with the user's last message (no model needed)."""

    name, where, context, temperature, top_p = "echo", "here", None, 0.0, 1.0

    def stream(self, messages, *args):
        yield ("content", messages[-1]["content"])


def test_login_guards_the_app_and_uploads_are_capped():
    """With --auth, Gradio serves only its login page until /login succeeds: the config, the API and uploads
    answer 401; the right password gives a session cookie, the chat then works, and uploads over 1 MB get 413."""
    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    from ernie45.webui import build_demo, launch

    demo = build_demo(Echo())
    port = free_port()
    launch(demo, "127.0.0.1", port, auth=[("alice", "s3cret")], prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            page = http.get("/")
            assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
            assert http.get("/config").status_code == 401
            assert http.get("/gradio_api/info").status_code == 401
            assert http.post("/gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 401
            assert http.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
            assert http.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
            assert http.get("/config").status_code == 200
            assert http.post("/gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code == 200
            big = http.post("/gradio_api/upload", files={"files": ("a.bin", b"\0" * (2 << 20))})
            assert big.status_code == 413
        with pytest.raises(AuthenticationError):
            Client(url + "/", verbose=False)
        client = Client(url + "/", auth=("alice", "s3cret"), verbose=False)
        assert client.predict("你好", "", 0.0, 1.0, 8, api_name="/chat") == "你好"
    finally:
        demo.close()
