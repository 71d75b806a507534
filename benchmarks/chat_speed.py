"""Generation speed of ChatAI's path (model.generate with the KV cache) against plain uncached
generation that re-runs the model over the whole window for every character.

For a model of the default CPU preset's shape (random weights: speed does not depend on them) it
reports, cached and uncached, taking turns:
  - time to the first character after a 500-character prompt;
  - characters/s at a 100-character context and at the full context (the window already full,
    so the window rule's re-reads are included);
  - cached per-character cost at several context lengths, to show it stays flat.

Run:  python benchmarks/chat_speed.py [--threads=1] [--rounds=3]
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import Train  # noqa: E402
from common import parse_options  # noqa: E402

SETTINGS = {"threads": 1, "rounds": 3, "chars": 200}


def timed_generate(net, prompt, n, use_cache):
    """(seconds to the first id, ids/s over the next n-1 ids)."""
    start = time.perf_counter()
    stream = M.generate(net, prompt, n, temperature=1.0, top_k=40, stop_ids=(), use_cache=use_cache,
                        generator=torch.Generator().manual_seed(0))
    next(stream)
    first = time.perf_counter()
    count = sum(1 for _ in stream)
    return first - start, count / (time.perf_counter() - first)


def main(argv):
    settings = parse_options(argv, SETTINGS)
    torch.set_num_threads(settings["threads"])
    shape = {k: v for k, v in Train.PRESETS["cpu"].items() if k in ("hidden_size", "num_layers", "nhead", "seq_length")}
    torch.manual_seed(0)
    net = M.CharTransformer(M.ModelConfig(vocab_size=120, **shape)).eval()
    T, n = shape["seq_length"], settings["chars"]
    prompt = lambda length: torch.randint(len(M.SPECIAL_TOKENS), 120, (length,)).tolist()
    print(f"model: CPU preset {shape}, {net.num_params():,} params | threads {settings['threads']} | torch {torch.__version__}")
    cases = {"first char, 500-char prompt": (500, 1), "100-char context": (100, n), "full context": (T + 50, n)}
    results = {}
    for _ in range(settings["rounds"]):  # take turns, keep the best of each
        for name, (length, count) in cases.items():
            for use_cache in (True, False):
                first, rate = timed_generate(net, prompt(length), max(count, 2), use_cache)
                key = (name, use_cache)
                best = results.get(key, (float("inf"), 0.0))
                results[key] = (min(best[0], first), max(best[1], rate))
    for name in cases:
        (c_first, c_rate), (u_first, u_rate) = results[(name, True)], results[(name, False)]
        if name.startswith("first"):
            print(f"{name:<30} cached {c_first * 1000:7.1f} ms | uncached {u_first * 1000:7.1f} ms")
        else:
            print(f"{name:<30} cached {c_rate:7.0f} chars/s | uncached {u_rate:7.0f} chars/s | {c_rate / u_rate:.1f}x")
    # Flat cost: cached ms per character while the context grows inside one window.
    costs = []
    for length in (8, T // 4, T // 2, T - 40):
        _, rate = timed_generate(net, prompt(length), 32, True)
        costs.append(f"{length} chars {1000 / rate:.2f} ms")
    print("cached cost per character by context: " + " | ".join(costs))


if __name__ == "__main__":
    main(sys.argv[1:])
