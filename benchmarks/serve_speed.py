"""serve.py under load: continuous batching against one sequence at a time, taking turns.

A model of the default CPU preset's shape (random weights, except that it never ends a turn, so
every reply is exactly `chars` characters: speed does not depend on the weights) is served twice
per round, with --max_batch=16 and with --max_batch=1. Each time, `clients` concurrent clients
stream a reply of `chars` characters through the real HTTP API. Reported: aggregate characters/s
over the whole burst, and each client's time to its first character (p50 and p95).

Run:  python benchmarks/serve_speed.py [--rounds=2] [--clients=16] [--chars=200]
"""
import concurrent.futures
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

import common  # noqa: F401  (puts the project on sys.path)
import Train
from lumina.checkpoint import model_state, save_checkpoint
from lumina.config import parse_cli
from lumina.model import CharTransformer, ModelConfig
from lumina.vocab import SPECIAL_TOKENS, Vocab

CONFIG = {
    "rounds": 2,      # each round serves the burst once batched and once one at a time
    "clients": 16,    # concurrent streaming clients per burst
    "chars": 200,     # characters each client asks for
    "threads": 0,     # the server's CPU threads; 0 = torch's default
}


def endless_model(path):
    """The CPU preset's shape; the final norm's gain is zero, so every position's hidden state is
    its bias v, and the special tokens' rows point against v: it never ends a turn."""
    shape = {k: v for k, v in Train.PRESETS["cpu"].items() if k in ("hidden_size", "num_layers", "nhead", "seq_length")}
    vocab = Vocab([chr(c) for c in range(32, 127)])
    torch.manual_seed(0)
    net = CharTransformer(ModelConfig(vocab_size=len(vocab), **shape))
    with torch.no_grad():
        net.norm.weight.zero_()
        net.norm.bias.normal_()
        net.tok_emb.weight[:len(SPECIAL_TOKENS)] = -10 * net.norm.bias
    save_checkpoint(path, {"stage": "bench", "vocab": vocab.chars, "model": model_state(net),
                             "model_config": dataclasses.asdict(net.config), "config": {}, "metrics": {}})
    return net.num_params()


def start_server(checkpoint, max_batch, threads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(common.ROOT, "serve.py"), checkpoint, f"--port={port}",
                             f"--max_batch={max_batch}", f"--threads={threads}"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/health")
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("serve.py did not start")


def one_client(url, chars, start):
    """(seconds from the burst's start to the first character, characters received)."""
    first, received = None, 0
    body = {"model": "Model", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": chars,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                text = choice["delta"].get("content") or ""
                if text and first is None:
                    first = time.perf_counter() - start
                received += len(text)
    return first, received


def burst(url, clients, chars):
    """Every client at once; (aggregate characters/s, first-character times)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: one_client(url, chars, start), range(clients)))
    seconds = time.perf_counter() - start
    if any(received != chars for _, received in results):
        raise SystemExit(f"a client got {[r for _, r in results]} characters, not {chars}")
    return clients * chars / seconds, sorted(first for first, _ in results)


def main(argv):
    options = parse_cli(argv, CONFIG, __file__)[0]
    checkpoint = os.path.join(tempfile.mkdtemp(prefix="lumina-serve-"), "Model.pth")
    params = endless_model(checkpoint)
    print(f"model: CPU preset shape, {params:,} params | {options['clients']} clients x {options['chars']} chars | "
          f"server threads {options['threads'] or 'default'} | torch {torch.__version__} | {os.cpu_count()} CPUs")
    results = {16: [], 1: []}
    for round_ in range(options["rounds"]):
        for max_batch in results:  # taking turns
            proc, url = start_server(checkpoint, max_batch, options["threads"])
            burst(url, 2, 20)  # warm up the server's first steps
            rate, firsts = burst(url, options["clients"], options["chars"])
            proc.terminate()
            proc.wait()
            results[max_batch].append((rate, firsts))
            p95 = firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))]
            print(f"round {round_ + 1} max_batch={max_batch:<2}: {rate:,.0f} chars/s | first character p50 "
                  f"{statistics.median(firsts):.3f} s, p95 {p95:.3f} s", flush=True)
    batched, single = (statistics.mean(r for r, _ in results[b]) for b in (16, 1))
    print(f"mean over {options['rounds']} rounds: batched {batched:,.0f} chars/s | one at a time {single:,.0f} chars/s | "
          f"{batched / single:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
