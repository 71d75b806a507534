"""Speed of Dataset_download.py on a full-size synthetic OASST1 in the hub's schema.

It writes 84,437 train and 4,401 validation messages (the real split sizes) in 9,846 and 518
branching trees, with ranks, deleted and rejected rows and several languages, as hub-schema
parquet files written by `datasets` (what the hub serves), then times
`python Dataset_download.py --source DIR --force` end to end: reading, validating, threading and
writing. The download itself is not part of it.

Run:  python benchmarks/dataset_speed.py [--runs=3]
"""
import os
import random
import subprocess
import sys
import tempfile
import time

from common import ROOT
from lumina.config import parse_cli

CONFIG = {
    "runs": 3,  # timed runs of the whole script; best and median are reported
}

SIZES = {"train": (84437, 9846), "validation": (4401, 518)}
TEXT = "The quick brown fox jumps over the lazy dog. " * 12


def row(message_id, parent_id, role, tree, rank, rng):
    return {"message_id": message_id, "parent_id": parent_id, "user_id": f"user{rng.randrange(5000)}",
            "created_date": f"2023-02-{rng.randrange(1, 28):02d}T12:00:00+00:00",
            "text": TEXT[: rng.randrange(20, len(TEXT))], "role": role,
            "lang": rng.choices(["en", "es", "de", "ru"], [45, 30, 15, 10])[0], "review_count": 3,
            "review_result": rng.random() > 0.03, "deleted": rng.random() < 0.02, "rank": rank,
            "synthetic": False, "model_name": None,
            "detoxify": {"toxicity": rng.random() / 100, "severe_toxicity": 0.0, "obscene": 0.0,
                         "identity_attack": 0.0, "insult": 0.0, "threat": 0.0, "sexual_explicit": 0.0},
            "message_tree_id": tree, "tree_state": "ready_for_export",
            "emojis": {"name": ["+1"], "count": [rng.randrange(5)]},
            "labels": {"name": ["spam", "quality"], "value": [0.0, rng.random()], "count": [3, 3]}}


def synthetic_split(messages, trees, rng):
    """`trees` trees with exactly `messages` rows: replies branch 1-3 ways, roles alternate."""
    rows, per_tree = [], [messages // trees + (i < messages % trees) for i in range(trees)]
    for t, size in enumerate(per_tree):
        tree = f"tree{t}"
        open_nodes = [(row(tree, None, "prompter", tree, None, rng), "prompter")]
        rows.append(open_nodes[0][0])
        count = 1
        while count < size:
            parent, role = open_nodes[rng.randrange(len(open_nodes))]
            child_role = "assistant" if role == "prompter" else "prompter"
            siblings = sum(1 for r in rows[-size:] if r["parent_id"] == parent["message_id"])
            child = row(f"{tree}-{count}", parent["message_id"], child_role, tree,
                        siblings if child_role == "assistant" else None, rng)
            rows.append(child)
            open_nodes.append((child, child_role))
            count += 1
    return rows


def main(argv):
    runs = parse_cli(argv, CONFIG, __file__)[0]["runs"]
    import datasets
    rng = random.Random(0)
    folder = tempfile.mkdtemp(prefix="lumina-oasst-")
    for split, (messages, trees) in SIZES.items():
        rows = synthetic_split(messages, trees, rng)
        datasets.Dataset.from_list(rows).to_parquet(os.path.join(folder, f"{split}-00000-of-00001.parquet"))
        print(f"{split}: {len(rows):,} messages in {trees:,} trees")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, os.path.join(ROOT, "Dataset_download.py"), f"--source={folder}",
                              f"--out_dir={os.path.join(folder, 'out')}", "--force", "--languages=None"],
                             capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
    print(out.stdout.split("example conversation")[0].strip())
    print(f"Dataset_download.py on 88,838 messages: best {min(times):.1f} s, median {sorted(times)[len(times) // 2]:.1f} s "
          f"over {runs} runs (whole script: start-up, reading parquet, validating, threading, writing)")


if __name__ == "__main__":
    main(sys.argv[1:])
