"""`torchrun ... ernie45 serve --tp 2`: rank 0 serves HTTP and replays every model call on rank 1.

Answers (greedy chat and a batch of completions with prompt logprobs and a row move) must equal the
single-process server's, for a dense model and a MoE model under expert parallelism; Ctrl-C / SIGTERM drains
and stops both ranks; a killed rank makes the server answer 503 and exit non-zero instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.generation import generate
from ernie45.serve.engine import EngineArgs
from ernie45.serve.server import ModelSource, ServerConfig, create_app

uvicorn = pytest.importorskip("uvicorn")

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "serve.md")
DOC_ZH = DOC.replace("serve.md", "serve_zh.md")
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
SLOTS, CONTEXT = 4, 256
# Unequal lengths: a right-padded prefill and a masked decode.
PROMPTS = ["床前明月光", "The quick brown fox jumps", "知识"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("serve_tp")
    return {
        kind: save_hf(make_hf_model(kind, bias_scale=0.3), d / kind, tokenizer_dir)
        for kind in ("dense", "moe")
    }


def wait_until(check, timeout: float, what: str):
    """Poll `check()` until truthy (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health(base: str) -> int:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code
    except httpx.TransportError:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def tp_commands(path: str = DOC) -> list[list[str]]:
    """The `torchrun ... serve` commands of the guide's "Tensor parallel" section (its one ```shell block)."""
    with open(path, encoding="utf-8") as f:
        (block,) = re.findall(r"```shell\n(.*?)```", f.read(), re.S)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("torchrun ")]


def doc_command(kind: str) -> list[str]:
    """The guide's dense command, or for MoE the one with --ep."""
    return next(c for c in tp_commands() if ("--ep" in c) == (kind == "moe"))


class TorchrunServer:
    """The docs' `torchrun ... serve --tp 2` command on a tiny checkpoint, output in a log file.

    `torchrun_args` go to torchrun itself; the server gets small test limits (fp32 on CPU, 4 slots)."""

    def __init__(self, kind: str, ckpt: str, log_path, torchrun_args: tuple[str, ...] = (),
                 server_args: tuple[str, ...] = ()):
        port = free_port()
        self.base, self.log_path = f"http://127.0.0.1:{port}", log_path
        cmd = doc_command(kind)
        cmd[cmd.index("--model") + 1], cmd[cmd.index("--port") + 1] = ckpt, str(port)
        m = cmd.index("-m")
        cmd = [TORCHRUN, *cmd[1:m], *torchrun_args, *cmd[m:]]
        cmd += [
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--max-num-seqs",
            str(SLOTS),
            "--max-model-len",
            str(CONTEXT),
            *server_args,
        ]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        try:
            wait_until(lambda: self.proc.poll() is not None or health(self.base) == 200, 240, "/health")
            assert self.proc.poll() is None, self.log()
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rank_pids(self) -> dict[int, int]:
        """The worker processes (children of torchrun) by their RANK environment variable."""
        pids = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
                    pids[int(env[b"RANK"])] = int(pid)
        return pids

    def kill(self) -> None:
        """SIGKILL torchrun and its ranks (which run in sessions of their own, so torchrun's death leaves them)."""
        if self.proc.poll() is None:
            for pid in self.rank_pids().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(30)


def single_process_app(model, tok, name: str, on_fatal=None):
    """The app `ernie45 serve` runs without --tp."""
    config = ServerConfig(name, None, EngineArgs(max_num_seqs=SLOTS, max_model_len=CONTEXT))
    return create_app(ModelSource(model=model, tokenizer=tok), config, on_fatal)


