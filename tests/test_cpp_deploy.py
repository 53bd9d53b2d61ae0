"""C++ deployment: `ernie45 export --format aoti` and the libtorch demo in deploy/cpp.

The exported step function is checked against the eager model (fast tests); the slow tests run the commands
of docs/cpp.md (export, then build and run the C++ demo) once per session and compare the C++ program's
token ids with ernie45's own decoding: greedy, chat template and seeded top-p sampling.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.cli import main as cli_main
from ernie45.errors import ErnieError
from ernie45.export.aoti import (
    MANIFEST_FILE,
    PACKAGE_FILE,
    StepModule,
    build_manifest,
    chat_pieces,
    export_aoti,
    export_program,
    package_metadata,
)
from ernie45.generation import generate, resolve_config
from ernie45.models import bundled_path
from ernie45.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cpp.md"
PROMPT = "床前明月光，疑是地上霜。"


def step_greedy(step: StepModule, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding through `StepModule` the way the C++ demo drives it: prefill, then one token a step."""
    k, v = step.empty_cache()
    ids, pos, out = torch.tensor([prompt]), 0, []
    with torch.no_grad():
        for _ in range(n):
            logits, new_k, new_v = step(ids, k, v, torch.tensor([pos]))
            S = ids.shape[1]
            k[:, :, :, pos : pos + S] = new_k
            v[:, :, :, pos : pos + S] = new_v
            pos += S
            out.append(int(logits.argmax(-1)))
            ids = torch.tensor([[out[-1]]])
    return out


# ---- the exported step function, eagerly ------------------------------------------------------------------
@pytest.mark.parametrize("kind,dtype", [("dense", "float32"), ("moe", "float32"), ("dense", "bfloat16")])
def test_step_module_decodes_like_generate(tmp_path, tokenizer_dir, kind, dtype):
    path = save_hf(make_hf_model(kind, bias_scale=0.3), tmp_path / kind, tokenizer_dir)
    model, tok = ernie45.load(path, dtype=dtype, device="cpu")
    prompt = tok.encode(PROMPT)
    step = StepModule(model, 40).eval()
    expected = generate(model, [prompt], max_new_tokens=16, eos_token_id=[])[0, len(prompt) :].tolist()
    assert step_greedy(step, prompt, 16) == expected
    k, v = step.empty_cache()
    with torch.no_grad():
        logits, new_k, _ = step(torch.tensor([prompt]), k, v, torch.tensor([0]))
        ref = model(torch.tensor([prompt])).logits[:, -1].float()
    assert logits.dtype == torch.float32 and new_k.dtype == model.dtype
    assert new_k.shape == (model.config.num_hidden_layers, 1, 2, len(prompt), model.config.head_dim)
    torch.testing.assert_close(logits, ref, atol=1e-5 if dtype == "float32" else 0.05, rtol=1e-4)


