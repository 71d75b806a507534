"""lumina/data.py: everything that turns files into conversations, once. It imports no torch.

A document is ("chat", [{"role", "content"}, ...]) or ("text", "prose"). Readers for every input
format end there:
  - chat JSONL, one conversation per line: {"messages": [{"role", "content"}, ...]}
  - OASST message rows, one message per line ({"message_id", "parent_id", "text", "role", ...}),
    as the hub's OpenAssistant/oasst1 serves them; the release's nested trees files are flattened
  - rows of {"text"} alone: prose
  - text with <|user|> / <|bot|> at the start of a line; any other text file is prose
OASST rows are validated (every dropped message counted under its reason) and threaded by
parent_id, never by row order. Files are written atomically: a crash leaves the old file or the new
one, never half of one. Turning documents into ids needs the vocabulary, so that is vocab.py's.
"""
import gzip
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import tempfile
import zlib
from collections import Counter, defaultdict

ROLES = {"prompter": "user", "user": "user", "assistant": "assistant", "system": "system"}
BRANCHES = ("best", "all")  # which root-to-leaf paths of an OASST tree become conversations
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt")


class DataError(Exception):
    """Data that cannot be used; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Files on disk: where they are, which are validation, and writing them safely
# ----------------------------------------------------------------------------------------------
VALIDATION_WORDS = {"val", "valid", "validation", "test"}


def is_validation_file(path):
    """The one rule for telling a validation file by its name: one of its words (split at anything
    but letters and digits) is val, valid, validation or test. "interval.txt" is not one."""
    return bool(VALIDATION_WORDS & set(re.split(r"[^a-z0-9]+", os.path.basename(path).lower())))


def data_files(path, suffixes=DATA_SUFFIXES):
    """The data files at `path` (a file, or a folder's files with these suffixes), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path} does not exist")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(suffixes))
    if not files:
        raise DataError(f"{path} holds no {', '.join(suffixes)} files")
    return files


def split_files(path):
    """(train files, validation files) for training. Dataset_download.py's folder has its own
    train.jsonl / validation.jsonl (and raw_*.jsonl beside them, which are not training data). In
    another folder, files are told apart by name; one file given on its own is what to train on,
    whatever its name says (a share of it is then held out)."""
    settle_file_set(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    if os.path.isfile(path):
        return [path], []
    prepared = os.path.join(path, "train.jsonl")
    if os.path.isdir(path) and os.path.exists(prepared):
        val = os.path.join(path, "validation.jsonl")
        return [prepared], [val] if os.path.exists(val) else []
    files = data_files(path)
    return [f for f in files if not is_validation_file(f)], [f for f in files if is_validation_file(f)]


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash leaves the old file or the new one,
    never half of one. The temporary file sits in the same folder so the rename is atomic, and it
    gets the mode any new file would get (mkstemp alone makes private files). The file is synced
    before the rename and the folder after it (SQLite's rule): without that, a power cut can leave
    a renamed but empty file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    sync_folder(folder)


def sync_folder(folder):
    """Make the folder's entries (a rename) durable; POSIX only: Windows cannot open a folder."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


INCOMING = ".incoming"  # a file set being written; it holds COMPLETE once every file is in
COMPLETE = "COMPLETE"


def write_file_set(folder, write, before_move=None):
    """Replace a set of files that belong together (train.jsonl beside validation.jsonl...) so a
    reader sees the old set or the new one, never a mix: write(staging) writes every file into
    folder/.incoming, a COMPLETE marker is the commit point, then each file moves into place. A
    crash before the marker leaves the old set (the next write clears the leftovers); a crash
    after it is finished by the next reader (settle_file_set), as a journal is replayed."""
    staging = os.path.join(folder, INCOMING)
    settle_file_set(folder)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write(staging)
    names = sorted(n for n in os.listdir(staging) if not n.startswith("."))
    write_text(os.path.join(staging, COMPLETE), "\n".join(names))
    settle_file_set(folder, before_move)


def settle_file_set(folder, before_move=None):
    """Finish moving a complete set out of folder/.incoming (every reader of a prepared folder
    calls this first); an incomplete one is left for its writer. before_move(name): a test's hook."""
    staging = os.path.join(folder, INCOMING)
    try:
        with open(os.path.join(staging, COMPLETE), encoding="utf-8") as f:
            names = f.read().split("\n")
    except OSError:
        return  # no set in progress, or one that never completed: the old set stands
    for name in names:
        if os.path.exists(os.path.join(staging, name)):  # an earlier, interrupted settle moved the others
            if before_move:
                before_move(name)
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    sync_folder(folder)
    shutil.rmtree(staging)


def write_jsonl(path, rows):
    """Rows as JSON lines, atomically. Returns the sha256 of what was written."""
    digest = hashlib.sha256()

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
                f.write(line)
                digest.update(line.encode("utf-8"))

    atomic_write(path, write)
    return digest.hexdigest()


def write_text(path, text):
    """A text file, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def files_digest(path):
    """One sha256 for the data at `path` (a file, or a folder's data files): names and contents."""
    digest = hashlib.sha256()
    try:
        for file in data_files(path):
            digest.update(f"{os.path.basename(file)}:{sha256_file(file)}\n".encode())
    except (DataError, OSError):
        return "missing"
    return digest.hexdigest()


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading: JSONL rows, release trees, marked text
# ----------------------------------------------------------------------------------------------
def read_jsonl(path, problems):
    """[(line number, row dict)] of a .jsonl or .jsonl.gz file. A line that is not a JSON object
    of text goes to `problems` as "file:line: reason" and is skipped. A line holding one of the
    release's nested trees ({"prompt": {..., "replies": [...]}}) becomes its flattened messages."""
    rows = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            if "\\u" in line:  # NUL and lone surrogates can only arrive as \u escapes
                check_text(row)
            found = flatten_tree(row["prompt"], row.get("message_tree_id")) if isinstance(row.get("prompt"), dict) else [row]
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{number}: not valid JSON ({e.msg})")
        except RecursionError:
            problems.append(f"{path}:{number}: JSON nested too deeply to be a message")
        except ValueError as e:
            problems.append(f"{path}:{number}: {e}")
        else:
            rows += [(number, r) for r in found]
    return rows


def text_rows(rows, source, problems):
    """The rows (from parquet or the hub) whose strings are text: one with a NUL or a lone
    surrogate goes to `problems` as "source:row N: reason", as a bad JSONL line does."""
    kept = []
    for number, row in enumerate(rows, start=1):
        try:
            check_text(row)
            kept.append(row)
        except ValueError as e:
            problems.append(f"{source}:row {number}: {e}")
    return kept


def text_lines(path):
    """(line number, line) of a text file, .gz or not. Every line must be UTF-8: a file in another
    encoding is a DataError naming the line, rather than text with U+FFFD where its letters were;
    so is a truncated or corrupt .gz."""
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield number, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); "
                        f"save the file as UTF-8") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}:{number + 1}: the file is truncated or corrupt ({e}); copy or download it again") from None


BAD_CHARACTERS = re.compile("[\x00\ud800-\udfff]")  # NUL (no text has one) and lone surrogates (not Unicode)


def check_text(value):
    """Raise ValueError when any string in a parsed JSON value (keys too) holds a NUL or a lone
    surrogate. Iterative, so no depth of nesting can overflow the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str) and BAD_CHARACTERS.search(item):
            char = BAD_CHARACTERS.search(item).group()
            raise ValueError("holds a NUL character (U+0000): is it a binary file?" if char == "\x00" else
                             f"holds a lone surrogate (U+{ord(char):04X}), which is not Unicode text")


def flatten_tree(root, tree_id):
    """A nested {..., "replies": [...]} tree as flat rows with parent_id set from the nesting
    (a loop, not recursion: a tree may be deep)."""
    rows, stack = [], [(root, None)]
    while stack:
        node, parent_id = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("replies") or [], list):
            raise ValueError("a tree's 'prompt' and every reply must be message objects with a 'replies' list")
        row = {k: v for k, v in node.items() if k != "replies"}
        row["parent_id"] = parent_id
        row["message_tree_id"] = tree_id or row.get("message_tree_id") or row.get("message_id")
        tree_id = row["message_tree_id"]
        rows.append(row)
        stack += [(reply, row.get("message_id")) for reply in reversed(node.get("replies") or [])]
    return rows


def parse_marked_text(text, path, problems):
    """<|user|> and <|bot|> at a line's start open a turn; other lines continue it. Each user turn
    and the bot turns after it form one conversation."""
    chats = []
    for number, line in enumerate(text.splitlines(), start=1):
        marker = next((m for m in ("<|user|>", "<|bot|>") if line.startswith(m)), None)
        if marker == "<|user|>" or (marker and not chats):
            chats.append([])
        if marker:
            role = "user" if marker == "<|user|>" else "assistant"
            chats[-1].append({"role": role, "content": line[len(marker):].strip()})
        elif chats:
            chats[-1][-1]["content"] += "\n" + line
        elif line.strip():
            problems.append(f"{path}:{number}: text before the first <|user|> or <|bot|> marker")
    return [("chat", [{**m, "content": m["content"].strip()} for m in chat]) for chat in chats]


def read_documents(path, problems):
    """The documents in one file, whatever its format. Bad lines go to `problems`."""
    if path.endswith((".jsonl", ".jsonl.gz", ".json")):
        return rows_to_documents(read_jsonl(path, problems), path, problems)
    lines = []
    for number, line in text_lines(path):
        if "\x00" in line:
            raise DataError(f"{path}:{number}: holds a NUL character (U+0000): is it a binary file?")
        lines.append(line)
    text = "".join(lines).replace("\r\n", "\n")
    if any(line.startswith(("<|user|>", "<|bot|>")) for line in text.splitlines()):
        return parse_marked_text(text, path, problems)
    return [("text", p) for p in text.split("\n\n") if p.strip()]


def rows_to_documents(rows, path, problems):
    """Chat rows become chats, OASST message rows are validated and threaded, bare text rows are
    prose."""
    documents, messages = [], []
    for number, row in rows:
        if isinstance(row.get("messages"), list):
            chat = clean_chat(row["messages"])
            if chat:
                documents.append(("chat", chat))
            else:
                problems.append(f"{path}:{number}: 'messages' needs role/content objects with text")
        elif isinstance(row.get("text"), str) and is_one_of(row.get("role"), ROLES):
            reason = schema_problem(row) if "message_id" in row or "parent_id" in row else None
            if reason:  # a message row with ids that are not strings, and the like
                problems.append(f"{path}:{number}: {reason.replace('_', ' ')}")
            else:
                messages.append(row)
        elif isinstance(row.get("text"), str):
            if row["text"].strip():
                documents.append(("text", row["text"]))
        else:
            problems.append(f"{path}:{number}: no 'messages' list or 'text' string")
    return documents + [("chat", c["messages"]) for c in message_rows_to_conversations(messages)]


def is_one_of(value, names):
    """value is a string among `names` (a list or a number where a name belongs is not)."""
    return isinstance(value, str) and value in names


def clean_chat(messages):
    """Keep well-formed messages, renaming OASST's 'prompter' to 'user'; [] if any is malformed."""
    chat = [{"role": ROLES[m["role"]], "content": m["content"]} for m in messages
            if isinstance(m, dict) and is_one_of(m.get("role"), ROLES) and isinstance(m.get("content"), str)]
    return chat if len(chat) == len(messages) else []


def message_rows_to_conversations(rows, branches="best"):
    """Message rows given straight to training. With ids they are validated (deleted, rejected and
    empty messages dropped, any language kept) and threaded by parent_id; without ids (the original
    project's format) each user row opens a conversation that the rows after it continue."""
    if rows and all("message_id" in r and "parent_id" in r for r in rows):
        messages, _ = validate(rows, {**FILTERS, "languages": None})
        return conversations(messages, branches)
    chats = []
    for r in rows:
        if ROLES[r["role"]] == "user" or not chats:
            chats.append({"messages": []})
        chats[-1]["messages"].append({"role": ROLES[r["role"]], "content": r["text"]})
    return chats


# ----------------------------------------------------------------------------------------------
# OASST validation: every message is kept or counted under one reason
# ----------------------------------------------------------------------------------------------
REQUIRED = {"message_id": (str,), "parent_id": (str, type(None)), "text": (str,), "role": (str,)}
OPTIONAL = {"lang": (str, type(None)), "deleted": (bool, type(None)), "review_result": (bool, type(None)),
            "rank": (int, type(None)), "message_tree_id": (str, type(None))}
OASST_ROLES = ("prompter", "assistant")
FILTERS = {"languages": ["en"], "drop_deleted": True, "drop_rejected": True, "drop_empty": True}


def schema_problem(row):
    for field, types in REQUIRED.items():
        if not isinstance(row.get(field), types):
            return f"missing_or_bad_{field}"
    for field, types in OPTIONAL.items():
        if not isinstance(row.get(field), types):
            return f"bad_{field}"
    return None if row["role"] in OASST_ROLES else "bad_role"


def filter_reason(row, filters):
    """Why `filters` (a dict shaped like FILTERS) drops this message, or None."""
    if filters["drop_deleted"] and row.get("deleted"):
        return "deleted"
    if filters["drop_rejected"] and row.get("review_result") is False:
        return "rejected"
    if filters["drop_empty"] and not row["text"].strip():
        return "empty_text"
    if filters["languages"] is not None and row.get("lang") not in filters["languages"]:
        return "language"
    return None


def validate(rows, filters):
    """(kept messages by id, Counter of drop reasons). Fields, duplicates and filters are checked
    per message; then structure: only messages reachable from a prompter root through replies of
    the other role are kept. A message below a dropped one is an orphan; a loop of parents, a cycle."""
    dropped, kept = Counter(), {}
    for row in rows:
        reason = "not_an_object" if not isinstance(row, dict) else schema_problem(row) or ("duplicate_id" if row["message_id"] in kept else None)
        reason = reason or filter_reason(row, filters)
        if reason:
            dropped[reason] += 1
        else:
            kept[row["message_id"]] = row
    reachable, counted = reachable_messages(kept, dropped)
    for row in kept.values():
        if row["message_id"] not in reachable and row["message_id"] not in counted and row["parent_id"] is not None:
            dropped[structure_reason(row, kept)] += 1
    return reachable, +dropped


def reachable_messages(kept, dropped):
    """Messages reachable from a prompter root through alternating roles, and the ids already
    counted in `dropped` on the way (roots that are not prompters, replies of the same role)."""
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
                dropped["roles_not_alternating"] += 1  # its replies become orphans
                counted.add(child["message_id"])
            else:
                stack.append(child)
    return reachable, counted


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
# Threading trees into conversations
# ----------------------------------------------------------------------------------------------
def rank_key(row):
    """Rank 0 is the best reply; unranked replies come after every ranked one, then by date and id,
    so the order never depends on the order of the rows in the file."""
    date = row.get("created_date") if isinstance(row.get("created_date"), str) else ""
    return (row.get("rank") is None, row.get("rank") or 0, date, row["message_id"])


def conversations(messages, branches="best"):
    """Conversations as {"id", "lang", "messages"} from validated messages by id: with branches
    "best" one per tree along the best replies, with "all" one per root-to-leaf path. A trailing
    unanswered user turn is cut off; a conversation needs a user turn and its answer."""
    children = defaultdict(list)
    for row in messages.values():
        children[row["parent_id"]].append(row)
    for siblings in children.values():
        siblings.sort(key=rank_key)
    found, seen = [], set()
    for root in children[None]:
        for path in paths_from(root, children, branches):
            while path and path[-1]["role"] == "prompter":
                path = path[:-1]
            key = tuple(r["message_id"] for r in path)
            if len(path) >= 2 and key not in seen:
                seen.add(key)
                found.append({"id": path[-1]["message_id"], "lang": root.get("lang"),
                              "messages": [{"role": ROLES[r["role"]], "content": r["text"]} for r in path]})
    return found


def paths_from(root, children, branches):
    """Root-to-leaf paths: the best-ranked one, or all of them (children are sorted best first)."""
    if branches == "best":
        path = [root]
        while children[path[-1]["message_id"]]:
            path.append(children[path[-1]["message_id"]][0])
        return [path]
    paths, stack = [], [[root]]
    while stack:
        path = stack.pop()
        replies = children[path[-1]["message_id"]]
        if not replies:
            paths.append(path)
        stack += [path + [reply] for reply in reversed(replies)]
    return paths


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


def held_out_groups(groups, fraction, seed):
    """The groups (OASST trees, documents) to hold out: a seeded `fraction` of them, at least one
    when there are two or more."""
    groups = sorted(set(groups))
    random.Random(seed).shuffle(groups)
    count = min(len(groups) - 1, max(1, round(len(groups) * fraction))) if fraction > 0 else 0
    return set(groups[:count])


def hold_out(items, group_of, fraction, seed):
    """Split items into (train, validation) by whole group, so that no group is in both."""
    val_groups = held_out_groups(map(group_of, items), fraction, seed)
    return ([i for i in items if group_of(i) not in val_groups], [i for i in items if group_of(i) in val_groups])


# ----------------------------------------------------------------------------------------------
# Preference pairs: the rankings of sibling replies
# ----------------------------------------------------------------------------------------------
def preference_pairs(rows, messages):
    """(pairs, Counter of skipped pairs by reason) from a split's raw message rows and the ones
    validate() kept. Every two assistant replies to the same kept prompt make a pair when both
    were kept and ranked, with different ranks (rank 0 is the best):
      {"id", "tree", "prompt": [messages up to and including the prompt], "chosen", "rejected",
       "ranks": [the chosen's, the rejected's]}
    A pair is skipped, and counted, for a deleted, rejected or otherwise dropped reply, a reply
    without a rank, or equal ranks."""
    replies = defaultdict(list)
    for row in rows:
        if isinstance(row, dict) and row.get("role") == "assistant" and is_one_of(row.get("parent_id"), messages):
            replies[row["parent_id"]].append(row)
    tree_of, pairs, skipped = tree_ids(messages), [], Counter()
    for prompt_id, siblings in replies.items():
        prompt = thread_to(messages, prompt_id)
        for a, b in itertools.combinations(siblings, 2):
            reason = pair_problem(a, b, messages)
            if reason:
                skipped[reason] += 1
                continue
            better, worse = (a, b) if a["rank"] < b["rank"] else (b, a)
            pairs.append({"id": f"{better['message_id']}>{worse['message_id']}", "tree": tree_of[prompt_id],
                          "prompt": prompt, "chosen": better["text"], "rejected": worse["text"],
                          "ranks": [better["rank"], worse["rank"]]})
    return pairs, skipped


def pair_problem(a, b, messages):
    """Why two sibling replies make no preference pair, or None."""
    if a.get("deleted") or b.get("deleted"):
        return "deleted_reply"
    if a.get("review_result") is False or b.get("review_result") is False:
        return "rejected_reply"
    if any(not is_one_of(r.get("message_id"), messages) or messages[r["message_id"]] is not r for r in (a, b)):
        return "dropped_reply"  # empty, another language, a duplicate id...
    if a.get("rank") is None or b.get("rank") is None:
        return "null_rank"
    return "equal_rank" if a["rank"] == b["rank"] else None


def thread_to(messages, message_id):
    """The conversation from the tree's root down to message_id, as chat messages."""
    path = []
    while message_id is not None:
        row = messages[message_id]
        path.append({"role": ROLES[row["role"]], "content": row["text"]})
        message_id = row["parent_id"]
    return path[::-1]


# ----------------------------------------------------------------------------------------------
# Preference pairs as files (Dataset_download.py writes them; fine_tune.py learns from them)
# ----------------------------------------------------------------------------------------------
PAIR_FILES = ("pairs_train.jsonl", "pairs_validation.jsonl")


def read_pairs(path, problems):
    """The preference pairs of one JSONL file: {"prompt": [messages ending with a user turn],
    "chosen", "rejected"} and optionally "tree" (pairs of one tree are held out together). A
    malformed line goes to `problems` as "file:line: reason" and is skipped."""
    pairs = []
    for number, row in read_jsonl(path, problems):
        try:
            pair = checked_pair(row)
        except ValueError as e:
            problems.append(f"{path}:{number}: {e}")
            continue
        pairs.append({"tree": str(row.get("tree") or f"{path}:{number}"), **pair})
    return pairs


def checked_pair(row):
    """{"prompt", "chosen", "rejected"} of a pair row, its messages cleaned; ValueError if it is not
    one a reader keeps (read_pairs, and serve.py before it appends a pair from the page)."""
    prompt = clean_chat(row["prompt"]) if isinstance(row.get("prompt"), list) else []
    replies = [row.get(key) for key in ("chosen", "rejected")]
    if not prompt or prompt[-1]["role"] != "user" or not all(isinstance(r, str) and r.strip() for r in replies):
        raise ValueError("a pair needs 'prompt' (messages ending with a user turn) and non-empty 'chosen' and "
                         "'rejected' texts")
    return {"prompt": prompt, "chosen": replies[0], "rejected": replies[1]}


def append_jsonl(path, row):
    """Append one JSON line to path, atomically: the file is rewritten whole beside itself and
    renamed over the old one (atomic_write), so a crash leaves the file as it was or with the whole
    new line, never half of it, and nothing already there is ever lost. A file that does not end
    in a newline (edited by hand) gets one first. Costs the file's size per line: for files a
    person adds to one line at a time, not for a dataset. Returns the number of lines now in it."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        with open(path, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(old + line)
    atomic_write(path, write)
    return old.count(b"\n") + 1


def pair_files(path):
    """(train files, validation files) of preference pairs at `path`, or None when it holds none:
    Dataset_download.py's folder (pairs_train.jsonl, pairs_validation.jsonl), or a JSONL file whose
    first row is a pair."""
    settle_file_set(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        train, val = (os.path.join(path, name) for name in PAIR_FILES)
        return ([train], [val] if os.path.exists(val) else []) if os.path.exists(train) else None
    if os.path.isfile(path) and path.endswith((".jsonl", ".jsonl.gz")):
        try:
            first = next((line for _, line in text_lines(path) if line.strip()), "")
            row = json.loads(first)
        except (DataError, ValueError, RecursionError):  # the reader of the data says what is wrong with it
            return None
        return ([path], []) if isinstance(row, dict) and "chosen" in row and "rejected" in row else None
    return None


def prepared_pair_files(path):
    """The pair files beside the conversations in a folder from Dataset_download.py, else []."""
    files = pair_files(path) if os.path.isdir(path) else None
    return [f for group in files or () for f in group]


def pair_chars(files):
    """Counter of every character in these pair files. Train.py builds the vocabulary of a prepared
    folder from its pairs too: the pairs hold every ranked reply, the conversations only the best
    ones, so without them preference tuning would meet a hundred characters the model never saw."""
    counts = Counter()
    for path in files:
        for pair in read_pairs(path, []):  # fine_tune.py reports a pair file's bad lines when it reads it
            counts.update(pair["chosen"] + pair["rejected"] + "".join(m["content"] for m in pair["prompt"]))
    return counts


def training_pairs(path, val_fraction, seed, problems):
    """(train pairs, validation pairs) from pair files; without a validation file a val_fraction
    of whole trees is held out, so no tree has pairs on both sides."""
    files = pair_files(path)
    if files is None:
        raise DataError(f"{path} holds no preference pairs (rows with 'prompt', 'chosen' and 'rejected'); "
                        f"Dataset_download.py writes them as pairs_train.jsonl")
    train, val = ([p for f in group for p in read_pairs(f, problems)] for group in files)
    if not val:
        train, val = hold_out(train, lambda pair: pair["tree"], val_fraction, seed)
    if not train:
        raise DataError(f"no usable preference pairs in {path}" +
                        (f" ({len(problems)} lines skipped; the first: {problems[0]})" if problems else ""))
    return train, val


# ----------------------------------------------------------------------------------------------
# Training documents
# ----------------------------------------------------------------------------------------------
def training_documents(path, val_fraction, seed, problems):
    """(train documents, validation documents) from a file or folder. Without a validation file,
    a val_fraction of whole documents is held out, so no conversation sits in both."""
    if not os.path.exists(path):
        hint = " Run `python Dataset_download.py` first." if os.path.basename(path.rstrip("/")) == "oasst1_data" else ""
        raise DataError(f"data path {path} does not exist.{hint}")
    try:
        train_files, val_files = split_files(path)
    except DataError as e:
        raise DataError(f"{e}. For OASST1, run `python Dataset_download.py` first.") from None
    train = [d for f in train_files for d in read_documents(f, problems)]
    val = [d for f in val_files for d in read_documents(f, problems)]
    if not val:
        numbered = list(enumerate(train))
        kept, held = hold_out(numbered, lambda item: item[0], val_fraction, seed)
        train, val = [d for _, d in kept], [d for _, d in held]
    if not train:
        raise DataError(f"no usable text in {path}" + (f"; first problem: {problems[0]}" if problems else ""))
    return train, val


def document_chars(documents):
    """Counter of every character in the documents' text."""
    counts = Counter()
    for kind, doc in documents:
        for text in [doc] if kind == "text" else [m["content"] for m in doc]:
            counts.update(text)
    return counts