@contextlib.contextmanager
def serving(app):
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: health(base) == 200, 60, "/health")
        yield base
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def answers(base: str, name: str, stop_token: int | None) -> dict:
    """A greedy chat (with logprobs) and one completions request for three prompts with echo + logprobs
    (prompt logits on every rank); `stop_token` ends the first prompt early, so its row is refilled by a move."""
    c = client(base)
    chat = c.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "你好，请介绍一下你自己。"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    extra = {
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stop_token_ids": [stop_token] if stop_token else [],
    }
    comp = c.completions.create(
        model=name, prompt=PROMPTS, max_tokens=10, temperature=0, echo=True, logprobs=1, extra_body=extra
    )
    return {
        "chat": (
            chat.choices[0].message.content,
            chat.choices[0].finish_reason,
            chat.usage.completion_tokens,
            [
                (t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
                for t in chat.choices[0].logprobs.content
            ],
        ),
        "completions": [
            (ch.text, ch.finish_reason, ch.logprobs.tokens, ch.logprobs.token_logprobs)
            for ch in sorted(comp.choices, key=lambda ch: ch.index)
        ],
    }


def assert_same(a, b, path="answer"):
    """Equal structure and strings; logprobs equal within 1e-4 (the split model's logits differ by ~1e-6)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= 1e-4, (path, a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, (path, a, b)


def first_prompt_stop_token(model, tok) -> int:
    """A token the first prompt generates at its 4th step or later (and not before): it stops there."""
    ids = tok.encode(PROMPTS[0])
    out = generate(model, [ids], max_new_tokens=10, do_sample=False, eos_token_id=[])
    new = out[0, len(ids) :].tolist()
    return next(t for j, t in enumerate(new) if j >= 3 and t not in new[:j])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_tp_server_answers_like_single_process(ckpts, tmp_path, kind):
    """The docs' commands: `--tp 2` for the dense model, `--tp 2 --ep 2` for the MoE model."""
    ckpt, name = ckpts[kind], kind
    model, tok = ernie45.load(ckpt, dtype="float32", device="cpu")
    stop = first_prompt_stop_token(model, tok)
    with serving(single_process_app(model, tok, name)) as base:
        want = answers(base, name, stop)
    assert want["completions"][0][1] == "stop" and want["completions"][1][1] == "length"  # a row was moved
    assert len(want["chat"][3]) == 12

    server = TorchrunServer(kind, ckpt, tmp_path / "tp.log")
    try:
        assert_same(answers(server.base, name, stop), want)
        assert_same(answers(server.base, name, stop), want)  # the mirrored caches stayed consistent
        # a temperature of 1e-45 (once NaN in the shared step, which stopped a --tp server) is greedy here
        tiny = client(server.base).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "你好"}], max_tokens=4, temperature=1e-45
        )
        assert tiny.choices[0].finish_reason in ("stop", "length")
        assert_same(answers(server.base, name, stop), want)
        # Ctrl-C: SIGINT reaches torchrun (the ranks run in sessions of their own), which sends SIGTERM to the
        # ranks; rank 0 drains and releases rank 1, which ignores the signal and waits for that.
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(90)
    finally:
        server.kill()
    log = server.log()
    assert "rank 1: stopped" in log and "Finished server process" in log, log[-3000:]
    assert "error:" not in log, log[-3000:]