def test_chat_pieces_rebuild_the_template(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    p = chat_pieces(tok)
    assert p["user_prefix"] == "<|begin_of_sentence|>User: " and p["user_suffix"] == "\nAssistant: "
    for msgs in (
        [{"role": "user", "content": "你好 there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nagain"}],
    ):
        user = msgs[-1]["content"]
        rebuilt = (
            (
                p["system_prefix"] + msgs[0]["content"] + p["system_between"]
                if len(msgs) == 2
                else p["user_prefix"]
            )
            + user
            + p["user_suffix"]
        )
        assert rebuilt == tok.apply_chat_template(msgs)


def test_chat_pieces_refuse_a_template_that_transforms_the_message(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ErnieError, match="C\\+\\+ runtime cannot apply it"):
        chat_pieces(tok)


def test_manifest_and_package_metadata(hf_dense):
    _, path = hf_dense
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    m = build_manifest(model, tok, 64, "float32")
    assert (m["eos_token_ids"], m["stop_token_ids"]) == ([2], [2, 4])
    assert m["special_token_ids"] == sorted(tok.special_ids)
    assert m["inputs"][1]["shape"] == [3, 1, 2, 64, 24]
    assert m["generation"] == {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    meta = package_metadata(m)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ernie45.stop_token_ids"] == "2 4"
    assert meta["ernie45.generation.do_sample"] == "false"
    assert meta["ernie45.chat.user_suffix"] == "\nAssistant: "
    lines = dict(line.split("\t")[::-1] for line in meta["ernie45.added_tokens"].split("\n"))
    assert {k: int(v) for k, v in lines.items()} == tok.added_tokens


def test_export_rejects_bad_input(tmp_path, hf_dense, capsys):
    _, path = hf_dense
    assert cli_main(["export", "--format", "aoti", str(tmp_path / "nope"), str(tmp_path / "o")]) == 1
    assert "model path not found" in capsys.readouterr().err
    for n in ("1", "257"):
        assert cli_main(["export", path, str(tmp_path / "o"), "--max-seq-len", n]) == 1
        assert "--max-seq-len must be in [2, 256]" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ErnieError, match="not empty"):
        export_aoti(path, tmp_path / "full")
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "--format", "onnx", path, str(tmp_path / "o")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists() and (tmp_path / "full" / "x").read_text() == "keep"


# ---- the C++ demo (slow: one AOTInductor compile and one C++ build per session) -------------------------
def _cpp_toolchain_missing() -> str | None:
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(
        ["g++", "-E", "-x", "c++", "-"],
        input="#include <sentencepiece_processor.h>\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return "libsentencepiece-dev is not installed"
    return None


def _doc_commands() -> list[str]:
    """The export and build/run commands of the guide's ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("ernie45 export ", "deploy/cpp/build.sh "))]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tokenizer_dir):
    """Run docs/cpp.md's commands on the bundled model (or a tiny random one): (model_dir, export_dir, binary)."""
    missing = _cpp_toolchain_missing()
    if missing:
        pytest.skip(f"C++ demo not built: {missing}")
    tmp = tmp_path_factory.mktemp("cpp")
    bundled = bundled_path()
    model_dir = (
        bundled
        if os.path.isfile(os.path.join(bundled, "config.json"))
        else save_hf(make_hf_model("dense"), tmp / "model", tokenizer_dir)
    )
    export_dir, build_dir = tmp / "ernie-tiny-aoti", tmp / "build"
    env = {**os.environ, "PYTHON": sys.executable, "BUILD_DIR": str(build_dir)}
    commands = _doc_commands()
    assert [c.split()[0] for c in commands] == ["ernie45", "deploy/cpp/build.sh"]
    for line in commands:
        argv = [
            str(export_dir) if a == "ernie-tiny-aoti" else model_dir if a == "ernie-tiny" else a
            for a in shlex.split(line)
        ]
        if argv[0] == "ernie45":
            assert cli_main(argv[1:] + ["--quiet"]) == 0
        else:
            run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert run.returncode == 0, run.stderr[-3000:]
            assert re.search(r"generated: \d+ tokens, [\d.]+ tokens/s", run.stderr)
    return model_dir, export_dir, build_dir / "infer_demo"


def run_demo(binary: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], input=stdin, capture_output=True, text=True, timeout=300)


def demo_ids(run: subprocess.CompletedProcess) -> list[int]:
    assert run.returncode == 0, run.stderr
    line = next(x for x in run.stderr.splitlines() if x.startswith("token ids:"))
    return [int(t) for t in line.split(":")[1].split()]


@pytest.mark.slow
def test_export_writes_the_package_and_its_manifest(deployed):
    model_dir, export_dir, _ = deployed
    names = sorted(os.listdir(export_dir))
    assert {
        PACKAGE_FILE,
        MANIFEST_FILE,
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    } <= set(names)
    assert not any(n.startswith(".") for n in os.listdir(export_dir.parent))
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    assert manifest == build_manifest(model, tok, manifest["max_seq_len"], "float32")


@pytest.mark.slow
def test_package_runs_from_python_like_the_eager_step(deployed):
    model_dir, export_dir, _ = deployed
    compiled = torch._inductor.aoti_load_package(str(export_dir / PACKAGE_FILE))
    assert compiled.get_metadata()["ernie45.max_seq_len"] == "256"
    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    step = StepModule(model, 256).eval()
    k, v = step.empty_cache()
    with torch.no_grad():
        for ids, pos in ((tok.encode(PROMPT), 0), ([7], 9), ([8], 10)):
            args = (torch.tensor([ids]), k, v, torch.tensor([pos]))
            for got, want in zip(compiled(*args), step(*args), strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_cpp_greedy_matches_ernie45_generate(deployed, capsys):
    model_dir, export_dir, binary = deployed
    capsys.readouterr()
    assert (
        cli_main(
            [
                "generate",
                "--model",
                model_dir,
                "--dtype",
                "float32",
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "24",
                "--temperature",
                "0",
                "--json",
            ]
        )
        == 0
    )
    expected = json.loads(capsys.readouterr().out)
    run = run_demo(
        binary,
        str(export_dir),
        "--raw",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
        "--print-ids",
    )
    assert demo_ids(run) == expected["token_ids"]
    assert run.stdout == expected["text"] + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("system", [None, "你是一个助手。"])
def test_cpp_chat_template_matches_python(deployed, system):
    model_dir, export_dir, binary = deployed
    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "你好"}
    ]
    prompt = tok.apply_chat_template(messages, tokenize=True)
    stop = list(
        dict.fromkeys(resolve_config(model).eos_token_ids + tok.stop_token_ids)
    )  # what `ernie45 chat` uses
    # greedy explicitly: the bundled model's generation_config.json samples by default
    seq = generate(model, [prompt], max_new_tokens=30, eos_token_id=stop, do_sample=False, repetition_penalty=1.0)[
        0, len(prompt) :
    ].tolist()
    expected = seq[: next((i + 1 for i, t in enumerate(seq) if t in stop), len(seq))]
    args = ["--system", system] if system else []
    run = run_demo(
        binary, str(export_dir), "--prompt", "你好", "--max-new-tokens", "30", "--print-ids", "--temperature", "0", *args
    )
    assert demo_ids(run) == expected


