"""`ernie45 generate`, `ernie45 chat` and `ernie45 info` on a tiny checkpoint: output equals the Python API,
stdin and pexpect sessions, bad input, and the commands of docs/generate.md."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.cli import main as cli
from ernie45.commands.chat import HELP, chat, fit_history
from ernie45.errors import ErnieError
from ernie45.generation import stream_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "床前明月光，"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread when the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("dense", seed=2)
    path = save_hf(hf, tmp_path_factory.mktemp("cli") / "tiny", tokenizer_dir)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    return path, model, tok


def _expected(model, tok, prompt_ids, **kw):
    """(text, token ids) of the Python API for the same request."""
    chunks = list(stream_generate(model, tok, prompt_ids, **kw))
    return "".join(c.text for c in chunks), [c.token for c in chunks]


def _run(argv, capsys, stdin=""):
    if argv[0] in ("generate", "chat") and "--dtype" not in argv:
        argv = [*argv, "--dtype", "float32"]  # "auto" may pick bf16 on this CPU; the API reference is fp32
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        rc = cli(argv)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_the_api_text(ckpt, capsys):
    path, model, tok = ckpt
    rc, out, err = _run(
        [
            "generate",
            "--model",
            path,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
        ],
        capsys,
    )
    ids = tok.encode(PROMPT)
    greedy = model.generate([ids], do_sample=False, max_new_tokens=12, eos_token_id=[])[0, len(ids) :]
    assert rc == 0 and err == ""
    assert out == tok.decode(greedy, skip_special_tokens=True) + "\n"


def test_generate_json_sampling_is_seeded(ckpt, capsys):
    path, model, tok = ckpt
    argv = [
        "generate",
        "--model",
        path,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "10",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "40",
        "--seed",
        "3",
        "--json",
        "--verbose",
    ]
    rc, out, err = _run(argv, capsys)
    got = json.loads(out)
    text, ids = _expected(
        model,
        tok,
        tok.encode(PROMPT),
        do_sample=True,
        temperature=0.9,
        top_p=0.95,
        top_k=40,
        seed=3,
        max_new_tokens=10,
    )
    assert rc == 0 and got == {
        "text": text,
        "token_ids": ids,
        "prompt_token_ids": tok.encode(PROMPT),
        "finish_reason": "length" if len(ids) == 10 else "stop",
    }
    assert re.search(r"generated: \d+ tokens, [\d.]+ tokens/s", err)
    assert json.loads(_run(argv, capsys)[1]) == got


def test_generate_stop_string_and_beams(ckpt, capsys):
    path, model, tok = ckpt
    ids = tok.encode(PROMPT)
    full, _ = _expected(model, tok, ids, do_sample=False, max_new_tokens=16, eos_token_id=[])
    stop = next(full[i : i + 1] for i in range(4, len(full)) if full[i] != "\ufffd")
    rc, out, _ = _run(
        [
            "generate",
            "--model",
            path,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--stop",
            stop,
            "--json",
        ],
        capsys,
    )
    got = json.loads(out)
    assert rc == 0 and got["text"] == full[: full.index(stop)] and got["finish_reason"] == "stop"

    rc, out, _ = _run(
        [
            "generate",
            "--model",
            path,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
            "--num-beams",
            "3",
            "--json",
        ],
        capsys,
    )
    beam = model.generate([ids], num_beams=3, max_new_tokens=8)[0, len(ids) :].tolist()
    got = json.loads(out)
    assert rc == 0 and got["token_ids"] == beam[: len(got["token_ids"])]
    assert got["text"] == tok.decode(got["token_ids"], skip_special_tokens=True)


def test_generate_reads_stdin_in_a_real_process(ckpt):
    path, model, tok = ckpt
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ernie45",
            "generate",
            "--model",
            path,
            "--max-new-tokens",
            "6",
            "--json",
            "--dtype",
            "float32",
        ],
        input=PROMPT + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    text, ids = _expected(model, tok, tok.encode(PROMPT), max_new_tokens=6)
    assert json.loads(r.stdout)["token_ids"] == ids and json.loads(r.stdout)["text"] == text


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "床前明月光 " * 200], "context window"),
        (["--prompt", "hi", "--top-p", "0"], "top_p must be in"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in"),
        (["--prompt", "hi", "--temperature", "-0.5"], "temperature must be >= 0"),
        (["--prompt", "hi", "--num-beams", "0"], "num_beams must be"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be"),
    ],
)
def test_generate_bad_input(ckpt, capsys, args, msg):
    rc, out, err = _run(["generate", "--model", ckpt[0], *args], capsys)
    assert rc == 1 and out == "" and err.startswith("error: ") and msg in err and "Traceback" not in err


def test_bad_model_path_and_unknown_flag(tmp_path, capsys):
    rc, _, err = _run(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert rc == 1 and "model path not found" in err
    for command in ("generate", "chat"):
        with pytest.raises(SystemExit) as e:
            cli([command, "--no-such-flag"])
        assert e.value.code == 2


def test_chat_piped_stdin_keeps_history_and_clears(ckpt):
    path, model, tok = ckpt
    stops = list(dict.fromkeys(model.generation_config.eos_token_ids + tok.stop_token_ids))

    def reply(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return _expected(model, tok, ids, max_new_tokens=8, eos_token_id=stops)[0]

    system = {"role": "system", "content": "你是助手。"}
    r1 = reply([system, {"role": "user", "content": "你好"}])
    r2 = reply(
        [
            system,
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": "Hello"},
        ]
    )
    out = io.StringIO()
    rc = chat(
        model,
        tok,
        system="你是助手。",
        stdin=io.StringIO("你好\nHello\n\n/clear\n你好\n/exit\nignored\n"),
        out=out,
        err=io.StringIO(),
        max_new_tokens=8,
    )
    assert rc == 0 and out.getvalue() == f"{r1}\n{r2}\n(conversation cleared)\n{r1}\n"


def test_fit_history_drops_oldest_turns(ckpt):
    _, model, tok = ckpt
    msgs = [{"role": "system", "content": "S"}]
    for i in range(6):
        msgs += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": "answer " * 5},
        ]
    msgs.append({"role": "user", "content": "last"})
    full = len(tok.apply_chat_template(msgs, tokenize=True))
    kept, ids = fit_history(tok, msgs, context=full + 10, max_new_tokens=40)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and len(kept) < len(msgs)
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1 :] and kept[1]["role"] == "user"
    assert ids == tok.apply_chat_template(kept, tokenize=True) and len(ids) + 40 <= full + 10
    with pytest.raises(ErnieError, match="too long"):
        fit_history(tok, [{"role": "user", "content": "x " * 400}], context=64, max_new_tokens=8)


def test_chat_interactive_with_pexpect(ckpt):
    """A real terminal session: spinner, banner, prompts, a streamed reply, /clear (same reply again), /exit."""
    pexpect = pytest.importorskip("pexpect")
    path, model, tok = ckpt
    stops = list(dict.fromkeys(model.generation_config.eos_token_ids + tok.stop_token_ids))
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True)
    r1 = _expected(model, tok, ids, max_new_tokens=6, eos_token_id=stops)[0]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ernie45", "chat", "--model", path, "--max-new-tokens", "6", "--dtype", "float32"],
        env=env,
        encoding="utf-8",
        timeout=300,
    )
    seen = []
    try:
        child.setecho(False)
        for send, until in [
            (None, ">>> "),
            ("你好", ">>> "),
            ("/clear", ">>> "),
            ("你好", ">>> "),
            ("/exit", pexpect.EOF),
        ]:
            if send is not None:
                child.sendline(send)
            if until is pexpect.EOF:
                child.expect(pexpect.EOF)
            else:
                child.expect_exact(until)
            seen.append(child.before.replace("\r\n", "\n"))
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "loading" in seen[0] and seen[0].rstrip().endswith(f"ernie45 chat: {HELP}")
    assert seen[1:] == [r1 + "\n", "(conversation cleared)\n", r1 + "\n", ""]


def test_info(ckpt, capsys, tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    path = ckpt[0]
    rc, out, _ = _run(["info", path, "--json"], capsys)
    info = json.loads(out)
    total = sum(t.numel() for t in load_file(os.path.join(path, "model.safetensors")).values())
    assert rc == 0 and info["parameters"] == total and info["dtypes"] == {"F32": total}
    assert (
        info["num_hidden_layers"] == 3
        and info["context_window"] == 256
        and "model.safetensors" in info["files"]
    )
    moe = save_hf(make_hf_model("moe"), tmp_path / "moe", tokenizer_dir)
    tensors = load_file(os.path.join(moe, "model.safetensors"))
    routed = sum(t.numel() for k, t in tensors.items() if ".mlp.experts." in k)
    total = sum(t.numel() for t in tensors.values())
    rc, out, _ = _run(["info", moe], capsys)
    assert rc == 0 and f"{total:,}" in out and f"{total - routed + routed * 2 // 6:,}" in out
    assert "moe_num_experts          6" in out


def _doc_commands(text):
    """(kind, body) for every ```bash command line and ```python block of a guide."""
    blocks = re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)
    for kind, body in blocks:
        if kind == "python":
            yield kind, body
        else:
            yield from ((kind, line) for line in body.splitlines() if line.strip())


@pytest.mark.parametrize("guide", ["generate.md", "generate_zh.md"])
def test_docs_commands_run(ckpt, capsys, guide):
    path = ckpt[0]
    with open(os.path.join(ROOT, "docs", guide), encoding="utf-8") as f:
        text = f.read().replace("ERNIE-4.5-0.3B-PT", path)
    ran = 0
    for kind, body in _doc_commands(text):
        if kind == "python":
            exec(compile(body, guide, "exec"), {})
            capsys.readouterr()
            ran += 1
            continue
        stdin = "你好\n"
        if "|" in body:
            left, body = body.split("|", 1)
            stdin = shlex.split(left)[1] + "\n"
        argv = shlex.split(body)
        env = {}
        while "=" in argv[0]:  # VAR=value prefixes
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        assert argv[0] == "ernie45"
        if argv[1] in ("generate", "chat") and "--max-new-tokens" not in argv:
            argv += ["--max-new-tokens", "16"]  # keep the test fast; the defaults are 128 / 512
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            rc, out, err = _run(argv[1:], capsys, stdin=stdin)
        assert rc == 0, (body, err)
        if argv[1] == "generate":
            _check_generated(argv[1:], out, capsys, stdin)
        assert out.strip(), body
        ran += 1
    assert ran >= 10


def _check_generated(argv, out, capsys, stdin):
    """What `generate` printed is the text it generated: the run's own --json, or the same run with --json added,
    reports that text, non-blank, from 1 to --max-new-tokens new tokens."""
    if "--json" in argv:
        result = json.loads(out)
    else:
        rc, printed, err = _run([*argv, "--json"], capsys, stdin=stdin)
        assert rc == 0, err
        result = json.loads(printed)
        assert out == result["text"] + "\n"
    limit = int(argv[argv.index("--max-new-tokens") + 1])
    assert result["text"].strip() and 1 <= len(result["token_ids"]) <= limit, (argv, result)
