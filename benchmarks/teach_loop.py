"""The page's teaching loop, measured: pairs chosen in the chat page by a clear rule, learned with
DPO, checked on prompts the page never showed.

  1. serve.py --pairs_file serves the chat model; headless Chromium drives its page like a learner:
     for each prompt, "Compare", and pick the reply that follows the rule (it ends with `ending`,
     "!" unless told) when
     exactly one of the two does; otherwise "Neither" and compare again. Until `pairs` are saved.
  2. Held-out pairs: for other prompts, the chat model's own sampled replies, one that follows the
     rule (chosen) and one that does not (rejected), per prompt that has both.
  3. fine_tune.py --data=the page's pairs file (DPO, its defaults).
  4. Before and after, on the held-out prompts: pair accuracy (the share of held-out pairs to which
     the model gives the chosen reply more log-probability per character; and DPO's own measure,
     the implicit reward against the chat model, 50% for the chat model itself), the share of
     sampled replies that follow the rule, and the end-of-turn rate (is it still a chatbot?).

Prompts: the first user messages of ../shared/data/oasst1's validation sample trees, shuffled
with `seed`; the page's come first, the held-out ones from the other end.

Run:  python benchmarks/teach_loop.py --model=Chat.pth [--ending=.] [--pairs=20] [--held_out=40] [--tune_args="--beta=5"]
"""
import itertools
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile

import torch

import common
from lumina import engine
from lumina.checkpoint import load_for_chat
from lumina.config import parse_cli
from lumina.evaluate import end_of_turn_rate, run
from lumina.preference import encode_pair, pair_metrics, reply_chars, sequence_logprobs, unscored_end
from lumina.vocab import SPECIAL_TOKENS, TURN_ENDS, chat_prompt
from serve_speed import start_server

CONFIG = {
    "model": None,        # the chat model (a fine-tune that ends its turns)
    "pairs": 20,          # pairs to choose in the page
    "held_out": 30,       # held-out prompts for the checks (the page gets the sample's other prompts)
    "samples": 12,        # replies sampled per held-out prompt (pairs, and the rule's share)
    "max_tries": 12,      # compares per page prompt before moving to the next
    "max_chars": 400,     # reply length, as the page's default
    "seed": 0,
    "ending": "!",        # the rule: the better reply ends with this (a weak model may never write "!": try ".")
    "out_dir": None,      # where the pairs file and the taught model go; None = a new temporary folder
    "tune_args": "",      # more fine_tune.py arguments, e.g. "--beta=5 --max_minutes=2"
    "score_end": True,    # DPO scores each reply's closing <|end|> (fine_tune.py --score_end), and so do the
                          #   checks: a rule about how a reply ends is learned where the model ends it
}
TYPES = {"model": str, "out_dir": str, "tune_args": str, "ending": str}
SAMPLE = os.path.join(common.ROOT, "..", "shared", "data", "oasst1", "oasst1_validation_en_sample.messages.jsonl")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def follows_rule(text, ending):
    return text.rstrip().endswith(ending)


