"""lumina/evaluate.py: the probe replies that Train.py and fine_tune.py print at each evaluation."""
import math

import torch

from lumina.checkpoint import build_model, load_checkpoint
from lumina.evaluate import PROBES, probe_replies, reply_logprob
from lumina.vocab import render_chat
from conftest import endless_checkpoint


def test_a_probe_shows_what_was_generated_and_how_sure_the_model_was(tmp_path):
    net, vocab = build_model(load_checkpoint(endless_checkpoint(tmp_path / "Model.pth")))  # never ends a turn
    probes = probe_replies(net, vocab, 12, seed=3)
    assert [p for p, _, _ in probes] == PROBES
    for prompt, reply, logprob in probes:
        assert len(reply) == 12  # every character it wrote (they once all printed as '')
        ids = render_chat([{"role": "user", "content": prompt}], vocab, add_generation_prompt=True)[0]
        full = torch.tensor([ids + vocab.encode(reply)])
        with torch.no_grad():
            logits, _ = net(full)
        expected = logits[0, len(ids) - 1:-1].log_softmax(-1).gather(1, full[0, len(ids):, None]).mean()
        assert math.isclose(logprob, float(expected), rel_tol=1e-4, abs_tol=1e-5)


def test_a_reply_longer_than_the_window_is_scored_on_its_last_part(tmp_path):
    net, vocab = build_model(load_checkpoint(endless_checkpoint(tmp_path / "Model.pth", seq_length=16)))
    ids = vocab.encode("abcdefghij") + vocab.encode("klmnopqrstuvwxyz")  # 26 ids, a window of 16
    with torch.no_grad():
        logits, _ = net(torch.tensor([ids[10:]]), before=torch.tensor([ids[8:10]]))
    expected = logits[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[11:])[:, None]).mean()
    assert math.isclose(reply_logprob(net, ids, 5), float(expected), rel_tol=1e-4)
