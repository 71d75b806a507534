"""The generation engine, without HTTP: how far batching multiplies characters/s, what one batched
draw costs a row, and one chat stream against the single-sequence generation of an older release.

For a model of the CPU preset's shape (random weights and the vocabulary size of the real text:
speed does not depend on the weights), taking turns:
  1. rows: 1, 8, 16 and 64 rows at once, each a 60-character prompt and a `chars`-character reply
     (past the window, so re-reads are included); characters/s of the whole batch, and the ratio
     to one row. Each row count runs in the precision that --dtype names; auto is what serve.py
     picks with max_batch that many rows (lumina.engine.generation_dtype, timed), the weights cast to it;
  2. sampling: the cost of one batched draw (engine.choose) per row at 64 rows, for the default
     settings (temperature 0.8, top-k 40), nucleus (top-p 0.9), and with a repetition penalty;
  3. chat: one greedy stream (ChatAI's default threads, 1) of the same weights through this
     engine (and its compiled decode step, with --compile=True) and through model.py of release
     `peer` (read from git), after a window-filling prompt; the texts must be identical;
  4. precision (with --precision_widths): steady-state characters/s of 1, 16 and 64 rows for models
     of those widths in float32, in bf16 autocast, and with the weights cast to bf16 (what ChatAI
     and serve.py do): what the timed trial of lumina.engine.generation_dtype decides among.

Run:  python benchmarks/engine_speed.py [--rounds=3] [--threads=2] [--peer=d26845d] [--compile=True]
      python benchmarks/engine_speed.py --rounds=2 --peer= --precision_widths=128,256,512
"""
import copy
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

import common  # noqa: F401  (puts the project on sys.path)
from lumina.config import parse_cli
from lumina.device import seeded_generator
from lumina.engine import Engine, Row, Sampling, choose, compile_buckets, generate, generation_dtype, recent_ids, row_keys
from lumina.model import CharTransformer, ModelConfig
from lumina.plan import PRESETS
from lumina.vocab import SPECIAL_TOKENS

CONFIG = {
    "rounds": 3,          # turns taken by every measurement; the best of each is kept
    "threads": 2,         # CPU threads for parts 1 and 2 (serve.py uses torch's default: every core)
    "chars": 400,         # reply length per row in part 1
    "vocab": 1335,        # vocabulary size: the real OASST1 English text's
    "peer": "d26845d",    # part 3: the release whose model.py is the single-stream peer; "" skips it
    "dtype": "auto",      # part 1: auto (serve.py's rule for each row count), float32 or bfloat16
    "precision_widths": [],  # part 4: model widths to time in each precision, e.g. 128,256,512; [] skips it
    "compile": False,     # part 1 with the compiled, bucketed decode step (Engine(compile=True)), after a warm-up
}
PRECISION_SHAPES = {128: (4, 4), 256: (4, 4), 384: (6, 6), 512: (8, 8)}  # width -> (layers, heads)
ROWS = (1, 8, 16, 64)


def preset_model(vocab_size):
    shape = {k: v for k, v in PRESETS["cpu"].items() if k in ("hidden_size", "num_layers", "nhead", "seq_length")}
    torch.manual_seed(0)
    return CharTransformer(ModelConfig(vocab_size=vocab_size, **shape)).eval()


def prompt(vocab_size, length, seed):
    return torch.randint(len(SPECIAL_TOKENS), vocab_size, (length,), generator=seeded_generator(seed)).tolist()


def batch_rate(net, rows_n, chars, compile=False):
    """Characters/s of rows_n rows generated together, each a `chars`-character reply (compiled:
    every bucket is compiled before the clock starts)."""
    engine = Engine(net, rows_n, compile=compile)
    if compile:
        compile_buckets(engine)
    rows = [Row(prompt(net.config.vocab_size, 60, i), chars, slot=i, top_k=40, seed=i, stop_ids=())
            for i in range(rows_n)]
    start = time.perf_counter()
    while live := [row for row in rows if not row.done]:
        engine.step(live)
    return rows_n * chars / (time.perf_counter() - start)


def draw_cost(vocab_size, settings, rows_n=64, calls=200):
    """Microseconds per row of one batched draw over rows_n rows."""
    logits = torch.randn(rows_n, vocab_size, generator=seeded_generator(0)) * 3
    rows = [Row(prompt(vocab_size, 70, i), 100, slot=i, seed=i, **settings) for i in range(rows_n)]
    sampling = Sampling.of(rows, vocab_size, logits.device)
    keys = row_keys(sampling.keys, range(rows_n), logits.device)
    recent = recent_ids(rows, logits.device) if sampling.penalty_used else None
    choose(logits, sampling, keys, recent)
    start = time.perf_counter()
    for _ in range(calls):
        choose(logits, sampling, keys, recent)
    return (time.perf_counter() - start) / calls / rows_n * 1e6


def peer_model(release, net):
    """model.py of an older release, loaded from git into a temporary folder, with net's weights."""
    folder = tempfile.mkdtemp(prefix="lumina-peer-")
    for name in ("model.py", "data.py", "config.py"):
        source = subprocess.run(["git", "-C", common.ROOT, "show", f"{release}:{name}"], capture_output=True, text=True)
        if source.returncode:
            raise SystemExit(f"cannot read {name} of release {release}: {source.stderr.strip()}")
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(source.stdout)
    sys.path.insert(0, folder)  # its model.py imports its own data.py
    spec = importlib.util.spec_from_file_location("peer_model", os.path.join(folder, "model.py"))
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    sys.path.remove(folder)
    # Only the keys that release knew: the later ones (n-gram tables, QK-norm, soft-cap) are off here.
    known = {field.name for field in dataclasses.fields(old.ModelConfig)}
    peer = old.CharTransformer(old.ModelConfig(**{k: v for k, v in vars(net.config).items() if k in known})).eval()
    peer.load_state_dict(net.state_dict())
    return old, peer


