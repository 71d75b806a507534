"""Dataset_download.py: download OpenAssistant OASST1, validate it and rebuild its conversations.

Reads  the hub's OpenAssistant/oasst1 through `datasets`. When the hub cannot be reached it says so
       within seconds and prepares the small real sample that ships in oasst1_data/ instead, so
       every later stage still works offline. --source reads a local copy: the hub's parquet
       files, JSONL with one message per line in the hub's schema, or the original release files
       *_oasst_ready.messages.jsonl.gz / *_oasst_ready.trees.jsonl.gz; --source=sample the sample.
Writes oasst1_data/train.jsonl, validation.jsonl   one conversation per line:
                                                   {"id", "lang", "messages": [{"role", "content"}]}
       oasst1_data/pairs_train.jsonl, pairs_validation.jsonl   one preference pair per line, from every
                                                   two ranked replies to the same prompt (rank 0 is best):
                                                   {"id", "tree", "prompt": [{"role", "content"}, ... up to the
                                                   prompt], "chosen", "rejected", "ranks": [chosen's, rejected's]}
       oasst1_data/raw_train.jsonl, raw_validation.jsonl   the messages as they arrived
       oasst1_data/manifest.json   source, filters, counts in and out per reason (skipped pairs too),
                                   sha256 of each file

Conversations are rebuilt by following parent_id, never by row order: a reply is paired with the
message it answers. Every dropped message, and every skipped preference pair (equal ranks, a
deleted, rejected or otherwise dropped reply, a missing rank), is counted under its reason. A
tree's conversations and pairs always land in the same split. It needs no torch.

Run:
  python Dataset_download.py                               # the hub, else the bundled sample
  python Dataset_download.py --source ~/oasst1/            # local files, no network
  python Dataset_download.py --languages="['en','de']" --branches=all --force
"""
import json
import os
import sys
import time
import urllib.error
import urllib.request

from tqdm import tqdm

from lumina import data
from lumina.config import parse_cli

CONFIG = {
    # --- source ---
    "source": None,               # None = the hub (the bundled sample when it cannot be reached); "sample"; or a file/folder
    "hub_name": "OpenAssistant/oasst1",  # the hub dataset to download
    "hub_timeout": 5.0,           # seconds to wait for the hub to answer before using the bundled sample
    "retries": 3,                 # download attempts once the hub answered (datasets also retries inside each)
    "retry_wait": 5.0,            # seconds before the 2nd attempt, doubling after each failure
    # --- filters (each dropped message is counted under its reason) ---
    "languages": ["en"],          # language codes to keep, e.g. ['en','de']; None keeps every language
    "drop_deleted": True,         # drop messages removed by a moderator or their author
    "drop_rejected": True,        # drop messages with review_result false (null, not yet reviewed, stays)
    "drop_empty": True,           # drop messages whose text is empty or only whitespace
    # --- conversations ---
    "branches": "best",           # best: one conversation per tree along the rank-0 replies; all: every path
    "val_fraction": 0.05,         # held out by whole tree when the source has only one split (0-0.5)
    "seed": 0,                    # decides which trees are held out
    # --- output ---
    "out_dir": "oasst1_data",     # where the files above are written
    "force": False,               # redo the work even when valid outputs exist (also: --force)
}
RULES = {"branches": data.BRANCHES, "val_fraction": (0.0, 0.5), "retries": (1, 100), "hub_timeout": (0.1, 600)}
RENAMED = {"threads": "use --branches=best or --branches=all (threads means CPU threads in every other script)"}
TYPES = {"source": str}
HUB_SIZES = {"train": 84437, "validation": 4401}  # the 2023-04-12 export
SPLITS = ("train", "validation")
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oasst1_data", "oasst1_sample.messages.jsonl.gz")
SAMPLE_NOTE = ("This is the small offline sample: 60 English trees of OASST1's validation split (Apache-2.0, "
               "see oasst1_data/README.md), enough to try every stage but far too little for a good model. For "
               "the full set (84,437 + 4,401 messages), run this again where huggingface.co can be reached, "
               "or download it elsewhere and pass --source PATH.")


