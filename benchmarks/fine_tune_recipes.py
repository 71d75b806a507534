"""Fine-tuning recipes compared on what a chatbot needs: does it end its turn, and did it keep what
the base model knew? Each variant is one `python fine_tune.py` run from the same base model on the
same conversations; the table takes both figures from fine_tune.py's own closing line,
`val bits/char A -> B | ends its turn X% -> Y% of N held-out replies`, plus steps and minutes.
With few held-out threads N is small, so the fine-tuned model is also sampled `replies_per_prompt`
times per held-out prompt (other seeds, the same settings: temperature 0.8, top-k 40, 2,000
characters) for a second end-of-turn rate over more replies.

Default data: the 60 real OASST1 validation trees beside the repository (threaded best-path;
whole threads held out, as fine_tune.py does).

Run:  python benchmarks/fine_tune_recipes.py --base=Model.pth \\
          --variants="lora_rank=0;lora_rank=8 learning_rate=1e-3"
      (variants are separated by ';', each a space-separated list of fine_tune.py keys)
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

import common
from lumina.checkpoint import build_model, load_checkpoint
from lumina.config import parse_cli
from lumina.corpus import load_data
from lumina.evaluate import end_of_turn_rate, replies_per_prompt

CONFIG = {
    "base": "Model.pth",   # the base model every variant starts from
    "data": os.path.join(os.path.dirname(common.TEXT), "oasst1_validation_en_sample.messages.jsonl"),
    "variants": "",        # ';'-separated variants, each space-separated key=value pairs for fine_tune.py
    "replies_per_prompt": 5,  # extra samples per held-out prompt for the second end-of-turn rate; 0 = none
}
CLOSING = re.compile(r"val bits/char ([\d.]+) -> ([\d.]+) \| ends its turn (\d+)% -> (\d+)% of (\d+)")
STEPS = re.compile(r"eval step (\d+)")


def run(base, data, variant):
    """(val before, val after, end before %, end after %, probes, last step, minutes) of one variant."""
    out_dir = tempfile.mkdtemp()
    args = [f"--{pair}" for pair in variant.split()]
    start = time.time()
    done = subprocess.run([sys.executable, os.path.join(common.ROOT, "fine_tune.py"), f"--base_model={base}",
                           f"--data={data}", f"--output={os.path.join(out_dir, 'FT.pth')}", "--probe_chars=0", *args],
                          capture_output=True, text=True, cwd=out_dir)
    found = CLOSING.search(done.stdout)
    if done.returncode or not found:
        raise SystemExit(f"variant {variant!r} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    steps = STEPS.findall(done.stdout)
    return [float(found[1]), float(found[2]), int(found[3]), int(found[4]), int(found[5]),
            int(steps[-1]) if steps else 0, (time.time() - start) / 60, os.path.join(out_dir, "FT.pth")]


def more_replies(path, data, per_prompt):
    """(replies that ended, replies) for the fine-tuned model: each held-out prompt sampled
    per_prompt times, as fine_tune.py samples them (its split, its seed)."""
    checkpoint = load_checkpoint(path)
    net, vocab = build_model(checkpoint)
    found = load_data(data, tempfile.mkdtemp(), checkpoint["config"]["val_fraction"], True,
                            checkpoint["config"]["seed"], vocab, log=lambda *a: None)
    prompts = found.val_prompts * per_prompt  # slot i samples with seed i: every copy differs
    replies = len(prompts) * replies_per_prompt(prompts)
    return round(end_of_turn_rate(net, prompts, torch.float32) * replies), replies


def main(argv):
    settings = parse_cli(argv, CONFIG, __file__)[0]
    print(f"base {settings['base']} | data {settings['data']}")
    print("| variant | val bits/char before -> after | change | ends its turn before -> after | more replies | steps | minutes |")
    print("|---|---|---|---|---|---|---|")
    for variant in [v.strip() for v in settings["variants"].split(";")]:
        before, after, end_before, end_after, probes, steps, minutes, path = run(settings["base"], settings["data"], variant)
        ended, replies = more_replies(path, settings["data"], settings["replies_per_prompt"]) if settings["replies_per_prompt"] else (0, 0)
        print(f"| {variant or '(defaults)'} | {before:.3f} -> {after:.3f} | {after - before:+.3f} | "
              f"{end_before}% -> {end_after}% of {probes} | {ended}/{replies} | {steps} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
