"""Supervised fine-tuning, then DPO, judged on trees neither saw: k-fold by tree over the real
OASST1 sample beside the repository (60 English validation trees, 300 preference pairs).

For each fold: the other folds' best-path threads fine-tune the base (`python fine_tune.py`, the
defaults plus `sft_args`); the other folds' pairs then tune that model with DPO (the defaults plus
`dpo_args`). The fold's own trees are the held-out set:
  - the end-of-turn rate: every prompt of the held-out trees (the conversation up to each user
    turn, every branch), each sampled `samples` times as ChatAI samples by default (temperature
    0.8, top-k 40, at most 2,000 characters), and the median reply length;
  - val bits/char on the held-out best-path threads (assistant turns);
  - pair accuracy: the share of held-out pairs whose implicit reward, beta * (log pi - log ref)
    with the fine-tuned model as the reference, prefers the better reply (ties count half, so the
    fine-tuned model itself scores 50%), and the likelihood preference: the share where the model
    gives the better reply more log-probability per character.

Run:  python benchmarks/preference_folds.py --base=Model.pth [--folds=5] [--only_folds=0,1]
          [--sft_args="--train=lora"] [--dpo_args="--beta=0.2"] [--skip_dpo]
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

import torch

import common
from lumina import data
from lumina.checkpoint import build_model, load_checkpoint
from lumina.config import parse_cli
from lumina.evaluate import evaluate, run
from lumina.plan import TrainConfig
from lumina.engine import Engine, Row
from lumina.preference import encode_pair, logprobs_of, pair_metrics, reply_chars, unscored_end
from lumina.training import Runtime
from lumina.vocab import END, TURN_ENDS, encode_documents, render_chat

CONFIG = {
    "base": "Model.pth",     # the base model (Train.py's) every fold starts from
    "data": os.path.join(os.path.dirname(common.TEXT), "oasst1_validation_en_sample.messages.jsonl"),
    "folds": 5,              # folds by tree; every tree is held out once
    "only_folds": [],        # run these folds only (e.g. 0 to try a recipe quickly); [] = all
    "sft_args": "",          # more fine_tune.py options for the supervised step
    "dpo_args": "",          # more fine_tune.py options for the DPO step; ';' separates variants, each run on the same SFT model
    "skip_dpo": False,       # measure the supervised step alone
    "seed": 0,               # decides the folds
    "threads": 2,            # CPU threads for the measurements
    "samples": 4,            # replies sampled per held-out prompt (other seeds), for a steadier end-of-turn rate
}
TEMPLATE = {"temperature": 0.8, "top_k": 40}  # ChatAI's default sampling
END_CHARS = 2000


def folds_of(path, count, seed):
    """[(trees, threads, pairs, prompts)] per fold, from OASST message rows, by whole tree."""
    rows = [row for _, row in data.read_jsonl(path, [])]
    messages, _ = data.validate(rows, data.FILTERS)
    tree_of = data.tree_ids(messages)
    threads = data.conversations(messages, "best")
    pairs, _ = data.preference_pairs(rows, messages)
    prompts = [(tree_of[m], data.thread_to(messages, m)) for m, row in messages.items() if row["role"] == "prompter"]
    trees = sorted(set(tree_of.values()))
    random.Random(seed).shuffle(trees)
    fold = {tree: i % count for i, tree in enumerate(trees)}
    out = defaultdict(lambda: ([], [], []))
    for thread in threads:
        out[fold[tree_of[thread["id"]]]][0].append(thread)
    for pair in pairs:
        out[fold[pair["tree"]]][1].append(pair)
    for tree, prompt in prompts:
        out[fold[tree]][2].append(prompt)
    return [out[i] for i in range(count)]


def fine_tune(base, data_file, output, args):
    done = subprocess.run([sys.executable, os.path.join(common.ROOT, "fine_tune.py"), f"--base_model={base}",
                           f"--data={data_file}", f"--output={output}", "--probe_chars=0", *args.split()],
                          capture_output=True, text=True, cwd=os.path.dirname(output))
    if done.returncode:
        raise SystemExit(f"fine_tune.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def end_rate(net, vocab, prompts, runtime, samples):
    """(share of replies that end with <|end|>, median reply length) over the held-out prompts,
    each sampled `samples` times."""
    ids = [render_chat(p, vocab, add_generation_prompt=True)[0] for p in prompts for _ in range(samples)]
    rows = [Row(p, END_CHARS, slot, seed=slot, stop_ids=TURN_ENDS, **TEMPLATE) for slot, p in enumerate(ids)]
    with runtime.autocast():
        run(Engine(net, len(rows)), rows)
    return sum(r.ids[-1] == END for r in rows) / len(rows), statistics.median(r.new for r in rows)


def val_bpc(net, vocab, threads, runtime):
    ids, mask = encode_documents([("chat", t["messages"]) for t in threads], vocab, True)
    config = TrainConfig(seq_length=net.config.seq_length, eval_windows=10 ** 6, batch_size=16)
    return evaluate(net, torch.from_numpy(ids), torch.from_numpy(mask), config, runtime) / 0.6931471805599453


def pair_figures(net, reference, vocab, pairs, runtime, beta, per_char, score_end):
    """Implicit-reward accuracy against the reference (rewards per character with per_char, as
    fine_tune.py's), and the likelihood preference per character."""
    encoded = [encode_pair(p, vocab, net.config.seq_length)[0] for p in pairs]
    encoded = encoded if score_end else unscored_end(encoded)
    policy, ref = logprobs_of(net, encoded, runtime), logprobs_of(reference, encoded, runtime)
    chars = reply_chars(encoded)
    scale = chars if per_char else 1.0
    likelihood = (policy[:, 0] / chars[:, 0] > policy[:, 1] / chars[:, 1]).float().mean().item()
    return pair_metrics(policy / scale, ref / scale, beta)["pair_accuracy"], likelihood


def measure(path, reference, held, runtime, samples):
    """The held-out figures of one model; pair accuracy with the rewards its DPO run used (the
    beta, per_char and score_end its checkpoint records; a supervised model is its own reference)."""
    threads, pairs, prompts = held
    checkpoint = load_checkpoint(path)
    net, vocab = build_model(checkpoint)
    net.eval()
    ref = build_model(load_checkpoint(reference))[0].eval() if reference else net
    beta, per_char, score_end = (checkpoint.get(k, d) for k, d in (("beta", 0.1), ("per_char", False), ("score_end", True)))
    rate, median = end_rate(net, vocab, prompts, runtime, samples)
    accuracy, likelihood = pair_figures(net, ref, vocab, pairs, runtime, beta, per_char, score_end)
    return {"end_rate": rate, "median_reply": median, "val_bpc": val_bpc(net, vocab, threads, runtime),
            "pair_accuracy": accuracy, "likelihood_preference": likelihood}


def main(argv):
    options = parse_cli(argv, CONFIG, __file__, types={"only_folds": list})[0]
    torch.set_num_threads(options["threads"])
    runtime = Runtime(torch.device("cpu"))
    folds = folds_of(options["data"], options["folds"], options["seed"])
    variants = [v.strip() for v in options["dpo_args"].split(";")]
    wanted = [int(f) for f in options["only_folds"]] or range(options["folds"])
    print(f"base {options['base']} | {options['folds']} folds by tree | sft {options['sft_args'] or 'defaults'} | "
          f"dpo {options['dpo_args'] or 'defaults'}")
    results = defaultdict(list)
    for k in wanted:
        work = tempfile.mkdtemp(prefix=f"lumina-fold{k}-")
        train = [folds[i] for i in range(options["folds"]) if i != k]
        data.write_jsonl(os.path.join(work, "threads.jsonl"), [{"messages": t["messages"]} for f in train for t in f[0]])
        data.write_jsonl(os.path.join(work, "pairs.jsonl"), [p for f in train for p in f[1]])
        sft, dpo = os.path.join(work, "SFT.pth"), os.path.join(work, "DPO.pth")  # each DPO variant overwrites the last
        print(f"fold {k}: sft  | {fine_tune(options['base'], os.path.join(work, 'threads.jsonl'), sft, options['sft_args'])}")
        results["sft"].append(measure(sft, None, folds[k], runtime, options["samples"]))
        for variant in [] if options["skip_dpo"] else variants:
            print(f"fold {k}: dpo {variant} | {fine_tune(sft, os.path.join(work, 'pairs.jsonl'), dpo, variant)}")
            results[f"dpo {variant}"].append(measure(dpo, sft, folds[k], runtime, options["samples"]))
        for stage, figures in results.items():
            print(f"fold {k}: {stage} held out: " + json.dumps({k2: round(v, 4) for k2, v in figures[-1].items()}),
                  flush=True)
    for stage, figures in results.items():
        mean = {key: statistics.mean(f[key] for f in figures) for key in figures[0]}
        print(f"{stage}, mean over {len(figures)} folds: " + " | ".join(f"{k2} {v:.4f}" for k2, v in mean.items()))
    print(f"held-out prompts per fold: {[len(f[2]) for f in folds]} | pairs per fold: {[len(f[1]) for f in folds]}")


if __name__ == "__main__":
    main(sys.argv[1:])