class SourceError(Exception):
    """A source that cannot be read; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Reading: the hub, the bundled sample or local files -> {split: [message rows]}
# ----------------------------------------------------------------------------------------------
def hub_reachable(timeout):
    """True when the hub answers within `timeout` seconds (any HTTP answer counts). `datasets`
    itself would retry for minutes before giving up on a machine with no network."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def download(name, retries, wait, load=None):
    """Both hub splits as lists of rows, retrying network failures with exponential backoff."""
    if load is None:
        from datasets import load_dataset as load
    for attempt in range(1, retries + 1):
        try:
            dataset = load(name)
            return {split: dataset[split].to_list() for split in SPLITS}
        except (ConnectionError, TimeoutError, OSError) as e:
            if attempt == retries:
                raise SourceError(f"could not download {name} from the Hugging Face hub after {retries} attempts "
                                  f"({e}). Download the files elsewhere and run with --source PATH "
                                  f"(parquet, JSONL or the *_oasst_ready.*.jsonl.gz release files), "
                                  f"or use the bundled sample with --source=sample") from None
            print(f"download failed ({e}); retrying in {wait:.0f} s ({attempt}/{retries})")
            time.sleep(wait)
            wait *= 2


def read_local(path, problems):
    """{split: rows}, the split told by each file's name. parquet goes through `datasets`; JSONL
    is read line by line so that each malformed line is reported with its number."""
    splits = {}
    try:
        files = data.data_files(path, (".parquet", ".jsonl", ".jsonl.gz", ".json"))
    except data.DataError as e:
        raise SourceError(f"--source {e}") from None
    for file in tqdm(files, desc="reading", unit="file"):
        if file.endswith(".parquet"):
            from datasets import load_dataset
            rows = data.text_rows(load_dataset("parquet", data_files=file, split="train").to_list(), file, problems)
        else:
            rows = [row for _, row in data.read_jsonl(file, problems)]
        if not rows:
            problems.append(f"{file}: no rows")
        splits.setdefault("validation" if data.is_validation_file(file) else "train", []).extend(rows)
    return splits


def read_source(config, problems):
    """({split: rows}, where they came from). Only the hub's splits are checked against its sizes."""
    source = config["source"]
    if source == "sample" or (source is None and not hub_reachable(config["hub_timeout"])):
        if source is None:
            print(f"the Hugging Face hub cannot be reached (no answer within {config['hub_timeout']:g} s); "
                  f"preparing the bundled offline sample instead")
        return read_local(SAMPLE, problems), "sample"
    if source:
        return read_local(os.path.expanduser(source), problems), source
    splits = download(config["hub_name"], config["retries"], config["retry_wait"])
    splits = {split: data.text_rows(rows, f"hub split {split}", problems) for split, rows in splits.items()}
    for split, size in HUB_SIZES.items():
        if len(splits[split]) != size:
            problems.append(f"hub split {split} has {len(splits[split]):,} rows, expected {size:,}")
    return splits, f"hub:{config['hub_name']}"


# ----------------------------------------------------------------------------------------------
# Validation and conversations, per split
# ----------------------------------------------------------------------------------------------
def prepare(splits, config):
    """({split: conversations}, {split: preference pairs}, counts). With one split, whole trees are
    held out for validation: a tree's conversations and its pairs land in the same split."""
    found, pairs, counts, tree_of = {}, {}, {}, {}
    filters = {key: config[key] for key in data.FILTERS}
    for split, rows in splits.items():
        messages, dropped = data.validate(tqdm(rows, desc=f"validating {split}", unit="msg", leave=False), filters)
        found[split] = data.conversations(messages, config["branches"])
        pairs[split], skipped = data.preference_pairs(rows, messages)
        tree_of.update(data.tree_ids(messages))
        counts[split] = {"rows_in": len(rows), "messages_kept": len(messages), "dropped": dict(dropped),
                         "conversations": len(found[split]), "pairs": len(pairs[split]), "pairs_skipped": dict(skipped)}
    if len(found) == 1:
        (given, pool), = found.items()
        held = data.held_out_groups([tree_of[c["id"]] for c in pool], config["val_fraction"], config["seed"])
        found["train"], found["validation"] = ([c for c in pool if (tree_of[c["id"]] in held) == v] for v in (False, True))
        pairs["train"], pairs["validation"] = ([p for p in pairs[given] if (p["tree"] in held) == v] for v in (False, True))
        counts["split"] = {"from": given, "train_conversations": len(found["train"]),
                           "validation_conversations": len(found["validation"]), "by": "whole tree",
                           "train_pairs": len(pairs["train"]), "validation_pairs": len(pairs["validation"])}
    return found, pairs, counts


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def settings_of(config):
    """The config keys that change the output; a rerun with other values must redo the work."""
    return {k: v for k, v in config.items() if k not in ("force", "retries", "retry_wait", "out_dir", "hub_timeout")}


