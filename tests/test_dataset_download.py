"""Dataset_download.py: sources, validation counts, threads by parent_id, outputs and reruns."""
import gzip
import hashlib
import json
import os
import socket
import time


import pytest

import Dataset_download as D
from conftest import SHARED_DATA, need, run_script, write_jsonl

SAMPLE = os.path.join(SHARED_DATA, "oasst1_validation_en_sample.messages.jsonl")


def msg(message_id, parent_id, role, text, rank=None, tree="t1", **fields):
    """A message row with all 18 fields of the hub's schema."""
    row = {"message_id": message_id, "parent_id": parent_id, "user_id": "u", "created_date": "2023-02-01T00:00:00",
           "text": text, "role": role, "lang": "en", "review_count": 3, "review_result": True, "deleted": False,
           "rank": rank, "synthetic": False, "model_name": None, "detoxify": None, "message_tree_id": tree,
           "tree_state": "ready_for_export", "emojis": None, "labels": None}
    row.update(fields)
    return row


# Tree t1 branches twice with ranks; tree t2 has null ranks, a deleted and a rejected reply, an
# orphan (its parent was deleted) and a duplicate id; tree t3 is German; x9's parent is missing.
ROWS = [
    msg("q1", None, "prompter", "What is 2+2?"),
    msg("a1", "q1", "assistant", "It is 4.", rank=0), msg("a2", "q1", "assistant", "Five.", rank=1),
    msg("q2", "a1", "prompter", "And 3+3?"),
    msg("b1", "q2", "assistant", "Six.", rank=1), msg("b2", "q2", "assistant", "It is 6.", rank=0),
    msg("p1", None, "prompter", "Name a fruit.", tree="t2"),
    msg("r1", "p1", "assistant", "Apple.", tree="t2"),
    msg("r2", "p1", "assistant", "Spam spam", tree="t2", review_result=False),
    msg("r3", "p1", "assistant", "gone", tree="t2", deleted=True),
    msg("o1", "r3", "prompter", "reply to a deleted message", tree="t2"),
    msg("r1", "p1", "assistant", "Apple again (duplicate id).", tree="t2"),
    msg("r4", "p1", "assistant", "   ", tree="t2"),
    msg("g1", None, "prompter", "Wie geht's?", tree="t3", lang="de"),
    msg("g2", "g1", "assistant", "Gut.", tree="t3", lang="de"),
    msg("x9", "missing", "assistant", "my parent never existed", tree="t4"),
]


def prepare(tmp_path, *args, rows=ROWS, name="train.jsonl"):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    write_jsonl(src / name, rows)
    out = run_script("Dataset_download.py", f"--source={src}", f"--out_dir={tmp_path / 'out'}", *args, cwd=tmp_path)
    return out, tmp_path / "out"


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def run_main(tmp_path, source, *args):
    D.main([f"--source={source}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0", *args])
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    return manifest, read(tmp_path / "out" / "train.jsonl")


# --- validation and threads ----------------------------------------------------------------------
def test_counts_every_drop_reason_and_threads_by_parent(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ROWS)
    manifest, threads = run_main(tmp_path, src)
    counts = manifest["counts"]["train"]
    assert counts["dropped"] == {"deleted": 1, "rejected": 1, "empty_text": 1, "duplicate_id": 1,
                                 "language": 2, "orphan": 2}
    assert counts["rows_in"] == counts["messages_kept"] + sum(counts["dropped"].values()) == len(ROWS)
    assert sorted((t["messages"] for t in threads), key=len, reverse=True) == [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}],
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]]


def test_all_mode_gives_every_path_and_languages_none_keeps_german(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ROWS)
    manifest, threads = run_main(tmp_path, src, "--branches=all", "--languages=None")
    replies = sorted(tuple(m["content"] for m in t["messages"] if m["role"] == "assistant") for t in threads)
    assert replies == [("Apple.",), ("Five.",), ("Gut.",), ("It is 4.", "It is 6."), ("It is 4.", "Six.")]
    assert "language" not in manifest["counts"]["train"]["dropped"]


def test_cycles_and_non_alternating_roles_are_counted(tmp_path):
    rows = [msg("q", None, "prompter", "hi"), msg("a", "q", "assistant", "hello"),
            msg("b", "a", "assistant", "same role twice"), msg("c", "b", "prompter", "below it"),
            msg("x", "y", "prompter", "loop 1"), msg("y", "x", "assistant", "loop 2")]
    manifest, threads = run_main(tmp_path, write_jsonl(tmp_path / "train.jsonl", rows))
    assert manifest["counts"]["train"]["dropped"] == {"roles_not_alternating": 1, "orphan": 1, "cycle": 2}
    assert len(threads) == 1


