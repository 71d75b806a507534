"""Dataset_download.py: download OpenAssistant OASST1, validate it and rebuild its conversations.

Reads  the hub's OpenAssistant/oasst1 through `datasets`, or a local copy given as --source: the
       hub's parquet files, JSONL with one message per line in the hub's schema, or the original
       release files *_oasst_ready.messages.jsonl.gz / *_oasst_ready.trees.jsonl.gz.
Writes oasst1_data/train.jsonl, validation.jsonl   one conversation per line:
                                                   {"id", "lang", "messages": [{"role", "content"}]}
       oasst1_data/raw_train.jsonl, raw_validation.jsonl   the messages as they arrived
       oasst1_data/manifest.json   source, filters, counts in and out per reason, sha256 of each file

Conversations are rebuilt by following parent_id, never by row order: a reply is paired with the
message it answers. Every dropped message is counted under its reason.

Run:
  python Dataset_download.py                               # from the Hugging Face hub
  python Dataset_download.py --source ~/oasst1/            # from local files, no network
  python Dataset_download.py --languages="['en','de']" --threads=all --force
It imports nothing from the other LuminaAI scripts.
"""
import ast
import gzip
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict

from tqdm import tqdm

CONFIG = {
    # --- source ---
    "source": None,               # None = the hub; or a local file or folder (parquet, JSONL, .jsonl.gz)
    "hub_name": "OpenAssistant/oasst1",  # the hub dataset to download
    "retries": 3,                 # download attempts (datasets also retries inside each one)
    "retry_wait": 5.0,            # seconds before the 2nd attempt, doubling after each failure
    # --- filters (each dropped message is counted under its reason) ---
    "languages": ["en"],          # language codes to keep, e.g. ['en','de']; None keeps every language
    "drop_deleted": True,         # drop messages removed by a moderator or their author
    "drop_rejected": True,        # drop messages with review_result false (null, not yet reviewed, stays)
    "drop_empty": True,           # drop messages whose text is empty or only whitespace
    # --- threads ---
    "threads": "best",            # best: one thread per tree along the rank-0 replies; all: every path
    "val_fraction": 0.05,         # held out by whole tree when the source has only one split (0-0.5)
    "seed": 0,                    # decides which trees are held out
    # --- output ---
    "out_dir": "oasst1_data",     # where the files above are written
    "force": False,               # redo the work even when valid outputs exist (also: --force)
}
REQUIRED = {"message_id": (str,), "parent_id": (str, type(None)), "text": (str,), "role": (str,)}
OPTIONAL = {"lang": (str, type(None)), "deleted": (bool, type(None)), "review_result": (bool, type(None)),
            "rank": (int, type(None)), "message_tree_id": (str, type(None))}
ROLES = {"prompter": "user", "assistant": "assistant"}
HUB_SIZES = {"train": 84437, "validation": 4401}  # the 2023-04-12 export
SPLITS = ("train", "validation")


