"""lumina/preference.py and fine_tune.py --objective=dpo: pairs as windows, the DPO loss, the
frozen reference, learning a toy preference, resume, bad input, every precision."""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import fine_tune
from lumina.checkpoint import build_model, load_checkpoint
from lumina.engine import predecessors, window_start
from lumina.preference import DPO, dpo_loss, encode_pair, reply_chars, reply_windows, sequence_logprobs
from lumina.training import Runtime
from lumina.vocab import END, Vocab, render_chat
from conftest import DEVICE, interrupt_after, refusal, tiny_checkpoint, tiny_model, write_jsonl

WORDS = ["cat", "dog", "sun", "tree", "blue", "fish", "rain", "moon", "star", "milk", "bird", "rock", "wind", "leaf"]


def toy_pairs(words):
    """Always prefer the reply that ends with '!': the same words, two endings."""
    return [{"tree": w, "prompt": [{"role": "user", "content": f"say {w}"}], "chosen": f"{w} {w}!",
             "rejected": f"{w} {w}."} for w in words]


@pytest.mark.parametrize("ngram", [0, 64])
def test_each_reply_character_is_scored_once_with_the_engines_context(ngram):
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz ")
    net = tiny_model(vocab, seq_length=16, ngram_buckets=ngram).eval()
    if ngram:
        torch.nn.init.normal_(net.ngram.pair.weight)
    prompt = render_chat([{"role": "user", "content": "hello there friend"}], vocab, True)[0]
    reply = vocab.encode("a long reply that outgrows the window") + [END]
    inputs, targets, before = reply_windows(prompt, reply, 16)
    ids = prompt + reply
    assert sorted(t for t in targets.flatten().tolist() if t >= 0) == sorted(reply)
    with torch.no_grad():  # the textbook way: each id from its own window (window_start), one pass each
        expected = sum(net(torch.tensor([ids[window_start(i, 16):i]]), before=torch.tensor(
                           [predecessors(ids, window_start(i, 16))]))[0][0, -1].log_softmax(-1)[ids[i]].item()
                       for i in range(len(prompt), len(ids)))
        got = sequence_logprobs(net, [(inputs, targets, torch.zeros(len(inputs), dtype=torch.long), before)], "cpu")[0, 0]
    assert math.isclose(got.item(), expected, rel_tol=1e-5) and len(inputs) > 2  # the reply needed re-reads


def test_the_dpo_loss_is_its_definition_log_2_at_the_reference_and_falls_as_chosen_rises():
    policy, reference = torch.tensor([[-10.0, -12.0], [-5.0, -4.0]]), torch.tensor([[-11.0, -11.0], [-5.0, -5.0]])
    beta = 0.5
    by_hand = -sum(math.log(1 / (1 + math.exp(-beta * ((p[0] - r[0]) - (p[1] - r[1])))))
                   for p, r in zip(policy.tolist(), reference.tolist())) / 2
    assert math.isclose(dpo_loss(policy, reference, beta).item(), by_hand, rel_tol=1e-6)
    assert math.isclose(dpo_loss(reference, reference, beta).item(), math.log(2), rel_tol=1e-6)
    raised = reference + torch.tensor([[1.0, 0.0]])
    assert dpo_loss(raised, reference, beta) < dpo_loss(reference, reference, beta)


def test_per_char_rewards_ignore_a_change_that_only_follows_reply_length_and_score_end_drops_the_end():
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz !.")
    net = tiny_model(vocab, seq_length=16)
    long_short = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a much longer reply", "rejected": "no"}
    pairs = [encode_pair(p, vocab, 16)[0] for p in toy_pairs(WORDS[:3]) + [long_short]]
    chars = reply_chars(pairs)
    assert chars[-1].tolist() == [len(long_short["chosen"]) + 1, len(long_short["rejected"]) + 1]  # <|end|> counts
    objective = DPO(SimpleNamespace(train=pairs, val_pairs=pairs), beta=2.0, per_char=True)
    objective.prepare(net, Runtime(torch.device("cpu")))
    reference = objective.reference["train"]
    shifted = reference - 0.3 * chars  # every character 0.3 nats less likely: a longer reply loses more in total
    assert math.isclose(dpo_loss(objective.compared(shifted, "train"), objective.compared(reference, "train"), 2.0).item(),
                        math.log(2), rel_tol=1e-6)
    assert dpo_loss(shifted, reference, 2.0).item() > math.log(2) + 0.1  # summed, the long chosen reply loses
    with torch.no_grad():
        net.blocks[0].mlp.up.weight.add_(0.5)  # the policy moves away from the reference
    policy = sequence_logprobs(net, pairs, "cpu")
    expected = dpo_loss(policy / chars, reference / chars, 2.0)
    assert math.isclose(objective.loss(net, torch.arange(len(pairs)), Runtime(torch.device("cpu"))).item(),
                        expected.item(), rel_tol=1e-5)
    without_end = DPO(SimpleNamespace(train=pairs, val_pairs=pairs), beta=2.0, score_end=False).pairs["train"]
    assert torch.equal(reply_chars(without_end), chars - 1)  # only each reply's <|end|> left the score
    assert not any((t == END).any() for _, t, _, _ in without_end) and all((t == END).any() for _, t, _, _ in pairs)


@pytest.fixture
def toy(tmp_path):
    base = tmp_path / "Model.pth"
    tiny_checkpoint(str(base), text="abcdefghijklmnopqrstuvwxyz !.")
    train = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(WORDS))
    return base, train


