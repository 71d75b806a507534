"""fine_tune.py: vocabulary growth, lower held-out loss, new characters in chat, bad input."""

import json
import os
import re

import pytest
import torch

import fine_tune
import Train
from lumina.checkpoint import build_model, load_checkpoint
from lumina.corpus import load_data
from lumina.vocab import Vocab
from conftest import DEVICE, CHATS, interrupt_after, refusal, run_script, write_jsonl
from test_train import TINY_ARGS

SPANISH = [[{"role": "user", "content": "hola"}, {"role": "assistant", "content": "el niño y la niña, mañana señor"}],
           [{"role": "user", "content": "que tal?"}, {"role": "assistant", "content": "año tras año, ñu y ñandú"}]]
FT_ARGS = ["--epochs=0", "--max_iters=150", "--eval_interval=50", "--log_interval=50", "--max_minutes=0", "--probe_chars=10",
           "--learning_rate=3e-3", f"--device={DEVICE}", "--dtype=float32", "--batch_size=8", "--end_chars=200"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny English model trained by Train.py (its main(), here), shared by this file's tests."""
    folder = tmp_path_factory.mktemp("base")
    data = write_jsonl(folder / "english.jsonl", [{"messages": c} for c in CHATS * 30])
    Train.main([f"--data={data}", f"--out_dir={folder}", "--max_iters=120", "--eval_interval=60", *TINY_ARGS])
    return folder / "Model.pth"


@pytest.fixture
def spanish(tmp_path):
    return write_jsonl(tmp_path / "es.jsonl", [{"messages": c} for c in SPANISH * 40])


def test_growth_adds_exactly_the_new_characters_and_keeps_old_rows_and_logits(base):
    net, vocab = build_model(load_checkpoint(str(base)))
    net.eval()
    old_rows = net.tok_emb.weight.detach().clone()
    x = torch.tensor([vocab.encode("hi there")])
    before, _ = net(x)
    logs = []
    grown = fine_tune.grow_vocabulary(net, vocab, {"ñ": 9, "ü": 2}, 64, logs.append)
    assert grown.chars == vocab.chars + ["ñ", "ü"] and "'ñ' x9, 'ü' x2" in logs[0]
    assert torch.equal(net.tok_emb.weight[: len(vocab)], old_rows)
    after, _ = net(x)
    assert torch.allclose(after[..., : len(vocab)], before, atol=1e-6)


def test_too_many_new_characters_are_refused_with_the_worst_named(base):
    net, vocab = build_model(load_checkpoint(str(base)))
    strange = {chr(0x4E00 + i): 100 - i for i in range(80)}
    with pytest.raises(SystemExit, match=r"80 characters the model never saw.*'一' x100.*encoding"):
        fine_tune.grow_vocabulary(net, vocab, strange, 64, print)


def test_spanish_fine_tune_learns_new_letters_and_chat_uses_them(base, spanish, tmp_path):
    out_path = tmp_path / "FineTuned_Model.pth"
    out = run_script("fine_tune.py", f"--base_model={base}", f"--data={spanish}", f"--output={out_path}",
                     *FT_ARGS, "--train=all", cwd=tmp_path)  # a new language: the blocks must learn too
    assert out.returncode == 0, out.stderr
    assert "inherited: batch_size" not in out.stdout and "inherited: grad_accum=1" in out.stdout
    assert "new 'ñ' x" in out.stdout and "fine-tuned:" in out.stdout
    ckpt = load_checkpoint(str(out_path))
    assert ckpt["stage"] == "fine_tune" and ckpt["base_model"] == str(base)
    base_chars = load_checkpoint(str(base))["vocab"]
    unseen = {c for chat in SPANISH for m in chat for c in m["content"]} - set(base_chars)
    assert {"ñ", "ú"} <= unseen
    assert ckpt["vocab"][: len(base_chars)] == base_chars and set(ckpt["vocab"][len(base_chars):]) == unseen
    assert ckpt["new_vocab_size"] == ckpt["old_vocab_size"] + len(unseen)
    # Held-out loss fell, by a lot.
    assert ckpt["metrics"]["val_loss"] < ckpt["val_loss_before"] - 0.5
    # ChatAI loads it and writes the new letter.
    chat = run_script("ChatAI.py", str(out_path), "--prompt=hola", "--max_new_chars=60", "--seed=0", cwd=tmp_path)
    assert chat.returncode == 0 and "stage fine_tune" in chat.stderr
    assert "ñ" in chat.stdout, chat.stdout
    # Fine-tuning the fine-tuned model again works (here: a fresh interpreter cost more than the run).
    fine_tune.main([f"--base_model={out_path}", f"--data={spanish}", f"--output={tmp_path / 'Round2.pth'}", *FT_ARGS,
                    "--max_iters=20"])
    assert load_checkpoint(str(tmp_path / "Round2.pth"))["old_vocab_size"] == ckpt["new_vocab_size"]


def test_bad_inputs_get_their_messages(base, spanish, tmp_path, capsys, monkeypatch):
    out = run_script("fine_tune.py", f"--data={spanish}", cwd=tmp_path)  # one as a process: the exit code a shell sees
    assert out.returncode != 0 and "Model.pth not found: run `python Train.py` first" in out.stderr
    assert "Traceback" not in out.stderr
    monkeypatch.chdir(tmp_path)  # the rest in this process: a fresh interpreter each cost more than the checks

    def said(*argv):
        return refusal(fine_tune.main, list(argv), capsys)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(base.read_bytes()[:1000])
    assert "truncated or corrupt" in said(f"--base_model={corrupt}", f"--data={spanish}")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert "no usable text" in said(f"--base_model={base}", f"--data={empty}")
    broken = write_jsonl(tmp_path / "broken.jsonl", ["{oops", {"messages": "not a list"}])
    assert "broken.jsonl:1: not valid JSON" in said(f"--base_model={base}", f"--data={broken}")
    same = said(f"--base_model={base}", f"--output={base}", f"--data={spanish}")
    assert "is the base model itself" in same and "--overwrite" in same
    assert "--learning_rate expects float, got 'fast'" in said("--learning_rate=fast")


def test_assistant_only_loss_masks_user_turns(base, spanish, tmp_path):
    vocab = Vocab(load_checkpoint(str(base))["vocab"])
    data = load_data(spanish, str(tmp_path / "cache"), 0.1, True, 0, vocab)
    text_with_mask = "".join(data.vocab.itos[i] if m else "_" for i, m in zip(data.train.tolist(), data.train_mask.tolist()))
    assert "hola" not in text_with_mask and "que tal" not in text_with_mask
    assert "mañana señor<|end|>" in text_with_mask


def run_in_process(folder, base, data, interrupt_at=None, resume=False):
    """fine_tune.main() here, LoRA rank 4; optionally a real SIGINT right after step `interrupt_at`."""
    with interrupt_after(interrupt_at):
        fine_tune.main([f"--base_model={base}", f"--data={data}", f"--output={folder / 'FT.pth'}", "--train=lora",
                        "--lora_rank=4", *FT_ARGS, "--max_iters=30", "--eval_interval=10", "--log_interval=1",
                        "--checkpoint_interval=1000", "--probe_chars=0"] + (["--resume"] if resume else []))


def test_lora_fine_tune_grows_the_vocabulary_and_resumes_exactly(base, spanish, tmp_path):
    import json
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_in_process(straight, base, spanish)
    with pytest.raises(SystemExit):
        run_in_process(broken, base, spanish, interrupt_at=13)
    assert load_checkpoint(str(broken / "FT_state.pth"))["lora"]  # the adapters, apart from the base
    run_in_process(broken, base, spanish, resume=True)
    curves = [{r["step"]: r["loss"] for r in map(json.loads, open(folder / "FT_metrics.jsonl")) if "loss" in r}
              for folder in (straight, broken)]
    assert sorted(curves[0]) == sorted(curves[1]) == list(range(1, 31))
    assert all(abs(curves[0][s] - curves[1][s]) <= 1e-6 + 1e-5 * abs(curves[0][s]) for s in curves[0])
    tuned = load_checkpoint(str(broken / "FT.pth"))  # a plain checkpoint: the adapters are merged in
    assert tuned["lora_rank"] == 4 and "ñ" in tuned["vocab"] and "lora" not in tuned
    net, vocab = build_model(tuned)
    base_net, _ = build_model(load_checkpoint(str(base)))
    assert not torch.equal(net.blocks[0].attn.qkv.weight, base_net.blocks[0].attn.qkv.weight)


PROSE = ["hello there, how are you today? i am fine.", "what is two plus two? it is four, of course.",
         "name a color: blue, or green, or red.", "thanks, you are welcome. how can i help?"]


def test_fine_tuning_on_chats_teaches_a_prose_model_to_end_its_turn(tmp_path, capsys):
    """A base trained on prose has never seen <|end|>; a few conversations teach it to stop. Both
    stages run their main() here: a fresh interpreter each cost more than these short runs."""
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": t} for t in PROSE * 40])
    Train.main([f"--data={prose}", f"--out_dir={tmp_path}", "--max_iters=150", "--eval_interval=150", *TINY_ARGS,
                "--seq_length=32"])
    assert "ends its turn" not in capsys.readouterr().out  # prose has no turns to end
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * 30])
    fine_tune.main([f"--base_model={tmp_path / 'Model.pth'}", f"--data={chats}", f"--output={tmp_path / 'FT.pth'}",
                    "--epochs=20", "--max_minutes=0", "--probe_chars=10", "--end_chars=300", f"--device={DEVICE}",
                    "--dtype=float32"])  # the defaults, on tiny data: more epochs
    out = capsys.readouterr().out
    assert "training the rows of the 5 chat tokens and 6 new characters, the norms: 672 of 26,016" in out
    before, after, replies = map(int, re.search(r"ends its turn (\d+)% -> (\d+)% of (\d+) held-out replies",
                                                 out).groups())
    assert replies >= 32  # every held-out prompt replied to until 32 replies are in
    assert after >= before + 25, out  # a barely trained base ends some replies by chance
    assert re.search(r"val bits/char [\d.]+ -> [\d.]+ \|", out)  # the closing line scripts read
    assert out.count("ends its turn in") == 6  # before, at each of the 4 evaluations, and after