def prompts(seed):
    """The first user messages of the sample's trees, shuffled."""
    with open(SAMPLE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    found = sorted(r["text"] for r in rows if r["parent_id"] is None and not r.get("deleted") and len(r["text"]) < 300)
    random.Random(seed).shuffle(found)
    return found


# --- 1. pairs chosen in the page ------------------------------------------------------------------------
def choose_in_page(url, page_prompts, wanted, max_tries, ending, saved=0):
    """Drive the page until the pairs file holds `wanted` pairs (`saved` already): (pairs saved,
    compares made, prompts asked). Past the last prompt it asks them again (new seeds, new replies)."""
    from playwright.sync_api import expect, sync_playwright
    compares = used = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        for prompt in itertools.cycle(page_prompts):
            if saved >= wanted:
                break
            used += 1
            page.click("#clear")
            page.fill("#input", prompt)
            for _ in range(max_tries):
                page.click("#compare")
                expect(page.locator(".compare .choice")).to_have_count(2, timeout=300000)
                compares += 1
                ruled = [follows_rule(t.inner_text(), ending) for t in page.locator(".compare .msg.assistant").all()]
                if sum(ruled) == 1:
                    page.locator(".compare .pick").nth(ruled.index(True)).click()
                    saved += 1
                    expect(page.locator("#status")).to_contain_text(f"holds {saved} pairs")
                    break
                page.click(".compare .neither")
        browser.close()
    return saved, compares, used


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("this benchmark drives the page in chromium: apt-get install -y chromium")
    return found


# --- 2. held-out pairs, and what a model writes -----------------------------------------------------------
def sample_replies(net, vocab, texts, samples, max_chars, seed):
    """{prompt: [reply texts]}, sampled as the page samples (temperature 0.8, top-k 40), 64 at a time."""
    rows = []
    for i, text in enumerate(texts):
        ids, _, _ = chat_prompt([{"role": "user", "content": text}], vocab, net.config.seq_length)
        rows += [(text, len(ids), engine.Row(list(ids), max_chars, 0, temperature=0.8, top_k=40,
                                             seed=seed + 1000 * i + s, stop_ids=TURN_ENDS)) for s in range(samples)]
    for start in range(0, len(rows), 64):
        part = [row for _, _, row in rows[start:start + 64]]
        for slot, row in enumerate(part):
            row.slot = slot
        run(engine.Engine(net, len(part)), part)
    replies = {}
    for text, prompt_length, row in rows:
        replies.setdefault(text, []).append(vocab.decode(i for i in row.ids[prompt_length:] if i >= len(SPECIAL_TOKENS)))
    return replies


def held_out_pairs(replies, ending):
    pairs = []
    for text, found in replies.items():
        good = [r for r in found if follows_rule(r, ending)]
        bad = [r for r in found if not follows_rule(r, ending) and r.strip()]
        if good and bad:
            pairs.append({"prompt": [{"role": "user", "content": text}], "chosen": good[0], "rejected": bad[0]})
    return pairs


@torch.no_grad()
def per_char_logprobs(net, vocab, pairs, score_end):
    """(pairs, 2) log-probability per character of each pair's chosen and rejected reply, with or
    without the closing <|end|>, as fine_tune.py's DPO compared them."""
    encoded = [encode_pair(pair, vocab, net.config.seq_length)[0] for pair in pairs]
    encoded = encoded if score_end else unscored_end(encoded)
    logp = torch.cat([sequence_logprobs(net, encoded[i:i + 8], "cpu") for i in range(0, len(encoded), 8)])
    return logp / reply_chars(encoded).clamp(min=1.0)


# --- 3 and 4 --------------------------------------------------------------------------------------------
def checks(net, vocab, held, pairs, options, reference=None):
    """The row of the table for one model."""
    logp = per_char_logprobs(net, vocab, pairs, options["score_end"])
    replies = sample_replies(net, vocab, held, options["samples"], options["max_chars"], options["seed"] + 1)
    ruled = [follows_rule(r, options["ending"]) for found in replies.values() for r in found]
    rendered = [chat_prompt([{"role": "user", "content": t}], vocab, net.config.seq_length)[0] for t in held]
    row = {"likelihood_accuracy": float((logp[:, 0] > logp[:, 1]).float().mean()),
           "rule_share": sum(ruled) / len(ruled), "ends_turn": end_of_turn_rate(net.eval(), rendered)}
    if reference is not None:
        row["implicit_accuracy"] = pair_metrics(logp, reference, 1.0)["pair_accuracy"]
    return row, logp


def main(argv):
    options = parse_cli(argv, CONFIG, __file__, types=TYPES)[0]
    if not options["model"]:
        raise SystemExit("--model=PATH is needed: a chat model that ends its turns (fine_tune.py's output)")
    out = options["out_dir"] or tempfile.mkdtemp(prefix="lumina-teach-")
    os.makedirs(out, exist_ok=True)
    pairs_file = os.path.join(out, "page_pairs.jsonl")
    kept = 0
    if os.path.exists(pairs_file):  # a run stopped before: its pairs count
        with open(pairs_file, encoding="utf-8") as f:
            kept = len(f.read().splitlines())
    found = prompts(options["seed"])
    page_prompts, held = found[:-options["held_out"]], found[-options["held_out"]:]
    # --- 1. the page ---
    proc, url = start_server(common.ROOT, options["model"], 2, 0, [f"--pairs_file={pairs_file}"])
    try:
        saved, compares, used = choose_in_page(url, page_prompts, options["pairs"], options["max_tries"], options["ending"], kept)
    finally:
        proc.terminate()
        proc.wait()
    print(f"page: {saved} pairs chosen by the rule ({kept} of them by an earlier run) in {compares} compares, "
          f"{used} prompts asked -> {pairs_file}", flush=True)
    # --- 2. held-out pairs from the chat model's own replies ---
    net, vocab, _ = load_for_chat(options["model"], "cpu")
    pairs = held_out_pairs(sample_replies(net, vocab, held, options["samples"], options["max_chars"], options["seed"]),
                           options["ending"])
    print(f"held out: {len(pairs)} pairs from {len(held)} prompts ({options['samples']} replies each)", flush=True)
    if not pairs:
        raise SystemExit("no held-out prompt got both kinds of reply: raise --samples or --held_out")
    # --- 3. DPO on the page's pairs ---
    taught = os.path.join(out, "Taught.pth")
    tune = subprocess.run([sys.executable, os.path.join(common.ROOT, "fine_tune.py"), f"--base_model={options['model']}",
                           f"--data={pairs_file}", f"--output={taught}", f"--score_end={options['score_end']}",
                           *shlex.split(options["tune_args"])],
                          cwd=out, capture_output=True, text=True)
    if tune.returncode:
        raise SystemExit(f"fine_tune.py failed:\n{tune.stdout[-2000:]}\n{tune.stderr[-2000:]}")
    print("fine_tune.py: " + " | ".join(line for line in tune.stdout.splitlines() if line.startswith(("objective", "done")))[:400])
    # --- 4. before and after ---
    before, reference = checks(net, vocab, held, pairs, options)
    after, _ = checks(*load_for_chat(taught, "cpu")[:2], held, pairs, options, reference)
    print(f"| model | held-out pair accuracy (log-prob per char) | implicit reward accuracy | replies ending with "
          f"{options['ending']!r} | ends its turn |")
    print("|---|---|---|---|---|")
    for name, row in (("chat model", before), ("taught (DPO on the page's pairs)", after)):
        implicit = f"{row['implicit_accuracy']:.1%}" if "implicit_accuracy" in row else "50% (the reference)"
        print(f"| {name} | {row['likelihood_accuracy']:.1%} of {len(pairs)} | {implicit} | {row['rule_share']:.1%} | "
              f"{row['ends_turn']:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
