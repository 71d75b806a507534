"""Training speed and quality of Train.py against the reference trainer, side by side.

The peer is ../shared/bench/ref_gpt.py: a plain fp32, eager, nanoGPT-like trainer. Both run on
the same real text (../shared/data/oasst1/oasst1_train_en_text.jsonl, its last 5% of rows held out
for validation, as the reference does), taking turns (A B A B ...), because these machines are
shared and noisy and only ratios measured in one run mean anything.

It reports:
  1. throughput at nanoGPT's documented CPU shape (4 layers, 4 heads, width 128, context 64,
     batch 12): tokens/s of each, the ratio, and model FLOPs utilisation against the fp32 and bf16
     matmul peaks measured in the same run;
  2. val bits/char of the reference and of Train.py's default CPU preset after the same
     wall-clock budget;
  3. (compile_minutes) Train.py eager against compiled, and the budget after which compiling pays.

Run (about 2 x rounds x seconds + 2 (3 with also_args) x budget_rounds x budget_minutes
+ 2 x compile_minutes, plus start-up):
  python benchmarks/train_speed.py                                   # 2 rounds of 60 s, then 10 min each
  python benchmarks/train_speed.py --rounds=0 --budget_rounds=2      # only part 2, twice, taking turns
  python benchmarks/train_speed.py --seconds=20 --rounds=1 --budget_minutes=0   # a quick look
  python benchmarks/train_speed.py --rounds=0 --train_args="--optimizer=adamw --batch_size=4"   # another setting
  python benchmarks/train_speed.py --rounds=0 --budget_minutes=0 --compile_minutes=3   # when compiling pays
  python benchmarks/train_speed.py --rounds=0 --also_args="--optimizer=adamw --batch_size=4 --learning_rate=3e-3"
                                    # each round: ref, the default, and Train.py with those options
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from common import ROOT, TEXT, split_text
from lumina.config import parse_cli

REF = os.path.join(ROOT, "..", "shared", "bench", "ref_gpt.py")
NANOGPT_SHAPE = dict(num_layers=4, nhead=4, hidden_size=128, seq_length=64, batch_size=12)
CONFIG = {
    "seconds": 60.0,         # length of each throughput run
    "rounds": 2,             # throughput pairs at the nanoGPT shape, taking turns; 0 skips part 1
    "budget_minutes": 10.0,  # training budget of each bits/char run; 0 skips part 2
    "budget_rounds": 1,      # bits/char pairs, taking turns
    "compile": "auto",       # Train.py --compile for parts 1 and 2 (auto, true or false)
    "compile_minutes": 0.0,  # part 3: Train.py's CPU preset this long eager, then compiled; 0 skips it
    "train_args": "",        # more Train.py options for part 2, e.g. "--optimizer=adamw --batch_size=4"
    "also_args": "",         # part 2: also run Train.py with these options in each round, e.g. the other optimizer
}


def matmul_peak(dtype, n=1024, seconds=3.0):
    """Sustained FLOP/s of an n x n x n matmul on this machine, now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.time()
    while time.time() - start < seconds or count < 2:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.time() - start)


def flops_per_token(params, layers, width, context):
    """nanoGPT's estimate: 6 per parameter plus attention's 12 * layers * width * context."""
    return 6 * params + 12 * layers * width * context


def run_ref(seconds, shape):
    args = [str(shape[k]) for k in ("num_layers", "nhead", "hidden_size", "seq_length", "batch_size")]
    out = subprocess.run([sys.executable, REF, TEXT, str(seconds), *args], capture_output=True, text=True, check=True)
    found = re.search(r"ref tok/s (\d+) val_bpc ([\d.]+) steps (\d+) params (\d+)", out.stdout)
    return {"tok_s": float(found[1]), "val_bpc": float(found[2]), "steps": int(found[3]), "params": int(found[4])}