def test_null_ranks_fall_back_to_a_stable_order(tmp_path):
    rows = [msg("q", None, "prompter", "hi"), msg("a", "q", "assistant", "unranked", rank=None),
            msg("b", "q", "assistant", "ranked best", rank=0)]
    _, threads = run_main(tmp_path, write_jsonl(tmp_path / "train.jsonl", rows))
    assert threads[0]["messages"][1]["content"] == "ranked best"


# --- sources -------------------------------------------------------------------------------------
def test_parquet_written_and_read_by_datasets(tmp_path):
    need("datasets")
    import datasets
    src = tmp_path / "parquet"
    src.mkdir()
    datasets.Dataset.from_list(ROWS[:6]).to_parquet(str(src / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(ROWS[6:8]).to_parquet(str(src / "validation-00000-of-00001.parquet"))
    D.main([f"--source={src}", f"--out_dir={tmp_path / 'out'}"])
    assert len(read(tmp_path / "out" / "train.jsonl")) == 1
    assert read(tmp_path / "out" / "validation.jsonl")[0]["messages"][1]["content"] == "Apple."


def test_the_hub_path_through_datasets_with_local_files(tmp_path):
    need("datasets")
    import datasets
    train, val = write_jsonl(tmp_path / "t.jsonl", ROWS[:6]), write_jsonl(tmp_path / "v.jsonl", ROWS[6:8])
    load = lambda name: datasets.load_dataset("json", data_files={"train": train, "validation": val})
    splits = D.download("OpenAssistant/oasst1", 1, 0, load=load)
    assert [r["message_id"] for r in splits["train"]] == [r["message_id"] for r in ROWS[:6]]
    assert splits["validation"][0]["text"] == "Name a fruit."


def test_an_unreachable_hub_is_retried_then_explained():
    calls = []

    def offline(name):
        calls.append(name)
        raise ConnectionError("Couldn't reach 'OpenAssistant/oasst1' on the Hub")

    with pytest.raises(D.SourceError, match="after 3 attempts.*--source PATH"):
        D.download("OpenAssistant/oasst1", 3, 0.0, load=offline)
    assert len(calls) == 3


def test_release_trees_and_messages_gz_files(tmp_path):
    tree = {"message_tree_id": "q1", "tree_state": "ready_for_export",
            "prompt": {**{k: v for k, v in ROWS[0].items() if k != "parent_id"},
                       "replies": [{**ROWS[1], "replies": [{**ROWS[3], "replies": [ROWS[5], ROWS[4]]}]}, ROWS[2]]}}
    src = tmp_path / "release"
    src.mkdir()
    with gzip.open(src / "2023-04-12_oasst_ready.trees.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(tree) + "\n")
    _, threads = run_main(tmp_path, src)
    assert [m["content"] for m in threads[0]["messages"]] == ["What is 2+2?", "It is 4.", "And 3+3?", "It is 6."]
    assert len(threads) == 1
    flat = tmp_path / "flat"
    flat.mkdir()
    with gzip.open(flat / "2023-04-12_oasst_ready.messages.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS[:6])
    _, threads_flat = run_main(tmp_path, flat, "--force")
    assert threads_flat[0]["messages"] == threads[0]["messages"]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    out, out_dir = prepare(tmp_path, rows=[ROWS[0], "{not json", ROWS[1], "[1, 2]"])
    assert out.returncode == 0, out.stderr
    assert "train.jsonl:2: not valid JSON" in out.stdout and "train.jsonl:4: expected a JSON object" in out.stdout
    problems = json.load(open(out_dir / "manifest.json"))["problems"]
    assert len(problems) == 2


def test_an_empty_file_is_an_error(tmp_path):
    out, _ = prepare(tmp_path, rows=[])
    assert out.returncode != 0 and "no messages in" in out.stderr and "no rows" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_options_are_refused(tmp_path):
    out, _ = prepare(tmp_path, "--branches=some")
    assert out.returncode != 0 and "branches must be one of best, all, got 'some'" in out.stderr
    out, _ = prepare(tmp_path, "--bogus=1")
    assert out.returncode != 0 and "valid" not in out.stdout and "valid keys: source" in out.stderr
    out, _ = prepare(tmp_path, "--threads=all")  # the old name of branches
    assert out.returncode != 0 and "--threads was renamed: use --branches=best or --branches=all" in out.stderr


# --- outputs -------------------------------------------------------------------------------------
def test_one_split_is_held_out_by_whole_tree(tmp_path):
    rows = [r for i in range(40) for r in (msg(f"q{i}", None, "prompter", f"question {i}", tree=f"t{i}"),
                                           msg(f"a{i}", f"q{i}", "assistant", f"answer {i}", tree=f"t{i}", rank=0),
                                           msg(f"f{i}", f"a{i}", "prompter", "more", tree=f"t{i}"),
                                           msg(f"b{i}", f"f{i}", "assistant", "sure", tree=f"t{i}", rank=0))]
    out, out_dir = prepare(tmp_path, "--val_fraction=0.25", "--branches=all", rows=rows)
    assert out.returncode == 0
    train, val = read(out_dir / "train.jsonl"), read(out_dir / "validation.jsonl")
    assert len(val) == 10 and len(train) == 30
    first_turns = lambda threads: {t["messages"][0]["content"] for t in threads}
    assert not first_turns(train) & first_turns(val)


def test_rerun_does_nothing_until_forced_or_outputs_change(tmp_path):
    out, out_dir = prepare(tmp_path)
    assert "wrote" in out.stdout
    manifest = json.load(open(out_dir / "manifest.json"))
    assert set(manifest["sha256"]) == {"train.jsonl", "validation.jsonl", "raw_train.jsonl", "raw_validation.jsonl",
                                       "pairs_train.jsonl", "pairs_validation.jsonl"}
    assert len(read(out_dir / "raw_train.jsonl")) == len(ROWS)  # the messages as they arrived
    out, _ = prepare(tmp_path)
    assert "nothing to do" in out.stdout
    (out_dir / "train.jsonl").write_text("tampered\n")  # e.g. a half-written file from another tool
    out, _ = prepare(tmp_path)
    assert "wrote" in out.stdout
    out, _ = prepare(tmp_path, "--force")
    assert "wrote" in out.stdout and "example conversation" in out.stdout
    out, _ = prepare(tmp_path, "--branches=all")  # other settings, other outputs
    assert "wrote" in out.stdout
    assert [f for f in os.listdir(out_dir) if f.startswith(".tmp")] == []


# --- the real rows -------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(SAMPLE), reason="../shared/data/oasst1 sample is absent on this machine")
def test_real_sample_threads_alternate_and_answer_their_parent(tmp_path):
    manifest, threads = run_main(tmp_path, SAMPLE, "--branches=all")
    rows = {r["message_id"]: r for r in map(json.loads, open(SAMPLE, encoding="utf-8"))}
    by_text = {}
    for r in rows.values():
        by_text.setdefault(r["text"], []).append(r)
    assert len(threads) > 100
    for thread in threads:
        roles = [m["role"] for m in thread["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        # Walk up from the leaf: each turn's message is the parent of the one after it.
        node = rows[thread["id"]]
        for message in reversed(thread["messages"]):
            assert node["text"] == message["content"]
            node = rows.get(node["parent_id"])
        assert node is None
    counts = manifest["counts"]["validation"]
    assert counts["rows_in"] == 608 == counts["messages_kept"] + sum(counts["dropped"].values())
    assert counts["dropped"]["deleted"] == 3 and counts["dropped"]["rejected"] == 15


# --- no network: the bundled sample ---------------------------------------------------------------
SAMPLE_SHA256 = "e5e0fc2db5a74b865365fc6aebe97e4e54cfcae0a1fef8862a0a41bd9f736470"  # ../shared/data/oasst1/README.md


def test_the_bundled_sample_is_the_real_validation_sample():
    assert os.path.getsize(D.SAMPLE) < 2_000_000
    with gzip.open(D.SAMPLE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SAMPLE_SHA256
    with open(os.path.join(os.path.dirname(D.SAMPLE), "README.md"), encoding="utf-8") as f:
        assert "Apache-2.0" in f.read()


def offline_run(tmp_path, endpoint, *args):
    start = time.monotonic()
    out = run_script("Dataset_download.py", f"--out_dir={tmp_path / 'out'}", *args, cwd=tmp_path,
                     env={"HF_ENDPOINT": endpoint})
    return out, time.monotonic() - start


def test_an_unreachable_hub_falls_back_to_the_sample_within_seconds(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out, seconds = offline_run(tmp_path, f"http://127.0.0.1:{port}")
    assert out.returncode == 0, out.stderr
    assert seconds < 10 and "hub cannot be reached" in out.stdout and "small offline sample" in out.stdout
    train = read(tmp_path / "out" / "train.jsonl")
    assert len(train) + len(read(tmp_path / "out" / "validation.jsonl")) == 58
    assert json.load(open(tmp_path / "out" / "manifest.json"))["source"] == "sample"
    # A rerun tries the hub again rather than calling the sample final.
    out, _ = offline_run(tmp_path, f"http://127.0.0.1:{port}")
    assert "nothing to do" not in out.stdout and "hub cannot be reached" in out.stdout


def test_a_hub_that_never_answers_times_out_quickly(tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        out, seconds = offline_run(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", "--hub_timeout=1")
    assert out.returncode == 0, out.stderr
    assert seconds < 10 and "no answer within 1 s" in out.stdout


# --- preference pairs -----------------------------------------------------------------------------------
# One prompt with five ranked replies: c1 is best; c2 and c3 tie; c4 is deleted; c5 has no rank.
RANKED = [
    msg("s1", None, "prompter", "Pick a colour.", tree="t5"),
    msg("c1", "s1", "assistant", "Blue, because it is calm.", rank=0, tree="t5"),
    msg("c2", "s1", "assistant", "Red.", rank=1, tree="t5"), msg("c3", "s1", "assistant", "Green.", rank=1, tree="t5"),
    msg("c4", "s1", "assistant", "gone", rank=2, tree="t5", deleted=True),
    msg("c5", "s1", "assistant", "Any.", tree="t5"),
]


def test_pairs_come_from_ranked_siblings_and_skips_are_counted_by_reason(tmp_path):
    manifest, _ = run_main(tmp_path, write_jsonl(tmp_path / "rows.jsonl", ROWS[:6] + RANKED))
    pairs = read(tmp_path / "out" / "pairs_train.jsonl")
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("It is 4.", "Five."), ("It is 6.", "Six."), ("Blue, because it is calm.", "Red."),
                   ("Blue, because it is calm.", "Green.")}
    second_turn = next(p for p in pairs if p["chosen"] == "It is 6.")
    assert second_turn["prompt"] == [{"role": "user", "content": "What is 2+2?"},
                                     {"role": "assistant", "content": "It is 4."},
                                     {"role": "user", "content": "And 3+3?"}]  # the conversation up to the prompt
    assert {p["tree"] for p in pairs} == {"q1", "s1"} and second_turn["ranks"] == [0, 1]
    counts = manifest["counts"]["train"]
    assert counts["pairs"] == 4
    assert counts["pairs_skipped"] == {"equal_rank": 1, "deleted_reply": 4, "null_rank": 3}


def test_pairs_follow_their_tree_into_one_split(tmp_path):
    rows = [r for i in range(40) for r in (msg(f"q{i}", None, "prompter", f"question {i}", tree=f"t{i}"),
                                           msg(f"a{i}", f"q{i}", "assistant", f"good {i}", tree=f"t{i}", rank=0),
                                           msg(f"b{i}", f"q{i}", "assistant", f"bad {i}", tree=f"t{i}", rank=1))]
    out, out_dir = prepare(tmp_path, "--val_fraction=0.25", rows=rows)
    assert out.returncode == 0 and "preference pairs" in out.stdout
    questions = lambda items, key: {item[key][0]["content"] for item in items}
    for split in ("train", "validation"):
        assert questions(read(out_dir / f"pairs_{split}.jsonl"), "prompt") == questions(read(out_dir / f"{split}.jsonl"),
                                                                                        "messages")
    assert len(read(out_dir / "pairs_validation.jsonl")) == 10


def test_an_interrupted_preparation_leaves_the_old_set_whole(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "train.jsonl", ROWS)
    D.main([f"--source={src}", f"--out_dir={tmp_path / 'out'}"])
    old = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    real, written = D.data.write_jsonl, []

    def full_disk_at_the_third_file(path, rows):
        written.append(path)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real(path, rows)

    monkeypatch.setattr(D.data, "write_jsonl", full_disk_at_the_third_file)
    with pytest.raises(SystemExit, match="No space left on device.*free some disk space.*intact"):
        D.main([f"--source={src}", f"--out_dir={tmp_path / 'out'}", "--branches=all"])
    monkeypatch.undo()
    assert {name: (tmp_path / "out" / name).read_bytes() for name in old} == old  # the old set, whole
    assert D.outputs_valid(str(tmp_path / "out"), D.parse_cli([f"--source={src}"], D.CONFIG, D.__file__, types=D.TYPES,
                                                               rules=D.RULES, renamed=D.RENAMED)[0])