# --- runs keep their own files, and resume the run they were -------------------------------------
def test_each_fine_tune_names_its_files_after_its_output_and_a_second_keeps_the_first(base, spanish, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # the outputs are named as a user names them, in the current folder

    def tune(*args):
        fine_tune.main([f"--data={spanish}", *FT_ARGS, "--max_iters=4", "--eval_interval=4", "--probe_chars=0", *args])
        return capsys.readouterr().out
    tune(f"--base_model={base}", "--output=R1.pth")
    round1 = {name: (tmp_path / name).read_bytes() for name in ("R1.pth", "R1_state.pth", "R1_metrics.jsonl")}
    tune("--base_model=R1.pth", "--output=R2.pth")  # the docstring's "fine-tune again"
    assert {name: (tmp_path / name).read_bytes() for name in round1} == round1
    assert (tmp_path / "R2_state.pth").exists() and (tmp_path / "R2_metrics.jsonl").exists()
    again = tune(f"--base_model={base}", "--output=R1.pth", "--seed=5")  # the same output again: the first is kept
    kept = re.search(r"moved it to (\S+)/", again).group(1)
    assert {name: (tmp_path / kept / name).read_bytes() for name in round1} == round1


def test_resume_restores_the_runs_config_and_refuses_another_base_data_or_output(base, spanish, tmp_path):
    folder = tmp_path / "lora"
    with pytest.raises(SystemExit):
        run_in_process(folder, base, spanish, interrupt_at=5)
    before = open(folder / "FT_metrics.jsonl").read()
    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": c} for c in CHATS * 5])
    for changed, name in ((f"--data={other}", "data"), (f"--base_model={tmp_path / 'elsewhere.pth'}", "base_model")):
        with pytest.raises(SystemExit, match=f"{name}"):
            fine_tune.main([f"--output={folder / 'FT.pth'}", changed, "--resume"])
    assert open(folder / "FT_metrics.jsonl").read() == before  # a refused resume touches nothing
    fine_tune.main([f"--output={folder / 'FT.pth'}", "--resume"])  # bare: the saved run's config, LoRA included
    tuned = load_checkpoint(str(folder / "FT.pth"))
    assert tuned["lora_rank"] == 4 and tuned["train"] == "lora"
    steps = [r["step"] for r in map(json.loads, open(folder / "FT_metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 31))


def test_the_readme_flow_from_the_bundled_sample_reaches_a_chat_twice(tmp_path):
    """Offline, as the README says: the sample, Train.py twice (the second keeps the first, byte for
    byte, and says where; --overwrite replaces), fine_tune.py on the threads, then DPO on the pairs
    (their characters are in the vocabulary, though the threads hold only the best replies), then a
    chat with the last model."""
    tiny = ["--seq_length=64", "--hidden_size=32", "--num_layers=2", "--nhead=2", "--batch_size=4", "--max_minutes=0",
            "--probe_chars=0", f"--device={DEVICE}", "--dtype=float32", "--end_chars=50", "--max_iters=10",
            "--eval_interval=10", "--ngram_buckets=0"]
    tune = ["--epochs=0", "--max_iters=6", "--eval_interval=6", "--max_minutes=0", "--probe_chars=0", f"--device={DEVICE}",
            "--dtype=float32", "--end_chars=50"]

    def step(script, *args):
        out = run_script(script, *args, cwd=tmp_path)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (script, args, out.stdout[-2000:], out.stderr[-2000:])
        return out
    step("Dataset_download.py", "--source=sample")
    step("Train.py", *tiny)
    first = {name: (tmp_path / name).read_bytes() for name in ("Model.pth", "train_state.pth", "train_metrics.jsonl")}
    second = step("Train.py", *tiny, "--seed=7")
    said = re.search(r"already holds a run \(step 10, val [\d.]+ bits/char, [\d-]+ [\d:]+\): moved it to (\S+)/",
                     second.stdout)
    assert said and all(flag in second.stdout for flag in ("--resume", "--overwrite", "--out_dir")), second.stdout
    assert {name: (tmp_path / said.group(1) / name).read_bytes() for name in first} == first  # nothing lost or mixed
    assert (tmp_path / "Model.pth").read_bytes() != first["Model.pth"]  # the second run wrote its own
    assert "moved it" not in step("Train.py", *tiny, "--overwrite").stdout  # told to: replaces, moves nothing
    assert len(os.listdir(tmp_path / "previous_runs")) == 1
    step("fine_tune.py", "--data=oasst1_data", *tune)
    out = step("fine_tune.py", "--base_model=FineTuned_Model.pth", "--data=oasst1_data/pairs_train.jsonl",
               "--output=DPO.pth", *tune)
    assert "vocabulary" not in out.stdout and load_checkpoint(str(tmp_path / "DPO.pth"))["objective"] == "dpo"
    step("ChatAI.py", "DPO.pth", "--prompt=Hello!", "--max_new_chars=20")  # a reply (an empty one is a reply too)


def test_a_fine_tune_reads_whole_chats_even_from_a_base_trained_with_a_short_first_phase(tmp_path):
    base = {"config": {**Train.CONFIG, "short_context": 64, "qk_norm": True},
            "model_config": {"seq_length": 256, "hidden_size": 128, "num_layers": 4, "nhead": 4, "qk_norm": True}}
    config = {**fine_tune.CONFIG, "output": str(tmp_path / "FineTuned_Model.pth")}
    train_config, _ = fine_tune.training_config(config, base)
    assert train_config.short_context == 0 and train_config.qk_norm is True  # the phase is pretraining's; the shape is the base's