class SourceError(Exception):
    """A source that cannot be read; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def parse_args(argv, config):
    """--key=value (or --source PATH) overrides; --force and --help flags. Exits 2 on a bad one."""
    config = dict(config)
    if "--help" in argv or "-h" in argv:
        source = open(__file__, encoding="utf-8").read()
        print(__doc__ + "\nEvery key can be set with --key=value:\n")
        print(source[source.index("CONFIG = {"):source.index("\n}\n") + 2])
        sys.exit(0)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--force":
            arg = "--force=true"
        if arg == "--source" and args:
            arg = "--source=" + args.pop(0)
        key, sep, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not sep or key not in config:
            sys.exit(f"error: cannot use {arg!r}; write --key=value with a key from: {', '.join(config)}")
        config[key] = read_value(key, text, config[key])
    return check_config(config)


def read_value(key, text, default):
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(default, bool) or lowered in ("true", "false"):
        if lowered not in ("true", "false"):
            sys.exit(f"error: --{key} expects true or false, got {text!r}")
        return lowered == "true"
    if key == "languages":
        return [c.strip() for c in (ast.literal_eval(text) if text.startswith("[") else text.split(","))]
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            sys.exit(f"error: --{key} expects {type(default).__name__}, got {text!r}")
    return text


def check_config(config):
    if config["threads"] not in ("best", "all"):
        sys.exit(f"error: threads must be best or all, got {config['threads']!r}")
    if not 0 <= config["val_fraction"] <= 0.5:
        sys.exit(f"error: val_fraction must be between 0 and 0.5, got {config['val_fraction']}")
    if config["retries"] < 1:
        sys.exit(f"error: retries must be at least 1, got {config['retries']}")
    return config


# ----------------------------------------------------------------------------------------------
# Reading: the hub or local files -> {split: [message rows]}
# ----------------------------------------------------------------------------------------------
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
                raise SourceError(f"could not reach the Hugging Face hub for {name} after {retries} attempts "
                                  f"({e}). Download the files elsewhere and run with --source PATH "
                                  f"(parquet, JSONL or the *_oasst_ready.*.jsonl.gz release files)") from None
            print(f"download failed ({e}); retrying in {wait:.0f} s ({attempt}/{retries})")
            time.sleep(wait)
            wait *= 2


def split_of(path):
    name = os.path.basename(path).lower()
    return "validation" if "valid" in name or "val." in name or "val_" in name else "train"


def source_files(path):
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SourceError(f"--source {path} does not exist")
    names = sorted(os.listdir(path))
    files = [os.path.join(path, n) for n in names if n.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json"))]
    if not files:
        raise SourceError(f"{path} holds no .parquet, .jsonl or .jsonl.gz files")
    return files


def read_local(path, problems):
    """{split: rows}. parquet goes through `datasets`; JSONL is read line by line so that each
    malformed line can be reported with its number."""
    splits = defaultdict(list)
    for file in tqdm(source_files(path), desc="reading", unit="file"):
        if file.endswith(".parquet"):
            from datasets import load_dataset
            rows = load_dataset("parquet", data_files=file, split="train").to_list()
        else:
            rows = read_jsonl(file, problems)
        if not rows:
            problems.append(f"{file}: no rows")
        splits[split_of(file)] += rows
    return dict(splits)


def read_jsonl(path, problems):
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: malformed JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: expected a JSON object")
            elif isinstance(row.get("prompt"), dict):  # a whole tree of the release's trees file
                rows += flatten_tree(row["prompt"], None, row.get("message_tree_id"))
            else:
                rows.append(row)
    return rows


def flatten_tree(node, parent_id, tree_id):
    """A nested {..., "replies": [...]} tree as flat rows with parent_id set from the nesting."""
    row = {k: v for k, v in node.items() if k != "replies"}
    row["parent_id"] = parent_id
    row["message_tree_id"] = tree_id or row.get("message_tree_id") or row.get("message_id")
    rows = [row]
    for reply in node.get("replies") or []:
        rows += flatten_tree(reply, row.get("message_id"), row["message_tree_id"])
    return rows


# ----------------------------------------------------------------------------------------------
# Validation: every message is kept or counted under one reason
# ----------------------------------------------------------------------------------------------
def schema_problem(row):
    for field, types in REQUIRED.items():
        if not isinstance(row.get(field), types):
            return f"missing_or_bad_{field}"
    for field, types in OPTIONAL.items():
        if not isinstance(row.get(field), types):
            return f"bad_{field}"
    if row["role"] not in ROLES:
        return "bad_role"
    return None


def filter_reason(row, config):
    languages = config["languages"]
    if config["drop_deleted"] and row.get("deleted"):
        return "deleted"
    if config["drop_rejected"] and row.get("review_result") is False:
        return "rejected"
    if config["drop_empty"] and not row["text"].strip():
        return "empty_text"
    if languages is not None and row.get("lang") not in languages:
        return "language"
    return None


def validate(rows, config):
    """(kept messages by id, Counter of drop reasons). Fields, duplicates and filters are checked
    per message; then structure: only messages reachable from a prompter root through replies of
    the other role are kept. A message below a dropped one is an orphan; a loop of parents, a cycle."""
    dropped, kept = Counter(), {}
    for row in rows:
        reason = schema_problem(row) or ("duplicate_id" if row["message_id"] in kept else None)
        reason = reason or filter_reason(row, config)
        if reason:
            dropped[reason] += 1
        else:
            kept[row["message_id"]] = row
    children = defaultdict(list)
    for row in kept.values():
        children[row["parent_id"]].append(row)
    reachable, stack, counted = {}, [], set()
    for root in children[None]:
        if root["role"] == "prompter":
            stack.append(root)
        else:
            dropped["root_not_prompter"] += 1
    while stack:
        row = stack.pop()
        reachable[row["message_id"]] = row
        for child in children[row["message_id"]]:
            if child["role"] == row["role"]:
                dropped["roles_not_alternating"] += 1  # its replies become orphans below
                counted.add(child["message_id"])
            else:
                stack.append(child)
    for row in kept.values():
        if row["message_id"] not in reachable and row["message_id"] not in counted and row["parent_id"] is not None:
            dropped[structure_reason(row, kept)] += 1
    return reachable, +dropped


def structure_reason(row, kept):
    """'cycle' when following parents loops, else 'orphan' (some ancestor is missing or dropped)."""
    seen = set()
    while row is not None and row["parent_id"] is not None:
        if row["message_id"] in seen:
            return "cycle"
        seen.add(row["message_id"])
        row = kept.get(row["parent_id"])
    return "orphan"


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------
def rank_key(row):
    """Rank 0 is the best reply; unranked replies come after every ranked one."""
    return (row.get("rank") is None, row.get("rank") or 0, row.get("created_date") or "", row["message_id"])


def build_threads(messages, mode):
    """Threads as {"id", "lang", "messages"}: with mode best one per tree along the best replies,
    with all one per root-to-leaf path. A trailing unanswered user turn is cut off."""
    children = defaultdict(list)
    for row in messages.values():
        children[row["parent_id"]].append(row)
    for siblings in children.values():
        siblings.sort(key=rank_key)
    threads, seen = [], set()
    for root in tqdm(children[None], desc="threading", unit="tree", leave=False):
        for path in (best_path(root, children) if mode == "best" else all_paths(root, children)):
            while path and path[-1]["role"] == "prompter":
                path = path[:-1]
            key = tuple(r["message_id"] for r in path)
            if len(path) >= 2 and key not in seen:
                seen.add(key)
                threads.append({"id": path[-1]["message_id"], "lang": root.get("lang"),
                                "messages": [{"role": ROLES[r["role"]], "content": r["text"]} for r in path]})
    return threads


def best_path(root, children):
    path = [root]
    while children[path[-1]["message_id"]]:
        path.append(children[path[-1]["message_id"]][0])
    return [path]


def all_paths(root, children):
    paths, stack = [], [[root]]
    while stack:
        path = stack.pop()
        replies = children[path[-1]["message_id"]]
        if not replies:
            paths.append(path)
        stack += [path + [reply] for reply in reversed(replies)]
    return paths


def hold_out(threads, tree_of, fraction, seed):
    """Split one list of threads into (train, validation) by whole tree: no tree is in both."""
    trees = sorted({tree_of[t["id"]] for t in threads})
    random.Random(seed).shuffle(trees)
    val_trees = set(trees[:round(len(trees) * fraction)])
    return ([t for t in threads if tree_of[t["id"]] not in val_trees],
            [t for t in threads if tree_of[t["id"]] in val_trees])


def tree_ids(messages):
    """message_id -> the id of its tree's root."""
    root = {}
    for message_id, row in messages.items():
        chain = []
        while message_id not in root and row["parent_id"] is not None:
            chain.append(message_id)
            message_id, row = row["parent_id"], messages[row["parent_id"]]
        top = root.get(message_id, message_id)
        root[message_id] = top
        root.update(dict.fromkeys(chain, top))
    return root


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def write_atomic(path, lines):
    """Write lines to a temporary file, then rename: a crash never leaves half a file. Returns
    the sha256 of what was written."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                digest.update(line.encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return digest.hexdigest()


def jsonl_lines(rows):
    return (json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_of(config):
    """The config keys that change the output; a rerun with other values must redo the work."""
    return {k: v for k, v in config.items() if k not in ("force", "retries", "retry_wait", "out_dir")}


def outputs_valid(out_dir, config):
    """True when manifest.json matches this config and every file still has its recorded sha256."""
    try:
        manifest = json.load(open(os.path.join(out_dir, "manifest.json"), encoding="utf-8"))
        return manifest["settings"] == settings_of(config) and all(
            sha256_file(os.path.join(out_dir, name)) == digest for name, digest in manifest["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def print_summary(manifest, example):
    print("\nmessages in and out:")
    for split, counts in manifest["counts"].items():
        if split == "split":
            print(f"  held out {counts['validation_threads']:,} of {counts['validation_threads'] + counts['train_threads']:,} "
                  f"{counts['from']} threads for validation, by whole tree")
            continue
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(counts["dropped"].items())) or "none"
        print(f"  {split:<10} {counts['rows_in']:>7,} in | {counts['messages_kept']:>7,} kept | "
              f"{counts['threads']:>6,} threads | dropped: {reasons}")
    for problem in manifest["problems"][:10]:
        print(f"  skipped {problem}")
    if example:
        print("\nexample conversation:")
        for message in example["messages"]:
            text = message["content"].replace("\n", " ")
            print(f"  {message['role']:>9}: {text[:200]}{'...' if len(text) > 200 else ''}")


def main(argv):
    config = parse_args(argv, CONFIG)
    out_dir = config["out_dir"]
    # --- skip the work when it is done ---
    if not config["force"] and outputs_valid(out_dir, config):
        print(f"{out_dir}/ already holds valid outputs for these settings; nothing to do (--force redoes it)")
        return
    # --- read ---
    problems = []
    try:
        if config["source"]:
            splits = read_local(os.path.expanduser(config["source"]), problems)
        else:
            splits = download(config["hub_name"], config["retries"], config["retry_wait"])
    except SourceError as e:
        sys.exit(f"error: {e}")
    if not any(splits.values()):
        sys.exit(f"error: no messages in {config['source'] or config['hub_name']}"
                 + (f" ({'; '.join(problems[:3])})" if problems else ""))
    if not config["source"]:
        for split, size in HUB_SIZES.items():
            if len(splits[split]) != size:
                problems.append(f"hub split {split} has {len(splits[split]):,} rows, expected {size:,}")
    # --- validate and thread each split ---
    threads, counts, tree_of = {}, {}, {}
    for split, rows in splits.items():
        messages, dropped = validate(tqdm(rows, desc=f"validating {split}", unit="msg", leave=False), config)
        threads[split] = build_threads(messages, config["threads"])
        tree_of.update(tree_ids(messages))
        counts[split] = {"rows_in": len(rows), "messages_kept": len(messages), "dropped": dict(dropped),
                         "threads": len(threads[split])}
    if len(threads) == 1:  # one split given: hold out whole trees for validation
        (given, pool), = threads.items()
        threads["train"], threads["validation"] = hold_out(pool, tree_of, config["val_fraction"], config["seed"])
        counts[given]["threads"] = len(pool)
        counts["split"] = {"from": given, "train_threads": len(threads["train"]),
                           "validation_threads": len(threads["validation"]), "by": "whole tree"}
    # --- write: data files first, the manifest last, each atomically ---
    os.makedirs(out_dir, exist_ok=True)
    digests = {}
    for split in SPLITS:
        digests[f"raw_{split}.jsonl"] = write_atomic(os.path.join(out_dir, f"raw_{split}.jsonl"),
                                                     jsonl_lines(splits.get(split, [])))
        digests[f"{split}.jsonl"] = write_atomic(os.path.join(out_dir, f"{split}.jsonl"), jsonl_lines(threads[split]))
    manifest = {"source": config["source"] or f"hub:{config['hub_name']}", "settings": settings_of(config),
                "counts": counts, "problems": problems, "sha256": digests}
    write_atomic(os.path.join(out_dir, "manifest.json"), [json.dumps(manifest, indent=2, ensure_ascii=False)])
    print_summary(manifest, (threads["train"] or threads["validation"] or [None])[0])
    print(f"\nwrote {out_dir}/: {len(threads['train']):,} train and {len(threads['validation']):,} validation threads")


if __name__ == "__main__":
    main(sys.argv[1:])
