"""data.py: every input format becomes documents, OASST trees become conversations, the
validation-file rule, and atomic writes."""
import os

import pytest

from lumina import data
from conftest import CHATS, write_jsonl


def test_custom_formats_load(tmp_path):
    problems = []
    chat = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHATS[0]}, "{broken", {"other": 1}, "[1, 2]"])
    docs = data.read_documents(chat, problems)
    assert docs == [("chat", CHATS[0])]
    assert sorted(p.split("a.jsonl:")[1] for p in problems) == [
        "2: not valid JSON (Expecting property name enclosed in double quotes)",
        "3: no 'messages' list or 'text' string", "4: expected a JSON object, got list"]

    rows = [{"message_id": "r", "parent_id": None, "text": "Q?", "role": "prompter"},
            {"message_id": "b", "parent_id": "r", "text": "worse", "role": "assistant", "rank": 1},
            {"message_id": "a", "parent_id": "r", "text": "best", "role": "assistant", "rank": 0},
            {"message_id": "c", "parent_id": "a", "text": "more?", "role": "prompter", "rank": None}]
    docs = data.read_documents(write_jsonl(tmp_path / "oasst.jsonl", rows), problems)
    # Threaded by parent_id along the best reply; the trailing unanswered question is cut off.
    assert docs == [("chat", [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "best"}])]

    no_ids = [{"text": "Hi", "role": "prompter"}, {"text": "Hello", "role": "assistant"},
              {"text": "Bye", "role": "prompter"}, {"text": "Ciao", "role": "assistant"}]
    docs = data.read_documents(write_jsonl(tmp_path / "original.jsonl", no_ids), problems)
    assert [d[1][0]["content"] for d in docs] == ["Hi", "Bye"] and docs[1][1][1]["content"] == "Ciao"

    marked = tmp_path / "marked.txt"
    marked.write_text("<|user|>Hi\n<|bot|>Hello,\nsecond line\n<|user|>Bye\n<|bot|>See you\n")
    docs = data.read_documents(str(marked), problems)
    assert docs == [("chat", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello,\nsecond line"}]),
                    ("chat", [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}])]

    prose = tmp_path / "book.txt"
    prose.write_text("First paragraph.\n\nSecond one.\n")
    assert data.read_documents(str(prose), problems) == [("text", "First paragraph."), ("text", "Second one.\n")]


def test_message_rows_given_to_training_drop_deleted_and_rejected_replies(tmp_path):
    rows = [{"message_id": "q", "parent_id": None, "text": "Q?", "role": "prompter"},
            {"message_id": "x", "parent_id": "q", "text": "spam", "role": "assistant", "rank": 0, "review_result": False},
            {"message_id": "y", "parent_id": "q", "text": "gone", "role": "assistant", "rank": 1, "deleted": True},
            {"message_id": "z", "parent_id": "q", "text": "kept", "role": "assistant", "rank": 2, "lang": "de"}]
    docs = data.read_documents(write_jsonl(tmp_path / "rows.jsonl", rows), [])
    assert docs == [("chat", [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "kept"}])]


def test_validation_file_rule_and_prepared_folders(tmp_path):
    assert [data.is_validation_file(n) for n in ("val.jsonl", "my_valid.txt", "test-set.jsonl", "train.jsonl", "interval.txt")] \
        == [True, True, True, False, False]
    for name in ("a.jsonl", "a_val.jsonl", "notes.md"):
        (tmp_path / name).write_text("{}\n")
    assert data.split_files(str(tmp_path)) == ([str(tmp_path / "a.jsonl")], [str(tmp_path / "a_val.jsonl")])
    for name in ("train.jsonl", "validation.jsonl", "raw_train.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert data.split_files(str(tmp_path)) == ([str(tmp_path / "train.jsonl")], [str(tmp_path / "validation.jsonl")])
    # One file given on its own is training data, whatever its name: it once counted as validation
    # only, and training stopped with "no usable text".
    assert data.split_files(str(tmp_path / "a_val.jsonl")) == ([str(tmp_path / "a_val.jsonl")], [])


def test_hold_out_keeps_each_group_whole():
    items = [(group, i) for group in range(10) for i in range(3)]
    train, val = data.hold_out(items, lambda item: item[0], 0.2, seed=0)
    assert len(val) == 6 and not {g for g, _ in train} & {g for g, _ in val}
    assert data.hold_out(items[:3], lambda item: item[0], 0.5, seed=0) == (items[:3], [])  # one group: none held out


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "out.jsonl")
    data.write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        data.write_jsonl(path, rows())
    assert open(path).read() == '{"a": 1}\n' and os.listdir(tmp_path) == ["out.jsonl"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real(fd))
    path = tmp_path / "Model.pth"
    data.write_text(str(path), "weights")
    assert synced[0].startswith(str(tmp_path)) and os.path.basename(synced[0]) != "Model.pth"  # the temporary, before the rename
    assert synced[-1] == str(tmp_path)  # then the folder, so the rename itself survives a power cut
    assert path.read_text() == "weights"


def test_a_file_set_is_seen_whole_old_or_new_whatever_moment_a_crash_comes(tmp_path):
    folder, names = str(tmp_path), ("train.jsonl", "validation.jsonl", "manifest.json")

    def writer(word, tick=lambda *a: None):
        def write(staging):
            for n in names:
                tick(n)
                data.write_text(os.path.join(staging, n), f"{word} {n}\n")
        return write

    class Crash(Exception):
        pass

    data.write_file_set(folder, writer("old"))
    for crash_at in range(1, 2 * len(names) + 1):  # before every write and every move of the new set
        calls = []

        def tick(*args):
            calls.append(args)
            if len(calls) == crash_at:
                raise Crash

        with pytest.raises(Crash):
            data.write_file_set(folder, writer("new", tick), before_move=tick)
        data.split_files(folder)  # a reader first finishes a set that was complete when the crash came
        seen = {n: (tmp_path / n).read_text() for n in names}
        assert seen in ({n: f"old {n}\n" for n in names}, {n: f"new {n}\n" for n in names}), (crash_at, seen)
        assert (seen["train.jsonl"] == "new train.jsonl\n") == (crash_at > len(names))
        data.write_file_set(folder, writer("old"))
        assert sorted(os.listdir(folder)) == sorted(names)  # nothing of the interrupted set is left