@pytest.mark.slow
def test_cpp_top_p_sampling_draws_what_python_draws(deployed):
    model_dir, export_dir, binary = deployed
    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    ask = "写一首题为《静夜思》的诗"
    prompt = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=True)
    eos = list(dict.fromkeys(resolve_config(model).eos_token_ids + tok.stop_token_ids))

    def python_ids(seed: int) -> list[int]:
        seq = generate(
            model,
            [prompt],
            max_new_tokens=24,
            do_sample=True,
            temperature=0.8,
            top_p=0.9,
            top_k=0,  # the C++ demo samples with temperature + top-p only (no top-k / repetition penalty)
            repetition_penalty=1.0,
            seed=seed,
            eos_token_id=eos,
        )[0, len(prompt) :].tolist()
        return seq[: next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))]

    def demo(seed: int) -> list[int]:
        args = ["--prompt", ask, "--max-new-tokens", "24", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "0"]
        return demo_ids(run_demo(binary, str(export_dir), *args, "--seed", str(seed), "--print-ids"))

    assert demo(3) == python_ids(3)
    assert demo(4) == python_ids(4)
    assert demo(3) != demo(4)


@pytest.mark.slow
def test_cpp_errors_are_one_clear_line(deployed, tmp_path):
    _, export_dir, binary = deployed
    no_package = tmp_path / "no_package"
    shutil.copytree(export_dir, no_package)
    (no_package / PACKAGE_FILE).unlink()
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(export_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    cases = [
        (
            (str(no_package), "--prompt", "hi"),
            None,
            f"error: package file not found: {no_package / PACKAGE_FILE}",
        ),
        (
            (str(no_tokenizer), "--prompt", "hi"),
            None,
            f"error: tokenizer not found: {no_tokenizer}/tokenizer.model",
        ),
        ((str(export_dir), "--prompt", ""), None, "error: the prompt is empty"),
        ((str(export_dir),), "\n", "error: the prompt is empty"),
        ((str(export_dir), "--prompt", "hi", "--top-p", "1.5"), None, "error: --top-p must be in (0, 1]"),
        ((str(tmp_path / "missing"), "--prompt", "hi"), None, "error: export directory not found"),
    ]
    for args, stdin, message in cases:
        run = run_demo(binary, *args, stdin=stdin)
        assert run.returncode == 1, (args, run.stderr)
        assert run.stdout == "" and run.stderr.count("\n") == 1 and run.stderr.startswith(message), run.stderr


@pytest.mark.slow
def test_moe_step_exports_with_a_dynamic_length(tmp_path, tokenizer_dir):
    path = save_hf(make_hf_model("moe", bias_scale=0.3), tmp_path / "moe", tokenizer_dir)
    model, _ = ernie45.load(path, dtype="float32", device="cpu")
    step = StepModule(model, 16).eval()
    exported = export_program(step).module()
    k, v = step.empty_cache()
    with torch.no_grad():
        for ids, pos in (([5, 6, 7], 0), ([9], 3), (list(range(20, 32)), 4)):
            args = (torch.tensor([ids]), k, v, torch.tensor([pos]))
            for got, want in zip(exported(*args), step(*args), strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
