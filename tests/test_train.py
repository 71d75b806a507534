"""Train.py: data formats, the loop, resume, Ctrl-C, OOM back-off, config errors, torchrun."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
import Train
from conftest import CHATS, ROOT, run_script, tiny_model, write_jsonl

TINY_ARGS = ["--seq_length=16", "--hidden_size=32", "--num_layers=2", "--nhead=2", "--batch_size=8",
             "--max_minutes=0", "--probe_chars=10", "--device=cpu", "--dtype=float32"]


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
    assert "step 020/120 | loss" in out.stdout and "bits/char" in out.stdout and "probe | Hello" in out.stdout
    curve = losses(tmp_path)
    assert curve[120] < curve[20] - 0.5
    ckpt = M.load_checkpoint(str(tmp_path / "Model.pth"))
    assert ckpt["stage"] == "train" and ckpt["config"]["max_iters"] == 120
    assert ckpt["metrics"]["val_bpc"] < 4.0
    net, vocab = M.build_model(ckpt)
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


def test_bad_config_keys_and_values_are_refused(tmp_path):
    out = run_script("Train.py", "--hiden_size=64", cwd=tmp_path)
    assert out.returncode != 0 and "unknown config key 'hiden_size'" in out.stderr and "hidden_size" in out.stderr
    out = run_script("Train.py", "--max_iters=many", cwd=tmp_path)
    assert "--max_iters expects int, got 'many'" in out.stderr
    out = run_script("Train.py", "--warmup_ratio=0.9", cwd=tmp_path)
    assert "warmup_ratio must be between 0.0 and 0.5, got 0.9" in out.stderr
    out = run_script("Train.py", "--device=tpu", cwd=tmp_path)
    assert "device must be auto, cuda, cuda:N, mps or cpu" in out.stderr
    out = run_script("Train.py", "--help", cwd=tmp_path)
    assert out.returncode == 0 and '"max_minutes": 15.0,' in out.stdout and "wall-clock budget" in out.stdout


# --- data formats -------------------------------------------------------------------------------
def test_custom_formats_load(tmp_path):
    problems = []
    chat = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHATS[0]}, "{broken", {"other": 1}])
    docs = Train.read_file(chat, problems)
    assert docs == [("chat", CHATS[0])]
    assert problems[0].endswith("a.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)")
    assert problems[1].endswith("a.jsonl:3: no 'messages' list or 'text' string")

    rows = [{"message_id": "r", "parent_id": None, "text": "Q?", "role": "prompter"},
            {"message_id": "b", "parent_id": "r", "text": "worse", "role": "assistant", "rank": 1},
            {"message_id": "a", "parent_id": "r", "text": "best", "role": "assistant", "rank": 0},
            {"message_id": "c", "parent_id": "a", "text": "more?", "role": "prompter", "rank": None}]
    docs = Train.read_file(write_jsonl(tmp_path / "oasst.jsonl", rows), problems)
    assert docs == [("chat", [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "best"},
                              {"role": "user", "content": "more?"}])]

    marked = tmp_path / "marked.txt"
    marked.write_text("<|user|>Hi\n<|bot|>Hello,\nsecond line\n<|user|>Bye\n<|bot|>See you\n")
    docs = Train.read_file(str(marked), problems)
    assert docs == [("chat", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello,\nsecond line"}]),
                    ("chat", [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}])]

    prose = tmp_path / "book.txt"
    prose.write_text("First paragraph.\n\nSecond one.\n")
    assert Train.read_file(str(prose), problems) == [("text", "First paragraph."), ("text", "Second one.\n")]


def test_load_data_splits_by_document_masks_and_caches(tmp_path, chat_file):
    cache = tmp_path / "cache"
    data = Train.load_data(chat_file, str(cache), 0.1, True, 0)
    assert len(data.val) > 0 and len(data.train) > len(data.val)
    # With assistant_only_loss, user text never counts: every masked-in id is assistant text or <|end|>.
    ids, mask = data.train.tolist(), data.train_mask.tolist()
    inside_user = False
    for i, m in zip(ids, mask):
        inside_user = i == M.USER or (inside_user and i != M.END)
        assert not (m and inside_user)
    assert any(mask) and not all(mask)
    logs = []
    again = Train.load_data(chat_file, str(cache), 0.1, True, 0, log=logs.append)
    assert torch.equal(again.train, data.train) and again.vocab.chars == data.vocab.chars
    assert "reusing the encoded cache" in logs[0]


def test_a_file_with_no_usable_text_is_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{bad", {"x": 1}])
    with pytest.raises(Train.DataError, match="no usable text.*empty.jsonl:1"):
        Train.load_data(empty, str(tmp_path / "c"), 0.1, False, 0)


# --- the loop -----------------------------------------------------------------------------------
def run_in_process(tmp_path, chat_file, interrupt_at=None, resume=False, max_iters=40):
    """Call Train.main() here; optionally deliver a real SIGINT right after step `interrupt_at`."""
    real_log = Train.log_metrics

    def log_and_maybe_interrupt(path, record):
        real_log(path, record)
        if record.get("step") == interrupt_at and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    Train.log_metrics = log_and_maybe_interrupt
    try:
        Train.main([f"--data={chat_file}", f"--out_dir={tmp_path}", f"--max_iters={max_iters}",
                    "--log_interval=1", "--eval_interval=15", "--checkpoint_interval=1000",
                    "--dropout=0.1", *TINY_ARGS] + (["--resume"] if resume else []))
    finally:
        Train.log_metrics = real_log


def test_resume_reproduces_the_uninterrupted_run(tmp_path, chat_file):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_in_process(straight, chat_file)
    with pytest.raises(SystemExit) as stopped:
        run_in_process(broken, chat_file, interrupt_at=23)
    assert stopped.value.code == Train.INTERRUPTED
    assert M.load_checkpoint(str(broken / "train_state.pth"))["step"] == 23
    run_in_process(broken, chat_file, resume=True)
    a, b = losses(straight), losses(broken)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5, abs_tol=1e-6), step


def test_sigint_saves_a_resumable_checkpoint(tmp_path, chat_file):
    cmd = [sys.executable, os.path.join(ROOT, "Train.py"), f"--data={chat_file}", f"--out_dir={tmp_path}",
           "--max_iters=100000", "--log_interval=5", *TINY_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "train_metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == Train.INTERRUPTED, err
    assert "Resume with: python Train.py --data=" in out and out.rstrip().endswith("--resume") and "Traceback" not in err
    state = M.load_checkpoint(str(tmp_path / "train_state.pth"))
    assert state["step"] >= 5 and "optimizer" in state and "sampler" in state["rng"]


def test_oom_backoff_halves_the_micro_batch_and_keeps_the_batch():
    calls, logs = [], []

    def step(micro):
        calls.append(micro)
        if micro > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return "done"

    assert Train.with_oom_backoff(step, 8, logs.append) == ("done", 2)
    assert calls == [8, 4, 2] and "micro-batch 8 -> 4" in logs[0] and "effective batch is unchanged" in logs[0]
    with pytest.raises(SystemExit, match="micro-batch of 1"):
        Train.with_oom_backoff(lambda micro: step(micro + 10), 1, logs.append)


def test_micro_batches_give_the_same_gradient_as_one_batch(vocab):
    runtime = Train.Runtime(torch.device("cpu"), torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randint(len(vocab), (8, 16)), torch.randint(len(vocab), (8, 16))
    grads = []
    for micro in (8, 2):
        net = tiny_model(vocab)
        Train.forward_backward(net, x, y, micro, runtime, scaler, {"label_smoothing": 0.0})
        grads.append(net.tok_emb.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = {"learning_rate": 1e-3, "warmup_ratio": 0.1, "min_lr_ratio": 0.1}
    assert Train.lr_at(0.0, cfg) < 1e-4
    assert math.isclose(Train.lr_at(0.1, cfg), 1e-3)
    assert Train.lr_at(0.5, cfg) < Train.lr_at(0.2, cfg)
    assert math.isclose(Train.lr_at(1.0, cfg), 1e-4)


def test_unavailable_device_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="not available"):
        Train.pick_device("cuda", 0)


# --- beyond one process --------------------------------------------------------------------------
def test_two_gloo_processes_train_and_rank0_saves(tmp_path, chat_file):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "Train.py"), f"--data={chat_file}", f"--out_dir={tmp_path}", "--max_iters=30",
           "--eval_interval=15", "--log_interval=10", "--grad_accum=2", "--threads=1", *TINY_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 process(es)" in out.stdout and out.stdout.count("done: 30 steps") == 1
    ckpt = M.load_checkpoint(str(tmp_path / "Model.pth"))
    M.build_model(ckpt)
    assert len(M.load_checkpoint(str(tmp_path / "train_state.pth"))["rng"]["sampler"]) == 2


def test_a_shape_rotary_cannot_use_is_refused_without_a_traceback(tmp_path, chat_file):
    out = run_script("Train.py", f"--data={chat_file}", f"--out_dir={tmp_path}", *TINY_ARGS,
                     "--hidden_size=36", "--nhead=4", cwd=tmp_path)
    assert out.returncode != 0 and "even head size" in out.stderr and "Traceback" not in out.stderr
