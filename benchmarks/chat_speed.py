"""Generation speed of ChatAI's path (model.generate with the KV cache) against uncached generation
that re-runs the model over the whole context for every character. Two uncached peers:
  plain     the textbook loop (nanoGPT's generate): the last seq_length ids, every character;
  rule      model.generate(use_cache=False): the same window rule as the cached path (a re-read
            keeps the most recent 3/4 window), so its contexts are 3/4 to 4/4 of a window.

For a model of the default CPU preset's shape (random weights: speed does not depend on them) it
reports, cached and uncached, taking turns:
  - time to the first character after a 500-character prompt;
  - characters/s at a 100-character context and at the full context (the window already full,
    so the window rule's re-reads are included);
  - cached per-character cost at several context lengths, to show it stays flat.

The cached path is measured eager (ChatAI's default) and compiled (ChatAI --compile=True).

Run:  python benchmarks/chat_speed.py [--threads=1] [--rounds=3] [--compile=False]
"""
import sys
import time

import torch

import common  # noqa: E402,F401  (puts the project on sys.path)
import ChatAI  # noqa: E402
from lumina.config import parse_cli  # noqa: E402
from lumina.device import seeded_generator  # noqa: E402
from lumina.engine import generate  # noqa: E402
from lumina.model import CharTransformer, ModelConfig  # noqa: E402
from lumina.plan import PRESETS  # noqa: E402
from lumina.vocab import SPECIAL_TOKENS  # noqa: E402

CONFIG = {
    "threads": 1,      # CPU threads for generation (ChatAI's default is 1)
    "rounds": 3,       # turns taken by every way of generating; the best of each is kept
    "chars": 200,      # characters generated per measurement
    "compile": True,   # also measure ChatAI --compile=True (adds a compile of ~35 s)
}


@torch.inference_mode()
def plain_generate(net, prompt, n, seed):
    """The textbook uncached loop: every new id re-runs the model over the last seq_length ids and
    samples among the 40 likeliest."""
    ids, generator = list(prompt), seeded_generator(seed)
    for _ in range(n):
        logits, _ = net(torch.tensor([ids[-net.config.seq_length:]]))
        top = logits[0, -1].topk(40)
        ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)]))
        yield ids[-1]


def timed_generate(stream_of, prompt, n):
    """(seconds to the first id, ids/s over the next n-1 ids) of stream_of(prompt, n, seed)."""
    start = time.perf_counter()
    stream = stream_of(prompt, n, 0)
    next(stream)
    first = time.perf_counter()
    count = sum(1 for _ in stream)
    return first - start, count / (time.perf_counter() - first)


def main(argv):
    settings = parse_cli(argv, CONFIG, __file__)[0]
    torch.set_num_threads(settings["threads"])
    shape = {k: v for k, v in PRESETS["cpu"].items() if k in ("hidden_size", "num_layers", "nhead", "seq_length")}
    torch.manual_seed(0)
    net = CharTransformer(ModelConfig(vocab_size=120, **shape)).eval()
    T, n = shape["seq_length"], settings["chars"]
    prompt = lambda length: torch.randint(len(SPECIAL_TOKENS), 120, (length,)).tolist()
    print(f"model: CPU preset {shape}, {net.num_params():,} params | threads {settings['threads']} | torch {torch.__version__}")
    cached = lambda model: lambda p, n, seed: generate(model, p, n, 1.0, 40, stop_ids=(), seed=seed)
    ways = {"cached": cached(net),
            "plain": lambda p, n, seed: plain_generate(net, p, n, seed),
            "rule": lambda p, n, seed: generate(net, p, n, 1.0, 40, stop_ids=(), seed=seed, use_cache=False)}
    if settings["compile"]:
        start = time.perf_counter()
        ways = {"compiled": cached(ChatAI.compile_for_chat(net, "cpu")), **ways}
        print(f"compile_for_chat (ChatAI --compile=True): {time.perf_counter() - start:.1f} s")
    ours = [way for way in ways if way in ("cached", "compiled")]
    cases = {"first char, 500-char prompt": (500, 1), "100-char context": (100, n), "full context": (T + 50, n)}
    results = {}
    for _ in range(settings["rounds"]):  # take turns, keep the best of each
        for name, (length, count) in cases.items():
            for way, stream_of in ways.items():
                first, rate = timed_generate(stream_of, prompt(length), max(count, 2))
                best = results.get((name, way), (float("inf"), 0.0))
                results[(name, way)] = (min(best[0], first), max(best[1], rate))
    for name in cases:
        if name.startswith("first"):
            print(f"{name}: " + " | ".join(f"{way} {results[(name, way)][0] * 1000:.1f} ms" for way in ways))
            continue
        print(f"{name}: " + " | ".join(f"{way} {results[(name, way)][1]:.0f} chars/s" for way in ways))
        for way in ours:
            rate = results[(name, way)][1]
            print(f"  {way} vs uncached: " + " | ".join(f"{peer} {rate / results[(name, peer)][1]:.1f}x"
                                                       for peer in ("plain", "rule")))
    # Flat cost: ms per character while the context grows inside one window.
    for way in ours:
        costs = [f"{length} chars {1000 / timed_generate(ways[way], prompt(length), 32)[1]:.2f} ms"
                 for length in (8, T // 4, T // 2, T - 40)]
        print(f"{way} cost per character by context: " + " | ".join(costs))


if __name__ == "__main__":
    main(sys.argv[1:])
