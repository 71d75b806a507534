"""Shared fixtures: tiny models and data, so the whole suite runs in minutes on 2 CPU cores."""
import contextlib
import importlib.util
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lumina.checkpoint import model_state, save_checkpoint  # noqa: E402
from lumina.model import CharTransformer, ModelConfig  # noqa: E402
from lumina.vocab import SPECIAL_TOKENS, Vocab  # noqa: E402

# One torch thread for this process and, through the environment, for every stage a test starts:
# the suite runs two files at once on two cores, and tiny models gain nothing from a second thread,
# which only waits for a core. Measured: two tiny Train.py runs side by side took 23 s each with two
# threads, 7 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
    from lumina import runfiles
    real_log = runfiles.log_metrics

    def log_and_maybe_interrupt(path, record):
        real_log(path, record)
        if record.get("step") == step and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    runfiles.log_metrics = log_and_maybe_interrupt
    try:
        yield
    finally:
        runfiles.log_metrics = real_log


def refusal(main, argv, capsys):
    """A stage's main(argv) in this process, which must refuse: what the user reads (stderr and the
    message sys.exit prints). Any other exception, a traceback for the user, fails the test."""
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code not in (0, None)
    return capsys.readouterr().err + str(refused.value.code)


def run_script(script, *args, cwd=None, input=None, timeout=300, env=None):
    """Run a stage the way a person does, returning the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Timed trials cache what they chose (lumina.device): every test, and every stage it runs in a
    subprocess, gets its own empty cache folder, never the real one in the home folder."""
    monkeypatch.setenv("LUMINA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def vocab():
    return Vocab.from_text("abcdefghijklmnopqrstuvwxyz !?.,\n\tñ")


def need(*modules, allow_module_level=False):
    """Skip unless these packages are installed, saying which are missing (the GPU machine has none
    of serve.py's). On CI (CI=true) a missing package fails instead: the requirements install
    every one, so a skip there would hide a broken install."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = f"needs {', '.join(missing)} (python -m pip install -r requirements-dev.txt)"
    if os.environ.get("CI"):
        pytest.fail(f"CI installs every package, but this test {message}", pytrace=False)
    pytest.skip(message, allow_module_level=allow_module_level)


# --- serve.py, as its clients reach it ---------------------------------------------------------------------
KEY = "secret"
SERVE_PACKAGES = ("fastapi", "uvicorn", "httpx", "openai")  # what talking to serve.py needs beyond the stages' own


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py in a subprocess, ready when /health answers (within start_seconds); eager unless the
    test names --compile (auto would time compiling at every test's start)."""

    def __init__(self, checkpoint, *args, env=None, start_seconds=60):
        import httpx
        self.checkpoint, self.port = checkpoint, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), checkpoint, f"--port={self.port}",
                                      "--threads=1", f"--device={DEVICE}",
                                      *([] if any(a.startswith("--compile") for a in args) else ["--compile=false"]),
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + start_seconds
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"serve.py did not start: {self.proc.communicate()[1][-2000:]}")

    def client(self, key=KEY):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def health(self):
        import httpx
        return httpx.get(self.url + "/health").json()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


def ask(client, text, **kwargs):
    return client.chat.completions.create(model="Model", messages=[{"role": "user", "content": text}], **kwargs)


ENDLESS_TEXT = "abcdefghijklmnopqrstuvwxyz !?.,\n<|>"


def endless_checkpoint(path, seq_length=64, context=0.0, spread=1.0):
    """A tiny model that never ends a turn: its final hidden state is v + context * n (n the
    normalised state, about as long as v), and the rows of <|end|>, the other special ids and
    newline are -10 v, so their logits are hugely negative for any context up to 0.5. context=0
    gives every position the same distribution; context=0.5 with spread=7 (every row scaled up
    before the special ones are set) gives one that depends on the text and spans likely and
    unlikely characters."""
    vocab = Vocab.from_text(ENDLESS_TEXT)
    net = tiny_model(vocab, seq_length=seq_length)
    with torch.no_grad():
        net.norm.weight.fill_(context)
        net.norm.bias.copy_(torch.randn(net.config.hidden_size))
        net.tok_emb.weight.mul_(spread)
        for never in [*range(len(SPECIAL_TOKENS)), vocab.stoi["\n"]]:  # one reply, one output line
            net.tok_emb.weight[never] = -10 * net.norm.bias
    save_checkpoint(str(path), {"stage": "train", "vocab": vocab.chars, "model": model_state(net),
                                  "model_config": dataclasses.asdict(net.config), "config": {}, "metrics": {}})
    return str(path)
