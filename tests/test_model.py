"""lumina/model.py: the transformer."""
import torch

from conftest import tiny_model


def test_changing_a_later_character_never_changes_earlier_logits(vocab):
    net = tiny_model(vocab).eval()
    a = torch.randint(len(vocab), (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % len(vocab)
    la, _ = net(a)
    lb, _ = net(b)
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_loss_ignores_masked_targets(vocab):
    net = tiny_model(vocab)
    x = torch.randint(len(vocab), (2, 8))
    y = torch.randint(len(vocab), (2, 8))
    masked = y.clone()
    masked[:, :4] = -1
    logits, loss = net(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, len(vocab)), y[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected)


def test_input_embedding_and_output_head_are_tied(vocab):
    net = tiny_model(vocab)
    assert net.head.weight is net.tok_emb.weight
