"""Shared fixtures: tiny models and data, so the whole suite runs in minutes on 2 CPU cores."""
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lumina.checkpoint import model_state, save_checkpoint  # noqa: E402
from lumina.model import CharTransformer, ModelConfig  # noqa: E402
from lumina.vocab import Vocab  # noqa: E402

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data", "oasst1")
# The device every stage and model of the suite runs on: LUMINA_TEST_DEVICE=cuda runs the same tests on a GPU.
DEVICE = os.environ.get("LUMINA_TEST_DEVICE", "cpu")
DTYPES = ["float32", "bfloat16", "float16"]  # every precision Train.py accepts besides auto; autocast runs all on a CPU
TINY = dict(seq_length=16, hidden_size=32, num_layers=2, nhead=2, dropout=0.0)
CHATS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello! how can I help?"}],
    [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome."}],
    [{"role": "user", "content": "name a color"}, {"role": "assistant", "content": "blue\nor green"}],
]


def tiny_model(vocab, seed=0, **overrides):
    torch.manual_seed(seed)
    return CharTransformer(ModelConfig(vocab_size=len(vocab), **{**TINY, **overrides}))


def tiny_checkpoint(path, seed=0, stage="train", text="abcdefghijklmnopqrstuvwxyz !?.,\n"):
    vocab = Vocab.from_text(text)
    net = tiny_model(vocab, seed)
    save_checkpoint(path, {"stage": stage, "vocab": vocab.chars,
                             "model_config": dataclasses.asdict(net.config),
                             "model": model_state(net), "config": {}, "metrics": {}})
    return net, vocab


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


@contextlib.contextmanager
def interrupt_after(step):
    """Deliver a real SIGINT right after training step `step` is logged (None: never), to test
    Ctrl-C and --resume inside this process."""
    from lumina import training
    real_log = training.log_metrics

    def log_and_maybe_interrupt(path, record):
        real_log(path, record)
        if record.get("step") == step and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    training.log_metrics = log_and_maybe_interrupt
    try:
        yield
    finally:
        training.log_metrics = real_log


def run_script(script, *args, cwd=None, input=None, timeout=300, env=None):
    """Run a stage the way a person does, returning the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def vocab():
    return Vocab.from_text("abcdefghijklmnopqrstuvwxyz !?.,\n\tñ")
