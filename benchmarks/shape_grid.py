"""The measurements behind Train.py's shape-by-budget rule (lumina.plan.choose_shape): train a
grid of model sizes at several budgets on the real text (its last 5% held out, as train_speed.py),
two runs at a time on one CPU thread each, and print each run's size, speed, the characters it
read per parameter and its val bits/char (1,200 windows). The best size at each budget, and how
many characters per parameter it read, is what the rule is fitted to.

Sizes are depths of the rule's own family (lumina.plan.depth_shape: width 32 x depth, heads of 32),
at the CPU preset's context, batch and learning rate, so that size is the only thing that varies.

With --rule it trains nothing: it prints the shape Train.py's rule picks on this machine (its
candidates timed here, on every thread) for each of those budgets, on the same text.

Run (about budgets x ceil(depths / 2) runs of each budget):
  python benchmarks/shape_grid.py --depths=4,5,6,8 --budgets=4,12
  python benchmarks/shape_grid.py --depths=4,6 --budgets=60 --extra="--seq_length=512"
  python benchmarks/shape_grid.py --rule --budgets=5,15,60,240     # what the rule picks here, in seconds
"""
import concurrent.futures
import json
import os
import sys
import tempfile

import torch

from common import split_text
from lumina.config import parse_cli
from lumina.corpus import load_data
from lumina.model import ModelConfig
from lumina.plan import PRESETS, TrainConfig, choose_shape, depth_shape, step_timer
from lumina.training import Runtime
from train_speed import run_ours

CONFIG = {
    "depths": "4,5,6,8",  # model sizes (lumina.plan.depth_shape), comma-separated
    "budgets": "4,12",    # minutes of each run, comma-separated
    "extra": "",          # more Train.py options for every run
    "out": "",            # also append one JSON line per run to this file
    "rule": False,        # True: print the rule's shape for each budget on this machine, train nothing
}


def run(data, minutes, depth, extra):
    shape = {**depth_shape(depth), "seq_length": PRESETS["cpu"]["seq_length"], "batch_size": PRESETS["cpu"]["batch_size"]}
    result = run_ours(data, tempfile.mkdtemp(prefix="lumina-grid-"), minutes, shape, "false", 1200,
                      ["--threads=1", *extra.split()])
    chars = result["tok_s"] * minutes * 60  # characters read, at its steady speed
    blocks = ModelConfig(vocab_size=1, **depth_shape(depth)).block_params()  # what the rule counts (not the n-gram tables)
    return dict(minutes=minutes, depth=depth, **shape, params=result["params"], block_params=blocks,
                steps=result["steps"], chars_s=round(result["tok_s"]), chars_per_param=round(chars / blocks, 2),
                val_bpc=round(result["val_bpc"], 4), extra=extra)


def show_rule(data, budgets):
    """The rule's choice for each budget, timed on this machine (as Train.py does before its loop)."""
    found = load_data(data, os.path.join(data, ".lumina_cache"), 0.05, False, 0, log=lambda *a: None)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    runtime = Runtime(torch.device("cpu"))
    for minutes in budgets:
        config = TrainConfig(max_minutes=minutes, max_iters=10 ** 9)
        choose_shape(config, len(found.vocab), len(found.train), "cpu", print, step_timer(found.vocab, runtime, "float32"))


def main(argv):
    settings = parse_cli(argv, CONFIG, __file__)[0]
    data = split_text(tempfile.mkdtemp(prefix="lumina-grid-"))
    if settings["rule"]:
        return show_rule(data, [float(m) for m in str(settings["budgets"]).split(",")])
    depths = [int(d) for d in str(settings["depths"]).split(",")]
    for minutes in (float(m) for m in str(settings["budgets"]).split(",")):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(run, data, minutes, d, settings["extra"]) for d in depths]
            for job in jobs:
                row = job.result()
                print(f"{row['minutes']:g} min, depth {row['depth']} (width {row['hidden_size']}): {row['block_params']:,} "
                      f"block params, {row['steps']} steps, {row['chars_s']:,} chars/s, {row['chars_per_param']:.2f} "
                      f"chars per block param, val {row['val_bpc']:.3f} bits/char", flush=True)
                if settings["out"]:
                    with open(settings["out"], "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
