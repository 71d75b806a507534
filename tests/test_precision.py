"""Every path that generates text, at every precision Train.py accepts. A CPU with native bf16 (or
a GPU) picks bf16 by itself, so the bf16 and fp16 paths are paths users run: here autocast runs
them on any CPU, only slower. Each path keeps two or more rows in flight, where a KV cache of the
wrong dtype used to fail (a single row's slice write converts silently)."""
import glob
import os
import re

import pytest
import torch

from lumina.checkpoint import load_checkpoint, load_for_chat
from lumina.device import autocast
from lumina.evaluate import end_of_turn_rate
from lumina.vocab import render_chat
from conftest import (CHATS, DEVICE, DTYPES, KEY, ROOT, SERVE_PACKAGES, need, Server, ask, endless_checkpoint, run_script,
                      write_jsonl)

TINY = ["--seq_length=32", "--hidden_size=32", "--num_layers=2", "--nhead=2", "--batch_size=8", "--max_minutes=0",
        "--end_chars=200", f"--device={DEVICE}"]


def dtype_lines(output):
    """The lines where a stage says which precision it runs in: there must be exactly one."""
    return [line for line in output.splitlines() if line.startswith("dtype ")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_end_of_turn_rate_steps_many_rows_at_every_precision(tmp_path, dtype):
    net, vocab, _ = load_for_chat(endless_checkpoint(tmp_path / "Model.pth"), DEVICE)
    prompts = [render_chat([{"role": "user", "content": text}], vocab, True)[0] for text in ("hi", "hello there", "what")]
    with autocast(torch.device(DEVICE), getattr(torch, dtype)):
        assert end_of_turn_rate(net, prompts, max_chars=100) == 0.0  # 100 batched steps of 3 rows: none ends


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float32: every stage's own tests
def test_every_stage_generates_at_every_precision(tmp_path, dtype):
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * 30])
    # Train.py on chat data: probes at each evaluation, the end-of-turn rate of the saved model at the end.
    out = run_script("Train.py", f"--data={chats}", f"--out_dir={tmp_path}", "--max_iters=100", "--eval_interval=50",
                     "--probe_chars=20", f"--dtype={dtype}", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "held-out replies" in out.stdout.splitlines()[-1] and "probe |" in out.stdout
    assert dtype_lines(out.stdout) == [f"dtype {dtype} (asked {dtype})"]
    assert load_checkpoint(str(tmp_path / "Model.pth"))["config"]["dtype"] == dtype
    # fine_tune.py: its "before" report samples the held-out prompts before the first step.
    out = run_script("fine_tune.py", f"--data={chats}", "--epochs=0", "--max_iters=20", "--probe_chars=20",
                     "--end_chars=200", f"--dtype={dtype}", f"--device={DEVICE}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"val bits/char [\d.]+ -> [\d.]+ \| ends its turn \d+% -> \d+% of \d+ held-out", out.stdout)
    # ChatAI: seeded replies repeat, beam search, and the int8 file.
    lines = ["seed 7", "hello there", "clear", "seed 7", "hello there", "beam 3", "hello there", "quit"]
    out = run_script("ChatAI.py", "FineTuned_Model.pth", f"--dtype={dtype}", "--max_new_chars=30",
                     input="\n".join(lines) + "\n", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if line.startswith("AI:")]
    assert len(replies) == 3 and replies[0] == replies[1] and len(replies[0]) > 5
    assert dtype_lines(out.stderr) == [f"dtype {dtype} (asked {dtype})"]
    assert run_script("export.py", "FineTuned_Model.pth", "--int8", cwd=tmp_path).returncode == 0
    out = run_script("ChatAI.py", "FineTuned_Model.int8.pth", f"--dtype={dtype}", "--max_new_chars=30", "--seed=3",
                     "--prompt", "hello there", cwd=tmp_path)
    assert out.returncode == 0 and len(out.stdout.strip()) > 0, out.stderr
    # serve.py: seeded, n=2 and beam search, in batched steps.
    need(*SERVE_PACKAGES)  # every stage but serve.py has passed
    import httpx
    server = Server(str(tmp_path / "FineTuned_Model.pth"), f"--api_key={KEY}", f"--dtype={dtype}", "--model_name=Model")
    try:
        client = server.client()
        seeded = [[c.message.content for c in ask(client, "hello there", max_tokens=30, temperature=1.0, seed=5,
                                                  n=2).choices] for _ in range(2)]
        assert seeded[0] == seeded[1] and len(seeded[0]) == 2
        beams = ask(client, "hello there", max_tokens=30, n=2, extra_body={"num_beams": 3}).choices
        assert len(beams) == 2 and all(c.finish_reason in ("stop", "length") for c in beams)
        assert httpx.get(server.url + "/health").json()["dtype"] == dtype
    finally:
        code, stdout, stderr = server.stop()
    assert code == 0 and "Traceback" not in stderr, stderr
    assert dtype_lines(stdout) == [f"dtype {dtype} (asked {dtype})"]


def test_auto_is_resolved_logged_once_and_stored(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * 10])
    out = run_script("Train.py", f"--data={chats}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4",
                     "--probe_chars=0", "--dtype=auto", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (line,) = dtype_lines(out.stdout)
    chosen = load_checkpoint(str(tmp_path / "Model.pth"))["config"]["dtype"]
    assert chosen in ("float32", "bfloat16", "float16") and line.startswith(f"dtype {chosen} (asked auto: ")
    out = run_script("ChatAI.py", "Model.pth", "--prompt", "hi", "--max_new_chars=5", cwd=tmp_path)
    (line,) = dtype_lines(out.stderr)
    assert out.returncode == 0 and re.fullmatch(r"dtype (float32|bfloat16|float16) \(asked auto: .+\)", line)


def test_no_generator_is_made_outside_the_one_helper():
    """A torch.Generator on the wrong device is an error a CPU can never show (there everything is on
    one device), so nothing makes one except lumina.device.seeded_generator."""
    helper, this = os.path.join(ROOT, "lumina", "device.py"), os.path.abspath(__file__)
    made = {}
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            lines = [n for n, line in enumerate(f, 1) if "torch.Generator(" in line]
        if lines and os.path.abspath(path) != this:
            made[os.path.relpath(path, ROOT)] = lines
    assert list(made) == [os.path.relpath(helper, ROOT)] and len(made[os.path.relpath(helper, ROOT)]) == 1, made


def test_auto_generation_precision_follows_the_measured_rule(monkeypatch):
    from lumina import device
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)  # as on a CPU with AMX or AVX512-BF16
    assert device.generation_dtype("auto", cpu, 1)[0] == torch.float32  # one reply: float32 was faster
    assert device.generation_dtype("auto", cpu, device.BF16_MIN_ROWS)[0] == torch.bfloat16
    assert device.generation_dtype("float16", cpu, 1) == (torch.float16, "")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.generation_dtype("auto", cpu, 64)[0] == torch.float32
