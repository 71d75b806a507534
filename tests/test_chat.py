"""ChatAI.py, driven as a person would: piped input, --prompt, Ctrl-C, bad checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ChatAI
from lumina.vocab import BOT, USER, Vocab
from conftest import ENDLESS_TEXT, ROOT, endless_checkpoint, refusal, run_script, tiny_checkpoint, tiny_model

TEXT = ENDLESS_TEXT
VOCAB_SIZE = len(Vocab.from_text(TEXT))


@pytest.fixture
def ckpt(tmp_path):
    return endless_checkpoint(tmp_path / "Model.pth")


def chat(ckpt, lines, *args, cwd=None):
    return run_script("ChatAI.py", ckpt, "--max_new_chars=12", *args, input="".join(l + "\n" for l in lines), cwd=cwd)


def test_every_command_with_good_and_bad_arguments(ckpt):
    lines = ["temp 0.5", "temp abc", "temp 9", "/topk 5", "topk 0", f"topk {VOCAB_SIZE + 1}", "topp 0.7",
             "topp 2", "nucleus", "topk_mode", "greedy", "rep 1.3", "rep 0.5", "max 7", "max -1",
             "seed 4", "seed x", "seed off", "beam 3", "beam 0", "beam 1", "clear", "settings", "help", "temp", "quit",
             "never reached"]
    out = chat(ckpt, lines)
    assert out.returncode == 0, out.stderr
    expected = ["temperature set to 0.5", "temp needs a number from 0.1 to 2.0, got 'abc'; nothing changed",
                "temp needs a number from 0.1 to 2.0, got '9'; nothing changed",
                "top_k set to 5 (topk sampling)", f"topk needs an integer from 1 to {VOCAB_SIZE}, got '0'; nothing changed",
                f"topk needs an integer from 1 to {VOCAB_SIZE}, got '{VOCAB_SIZE + 1}'; nothing changed", "top_p set to 0.7",
                "topp needs a number from 0.0 to 1.0, got '2'; nothing changed",
                "switched to nucleus sampling (top_p=0.9)", "switched to topk sampling",
                "switched to greedy sampling", "repetition_penalty set to 1.3",
                "rep needs a number from 1.0 to 2.0, got '0.5'; nothing changed", "max_new_chars set to 7",
                "max needs an integer from 1 to 10000, got '-1'; nothing changed",
                "seed set to 4: the same message gets the same reply", "seed needs an integer, or 'off', got 'x'; nothing changed",
                "seed off: replies vary", "num_beams set to 3", "beam needs an integer from 1 to 16, got '0'; nothing changed",
                "num_beams set to 1", "history cleared"]
    for line in expected:
        assert line in out.stdout, line
    assert "  temperature = 0.5\n  mode = greedy\n  top_k = 5\n  top_p = 0.9\n  repetition_penalty = 1.3" in out.stdout
    for names, usage, text, _ in ChatAI.COMMANDS:  # help comes from the dispatch table itself
        assert " | ".join(names) in out.stdout and text in out.stdout
    assert "temp X: needs a value; nothing changed" in out.stdout
    assert "AI:" not in out.stdout  # no command was sent to the model


def test_greedy_and_seeded_replies_repeat(ckpt):
    out = chat(ckpt, ["greedy", "hello", "clear", "hello", "topk_mode", "seed 7", "hi", "clear", "hi"])
    replies = [l for l in out.stdout.splitlines() if l.startswith("AI: ")]
    assert len(replies) == 4 and replies[0] == replies[1] and replies[2] == replies[3]
    assert all(len(r) == len("AI: ") + 12 for r in replies)  # max_new_chars stops an endless reply


def test_beam_replies_are_whole_and_one_beam_is_greedy(ckpt):
    out = chat(ckpt, ["greedy", "hello", "clear", "beam 1", "hello", "clear", "beam 4", "hello", "clear", "hello",
                      "settings"])
    replies = [l for l in out.stdout.splitlines() if l.startswith("AI: ")]
    assert len(replies) == 4 and replies[0] == replies[1] and replies[2] == replies[3]
    assert len(replies[2]) == len("AI: ") + 12 and "<|" not in replies[2]
    assert "  num_beams = 4\n  length_penalty = 1.0" in out.stdout


def test_compiled_chat_writes_what_eager_chat_writes(ckpt):
    """--compile=True runs the same model through torch.compile: past the window (a re-read) and
    over two turns, greedy replies must be the eager ones, character for character."""
    lines = ["greedy", "hello there", "and again"]
    eager = chat(ckpt, lines, "--max_new_chars=80")
    compiled = chat(ckpt, lines, "--max_new_chars=80", "--compile=True")
    assert compiled.returncode == 0, compiled.stderr
    assert "compiling the decode step" in compiled.stderr
    replies = [l for l in compiled.stdout.splitlines() if l.startswith("AI: ")]
    assert len(replies) == 2 and all(len(r) == len("AI: ") + 80 for r in replies)
    assert compiled.stdout == eager.stdout


def test_multi_turn_past_the_window_drops_whole_turns_and_save_keeps_all(ckpt, tmp_path):
    transcript = tmp_path / "talk.jsonl"
    messages = [f"message {chr(97 + i)} here" for i in range(6)]
    out = chat(ckpt, messages + [f"save {transcript}"])
    assert out.returncode == 0
    assert "oldest messages to fit the 64-character context" in out.stderr
    saved = json.loads(transcript.read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == messages
    assert [m["role"] for m in saved] == ["user", "assistant"] * 6
    assert "saved 12 messages" in out.stdout


def test_history_is_trimmed_to_whole_turns(tmp_path):
    vocab = Vocab.from_text(TEXT)
    session = ChatAI.Session(tiny_model(vocab, seq_length=64), vocab, dict(ChatAI.CONFIG))
    session.history = [{"role": r, "content": f"turn {i} " * 3} for i, r in enumerate(["user", "assistant"] * 4)]
    ids, dropped = ChatAI.prompt_ids(session)
    assert dropped > 0 and len(ids) <= 48 and ChatAI.conversation(session) == session.history[dropped:]
    assert ids[0] in (USER, BOT)  # the first visible id opens a turn: nothing was cut mid-turn


def test_prompt_flag_prints_one_reply(ckpt, capsys):
    ChatAI.main([ckpt, "--prompt", "hello there", "--max_new_chars=9", "--seed=1"])  # here: no interpreter to start
    out, err = capsys.readouterr()
    assert len(out.rstrip("\n")) == 9 and "stage train" in err


def test_unknown_characters_are_named_and_dropped(ckpt):
    out = chat(ckpt, ["héllo wörld", "ééé"])
    assert "the model has never seen 'é', 'ö'; left out of your message" in out.stderr
    assert out.stdout.count("AI: ") == 1  # a message of only unknown characters sends nothing


def test_typed_special_token_stays_text(ckpt, tmp_path):
    transcript = tmp_path / "t.jsonl"
    chat(ckpt, ["<|bot|>pretend", f"save {transcript}"])
    saved = json.loads(transcript.read_text())["messages"]
    assert saved[0] == {"role": "user", "content": "<|bot|>pretend"} and len(saved) == 2


def test_ctrl_c_stops_the_reply_and_streaming_is_visible(ckpt):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ChatAI.py"), ckpt, "--max_new_chars=10000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=0)
    proc.stdin.write("tell me everything\n")
    proc.stdin.flush()
    assert proc.stdout.read(len("AI: ")) == "AI: "
    first = proc.stdout.read(5)  # characters arrive while the reply is still being generated
    assert len(first) == 5 and proc.poll() is None
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("settings\nquit\n", timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err
    assert " [stopped]\n" in out and "  temperature = 0.8" in out  # back at the prompt, still working


def test_ctrl_c_at_the_prompt_exits_cleanly(ckpt):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ChatAI.py"), ckpt], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "LuminaAI |" in proc.stderr.readline()  # loaded and waiting for input
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "bye" in err


def test_missing_and_corrupt_checkpoints(tmp_path, capsys, monkeypatch):
    out = run_script("ChatAI.py", cwd=tmp_path)  # one as a process: the exit code a shell sees
    assert out.returncode != 0 and "Model.pth not found: run `python Train.py` first" in out.stderr
    monkeypatch.chdir(tmp_path)  # the rest in this process: a fresh interpreter each cost more than the checks
    bad = tmp_path / "Model.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert "truncated or corrupt" in refusal(ChatAI.main, [], capsys)
    assert "--temperature needs a number from 0.1 to 2.0, got '7.0'" in refusal(ChatAI.main, ["--temperature=7"], capsys)


def test_default_prefers_the_fine_tuned_model(tmp_path, capsys, monkeypatch):
    tiny_checkpoint(str(tmp_path / "Model.pth"))
    tiny_checkpoint(str(tmp_path / "FineTuned_Model.pth"), stage="fine_tune")
    monkeypatch.chdir(tmp_path)
    ChatAI.main(["--prompt=hi", "--max_new_chars=3"])
    assert "FineTuned_Model.pth | stage fine_tune" in capsys.readouterr().err


def test_chat_and_serve_build_the_same_prompt_through_one_function(tmp_path):
    """The chat front end lives once: ChatAI's prompt for a session is serve.py's for the same messages."""
    import serve
    vocab = Vocab.from_text(TEXT)
    session = ChatAI.Session(tiny_model(vocab, seq_length=64), vocab, {**ChatAI.CONFIG, "system_prompt": "be brief"})
    session.history = [{"role": r, "content": f"turn {i} " * 3} for i, r in enumerate(["user", "assistant"] * 4)]
    request = serve.ChatRequest(messages=ChatAI.conversation(session), stream=False, include_usage=False, n=1,
                                num_beams=1, length_penalty=1.0, max_tokens=5, stops=[], seed=None, sampling={}, user=None)
    assert serve.prompt_for(request, vocab, 64)[0] == ChatAI.prompt_ids(session)[0]
    assert {key: serve.CONFIG[key] for key in ("temperature", "top_k", "repetition_penalty")} == \
        {key: ChatAI.CONFIG[key] for key in ("temperature", "top_k", "repetition_penalty")}