def outputs_valid(out_dir, config):
    """True when manifest.json matches this config and every file still has its recorded sha256.
    Outputs made from the sample because the hub was down are never final: the hub is tried again."""
    data.settle_file_set(out_dir)
    try:
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if config["source"] is None and manifest["source"] == "sample":
            return False
        return manifest["settings"] == settings_of(config) and all(
            data.sha256_file(os.path.join(out_dir, name)) == digest for name, digest in manifest["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_outputs(out_dir, splits, found, pairs, manifest):
    """Every file of the set and the manifest (with each file's sha256) as one set: a crash part-way
    leaves the old set whole, never a new train.jsonl beside an old validation.jsonl."""
    def write(staging):
        digests = {}
        for split in SPLITS:
            for name, rows in ((f"raw_{split}", splits.get(split, [])), (split, found[split]), (f"pairs_{split}", pairs[split])):
                digests[f"{name}.jsonl"] = data.write_jsonl(os.path.join(staging, f"{name}.jsonl"), rows)
        data.write_text(os.path.join(staging, "manifest.json"),
                        json.dumps({**manifest, "sha256": digests}, indent=2, ensure_ascii=False))

    data.write_file_set(out_dir, write)


def print_summary(manifest, example):
    print("\nmessages in and out:")
    for split, counts in manifest["counts"].items():
        if split == "split":
            total = counts["validation_conversations"] + counts["train_conversations"]
            print(f"  held out {counts['validation_conversations']:,} of {total:,} {counts['from']} conversations "
                  f"for validation, by whole tree")
            continue
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(counts["dropped"].items())) or "none"
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(counts["pairs_skipped"].items())) or "none"
        print(f"  {split:<10} {counts['rows_in']:>7,} in | {counts['messages_kept']:>7,} kept | "
              f"{counts['conversations']:>6,} conversations | dropped: {reasons}")
        print(f"  {'':<10} {counts['pairs']:>7,} preference pairs | skipped: {skipped}")
    for problem in manifest["problems"][:10]:
        print(f"  skipped {problem}")
    if example:
        print("\nexample conversation:")
        for message in example["messages"]:
            text = message["content"].replace("\n", " ")
            print(f"  {message['role']:>9}: {text[:200]}{'...' if len(text) > 200 else ''}")


def main(argv):
    config, _, _ = parse_cli(argv, CONFIG, __file__, types=TYPES, rules=RULES, renamed=RENAMED)
    out_dir = config["out_dir"]
    # --- skip the work when it is done ---
    if not config["force"] and outputs_valid(out_dir, config):
        print(f"{out_dir}/ already holds valid outputs for these settings; nothing to do (--force redoes it)")
        return
    # --- read ---
    problems = []
    try:
        splits, source = read_source(config, problems)
    except SourceError as e:
        sys.exit(f"error: {e}")
    if not any(splits.values()):
        sys.exit(f"error: no messages in {source}" + (f" ({'; '.join(problems[:3])})" if problems else ""))
    # --- validate, thread and write ---
    found, pairs, counts = prepare(splits, config)
    manifest = {"source": source, "settings": settings_of(config), "counts": counts, "problems": problems}
    try:
        write_outputs(out_dir, splits, found, pairs, manifest)
    except OSError as e:
        sys.exit(f"error: could not write {out_dir}/ ({e.strerror or e}); free some disk space or choose another "
                 f"--out_dir. The files that were there are intact")
    print_summary(manifest, (found["train"] or found["validation"] or [None])[0])
    print(f"\nwrote {out_dir}/: {len(found['train']):,} train and {len(found['validation']):,} validation conversations; "
          f"{len(pairs['train']):,} train and {len(pairs['validation']):,} validation preference pairs")
    if source == "sample":
        print(SAMPLE_NOTE)


if __name__ == "__main__":
    main(sys.argv[1:])
