"""export.py: int8 checkpoints every chat stage reads, and an ONNX step that onnxruntime runs as
model.py does."""
import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

import export
import fine_tune
from lumina.checkpoint import CheckpointError, build_model, load_checkpoint, model_state, save_checkpoint
from lumina.engine import Engine, Row, generate, window_start
from lumina.vocab import BOT, END, SPECIAL_TOKENS, SYSTEM, USER, Vocab, render_chat
from conftest import ROOT, need, refusal, run_script, tiny_model, write_jsonl

TEXT = "abcdefghijklmnopqrstuvwxyz !?.,\n"
STOPS = (END, USER, BOT, SYSTEM)


def save(net, vocab, path):
    save_checkpoint(str(path), {"stage": "train", "vocab": vocab.chars, "model": model_state(net),
                                  "model_config": dataclasses.asdict(net.config), "config": {}, "metrics": {}})
    return str(path)


def lively_model(vocab, seq_length):
    """Random weights scaled up, so greedy picks vary with the context and have real gaps."""
    net = tiny_model(vocab, seq_length=seq_length, hidden_size=64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4)
    return net.eval()


# --- int8 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_and_int8(tmp_path_factory):
    """A model, export.py --int8 of it and what it printed; the tests read the files and never change them."""
    folder = tmp_path_factory.mktemp("int8")
    vocab = Vocab.from_text(TEXT)
    net = tiny_model(vocab, seq_length=32, hidden_size=96, num_layers=3)
    path = save(net, vocab, folder / "Model.pth")
    out = run_script("export.py", path, "--int8")
    assert out.returncode == 0, out.stderr
    return path, str(folder / "Model.int8.pth"), out.stdout


def test_int8_file_is_a_quarter_and_gives_nearly_the_same_logits(float_and_int8):
    path, int8, message = float_and_int8
    assert os.path.getsize(int8) <= 0.30 * os.path.getsize(path)
    assert f"of {path}" in message and "%" in message
    checkpoint = load_checkpoint(int8)  # weights_only, and the dtypes are checked
    assert checkpoint["model"]["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert checkpoint["model"]["tok_emb.weight"] is checkpoint["model"]["head.weight"]  # tied: stored once
    (full, _), (small, _) = build_model(load_checkpoint(path)), build_model(checkpoint)
    ids = torch.randint(len(SPECIAL_TOKENS), full.config.vocab_size, (2, 32))
    with torch.no_grad():
        a, b = full.eval()(ids)[0].log_softmax(-1), small.eval()(ids)[0].log_softmax(-1)
    assert (a - b).abs().max() < 0.05 and not torch.equal(a, b)


def test_chat_reads_int8_and_fine_tune_and_export_refuse_it(float_and_int8, tmp_path, capsys):
    _, int8, _ = float_and_int8
    chat = run_script("ChatAI.py", int8, "--prompt", "hello", "--max_new_chars=10", "--seed=1")
    assert chat.returncode == 0 and "int8" in chat.stderr, chat.stderr  # the stage line names it
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}] * 4)
    # The refusals in this process: a fresh interpreter each cost more than the checks.
    tune = refusal(fine_tune.main, [f"--base_model={int8}", f"--data={data}", f"--output={tmp_path / 'FT.pth'}"], capsys)
    assert "int8 weights" in tune and "fine-tune the checkpoint" in tune
    assert "already holds int8" in refusal(export.main, [int8, "--int8", f"--out={tmp_path / 'x.pth'}"], capsys)


def test_a_damaged_int8_file_fails_by_name(float_and_int8, tmp_path):
    _, int8, _ = float_and_int8
    checkpoint = torch.load(int8, weights_only=True)
    checkpoint["model"]["blocks.1.mlp.up.weight"] = checkpoint["model"]["blocks.1.mlp.up.weight"].float()
    torch.save(checkpoint, tmp_path / "float_where_int8.pth")
    with pytest.raises(CheckpointError, match="'blocks.1.mlp.up.weight'.*int8"):
        load_checkpoint(str(tmp_path / "float_where_int8.pth"))
    checkpoint = torch.load(int8, weights_only=True)
    checkpoint["int8_scales"]["blocks.0.attn.proj.weight"] = torch.ones(3)
    torch.save(checkpoint, tmp_path / "bad_scales.pth")
    with pytest.raises(CheckpointError, match="scales of 'blocks.0.attn.proj.weight'"):
        load_checkpoint(str(tmp_path / "bad_scales.pth"))


