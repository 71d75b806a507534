"""Hostile data for every reader in lumina/data.py (and the cache in corpus.py): whatever a file
holds, the answer is documents, or skipped lines named "file:line: reason", or one DataError that
names the file. Never a traceback, and never a cache made from a file that failed. Hypothesis
generates the rows; what it found is kept below as @example regression cases."""
import gzip
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import Dataset_download
from lumina import data
from lumina.corpus import load_data

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
# Characters that broke a reader once: NUL (numpy's str arrays strip it), a lone surrogate (cannot be
# written as UTF-8), the chat markers, a tab, and text of any other kind.
NASTY = st.sampled_from(["\x00", "\ud800", "\udfff", "<|user|>", "<|bot|>", "<|end|>", "\t", "\n", "é", "🙂", " "])
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=5)), max_size=6).map("".join)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
OASST_KEYS = ["message_id", "parent_id", "text", "role", "rank", "lang", "deleted", "review_result",
              "message_tree_id", "created_date", "messages", "prompt", "replies", "chosen", "rejected", "content", "tree"]
ROLE = st.sampled_from(["prompter", "assistant", "user", "system", ["user"], None, 3])
IDS = st.sampled_from(["a", "b", "c", None, ["a"], {"a": 1}, 7])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, JSON)})
ROW = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(OASST_KEYS), JSON, max_size=6),
    st.fixed_dictionaries({"message_id": IDS, "parent_id": IDS, "text": st.one_of(TEXT, JSON), "role": ROLE,
                           "rank": st.one_of(st.none(), st.integers(0, 2), JSON), "created_date": JSON}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(MESSAGE, max_size=4), JSON)}),
    st.fixed_dictionaries({"prompt": st.one_of(st.lists(MESSAGE, max_size=3), JSON), "chosen": st.one_of(TEXT, JSON),
                           "rejected": st.one_of(TEXT, JSON)}),
    st.fixed_dictionaries({"prompt": st.fixed_dictionaries({"message_id": IDS, "text": TEXT, "role": ROLE,
                                                            "replies": st.one_of(JSON, st.lists(JSON, max_size=2))})}),
)
RAW_LINE = st.one_of(ROW.map(lambda row: json.dumps(row, ensure_ascii=True).encode()),  # \ud800 as an escape
                     st.binary(max_size=20).filter(lambda b: b"\n" not in b),           # invalid UTF-8, truncation
                     st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth))  # deep nesting
LINES = st.lists(RAW_LINE, min_size=5, max_size=10)  # 60 files of 5-10 rows: 300 or more rows per reader
HAND_MADE = [  # the crashes of issue 27, each as it was reported
    b'{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
    b'{"message_id": "a", "parent_id": ["x"], "text": "hi", "role": "prompter"}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "ok"}]}',
    b'{"messages": [{"role": "user", "content": "a\\u0000b"}, {"role": "assistant", "content": "ok"}]}',
    b"[" * 5000 + b"]" * 5000,
    b'{"text": "caf\xe9 latin-1"}',
]


def write(folder, name, lines, gz=False):
    path = os.path.join(folder, name)
    raw = b"\n".join(lines) + b"\n"
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)
    return path


def check_problems(problems, path):
    for problem in problems:
        assert problem.startswith(f"{path}:") and "\n" not in problem, problem


def clean(documents):
    """Whatever a reader returns is text that can be written and encoded: no NUL, no lone surrogate."""
    for kind, doc in documents:
        for text in [doc] if kind == "text" else [m["content"] for m in doc]:
            assert isinstance(text, str) and "\x00" not in text
            text.encode("utf-8")


def answer(reader, path):
    """Run a reader; a DataError must name the file. Returns (result or None, problems)."""
    problems = []
    try:
        return reader(path, problems), problems
    except data.DataError as e:
        assert path in str(e) and "\n" not in str(e), str(e)
        return None, problems


@FUZZ
@given(lines=LINES)
@example(lines=HAND_MADE)
def test_read_documents_of_any_jsonl(tmp_path, lines):
    path = write(tmp_path, "x.jsonl", lines)
    found, problems = answer(data.read_documents, path)
    check_problems(problems, path)
    if found is not None:
        clean(found)


@FUZZ
@given(lines=LINES, cut=st.integers(1, 200))
@example(lines=HAND_MADE, cut=30)
def test_read_jsonl_of_any_gz_even_truncated(tmp_path, lines, cut):
    path = write(tmp_path, "x.jsonl.gz", lines, gz=True)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:max(10, len(whole) - cut)])  # a download cut short
    found, problems = answer(data.read_documents, path)
    check_problems(problems, path)
    if found is not None:
        clean(found)