def run_ours(data, out_dir, minutes, shape, compile_, eval_windows=64, extra=()):
    """Train.py for `minutes`, evaluated only at the end. tok/s is the steady state: log intervals
    after the first, which holds start-up and compilation (reported separately)."""
    for name in ("train_metrics.jsonl", "train_state.pth", "Model.pth"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    args = [f"--{k}={v}" for k, v in shape.items()]
    cmd = [sys.executable, os.path.join(ROOT, "Train.py"), f"--data={data}", f"--out_dir={out_dir}",
           f"--max_minutes={minutes}", "--max_iters=100000000", "--eval_interval=100000000", "--log_interval=20",
           "--probe_chars=0", f"--eval_windows={eval_windows}", f"--compile={compile_}", *args, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"Train.py failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(out_dir, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    logs = [r for r in rows if "tok_s" in r]
    steady = logs[1:] or logs
    params = int(re.search(r"model: ([\d,]+) parameters", out.stdout)[1].replace(",", ""))
    return {"tok_s": sum(r["tok_s"] for r in steady) / len(steady), "first_interval_s": logs[0]["ms"] * 20 / 1000,
            "val_bpc": [r for r in rows if "val_bpc" in r][-1]["val_bpc"], "steps": logs[-1]["step"], "params": params}


def main(argv):
    settings = parse_cli(argv, CONFIG, __file__)[0]
    work = tempfile.mkdtemp(prefix="lumina-bench-")
    data = split_text(work)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print("matmul peak now: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    if settings["rounds"] > 0:
        throughput(settings, data, work, peaks)
    # --- 2. val bits/char for the same wall-clock budget, taking turns ---
    gaps = []
    for _ in range(settings["budget_rounds"] if settings["budget_minutes"] > 0 else 0):
        ref = run_ref(settings["budget_minutes"] * 60, NANOGPT_SHAPE)
        ours = run_ours(data, work, settings["budget_minutes"], {}, settings["compile"], eval_windows=1200,
                        extra=settings["train_args"].split())
        gaps.append(ref["val_bpc"] - ours["val_bpc"])
        print(f"{settings['budget_minutes']:g} min each: ref {ref['val_bpc']:.3f} bits/char ({ref['steps']} steps, "
              f"{ref['params']:,} params) | Train.py CPU preset {settings['train_args']} {ours['val_bpc']:.3f} "
              f"bits/char ({ours['steps']} steps, {ours['params']:,} params) | {gaps[-1]:+.3f} better", flush=True)
        if settings["also_args"]:
            also = run_ours(data, work, settings["budget_minutes"], {}, settings["compile"], eval_windows=1200,
                            extra=settings["also_args"].split())
            print(f"  and Train.py {settings['also_args']}: {also['val_bpc']:.3f} bits/char ({also['steps']} steps) | "
                  f"{ref['val_bpc'] - also['val_bpc']:+.3f} better than ref", flush=True)
    if len(gaps) > 1:
        print(f"mean over {len(gaps)} rounds: {sum(gaps) / len(gaps):+.3f} better")
    if settings["compile_minutes"] > 0:
        compile_payback(settings, data, work)


def compile_payback(settings, data, work):
    """Part 3: the budget after which torch.compile pays back its compile time: the extra start-up
    divided by the share of each step it saves. Never, when compiled steps are not faster."""
    runs = {c: run_ours(data, work, settings["compile_minutes"], {}, c, extra=settings["train_args"].split())
            for c in ("false", "true")}
    eager, compiled = runs["false"], runs["true"]
    saved = 1 - eager["tok_s"] / compiled["tok_s"]  # share of a step's time compiling saves
    extra = compiled["first_interval_s"] - eager["first_interval_s"]
    pays = f"after {extra / saved / 60:.1f} min" if saved > 0 else "never"
    print(f"compile: eager {eager['tok_s']:,.0f} tok/s | compiled {compiled['tok_s']:,.0f} tok/s "
          f"({compiled['tok_s'] / eager['tok_s']:.2f}x) | first 20 steps {eager['first_interval_s']:.1f} s eager, "
          f"{compiled['first_interval_s']:.1f} s compiled | compiling pays back {pays}")


def throughput(settings, data, work, peaks):
    """Part 1: tokens/s at the nanoGPT shape, taking turns, and MFU against the measured peaks."""
    ref_runs, our_runs = [], []
    for round_ in range(settings["rounds"]):
        ref_runs.append(run_ref(settings["seconds"], NANOGPT_SHAPE))
        our_runs.append(run_ours(data, work, settings["seconds"] / 60, NANOGPT_SHAPE, settings["compile"]))
        print(f"round {round_ + 1}: ref {ref_runs[-1]['tok_s']:,.0f} tok/s | Train.py {our_runs[-1]['tok_s']:,.0f} tok/s "
              f"(first 20 steps incl. start-up/compile: {our_runs[-1]['first_interval_s']:.1f} s)")
    ref_tok = sum(r["tok_s"] for r in ref_runs) / len(ref_runs)
    our_tok = sum(r["tok_s"] for r in our_runs) / len(our_runs)
    print(f"nanoGPT shape: ref {ref_tok:,.0f} tok/s | Train.py {our_tok:,.0f} tok/s | ratio {our_tok / ref_tok:.2f}x")
    for name, peak in peaks.items():
        print(f"  MFU vs {name} peak: ref {ref_tok * flops_per_token(ref_runs[0]['params'], 4, 128, 64) / peak:.1%} | "
              f"Train.py {our_tok * flops_per_token(our_runs[0]['params'], 4, 128, 64) / peak:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
