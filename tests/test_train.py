"""Train.py: data formats, the loop, resume, Ctrl-C, OOM back-off, config errors, torchrun."""
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lumina import data
import Train
from lumina import training
from lumina.checkpoint import build_model, load_checkpoint
from lumina.corpus import load_data
from lumina.optim import Muon, lr_at, make_optimizer, orthogonalize
from lumina.plan import TrainConfig
from lumina.training import INTERRUPTED, Runtime, forward_backward, with_oom_backoff
from lumina.vocab import END, USER
from lumina.config import apply_overrides
from lumina.device import seeded_generator
from conftest import DEVICE, CHATS, ROOT, interrupt_after, refusal, run_script, tiny_model, write_jsonl

TINY_ARGS = ["--seq_length=16", "--hidden_size=32", "--num_layers=2", "--nhead=2", "--batch_size=8",
             "--max_minutes=0", "--probe_chars=10", f"--device={DEVICE}", "--dtype=float32", "--end_chars=200",
             "--weight_decay=0.1", "--ngram_buckets=0"]  # the tiny model the tests were built on (n-grams: test_model)


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS * 30])


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "train_metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --- a real run ----------------------------------------------------------------------------------
def test_a_tiny_run_lowers_the_loss_and_writes_a_loadable_model(tmp_path, chat_file):
    out = run_script("Train.py", f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=120",
                     "--eval_interval=40", "--log_interval=20", *TINY_ARGS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "step 020/120 | loss" in out.stdout and "bits/char" in out.stdout
    assert re.search(r"probe \| Hello! How are you today\? -> '.*' \| mean log-prob -[\d.]+/char", out.stdout)
    assert re.search(r"Model\.pth: ends its turn in \d+% of \d+ held-out replies", out.stdout)  # chat data: does it stop?
    curve = losses(tmp_path)
    assert curve[120] < curve[20] - 0.5
    ckpt = load_checkpoint(str(tmp_path / "Model.pth"))
    assert ckpt["stage"] == "train" and ckpt["config"]["max_iters"] == 120
    assert ckpt["metrics"]["val_bpc"] < 4.0
    net, vocab = build_model(ckpt)
    assert "?" in vocab.chars and net.config.hidden_size == 32
    try:
        import matplotlib  # noqa: F401  (optional: the plot is made only when it is installed)
    except ImportError:
        return
    assert (tmp_path / "train_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_dataset_says_to_run_the_download(tmp_path):
    out = run_script("Train.py", *TINY_ARGS, cwd=tmp_path)
    assert out.returncode != 0 and "python Dataset_download.py" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_config_keys_and_values_are_refused(tmp_path, capsys, monkeypatch):
    out = run_script("Train.py", "--hiden_size=64", cwd=tmp_path)  # one as a process: the exit code a shell sees
    assert out.returncode != 0 and "unknown config key 'hiden_size'" in out.stderr and "hidden_size" in out.stderr
    monkeypatch.chdir(tmp_path)  # the rest in this process: a fresh interpreter each cost more than the checks
    assert "--max_iters expects int, got 'many'" in refusal(Train.main, ["--max_iters=many"], capsys)
    assert "warmup_ratio must be between 0.0 and 0.5, got 0.9" in refusal(Train.main, ["--warmup_ratio=0.9"], capsys)
    assert "device must be auto, cuda, cuda:N, mps or cpu" in refusal(Train.main, ["--device=tpu"], capsys)
    with pytest.raises(SystemExit) as helped:
        Train.main(["--help"])
    out = capsys.readouterr().out
    assert helped.value.code == 0 and '"max_minutes": 15.0,' in out and "wall-clock budget" in out


# --- data -------------------------------------------------------------------------------------
def test_load_data_splits_by_document_masks_and_caches(tmp_path, chat_file):
    cache = tmp_path / "cache"
    data = load_data(chat_file, str(cache), 0.1, True, 0)
    assert len(data.val) > 0 and len(data.train) > len(data.val)
    # With assistant_only_loss, user text never counts: every masked-in id is assistant text or <|end|>.
    ids, mask = data.train.tolist(), data.train_mask.tolist()
    inside_user = False
    for i, m in zip(ids, mask):
        inside_user = i == USER or (inside_user and i != END)
        assert not (m and inside_user)
    assert any(mask) and not all(mask)
    logs = []
    again = load_data(chat_file, str(cache), 0.1, True, 0, log=logs.append)
    assert torch.equal(again.train, data.train) and again.vocab.chars == data.vocab.chars
    assert "reusing the encoded cache" in logs[0]


def test_a_file_with_no_usable_text_is_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{bad", {"x": 1}])
    with pytest.raises(data.DataError, match="no usable text.*empty.jsonl:1"):
        load_data(empty, str(tmp_path / "c"), 0.1, False, 0)


# --- the loop -----------------------------------------------------------------------------------
def run_in_process(tmp_path, chat_file, interrupt_at=None, resume=False, max_iters=40, optimizer="adamw"):
    """Call Train.main() here; optionally deliver a real SIGINT right after step `interrupt_at`."""
    with interrupt_after(interrupt_at):
        Train.main([f"--data={chat_file}", f"--out_dir={tmp_path}", f"--max_iters={max_iters}",
                    "--log_interval=1", "--eval_interval=15", "--checkpoint_interval=1000",
                    "--dropout=0.1", f"--optimizer={optimizer}", *TINY_ARGS] + (["--resume"] if resume else []))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, chat_file, optimizer):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_in_process(straight, chat_file, optimizer=optimizer)
    with pytest.raises(SystemExit) as stopped:
        run_in_process(broken, chat_file, interrupt_at=23, optimizer=optimizer)
    assert stopped.value.code == INTERRUPTED
    assert load_checkpoint(str(broken / "train_state.pth"))["step"] == 23
    run_in_process(broken, chat_file, resume=True, optimizer=optimizer)
    a, b = losses(straight), losses(broken)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5, abs_tol=1e-6), step


def test_sigint_saves_a_resumable_checkpoint(tmp_path, chat_file):
    cmd = [sys.executable, os.path.join(ROOT, "Train.py"), f"--data={chat_file}", f"--out_dir={tmp_path}",
           "--max_iters=100000", "--log_interval=5", *TINY_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    metrics = tmp_path / "train_metrics.jsonl"  # made empty at the start; the first line comes at step 5
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert "Resume with: python Train.py --data=" in out and out.rstrip().endswith("--resume") and "Traceback" not in err
    state = load_checkpoint(str(tmp_path / "train_state.pth"))
    assert state["step"] >= 5 and "optimizer" in state and "sampler" in state["rng"][0]


def test_oom_backoff_halves_the_micro_batch_and_keeps_the_batch():
    calls, logs = [], []

    def step(micro):
        calls.append(micro)
        if micro > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return "done"

    assert with_oom_backoff(step, 8, logs.append, torch.device("cpu")) == ("done", 2)
    assert calls == [8, 4, 2] and "micro-batch 8 -> 4" in logs[0] and "effective batch is unchanged" in logs[0]
    with pytest.raises(SystemExit, match="micro-batch of 1"):
        with_oom_backoff(lambda micro: step(micro + 10), 1, logs.append, torch.device("cpu"))


@pytest.mark.parametrize("device,error", [
    ("cuda", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("mps", RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 MB)"))])
def test_cuda_and_mps_out_of_memory_both_back_off_and_free_their_own_cache(monkeypatch, device, error):
    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append("cuda"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: freed.append("mps"))

    def step(micro):
        if micro > 2:
            raise error
        return "done"

    assert with_oom_backoff(step, 8, lambda line: None, torch.device(device)) == ("done", 2)
    assert freed == [device, device]
    with pytest.raises(RuntimeError, match="some other failure"):  # only running out of memory backs off
        with_oom_backoff(lambda micro: (_ for _ in ()).throw(RuntimeError("some other failure")), 8, print,
                         torch.device(device))


def test_an_explicit_gpu_under_several_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match=r"cuda:1.*2 processes.*--device=cuda"):
        training.setup_runtime(TrainConfig.from_dict({"device": "cuda:1", "grad_accum": 2}))


def test_resume_restores_the_cpu_and_device_rng_and_the_sampler_of_its_own_rank():
    runtime = Runtime(torch.device(DEVICE), torch.float32)
    sampler = seeded_generator(5)
    saved = [training.rng_state(runtime.device, sampler)]
    expected = (torch.rand(3), torch.rand(3, device=DEVICE), torch.randint(100, (3,), generator=sampler))
    other = training.rng_state(runtime.device, seeded_generator(6))
    torch.manual_seed(123)
    training.set_rng_state([other, saved[0]], 1, runtime.device, sampler)  # rank 1 takes the second entry
    again = (torch.rand(3), torch.rand(3, device=DEVICE), torch.randint(100, (3,), generator=sampler))
    assert all(torch.equal(a, b) for a, b in zip(expected, again))
    old = {"torch": saved[0]["cpu"], "sampler": [saved[0]["sampler"]]}  # a state saved before per-rank RNG
    torch.manual_seed(123)
    training.set_rng_state(old, 0, runtime.device, sampler)
    assert torch.equal(torch.rand(3), expected[0])


def test_micro_batches_give_the_same_gradient_as_one_batch(vocab):
    runtime = Runtime(torch.device("cpu"), torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randint(len(vocab), (8, 16)), torch.randint(len(vocab), (8, 16))
    grads = []
    for micro in (8, 2):
        net = tiny_model(vocab)
        forward_backward(net, (x, y, x[:, :2]), micro, runtime, scaler, training.LanguageModel(None, None, 16))
        grads.append(net.tok_emb.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_muon_gets_the_blocks_matrices_and_adamw_everything_else(vocab):
    net = tiny_model(vocab)
    config = TrainConfig.from_dict({"learning_rate": 1e-3, "weight_decay": 0.1, "optimizer": "muon"})
    muon, adamw = make_optimizer(net, config, torch.device("cpu")).optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = [id(p) for g in adamw.param_groups for p in g["params"]]
    names = {id(p): n for n, p in net.named_parameters()}
    assert not in_muon & set(in_adamw) and len(in_adamw) == len(set(in_adamw))  # each in exactly one group
    assert in_muon | set(in_adamw) == set(names)
    assert sorted(names[i] for i in in_muon) == sorted(n for n, p in net.named_parameters()
                                                       if n.startswith("blocks.") and p.dim() == 2)
    assert {names[i] for i in in_adamw} >= {"tok_emb.weight", "norm.weight", "blocks.0.norm1.bias"}
    only_adamw = make_optimizer(net, dataclasses.replace(config, optimizer="adamw"), torch.device("cpu")).optimizers
    assert len(only_adamw) == 1 and isinstance(only_adamw[0], torch.optim.AdamW)


def test_orthogonalize_brings_every_singular_value_near_one_one_matrix_or_many():
    g = torch.randn(3, 48, 16, generator=seeded_generator(0)) * torch.logspace(-1, 1, 16)
    out = orthogonalize(g)  # g's singular values spread over two decades; out's near 1
    singular = torch.linalg.svdvals(out)
    assert out.shape == g.shape and singular.min() > 0.5 and singular.max() < 1.5
    assert torch.allclose(out[1], orthogonalize(g[1]), atol=1e-5)  # batched = one by one
    assert torch.allclose(orthogonalize(g[0].T), out[0].T, atol=1e-5)  # wide and tall alike


def test_muon_orthogonalises_fused_matrices_part_by_part(vocab):
    """q, k and v share one weight; each of the three should move by a near-orthogonal step, not
    the stacked 3d x d matrix (whose thirds would then have singular values near 1/sqrt(3))."""
    net = tiny_model(vocab)
    config = TrainConfig.from_dict({"learning_rate": 1e-2, "weight_decay": 0.0, "optimizer": "muon"})
    muon = make_optimizer(net, config, torch.device("cpu")).optimizers[0]
    assert sorted(g["parts"] for g in muon.param_groups) == [1, 2, 3]
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    qkv = net.blocks[0].attn.qkv.weight
    before = qkv.detach().clone()
    muon.step()
    step = (before - qkv.detach()) / (1e-2 * 0.2 * max(qkv.shape[0] // 3, qkv.shape[1]) ** 0.5)
    for part in step.chunk(3):  # five Newton-Schulz steps leave a square matrix's smallest values lower
        singular = torch.linalg.svdvals(part)
        assert 0.8 < singular.median() < 1.2 and singular.max() < 1.5


def test_muon_momentum_warms_up_and_its_count_survives_a_save():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    muon = Muon([{"params": [w]}], lr=1e-2, weight_decay=0.0, warmup_steps=10)
    grads = torch.randn(12, 8, 8, generator=seeded_generator(0))
    expected = torch.zeros(8, 8)
    for step, g in enumerate(grads):
        momentum = 0.85 + 0.10 * min(1.0, step / 10)  # 0.85 on the first step, 0.95 from step 10 on
        expected = momentum * expected + g
        w.grad = g.clone()
        muon.step()
        assert torch.allclose(muon.state[w]["momentum"], expected, atol=1e-6), step
    again = Muon([{"params": [w]}], lr=1e-2, weight_decay=0.0, warmup_steps=10)
    again.load_state_dict(muon.state_dict())
    assert again.param_groups[0]["steps"] == 12  # a resumed run does not warm up a second time
    before_warmup = muon.state_dict()  # as a run of an older LuminaAI saved it
    before_warmup["param_groups"][0].update(momentum=0.9)
    for key in ("steps", "warmup_steps"):
        del before_warmup["param_groups"][0][key]
    again.load_state_dict(before_warmup)
    w.grad = grads[0].clone()
    again.step()
    assert torch.allclose(again.state[w]["momentum"], 0.9 * expected + grads[0], atol=1e-6)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lr_at(0.0, cfg) < 1e-4
    assert math.isclose(lr_at(0.1, cfg), 1e-3)
    assert lr_at(0.5, cfg) < lr_at(0.2, cfg)
    assert math.isclose(lr_at(1.0, cfg), 1e-4)


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_over_the_last_share():
    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1, decay_ratio=0.2)
    assert lr_at(0.05, cfg) < 1e-3
    assert lr_at(0.1, cfg) == lr_at(0.5, cfg) == lr_at(0.8, cfg) == 1e-3  # stable: the peak, held
    assert math.isclose(lr_at(0.9, cfg), 1e-3 - 0.5 * 0.9e-3) and math.isclose(lr_at(1.0, cfg), 1e-4)
    assert math.isclose(lr_at(1.3, cfg), 1e-4)  # a run past its budget's end stays at the floor
    assert lr_at(0.5, dataclasses.replace(cfg, decay_ratio=0.0)) < 1e-3  # 0: the cosine, already decaying


# --- beyond one process --------------------------------------------------------------------------
def test_two_gloo_processes_train_and_rank0_saves(tmp_path, chat_file):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "Train.py"), f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=30",
           "--eval_interval=15", "--log_interval=10", "--grad_accum=2", "--threads=1", *TINY_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 process(es)" in out.stdout and out.stdout.count("done: 30 steps") == 1
    ckpt = load_checkpoint(str(tmp_path / "Model.pth"))
    build_model(ckpt)
    ranks = load_checkpoint(str(tmp_path / "train_state.pth"))["rng"]
    assert len(ranks) == 2 and all(set(r) == {"cpu", "device", "sampler"} for r in ranks)


def test_a_shape_rotary_cannot_use_is_refused_without_a_traceback(tmp_path, chat_file, capsys):
    said = refusal(Train.main, [f"--data={chat_file}", f"--out_dir={tmp_path}", *TINY_ARGS, "--hidden_size=36",
                                "--nhead=4"], capsys)
    assert "even head size" in said


# --- faults: SIGKILL at chosen moments, then resume ----------------------------------------------
# Each run is a process that kills itself with SIGKILL at the n-th optimizer step (after the backward
# pass, before the update), evaluation, or write of a named checkpoint (half written). The runs are
# forked from one process that has loaded torch and Train.py, so each starts at Train.main: a fresh
# interpreter spent most of its time importing torch. The forking process reads one run a line,
# [moment, n, argv], and answers the run's exit status; the runs' own output goes to a log file.
KILLER = r"""
import json, os, signal, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch, torch._dynamo, Train  # torch._dynamo: what building an optimizer imports
from lumina import training

def run(kind, n, argv):
    calls = []

    def kill_on_nth(name):
        calls.append(name)
        if calls.count(name) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    real_step, real_eval, real_save = training.forward_backward, training.evaluate, torch.save

    def step(*a, **k):
        loss = real_step(*a, **k)
        kill_on_nth("step")
        return loss

    def evaluate(*a, **k):
        loss = real_eval(*a, **k)
        kill_on_nth("eval")
        return loss

    def save(obj, f, *a, **k):
        for name in ("train_state", "Model.pth"):
            if name in os.path.basename(f) and kind == "write:" + name:
                with open(f, "wb") as half:
                    half.write(b"PK\x03\x04 half of a checkpoint")
                kill_on_nth(kind)
        return real_save(obj, f, *a, **k)

    training.forward_backward, training.evaluate, torch.save = step, evaluate, save
    Train.main(argv)

log = open(sys.argv[2], "a")
for line in sys.stdin:
    kind, n, argv = json.loads(line)
    child = os.fork()
    if child == 0:  # the run: it ends here, never back in this loop
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        signal.alarm(300)  # a run that hangs ends by SIGALRM, which the test reports
        try:
            run(kind, n, argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # only a run that was not killed gets here
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
"""
# (moment, n) in order; each run resumes from the last train_state.pth (saved every 5 steps).
KILLS = [("step", 8), ("write:Model.pth", 1), ("eval", 1), ("write:train_state", 1), ("write:train_state", 2),
         ("step", 4), ("eval", 1), ("write:train_state", 3), ("step", 9), ("eval", 1)]


def metric_records(out_dir):
    """The metrics file's records; every line must be whole JSON and no step logged twice."""
    with open(os.path.join(out_dir, "train_metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]  # a torn line would raise here
    for kind in ("loss", "val"):
        steps = [r["step"] for r in records if kind in r]
        assert len(steps) == len(set(steps)), f"a {kind} step appears twice: {steps}"
    return records


def test_sigkill_at_ten_moments_then_resume_continues_the_same_run(tmp_path, chat_file):
    args = [f"--data={chat_file}", "--max_iters=40", "--log_interval=1", "--eval_interval=10",
            "--checkpoint_interval=5", "--dropout=0.1", "--threads=1", *TINY_ARGS, "--probe_chars=0"]
    straight, broken, log = tmp_path / "straight", tmp_path / "broken", tmp_path / "killed_runs.log"
    out = run_script("Train.py", *args, f"--out_dir={straight}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    killer = subprocess.Popen([sys.executable, "-c", KILLER, ROOT, str(log)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for i, (moment, n) in enumerate(KILLS):
            resume = ["--resume"] if i else []
            killer.stdin.write(json.dumps([moment, n, [*args, f"--out_dir={broken}", *resume]]) + "\n")
            killer.stdin.flush()
            assert int(killer.stdout.readline()) == -signal.SIGKILL, (moment, n, log.read_text()[-2000:])
            state = load_checkpoint(str(broken / "train_state.pth"))  # never torn, whatever the moment
            assert state["step"] % 5 == 0
            if (broken / "Model.pth").exists():
                build_model(load_checkpoint(str(broken / "Model.pth")))
            metric_records(broken)
    finally:
        killer.stdin.close()
        killer.wait(timeout=60)
    out = run_script("Train.py", *args, f"--out_dir={broken}", "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    records = metric_records(broken)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    a, b = losses(straight), losses(broken)
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5, abs_tol=1e-6), step
    assert load_checkpoint(str(broken / "Model.pth"))["metrics"]["val_loss"] == \
        load_checkpoint(str(straight / "Model.pth"))["metrics"]["val_loss"]


def test_a_fresh_run_starts_a_fresh_metrics_file(tmp_path, chat_file):
    (tmp_path / "train_metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n{"step": 3, "lo')
    Train.main([f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=4", "--log_interval=2", "--eval_interval=4",
                *TINY_ARGS])
    assert [r["step"] for r in metric_records(tmp_path)] == [2, 4, 4]


# --- the config a run resolves ----------------------------------------------------------------------
def test_compile_true_on_the_command_line_and_an_old_runs_saved_false_both_read():
    config = Train.resolve_config(apply_overrides(Train.CONFIG, ["--compile=True"]), [], None)
    assert config.compile == "true"
    old_run = {"config": {**Train.CONFIG, "compile": False}}  # as an older run saved it
    assert Train.resolve_config(Train.CONFIG, ["--resume"], old_run).compile == "false"


# --- regularisation by the epochs a run will see ----------------------------------------------------
def test_auto_regularisation_is_logged_stored_and_switches_dropout_on(tmp_path, chat_file, capsys):
    Train.main([f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=60", "--eval_interval=60",
                *[a for a in TINY_ARGS if a != "--max_minutes=0"], "--max_minutes=5"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("regularisation auto:"))
    assert re.search(r"characters/s measured, 60 steps of 128 characters over [\d,]+ = [\d.]+ epochs -> dropout 0\.1, "
                     r"weight decay [\d.e-]+$", line)  # 60 steps over tiny data: a few epochs
    saved = load_checkpoint(str(tmp_path / "Model.pth"))
    assert saved["config"]["dropout"] == 0.1 == saved["model_config"]["dropout"] and saved["config"]["weight_decay"] > 0


def test_a_short_context_phase_reads_as_many_characters_in_shorter_windows():
    ids, mask = torch.arange(1000) % 50, torch.ones(1000, dtype=torch.bool)
    text = training.LanguageModel(ids, mask, 64, short_context=16, short_share=0.5)
    x, y, before = text.draw(4, seeded_generator(0), progress=0.2)
    assert x.shape == y.shape == (16, 16) and before.shape == (16, 2)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(before[:, 1], x[:, 0] - 1)  # windows of the text
    assert text.draw(4, seeded_generator(0), progress=0.6)[0].shape == (4, 64)  # then the whole context
    assert [len(part[0]) for part, _ in text.split((x, y, before), 2)] == [8, 8]  # micro-batches of as many characters
    whole = training.LanguageModel(ids, mask, 32, short_context=64, short_share=0.5)  # the preset's 64 > a tiny context
    assert whole.draw(4, seeded_generator(0), progress=0.2)[0].shape == (4, 32)  # no shorter phase than the context


def test_the_model_line_names_the_levers_that_are_on(tmp_path, chat_file, capsys):
    Train.main([f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4", *TINY_ARGS,
                "--short_context=8", "--logit_softcap=15"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model:"))
    assert line.endswith("context 16 | QK-norm | logit soft-cap 15 | the first 60% on 8-character windows")
    Train.main([f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4", *TINY_ARGS,
                "--qk_norm=False", "--overwrite"])  # the preset's 64 is no shorter than a context of 16: no phase
    assert next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model:")).endswith("context 16")


def test_the_cpu_preset_trains_with_qk_norm_and_a_short_first_phase_and_older_runs_resume_without():
    cpu, gpu = (Train.resolve_config(Train.CONFIG, [], None).with_preset(d) for d in ("cpu", "cuda"))
    assert cpu.qk_norm and gpu.qk_norm and (cpu.short_context, gpu.short_context) == (64, 0)  # ten-minute pairs: CPU only
    old_run = {"config": {k: v for k, v in Train.CONFIG.items() if k not in ("qk_norm", "short_context")}}
    resumed = Train.resolve_config(Train.CONFIG, ["--resume"], old_run).with_preset("cpu")
    assert (resumed.qk_norm, resumed.short_context) == (False, 0)  # as it was trained before the keys existed


def test_muon_takes_its_number_of_newton_schulz_iterations_and_keeps_it_in_its_state(vocab):
    net = tiny_model(vocab)
    config = TrainConfig.from_dict({"learning_rate": 1e-2, "weight_decay": 0.0, "optimizer": "muon", "muon_steps": 2})
    muon = make_optimizer(net, config, torch.device("cpu")).optimizers[0]
    assert {g["ns_steps"] for g in muon.param_groups} == {2}
    state = muon.state_dict()
    for group in state["param_groups"]:
        del group["ns_steps"]  # a state saved before the setting existed
    muon.load_state_dict(state)
    assert {g["ns_steps"] for g in muon.param_groups} == {5}