@FUZZ
@given(text=st.lists(st.one_of(NASTY, st.text(max_size=8), st.just("<|user|>hi\n<|bot|>yo")), max_size=60).map("".join),
       junk=st.binary(max_size=8))
@example(text="<|user|>hi\n<|bot|>a\x00b", junk=b"")
@example(text="prose", junk=b"\xff\xfe")
def test_read_documents_of_any_text_file(tmp_path, text, junk):
    path = os.path.join(tmp_path, "x.txt")
    with open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogatepass") + junk)
    found, problems = answer(data.read_documents, path)
    check_problems(problems, path)
    if found is not None:
        clean(found)


@FUZZ
@given(lines=LINES)
@example(lines=HAND_MADE)
@example(lines=[b'{"prompt": [{"role": "user", "content": "q"}], "chosen": "a\\u0000", "rejected": "b"}'] * 5)
def test_read_pairs_and_pair_files_of_any_jsonl(tmp_path, lines):
    path = write(tmp_path, "pairs.jsonl", lines)
    answer(lambda p, problems: data.pair_files(p), path)
    found, problems = answer(data.read_pairs, path)
    check_problems(problems, path)
    for pair in found or []:
        clean([("chat", pair["prompt"]), ("text", pair["chosen"]), ("text", pair["rejected"])])


@FUZZ
@given(lines=LINES)
@example(lines=HAND_MADE)
def test_training_documents_and_the_cache(tmp_path, lines):
    path = write(tmp_path, "x.jsonl", lines)
    cache = tempfile.mkdtemp(dir=tmp_path)  # tmp_path is shared by every example
    try:
        found = load_data(path, cache, 0.2, False, 0, log=lambda *a: None)
    except data.DataError as e:
        assert path in str(e)
        assert not os.path.exists(cache) or not os.listdir(cache)  # nothing is cached from a file that failed
        return
    check_problems(found.problems, path)
    again = load_data(path, cache, 0.2, False, 0, log=lambda *a: None)  # from the cache: the same vocabulary
    assert again.vocab.chars == found.vocab.chars and "\x00" not in "".join(found.vocab.chars)


@FUZZ
@given(rows=st.lists(ROW, min_size=5, max_size=10))
@example(rows=[json.loads(line) for line in HAND_MADE[:4]])
def test_oasst_validation_threads_and_pairs_of_any_rows(rows):
    """Dataset_download's path: validate, thread and pair whatever rows a source held."""
    config, problems = {**Dataset_download.CONFIG, "val_fraction": 0.5}, []
    found, pairs, counts = Dataset_download.prepare({"train": data.text_rows(rows, "hub", problems)}, config)
    check_problems(problems, "hub")
    for split in found:
        clean([("chat", c["messages"]) for c in found[split]])


@FUZZ
@given(rows=st.lists(ROW.filter(lambda row: isinstance(row, dict)), min_size=5, max_size=10))
def test_message_rows_given_to_training(rows):
    problems = []
    rows = data.text_rows(rows, "x.jsonl", problems)  # as read_jsonl gives them
    documents = data.rows_to_documents(list(enumerate(rows, start=1)), "x.jsonl", problems)
    check_problems(problems, "x.jsonl")
    clean(documents)


def test_invalid_utf8_is_an_error_naming_the_line_not_a_silent_replacement(tmp_path):
    path = write(tmp_path, "latin1.jsonl", [b'{"text": "fine"}', b'{"text": "caf\xe9"}'])
    with pytest.raises(data.DataError, match=r"latin1.jsonl:2: not valid UTF-8.*save the file as UTF-8"):
        data.read_documents(path, [])


def test_a_truncated_gz_names_the_file(tmp_path):
    path = write(tmp_path, "cut.jsonl.gz", [b'{"text": "hello"}'] * 1000, gz=True)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    with pytest.raises(data.DataError, match=r"cut.jsonl.gz.*(truncated|corrupt)"):
        data.read_documents(path, [])


def test_hand_made_rows_are_skipped_with_their_reason(tmp_path):
    path = write(tmp_path, "bad.jsonl", HAND_MADE[:5] + [b'{"text": "good prose"}'])
    problems = []
    assert data.read_documents(path, problems) == [("text", "good prose")]
    said = {int(p.split(": ", 1)[0].rsplit(":", 1)[1]): p for p in problems}
    assert sorted(said) == [1, 2, 3, 4, 5] and all(p.startswith(f"{path}:") for p in problems)
    assert "parent id" in said[2] and "surrogate" in said[3] and "NUL" in said[4] and "nested" in said[5]
