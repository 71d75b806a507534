"""serve.py under load, through the real HTTP API, taking turns.

A model of the default CPU preset's shape (random weights, except that it never ends a turn, so
every reply is exactly `chars` characters: speed does not depend on the weights) is served, each
round, to bursts of concurrent streaming clients:
  - `clients` clients, --max_batch=`clients` (continuous batching);
  - 1 client (the same server settings);
  - `clients` clients, --max_batch=1 (one sequence at a time);
  - with --peer=RELEASE: `clients` clients and 1 client on that release's serve.py (read from
    git), same weights (in the file format it reads) and settings;
  - with --logprobs=K: `clients` clients asking for logprobs with top_logprobs K;
  - with --also_compile=false,true: `clients` clients and 1 client with each of those --compile values.
Reported: aggregate characters/s over each burst, and each client's time to its first character
(p50 and p95). Clients and server share the machine.

Run:  python benchmarks/serve_speed.py [--rounds=2] [--clients=16] [--chars=200] [--peer=d26845d] [--serial=False]
                                       [--logprobs=5] [--compile=false] [--also_compile=false,true]
"""
import asyncio
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
from lumina.checkpoint import model_state, save_checkpoint
from lumina.config import parse_cli
from lumina.model import CharTransformer, ModelConfig
from lumina.plan import PRESETS
from lumina.vocab import SPECIAL_TOKENS, Vocab

CONFIG = {
    "rounds": 2,      # each round serves the burst once batched and once one at a time
    "clients": 16,    # concurrent streaming clients per burst
    "chars": 200,     # characters each client asks for
    "threads": 0,     # the server's CPU threads; 0 = torch's default
    "peer": "",       # a release (e.g. d26845d) whose serve.py also serves the burst; "" = none
    "dtype": "auto",  # this release's serve.py --dtype (the peer has no such key)
    "compile": "auto",  # this release's serve.py --compile: auto (its trial, cached), true or false
    "also_compile": "",  # also serve n clients and 1 client with these --compile values, e.g. "false,true"
    "serial": True,   # also serve the burst with --max_batch=1 (one sequence at a time: the slowest way)
    "logprobs": -1,   # K >= 0: also serve the burst asking for logprobs with top_logprobs K; -1 = not measured
}
PEER_FORMAT = 2  # d26845d reads format 2; the benchmark's model has no n-gram tables, all that format 3 added


def endless_model(path):
    """The CPU preset's shape; the final norm's gain is zero, so every position's hidden state is
    its bias v, and the special tokens' rows point against v: it never ends a turn."""
    shape = {k: v for k, v in PRESETS["cpu"].items() if k in ("hidden_size", "num_layers", "nhead", "seq_length")}
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