DPO_ARGS = ["--objective=dpo", "--train=all", "--learning_rate=3e-3", "--beta=0.5", "--epochs=0", "--max_minutes=0",
            "--probe_chars=0", "--val_fraction=0.3", "--end_chars=100", f"--device={DEVICE}"]


def closing(out):
    found = re.search(r"val bits/char ([\d.]+) -> ([\d.]+) \| pair accuracy ([\d.]+)% -> ([\d.]+)%", out)
    assert found, out
    return [float(x) for x in found.groups()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dpo_learns_a_toy_preference_and_keeps_the_reference_frozen(toy, tmp_path, dtype, capsys):
    base, train = toy
    before = {k: v.clone() for k, v in load_checkpoint(str(base))["model"].items()}
    steps = "--max_iters=60" if dtype == "float32" else "--max_iters=6"  # the other precisions: that it runs
    fine_tune.main([f"--base_model={base}", f"--data={train}", f"--output={tmp_path / 'DPO.pth'}", *DPO_ARGS, steps,
                    f"--dtype={dtype}"])  # here: a fresh interpreter cost more than the run
    _, _, accuracy_before, accuracy_after = closing(capsys.readouterr().out)
    assert accuracy_before == 50.0  # the starting model is the reference: every implicit reward is 0
    if dtype == "float32":
        assert accuracy_after >= 90.0, accuracy_after  # held-out words it never saw: it learned "!" over "."
    after = load_checkpoint(str(base))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the reference (base) file never changes
    tuned = load_checkpoint(str(tmp_path / "DPO.pth"))
    assert tuned["objective"] == "dpo" and tuned["beta"] == 0.5 and tuned["config"]["dtype"] == dtype
    assert tuned["per_char"] is True and tuned["score_end"] is False  # the defaults, recorded
    build_model(tuned)  # a plain checkpoint that every stage reads


def run_dpo(folder, base, data, interrupt_at=None, resume=False):
    with interrupt_after(interrupt_at):
        fine_tune.main([f"--base_model={base}", f"--data={data}", f"--output={folder / 'DPO.pth'}", *DPO_ARGS,
                        "--train=lora", "--lora_rank=4", "--max_iters=16", "--eval_interval=8", "--log_interval=1",
                        "--checkpoint_interval=1000", "--dtype=float32"] + (["--resume"] if resume else []))


def test_a_resumed_dpo_run_gives_the_same_losses(toy, tmp_path):
    base, train = toy
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_dpo(straight, base, train)
    with pytest.raises(SystemExit):
        run_dpo(broken, base, train, interrupt_at=7)
    assert "objective" in load_checkpoint(str(broken / "DPO_state.pth"))  # the reference travels with it
    run_dpo(broken, base, train, resume=True)
    curves = [{r["step"]: r["loss"] for r in map(json.loads, open(folder / "DPO_metrics.jsonl")) if "loss" in r}
              for folder in (straight, broken)]
    assert sorted(curves[0]) == sorted(curves[1]) == list(range(1, 17))
    assert all(abs(curves[0][s] - curves[1][s]) <= 1e-6 + 1e-5 * abs(curves[0][s]) for s in curves[0])


def test_long_prompts_are_trimmed_by_whole_turns_and_counted():
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz !.")
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 6} for i in range(8)]
    pair = {"prompt": history + [{"role": "user", "content": "last question"}], "chosen": "yes!", "rejected": "no."}
    (inputs, targets, which, _), trimmed = encode_pair(pair, vocab, 32)
    assert trimmed and set(which.tolist()) == {0, 1}
    kept = render_chat([pair["prompt"][-1]], vocab, True)[0]
    assert inputs[0, :len(kept)].tolist() == kept  # the newest turn stayed, whole; older ones went
    _, short = encode_pair({**pair, "prompt": pair["prompt"][-1:]}, vocab, 32)
    assert not short


def test_bad_pair_files_get_their_messages(toy, tmp_path, capsys):
    base, _ = toy  # fine_tune.main here: a fresh interpreter each cost more than the checks

    def run(data, output="DPO.pth"):
        return [f"--base_model={base}", f"--data={data}", f"--output={tmp_path / output}", *DPO_ARGS, "--max_iters=2"]
    threads = write_jsonl(tmp_path / "threads.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                     {"role": "assistant", "content": "hello"}]}] * 5)
    assert "holds no preference pairs" in refusal(fine_tune.main, run(threads), capsys)
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": [], "chosen": "a", "rejected": "b"}, "not json"])
    said = refusal(fine_tune.main, run(broken), capsys)
    assert "no usable preference pairs" in said and "2 lines skipped" in said
    accents = write_jsonl(tmp_path / "accents.jsonl", [{**p, "chosen": p["chosen"] + " ¡olé!"} for p in toy_pairs(WORDS)])
    fine_tune.main(run(accents, "A.pth"))
    out = capsys.readouterr().out
    assert "new '¡' x14" in out and "objective auto" not in out
    assert {"¡", "é"} <= set(load_checkpoint(str(tmp_path / "A.pth"))["vocab"])


def test_auto_finds_pairs_in_a_pairs_file(toy, tmp_path, capsys):
    base, train = toy
    fine_tune.main([f"--base_model={base}", f"--data={train}", f"--output={tmp_path / 'B.pth'}",
                    *[a for a in DPO_ARGS if a != "--objective=dpo"], "--max_iters=2"])
    assert "objective auto: dpo (preference pairs" in capsys.readouterr().out
