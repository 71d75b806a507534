"""lumina/model.py: the transformer."""
import torch

from lumina.vocab import Vocab

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


def test_ngrams_read_the_true_predecessors_of_a_window():
    from lumina.model import NgramEmbedding
    table = NgramEmbedding(64, 8)
    torch.nn.init.normal_(table.pair.weight)
    torch.nn.init.normal_(table.triple.weight)
    text = torch.randint(40, (1, 30))
    whole = table(text, torch.tensor([[-1, -1]]))
    assert torch.equal(table(text[:, 10:], text[:, 8:10]), whole[:, 10:])  # a window that knows what came before
    assert not torch.equal(table(text[:, 10:], torch.tensor([[-1, -1]]))[:, :2], whole[:, 10:12])


def test_a_model_with_ngrams_starts_as_the_plain_one():
    vocab = Vocab.from_text("abcdefgh")
    x = torch.randint(len(vocab), (2, 12))
    plain, hashed = tiny_model(vocab, seed=3), tiny_model(vocab, seed=3, ngram_buckets=64)
    assert hashed.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["ngram.pair.weight",
                                                                                     "ngram.triple.weight"]
    with torch.no_grad():
        assert torch.equal(plain(x)[0], hashed(x, before=x[:, :2])[0])  # the tables start at zero


def test_the_logit_softcap_bounds_every_logit_and_is_the_same_model_squashed():
    vocab = Vocab.from_text("abcdefgh")
    x = torch.randint(len(vocab), (2, 12))
    plain, capped = tiny_model(vocab, seed=3).eval(), tiny_model(vocab, seed=3, logit_softcap=2.0).eval()
    with torch.no_grad():
        for net in (plain, capped):
            net.tok_emb.weight.mul_(5)  # a confident model: logits beyond 2 (the head is tied), tanh not yet flat at 1
        free, bounded = plain(x)[0], capped(x)[0]
    assert free.abs().max() > 3 and bounded.abs().max() < 2.0
    assert torch.allclose(bounded, 2.0 * torch.tanh(free / 2.0), atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    vocab = Vocab.from_text("abcdefgh")
    x = torch.randint(len(vocab), (2, 12))
    for qk_norm in (False, True):
        net = tiny_model(vocab, seed=3, qk_norm=qk_norm).eval()
        with torch.no_grad():
            before = net(x)[0]
            for block in net.blocks:
                block.attn.qkv.weight[:2 * net.config.hidden_size].mul_(7.0)  # queries and keys 7 times larger
            after = net(x)[0]
        # unit RMS per head: the same attention whatever their scale; without, the scores grow 49-fold
        assert torch.allclose(before, after, atol=1e-5) == qk_norm