@pytest.mark.slow
def test_tp_server_speculates_with_the_mtp_layer_like_one_process(tmp_path):
    """`serve --tp 2 --ep 2 --speculative mtp` on the bundled ernie-tiny-moe (its trained MTP head): rank 0's drafter
    sends each MTP-layer call to every rank (each holds the layer whole and its own copy of the sequence's MTP
    cache), and the greedy answers are the single-process server's without speculation, with drafts accepted;
    finished sequences free every rank's cache, and the next requests draft again."""
    import re

    from ernie45.models import bundled_path

    ckpt, name = bundled_path("ernie-tiny-moe"), "ernie-tiny-moe"
    model, tok = ernie45.load(ckpt, dtype="float32", device="cpu")
    prompts = ["海上生明月，", "白日依山尽，", "秋风吹渭水，"]

    def texts(base: str) -> list[str]:  # one request at a time: the engine speculates while one sequence decodes
        c = client(base)
        return [c.completions.create(model=name, prompt=p, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

    with serving(single_process_app(model, tok, name)) as base:
        want = texts(base)
    server = TorchrunServer("moe", ckpt, tmp_path / "tp.log",
                            server_args=("--speculative", "mtp", "--num-speculative-tokens", "2"))
    try:
        assert texts(server.base) == want
        assert texts(server.base) == want  # the mirrored MTP caches were freed and made again
        page = httpx.get(f"{server.base}/metrics").text

        def count(metric: str) -> float:
            return float(re.search(rf"^{metric} (\S+)$", page, re.M).group(1))

        assert count("ernie45_spec_decode_num_drafts_total") > 0
        assert count("ernie45_spec_decode_num_accepted_tokens_total") > 0
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(90)
    finally:
        server.kill()
    log = server.log()
    assert "rank 1: stopped" in log and "error:" not in log, log[-3000:]


@pytest.mark.slow
def test_dead_rank_answers_503_and_exits_nonzero(ckpts, tmp_path):
    """Rank 1 is killed mid-request. torchrun's own monitor is slowed down, so rank 0 must notice by itself:
    the running request ends with a `rank_failed` error and rank 0 exits (status 1) within seconds."""
    server = TorchrunServer("dense", ckpts["dense"], tmp_path / "tp.log", ("--monitor-interval", "60"))
    try:
        ranks = server.rank_pids()
        assert sorted(ranks) == [0, 1]
        body = {
            "model": "dense",
            "prompt": "hi",
            "max_tokens": CONTEXT - 8,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            os.kill(ranks[1], signal.SIGKILL)
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]" and '"code": "rank_failed"' in events[-2], events[-3:]

        def rank0_exited() -> bool:
            try:
                with open(f"/proc/{ranks[0]}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped by torchrun
            except FileNotFoundError:
                return True

        wait_until(rank0_exited, 60, "rank 0 to exit")
    finally:
        server.kill()
    log = server.log()
    assert "error: a tensor-parallel rank failed" in log, log[-3000:]


def test_failed_tensor_parallel_step_answers_503_and_stops(ckpts):
    """Under tensor parallelism a failed step is fatal (the ranks may disagree from then on): the request gets
    503 `rank_failed`, /health turns 503, new requests are refused and the server's owner is told to exit.
    The other ranks are stood in for here; the real lost rank is in the test above."""
    model, tok = ernie45.load(ckpts["dense"], dtype="float32", device="cpu")
    fatal: list[BaseException] = []
    app = single_process_app(model, tok, "dense", fatal.append)
    with serving(app) as base:
        runner = app.state.server.engine.runner
        runner._send = lambda *op: None  # followers that accept every op
        runner.distributed = True

        def lost_rank(*args):
            raise RuntimeError("Connection closed by peer")

        runner.decode = lost_rank
        c = client(base)
        for _ in range(2):  # the running request, then a new one
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model="dense", prompt="hi", max_tokens=4)
            assert e.value.status_code == 503 and e.value.code == "rank_failed"
        assert health(base) == 503
    assert [str(e) for e in fatal] == ["Connection closed by peer"]


def test_cli_rejects_impossible_tp(ckpts, monkeypatch):
    """Clear one-line errors before any process group or model load."""
    from ernie45.errors import ErnieError
    from ernie45.serve.server import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    base = ["--model", ckpts["dense"], "--device", "cpu"]
    with pytest.raises(ErnieError, match="not divisible by --tp 3"):
        main([*base, "--tp", "3"])
    with pytest.raises(ErnieError, match="cannot be combined with --quantize"):
        main([*base, "--tp", "2", "--quantize", "wint8"])
    with pytest.raises(ErnieError, match="launch with `torchrun"):
        main([*base, "--tp", "2"])


def test_chinese_guide_has_the_same_tp_commands():
    assert len(tp_commands()) == 2 and tp_commands(DOC_ZH) == tp_commands()