def stream_rate(stream):
    """(ids, ids/s after the first) of a generator of ids."""
    first = next(stream)
    start = time.perf_counter()
    rest = list(stream)
    return [first] + rest, len(rest) / (time.perf_counter() - start)


def steady_rate(net, rows_n, dtype=None, steps=40):
    """Characters/s of rows_n rows stepping together after their prompts are read (no re-reads)."""
    engine = Engine(net, rows_n, dtype)
    rows = [Row(prompt(net.config.vocab_size, 100, i), 10 ** 6, slot=i, seed=i, top_k=40) for i in range(rows_n)]
    for _ in range(6):
        engine.step(rows)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(rows)
    return steps * rows_n / (time.perf_counter() - start)


def precision(widths, vocab, rounds):
    """Part 4: float32, bf16 autocast and bf16 weights, at 1, 16 and 64 rows, per width."""
    for width in widths:
        layers, heads = PRECISION_SHAPES.get(width, (4, 4))
        torch.manual_seed(0)
        net = CharTransformer(ModelConfig(vocab_size=vocab, seq_length=256, hidden_size=width, num_layers=layers,
                                          nhead=heads)).eval()
        ways = {"float32": (net, None), "bf16 autocast": (net, torch.bfloat16),
                "bf16 weights": (copy.deepcopy(net).to(torch.bfloat16), None)}
        best = {}
        for _ in range(rounds):
            for rows_n in (1, 16, 64):
                for way, (model, dtype) in ways.items():
                    best[rows_n, way] = max(best.get((rows_n, way), 0.0), steady_rate(model, rows_n, dtype))
        print(f"precision, width {width}, {layers} layers: " + " | ".join(
            f"{n} rows: " + ", ".join(f"{way} {best[n, way]:,.0f}" for way in ways)
            + f" ({best[n, 'bf16 weights'] / best[n, 'float32']:.2f}x)" for n in (1, 16, 64)), flush=True)


def main(argv):
    options = parse_cli(argv, CONFIG, __file__, types={"precision_widths": list})[0]
    net = preset_model(options["vocab"])
    print(f"model: CPU preset shape, {net.num_params():,} params, vocabulary {options['vocab']} | "
          f"threads {options['threads']} | torch {torch.__version__}")
    # --- 1. rows at once ---
    torch.set_num_threads(options["threads"])
    rates, dtypes = {}, {n: generation_dtype(net, options["dtype"], (1, n))[0] for n in ROWS}
    models = {dtype: copy.deepcopy(net).to(dtype) for dtype in set(dtypes.values())}
    for _ in range(options["rounds"]):
        for rows_n in ROWS:
            rates[rows_n] = max(rates.get(rows_n, 0.0), batch_rate(models[dtypes[rows_n]], rows_n, options["chars"],
                                                                   options["compile"]))
    print(("compiled " if options["compile"] else "") + "rows at once: " + " | ".join(f"{n} ({str(dtypes[n])[6:]}): {rates[n]:,.0f} chars/s ({rates[n] / rates[1]:.1f}x)"
                                        for n in ROWS))
    # --- 2. one batched draw ---
    for name, settings in (("top-k 40", dict(temperature=0.8, top_k=40)), ("top-p 0.9", dict(temperature=0.8, top_p=0.9)),
                           ("top-k 40, penalty 1.2", dict(temperature=0.8, top_k=40, repetition_penalty=1.2))):
        cost = min(draw_cost(options["vocab"], settings) for _ in range(options["rounds"]))
        print(f"sampling at 64 rows, {name}: {cost:.2f} us a row")
    if options["precision_widths"]:
        precision([int(w) for w in options["precision_widths"]], options["vocab"], options["rounds"])
    # --- 3. one chat stream against the peer release ---
    if options["peer"]:
        torch.set_num_threads(1)
        old, peer = peer_model(options["peer"], net)
        ids = prompt(options["vocab"], net.config.seq_length + 50, 7)
        ways = {"engine": lambda: generate(net, ids, 300, temperature=0, stop_ids=()),
                options["peer"]: lambda: old.generate(peer, ids, 300, temperature=0, stop_ids=())}
        if options["compile"]:  # ChatAI's compiled decode step (its graph compiled in part 1's warm-up or here)
            ways["engine compiled"] = lambda: generate(net, ids, 300, temperature=0, stop_ids=(), compile=True)
        best, texts = {}, {}
        for _ in range(options["rounds"]):
            for way, stream in ways.items():
                texts[way], rate = stream_rate(stream())
                best[way] = max(best.get(way, 0.0), rate)
        same = all(text == texts["engine"] for text in texts.values())
        print("one greedy stream, 1 thread, window full: " + " | ".join(
            f"{way} {rate:,.0f} chars/s ({rate / best[options['peer']]:.2f}x)" for way, rate in best.items()) +
            f" | identical text: {same}")


if __name__ == "__main__":
    main(sys.argv[1:])