def peer_copy(checkpoint):
    """The model file as an older release reads it: format 2, none of the later shape keys (the
    model has no n-gram tables, QK-norm or soft-cap, so the weights and logits are the same)."""
    state = torch.load(checkpoint, weights_only=True)
    state["format_version"] = PEER_FORMAT
    for key in ("ngram_buckets", "qk_norm", "logit_softcap"):
        state["model_config"].pop(key, None)
    folder = os.path.join(os.path.dirname(checkpoint), f"format{PEER_FORMAT}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.basename(checkpoint))  # the same name: serve.py serves it as "Model"
    torch.save(state, path)
    return path


def start_server(root, checkpoint, max_batch, threads, extra=()):
    """serve.py of the code at `root`, on a free port; (process, url) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(root, "serve.py"), checkpoint, f"--port={port}",
                             f"--max_batch={max_batch}", f"--threads={threads}", *extra], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):  # up to 10 minutes: a first start with compile=auto times and compiles its buckets
        try:
            httpx.get(url + "/health")
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("serve.py did not start")


def release_tree(release):
    """A folder holding the files of an older release, read from git."""
    folder = tempfile.mkdtemp(prefix=f"lumina-{release}-")
    archive = subprocess.run(["git", "-C", common.ROOT, "archive", release], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"cannot read release {release}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


async def one_client(url, chars, start, fields):
    """(seconds from the burst's start to the first character, characters received). A lean
    client: raw HTTP/1.1 over asyncio, the chunked SSE body parsed by hand, so that the clients,
    which share the machine with the server, cost it as little as they can."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "Model", "messages": [{"role": "user", "content": "Tell me a story."}],
                       "max_tokens": chars, "stream": True, **fields}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(body), body))  # a loopback server checks Host
    await reader.readuntil(b"\r\n\r\n")  # status line and headers
    first, received, pending = None, 0, b""
    while (size := int((await reader.readline()).strip(), 16)) > 0:  # chunked transfer encoding
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {") and b'"content"' in event:
                for choice in json.loads(event[6:])["choices"]:
                    received += len(choice["delta"].get("content") or "")
                    first = first or (time.perf_counter() - start if received else None)
    writer.close()
    return first, received


def burst(url, clients, chars, fields=None):
    """Every client at once, each request with `fields` added; (aggregate characters/s, first-character times)."""
    async def together():
        return await asyncio.gather(*(one_client(url, chars, start, fields or {}) for _ in range(clients)))

    start = time.perf_counter()
    results = asyncio.run(together())
    seconds = time.perf_counter() - start
    if any(received != chars for _, received in results):
        raise SystemExit(f"a client got {[r for _, r in results]} characters, not {chars}")
    return clients * chars / seconds, sorted(first for first, _ in results)


def measure(root, checkpoint, max_batch, clients, options, extra=(), fields=None):
    """(chars/s, first-character times) of one burst on a fresh server."""
    proc, url = start_server(root, checkpoint, max_batch, options["threads"], extra)
    try:
        burst(url, 2, 20, fields)  # warm up the server's first steps
        return burst(url, clients, options["chars"], fields)
    finally:
        proc.terminate()
        proc.wait()


def main(argv):
    options = parse_cli(argv, CONFIG, __file__)[0]
    checkpoint = os.path.join(tempfile.mkdtemp(prefix="lumina-serve-"), "Model.pth")
    params = endless_model(checkpoint)
    n, ours = options["clients"], ["--dtype=" + options["dtype"], "--compile=" + options["compile"]]
    print(f"model: CPU preset shape, {params:,} params | {n} clients x {options['chars']} chars | "
          f"server threads {options['threads'] or 'default'} | torch {torch.__version__} | {os.cpu_count()} CPUs")
    ways = {f"{n} clients, max_batch {n}": (common.ROOT, checkpoint, n, n, ours),
            f"1 client, max_batch {n}": (common.ROOT, checkpoint, n, 1, ours)}
    if options["logprobs"] >= 0:
        ways[f"{n} clients, max_batch {n}, logprobs top {options['logprobs']}"] = (
            common.ROOT, checkpoint, n, n, ours, {"logprobs": True, "top_logprobs": options["logprobs"]})
    for other in filter(None, options["also_compile"].split(",")):
        extra = ["--dtype=" + options["dtype"], "--compile=" + other]
        ways[f"{n} clients, max_batch {n}, compile {other}"] = (common.ROOT, checkpoint, n, n, extra)
        ways[f"1 client, max_batch {n}, compile {other}"] = (common.ROOT, checkpoint, n, 1, extra)
    if options["serial"]:
        ways[f"{n} clients, max_batch 1"] = (common.ROOT, checkpoint, 1, n, ours)
    if options["peer"]:
        peer, old_file = release_tree(options["peer"]), peer_copy(checkpoint)
        ways[f"{n} clients, max_batch {n}, {options['peer']}"] = (peer, old_file, n, n, [])
        ways[f"1 client, max_batch {n}, {options['peer']}"] = (peer, old_file, n, 1, [])
    results = {way: [] for way in ways}
    for round_ in range(options["rounds"]):
        for way, (root, model_file, max_batch, clients, extra, *fields) in ways.items():  # taking turns
            rate, firsts = measure(root, model_file, max_batch, clients, options, extra, *fields)
            results[way].append(rate)
            p95 = firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))]
            print(f"round {round_ + 1} {way}: {rate:,.0f} chars/s | first character p50 "
                  f"{statistics.median(firsts):.3f} s, p95 {p95:.3f} s", flush=True)
    mean = {way: statistics.mean(rates) for way, rates in results.items()}
    first = next(iter(mean))
    print("mean: " + " | ".join(f"{way} {rate:,.0f} chars/s" for way, rate in mean.items()))
    print(f"{first} against the others: " + " | ".join(f"{mean[first] / rate:.1f}x {way}" for way, rate in mean.items()
                                                       if way != first))


if __name__ == "__main__":
    main(sys.argv[1:])