# --- ONNX ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    need("onnxruntime", "onnx")
    folder = tmp_path_factory.mktemp("onnx")
    vocab = Vocab.from_text(TEXT)
    net = lively_model(vocab, seq_length=64)
    path = save(net, vocab, folder / "Model.pth")
    out = run_script("export.py", path, "--onnx")
    assert out.returncode == 0, out.stderr
    return net, vocab, str(folder / "Model.onnx")


def test_onnx_logits_match_on_the_prompt_and_50_cached_steps(onnx_model):
    net, vocab, path = onnx_model
    chat = export.OnnxChat(path)
    prompt = chat.prompt_ids([{"role": "user", "content": "hello there"}])
    assert prompt == render_chat([{"role": "user", "content": "hello there"}], vocab, True)[0]  # template from metadata
    logits, past = chat.step(prompt, chat.empty)
    eng, row = Engine(net, 1), Row(list(prompt), 50, temperature=0)
    assert np.abs(logits - eng.logits([row])[0].numpy()).max() < 1e-4
    for step in range(50):
        row.take(int(logits.argmax()))
        logits, past = chat.step(row.ids[-1:], past, export.predecessors(row.ids, len(row.ids) - 1))
        assert np.abs(logits - eng.logits([row])[0].numpy()).max() < 1e-4, step
    assert past.shape[4] == len(prompt) + 50


def test_onnx_greedy_equals_model_py_across_window_rereads(onnx_model):
    net, vocab, path = onnx_model
    prompt = render_chat([{"role": "user", "content": "what is this?"}], vocab, True)[0]
    expected = list(generate(net, prompt, 200, temperature=0, stop_ids=()))
    chat = export.OnnxChat(path)
    assert list(chat.generate(prompt, 200, stop_ids=())) == expected and len(set(expected)) > 5  # 200 ids: 4 re-reads of 64


def test_the_onnx_chat_needs_no_torch(onnx_model):
    net, vocab, path = onnx_model
    blocked = f"import sys, runpy; sys.modules['torch'] = None; sys.path.insert(0, {ROOT!r}); " \
              f"sys.argv = ['export.py', {path!r}, '--prompt', 'hi', '--max_new_chars=30']; " \
              f"runpy.run_path({os.path.join(ROOT, 'export.py')!r}, run_name='__main__')"
    import subprocess
    out = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    prompt = render_chat([{"role": "user", "content": "hi"}], vocab, True)[0]
    reply = [i for i in generate(net, prompt, 30, temperature=0, stop_ids=STOPS) if i >= len(SPECIAL_TOKENS)]
    assert out.stdout == vocab.decode(reply) + "\n"


def test_the_window_rule_is_model_pys():
    for seq_length in (4, 16, 64, 256):
        assert all(export.window_start(n, seq_length) == window_start(n, seq_length) for n in range(1, 1200))


def test_bad_requests_get_one_line_each(tmp_path, capsys):
    vocab = Vocab.from_text(TEXT)
    path = save(tiny_model(vocab), vocab, tmp_path / "Model.pth")
    out = run_script("export.py", path)  # one as a process: the exit code a shell sees
    assert out.returncode != 0 and "say what to write" in out.stderr and "Traceback" not in out.stderr, out.stderr
    cases = [([path, "--int8", "--onnx"], "one at a time"), ([], "give the checkpoint"),
             ([str(tmp_path / "nope.pth"), "--int8"], "not found"), ([str(tmp_path / "Model.onnx")], "say what to ask"),
             ([path, "--int8", f"--out={path}"], "overwrite the input"), ([str(tmp_path / "nope.onnx"), "--prompt=hi"], "cannot run")]
    for args, words in cases:  # the rest in this process
        assert words in refusal(export.main, args, capsys), args


def test_onnx_greedy_equals_the_engines_for_a_model_with_ngrams(tmp_path):
    """An exported step reads the two ids before its first id, as the engine's passes do."""
    need("onnxruntime", "onnx")
    vocab = Vocab.from_text(TEXT)
    net = tiny_model(vocab, seq_length=32, hidden_size=64, ngram_buckets=64)
    with torch.no_grad():
        torch.nn.init.normal_(net.ngram.pair.weight)
        torch.nn.init.normal_(net.ngram.triple.weight)
        for p in net.parameters():
            p.mul_(4)
    export.export_onnx(save(net.eval(), vocab, tmp_path / "Model.pth"), str(tmp_path / "Model.onnx"))  # export.py --onnx
    prompt = render_chat([{"role": "user", "content": "what is this?"}], vocab, True)[0]
    expected = list(generate(net, prompt, 100, temperature=0, stop_ids=()))
    chat = export.OnnxChat(str(tmp_path / "Model.onnx"))
    assert chat.takes_before and list(chat.generate(prompt, 100, stop_ids=())) == expected and len(set(expected)) > 5
