"""serve.py under each hostile request of issue 27: does anyone else still get served?

A model of the CPU preset's shape that never ends a turn (serve_speed.endless_model) is served with
16 slots. Each hostile request below is sent on its own thread while this script polls /health
every 50 ms; then an ordinary request is sent beside it. Reported per request: its status, the
slowest /health answer while it ran, and whether the ordinary request got its reply. Last, a
cross-site POST (another site's Origin) and a text/plain POST must be refused.

Run:  python benchmarks/hostile_requests.py [--seconds=3]
"""
import json
import os
import statistics
import tempfile
import threading
import time

import httpx

import common  # noqa: F401  (puts the project on sys.path)
from lumina.config import parse_cli
from serve_speed import endless_model, start_server

CONFIG = {
    "seconds": 3.0,  # how long /health is polled while each hostile request runs
    "threads": 0,    # the server's CPU threads; 0 = torch's default
}
MESSAGE = [{"role": "user", "content": "go"}]


def hostile_requests():
    """(name, body) of each request that once froze or crashed the server."""
    longest_stops = ["abcdefghij" * 25] * 4  # 250 characters each, near the 256 allowed; never completed
    return [
        ("none: 16 ordinary replies of 2,000 characters (the baseline)", {"messages": MESSAGE, "n": 16, "max_tokens": 2000}),
        ("4 stop strings of 200,000 characters, n=16", {"messages": MESSAGE, "n": 16, "stop": ["a" * 200_000] * 4,
                                                         "max_tokens": 2000}),
        ("4 stop strings of 250 characters, n=16, 2,000 characters each", {
            "messages": MESSAGE, "n": 16, "stop": longest_stops, "max_tokens": 2000}),
        ("1 MB of empty messages (28,000)", {"messages": [{"role": "user", "content": ""}] * 28_000, "max_tokens": 5}),
        ("999 messages of 900 characters", {"messages": [{"role": ("user", "assistant")[i % 2], "content": "x" * 900}
                                                         for i in range(999)], "max_tokens": 5}),
        ("JSON nested 400,000 deep", b"[" * 400_000 + b"]" * 400_000),
    ]


def run_beside(url, body, seconds):
    """(status of the hostile request, median and slowest /health in ms, the ordinary request's reply length)."""
    result, times = {}, []
    content = body if isinstance(body, bytes) else json.dumps({"model": "Model", **body}).encode()

    def send():
        result["status"] = httpx.post(url + "/v1/chat/completions", content=content, timeout=600,
                                      headers={"Content-Type": "application/json"}).status_code

    worker = threading.Thread(target=send)
    worker.start()
    deadline = time.time() + seconds
    with httpx.Client(timeout=600) as client:  # one connection: the poll times the server, not the client's set-up
        while time.time() < deadline:
            start = time.perf_counter()
            client.get(url + "/health")
            times.append(time.perf_counter() - start)
            time.sleep(0.05)
    ordinary = httpx.post(url + "/v1/chat/completions", timeout=600, json={"model": "Model", "messages": MESSAGE,
                                                                          "max_tokens": 20})
    worker.join()
    reply = ordinary.json()["choices"][0]["message"]["content"] if ordinary.status_code == 200 else ""
    return result["status"], statistics.median(times) * 1000, max(times) * 1000, len(reply)


def refused(url):
    """Status codes of a cross-site JSON POST and of a text/plain POST from the server's own origin."""
    body = json.dumps({"model": "Model", "messages": MESSAGE, "max_tokens": 5})
    cross = httpx.post(url + "/v1/chat/completions", content=body, headers={
        "Content-Type": "application/json", "Origin": "http://evil.example"}).status_code
    plain = httpx.post(url + "/v1/chat/completions", content=body, headers={
        "Content-Type": "text/plain", "Origin": url}).status_code
    return cross, plain


def main(argv):
    config, _, _ = parse_cli(argv, CONFIG, __file__)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "Model.pth")
        endless_model(checkpoint)
        proc, url = start_server(common.ROOT, checkpoint, 16, config["threads"], ["--model_name=Model"])
        try:
            print("| hostile request | its answer | /health while it ran: median, slowest | an ordinary request beside it |")
            print("|---|---|---|---|")
            for name, body in hostile_requests():
                status, median, slowest, reply = run_beside(url, body, config["seconds"])
                print(f"| {name} | {status} | {median:.0f} ms, {slowest:.0f} ms | {'served' if reply == 20 else 'NOT served'} "
                      f"({reply} of 20 characters) |", flush=True)
            cross, plain = refused(url)
            print(f"| a POST with another site's Origin | {cross} | | |")
            print(f"| a text/plain POST (a form or a 'simple' cross-site request) | {plain} | | |")
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
