"""Every path that generates text, at every precision Train.py accepts. A CPU with native bf16 (or
a GPU) picks bf16 by itself, so the bf16 and fp16 paths are paths users run: here autocast runs
them on any CPU, only slower. Each path keeps two or more rows in flight, where a KV cache of the
wrong dtype used to fail (a single row's slice write converts silently)."""
import glob
import json
import os
import re

import pytest
import torch

import export
import fine_tune
import Train
from lumina.checkpoint import load_checkpoint, load_for_chat
from lumina.device import autocast
from lumina.evaluate import end_of_turn_rate
from lumina.vocab import render_chat
from conftest import (CHATS, tiny_model, DEVICE, DTYPES, KEY, ROOT, SERVE_PACKAGES, need, Server, ask, endless_checkpoint,
                      run_script, write_jsonl)

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train.py with --dtype=auto on the test chats, long enough that its replies depend on the
    prompt: (its folder, its output). The stages below start from this model at each precision."""
    folder = tmp_path_factory.mktemp("trained")
    chats = write_jsonl(folder / "chats.jsonl", [{"messages": c} for c in CHATS * 30])
    out = run_script("Train.py", f"--data={chats}", f"--out_dir={folder}", "--max_iters=100", "--eval_interval=100",
                     "--probe_chars=0", "--dtype=auto", *TINY, cwd=folder)
    assert out.returncode == 0, out.stderr
    return folder, out.stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float32: every stage's own tests
def test_every_stage_generates_at_every_precision(trained, tmp_path, dtype, capsys):
    """Train.py and fine_tune.py run here, as main(command line), and export.py's int8 writer: a
    fresh interpreter for each cost more than their short runs. ChatAI.py (stdin) and serve.py (a
    port) run as processes."""
    base, chats, tuned = trained[0] / "Model.pth", trained[0] / "chats.jsonl", tmp_path / "FineTuned_Model.pth"
    # Train.py on chat data: probes at its evaluation, the end-of-turn rate of the saved model at the
    # end. A few steps: the stages after it start from the trained model.
    Train.main([f"--data={chats}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4", "--probe_chars=20",
                f"--dtype={dtype}", *TINY])
    out = capsys.readouterr().out
    assert "held-out replies" in out.splitlines()[-1] and "probe |" in out
    assert dtype_lines(out) == [f"dtype {dtype} (asked {dtype})"]
    assert load_checkpoint(str(tmp_path / "Model.pth"))["config"]["dtype"] == dtype
    # fine_tune.py: its "before" report samples the held-out prompts before the first step.
    fine_tune.main([f"--base_model={base}", f"--data={chats}", f"--output={tuned}", "--epochs=0", "--max_iters=4",
                    "--eval_interval=4", "--probe_chars=20", "--end_chars=200", f"--dtype={dtype}", f"--device={DEVICE}"])
    out = capsys.readouterr().out
    assert re.search(r"val bits/char [\d.]+ -> [\d.]+ \| ends its turn \d+% -> \d+% of \d+ held-out", out)
    # ChatAI: seeded replies repeat, beam search, and the int8 file.
    lines = ["seed 7", "hello there", "clear", "seed 7", "hello there", "beam 3", "hello there", "quit"]
    out = run_script("ChatAI.py", "FineTuned_Model.pth", f"--dtype={dtype}", "--max_new_chars=30",
                     input="\n".join(lines) + "\n", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if line.startswith("AI:")]
    assert len(replies) == 3 and replies[0] == replies[1] and len(replies[0]) > 5
    assert dtype_lines(out.stderr) == [f"dtype {dtype} (asked {dtype})"]
    export.export_int8(str(tuned), str(tmp_path / "FineTuned_Model.int8.pth"))  # what export.py --int8 runs
    out = run_script("ChatAI.py", "FineTuned_Model.int8.pth", f"--dtype={dtype}", "--max_new_chars=30", "--seed=3",
                     "--prompt", "hello there", cwd=tmp_path)
    assert out.returncode == 0 and len(out.stdout.strip()) > 0, out.stderr
    # serve.py: seeded, n=2 and beam search, in batched steps.
    need(*SERVE_PACKAGES)  # every stage but serve.py has passed
    import httpx
    server = Server(str(tuned), f"--api_key={KEY}", f"--dtype={dtype}", "--model_name=Model")
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


def test_auto_is_resolved_logged_once_and_stored(trained):
    folder, stdout = trained
    (line,) = dtype_lines(stdout)
    chosen = load_checkpoint(str(folder / "Model.pth"))["config"]["dtype"]
    assert chosen in ("float32", "bfloat16", "float16") and line.startswith(f"dtype {chosen} (asked auto: ")
    out = run_script("ChatAI.py", "Model.pth", "--prompt", "hi", "--max_new_chars=5", cwd=folder)
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


# --- the one precision policy: timed on this machine, cached per machine, model and torch ---
def fake_trial(times, calls):
    """A trial that takes no time: seconds per workload of each candidate, from `times`."""
    def trial(name):
        calls.append(name)
        return times[name]
    return trial


@pytest.fixture
def native_bf16(monkeypatch):
    from lumina import device
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)  # as on a CPU with AMX or AVX512-BF16
    return device


def test_the_trial_keeps_the_faster_and_caches_it(native_bf16):
    device, cpu, calls = native_bf16, torch.device("cpu"), []
    key = device.trial_key(cpu, {"hidden_size": 32}, "generate 1 row")
    trial = fake_trial({"float32": [2e-3], "bfloat16": [1e-3]}, calls)
    dtype, why = device.timed_dtype("auto", cpu, trial, key, "a character")
    assert dtype == torch.bfloat16 and calls == ["float32", "bfloat16"]
    assert why == "a character took 2 ms in float32, 1 ms in bfloat16"
    dtype, why = device.timed_dtype("auto", cpu, lambda name: pytest.fail("the cache answers"), key, "a character")
    assert dtype == torch.bfloat16 and why.endswith("1 ms in bfloat16 (cached)")
    assert device.timed_dtype("float16", cpu, pytest.fail, key, "a character") == (torch.float16, "")


def test_several_workloads_keep_the_choice_least_behind_the_best_at_any(native_bf16):
    device, cpu, calls = native_bf16, torch.device("cpu"), []
    key = device.trial_key(cpu, {"hidden_size": 32}, "generate 1 and 64 rows")
    # float32 is 2x behind at 64 rows; bfloat16 only 1.5x behind at 1 row.
    trial = fake_trial({"float32": [1e-3, 1e-4], "bfloat16": [1.5e-3, 5e-5]}, calls)
    dtype, why = device.timed_dtype("auto", cpu, trial, key, "a character at 1/64 rows")
    assert dtype == torch.bfloat16 and why == "a character at 1/64 rows took 1/0.1 ms in float32, 1.5/0.05 ms in bfloat16"


def test_a_changed_model_shape_or_torch_version_times_again(native_bf16, monkeypatch):
    device, cpu, calls = native_bf16, torch.device("cpu"), []
    trial = fake_trial({"float32": [1.0], "bfloat16": [2.0]}, calls)
    device.timed_dtype("auto", cpu, trial, device.trial_key(cpu, {"hidden_size": 32}, "train"), "a step")
    device.timed_dtype("auto", cpu, trial, device.trial_key(cpu, {"hidden_size": 64}, "train"), "a step")
    assert len(calls) == 4
    device.timed_dtype("auto", cpu, trial, device.trial_key(cpu, {"hidden_size": 64}, "train"), "a step")
    assert len(calls) == 4
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    device.timed_dtype("auto", cpu, trial, device.trial_key(cpu, {"hidden_size": 64}, "train"), "a step")
    assert len(calls) == 6


ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n"
ZEN4 = ZEN3.replace("model\t\t: 1", "model\t\t: 17").replace("fma", "fma avx512f avx512_bf16")


def test_two_cpus_of_one_name_are_two_machines_to_the_cache():
    """A VM's "AMD EPYC" was a Zen 3 (no bf16) in one session and a Zen 4 (avx512_bf16) in the
    next: a trial timed on one must not answer for the other."""
    from lumina.device import cpu_name
    zen3, zen4 = cpu_name(ZEN3 + "\n" + ZEN3.replace(": 0", ": 1")), cpu_name(ZEN4)
    assert zen3.startswith("AMD EPYC (family 25, model 1, flags ") and zen4.startswith("AMD EPYC (family 25, model 17, ")
    assert zen3 != zen4 != cpu_name(ZEN4.replace(" avx512_bf16", ""))  # flags alone tell them apart
    assert cpu_name("") is None and cpu_name("processor\t: 0\n") is None  # no processor named: the caller's fallback


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"key": "not a record"}', ""])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(native_bf16, content):
    device, cpu, calls = native_bf16, torch.device("cpu"), []
    key = device.trial_key(cpu, {"hidden_size": 32}, "train")
    path = device.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content.replace("key", key.replace('"', '\\"')))
    dtype, _ = device.timed_dtype("auto", cpu, fake_trial({"float32": [1.0], "bfloat16": [2.0]}, calls), key, "a step")
    assert dtype == torch.float32 and len(calls) == 2
    with open(path) as f:
        assert json.load(f)[key]["chosen"] == "float32"


def test_the_cache_lives_in_the_users_cache_folder(monkeypatch, tmp_path):
    from lumina import device
    monkeypatch.delenv("LUMINA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert device.cache_path() == os.path.join(str(tmp_path), "lumina", device.CACHE_FILE)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert device.cache_path() == os.path.join(os.path.expanduser("~"), ".cache", "lumina", device.CACHE_FILE)


@pytest.mark.parametrize("flags_bf16", [True, False])
def test_generation_precision_is_timed_on_the_model_itself(vocab, monkeypatch, flags_bf16):
    from lumina import device, engine
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: flags_bf16)
    net = tiny_model(vocab)
    dtype, why = engine.generation_dtype(net, "auto", (1, 4))
    if not flags_bf16:  # emulated bf16 is not worth a trial
        assert dtype == torch.float32 and "emulated" in why
        return
    assert re.fullmatch(r"a character \(rows 1/4\) took [\d.e+-]+/[\d.e+-]+ ms in float32, "
                        r"[\d.e+-]+/[\d.e+-]+ ms in bfloat16", why), why
    assert next(net.parameters()).dtype == torch.float32  # the trial casts a copy
    assert engine.generation_dtype(net, "auto", (1, 4)) == (dtype, why + " (cached)")
    assert engine.generation_dtype(net, "bfloat16", (1, 4)) == (torch.bfloat16, "")


def test_the_precisions_are_timed_taking_turns(vocab, monkeypatch):
    """A neighbour that takes the shared machine for a second slows both precisions, not the one
    timed at that moment: float32 and bfloat16 steps alternate, at each row count in turn."""
    from lumina import engine
    timed, best_step = [], engine.best_step
    monkeypatch.setattr(engine, "best_step", lambda eng, rows, steps=5: timed.append(
        (len(rows), str(next(eng.model.parameters()).dtype))) or best_step(eng, rows, steps))
    times = engine.precision_times(tiny_model(vocab), (1, 4))
    assert timed == [(1, "torch.float32"), (1, "torch.bfloat16")] * engine.TRIAL_TURNS + \
        [(4, "torch.float32"), (4, "torch.bfloat16")] * engine.TRIAL_TURNS
    assert set(times) == {"float32", "bfloat16"} and all(len(t) == 2 and min(t) > 0 for t in times.values())
