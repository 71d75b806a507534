"""How long the page waits for the attention view of one character: POST /lumina/attention to a
real serve.py, with a conversation whose window is full (seq_length characters read in one forward).

The model is the CPU preset's shape (serve_speed.endless_model: random weights; the time of one
forward does not depend on them), or a checkpoint given. Requests go one at a time, first with the
server idle, then while `busy` streaming clients keep its scheduler stepping. Reported: the time
from sending the request to having the whole JSON answer, median, p95 and max.

Run:  python benchmarks/attention_speed.py [--requests=50] [--busy=16] [--checkpoint=PATH]
"""
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time

import httpx
import torch

import common  # noqa: F401  (puts the project on sys.path)
from lumina.checkpoint import load_checkpoint
from lumina.config import parse_cli
from lumina.vocab import Vocab, chat_prompt
from serve_speed import endless_model, one_client, start_server

CONFIG = {
    "requests": 50,      # attention requests per measurement
    "busy": 16,          # streaming clients running during the second measurement; 0 = skip it
    "threads": 0,        # the server's CPU threads; 0 = torch's default
    "checkpoint": None,  # a model to serve; None = the CPU preset's shape with random weights
}
TYPES = {"checkpoint": str}


def conversation(checkpoint):
    """(messages, position): a reply whose character at `position` was written after reading a
    full window, exactly seq_length ids from the start of the text."""
    state = load_checkpoint(checkpoint)
    vocab, seq_length = Vocab(state["vocab"]), state["model_config"]["seq_length"]
    question = [{"role": "user", "content": "Tell me a story."}]
    prompt, _, _ = chat_prompt(question, vocab, seq_length)
    reply = "The quick brown fox jumps over the lazy dog. " * (seq_length // 40 + 2)
    return question + [{"role": "assistant", "content": reply}], seq_length - len(prompt)


def timed_requests(url, body, n):
    seconds = []
    with httpx.Client() as client:
        for _ in range(n):
            start = time.perf_counter()
            answer = client.post(url + "/lumina/attention", json=body)
            answer.raise_for_status()
            answer.json()
            seconds.append(time.perf_counter() - start)
    return sorted(seconds), answer.json()


def report(label, seconds):
    p95 = seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))]
    print(f"{label}: median {1000 * statistics.median(seconds):.1f} ms | p95 {1000 * p95:.1f} ms | "
          f"max {1000 * seconds[-1]:.1f} ms ({len(seconds)} requests)", flush=True)


def keep_busy(url, clients, stop):
    """Streaming clients, again and again until `stop` is set: the scheduler never rests."""
    async def loop():
        while not stop.is_set():
            await asyncio.gather(*(one_client(url, 200, time.perf_counter(), {}) for _ in range(clients)))
    asyncio.run(loop())


def main(argv):
    options = parse_cli(argv, CONFIG, __file__, types=TYPES)[0]
    checkpoint = options["checkpoint"]
    if checkpoint is None:
        checkpoint = os.path.join(tempfile.mkdtemp(prefix="lumina-attention-"), "Model.pth")
        endless_model(checkpoint)
    messages, position = conversation(checkpoint)
    proc, url = start_server(common.ROOT, checkpoint, max(options["busy"], 1), options["threads"])
    try:
        seconds, answer = timed_requests(url, {"messages": messages, "position": position}, options["requests"])
        print(f"model {checkpoint} | window {len(answer['tokens'])} characters | {len(answer['attention'])} layers x "
              f"{len(answer['attention'][0])} heads | torch {torch.__version__} | {os.cpu_count()} CPUs")
        report("idle server", seconds)
        if options["busy"]:
            stop = threading.Event()
            busy = threading.Thread(target=keep_busy, args=(url, options["busy"], stop))
            busy.start()
            time.sleep(2)
            try:
                report(f"beside {options['busy']} streaming clients", timed_requests(url, {"messages": messages, "position": position},
                                                                                      options["requests"])[0])
            finally:
                stop.set()
                busy.join()
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
