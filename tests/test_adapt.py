"""lumina/adapt.py: vocabulary expansion, chat-token training and LoRA."""
import dataclasses

import pytest
import torch

from lumina.adapt import add_lora, expand_vocab, freeze_all_but_new_rows, load_lora, lora_state
from lumina.checkpoint import CheckpointError, build_model, model_state
from lumina.model import CharTransformer
from lumina.optim import make_optimizer
from lumina.plan import TrainConfig
from lumina.vocab import SPECIAL_TOKENS
from conftest import tiny_model


def test_expansion_keeps_old_rows_and_logits(vocab):
    net = tiny_model(vocab).eval()
    old_rows = net.tok_emb.weight.detach().clone()
    x = torch.tensor([vocab.encode("hello there")])
    before, _ = net(x)
    new_vocab = expand_vocab(net, vocab, ["ü", "ß", "a"])  # "a" is already known
    assert new_vocab.chars == vocab.chars + ["ü", "ß"]
    assert new_vocab.encode("hello") == vocab.encode("hello")
    assert torch.equal(net.tok_emb.weight[: len(vocab)], old_rows)
    assert net.head.weight is net.tok_emb.weight and net.config.vocab_size == len(vocab) + 2
    after, _ = net(x)
    assert torch.allclose(after[..., : len(vocab)], before, atol=1e-6)
    new_rows = net.tok_emb.weight[len(vocab):]
    assert torch.allclose(new_rows[0], old_rows[len(SPECIAL_TOKENS):].mean(0))


def test_lora_trains_adapters_not_the_block_matrices_and_merges_exactly(vocab):
    net = tiny_model(vocab)
    base = {k: v.clone() for k, v in model_state(net).items()}
    add_lora(freeze_all_but_new_rows(net), rank=4, alpha=8.0)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    adapters = [n for n in trainable if ".parametrizations.weight.0." in n]
    assert len(adapters) == 2 * 4 * net.config.num_layers  # a and b on qkv, proj, up and the MLP's proj
    assert not [n for n in trainable if n.startswith("blocks.") and n not in adapters and "norm" not in n]
    optimizer = make_optimizer(net, TrainConfig(learning_rate=1e-2, weight_decay=0.1), torch.device("cpu"))
    x = torch.randint(len(SPECIAL_TOKENS), len(vocab), (4, 16))
    for _ in range(5):
        net(x[:, :-1], x[:, 1:])[1].backward()
        for each in optimizer.optimizers:
            each.step()
        optimizer.zero_grad()
    frozen, merged = model_state(net, merge=False), model_state(net)
    matrices = [n for n in base if n.startswith("blocks.") and n.endswith(("qkv.weight", "proj.weight", "up.weight"))]
    assert len(matrices) == 4 * net.config.num_layers
    embedding, special = frozen["tok_emb.weight"], len(SPECIAL_TOKENS)
    assert torch.equal(embedding[special:], base["tok_emb.weight"][special:])  # the characters' rows never moved
    assert not torch.equal(embedding[:special], base["tok_emb.weight"][:special])  # the chat tokens' rows learn
    for name in matrices:
        assert torch.equal(frozen[name], base[name])  # the base matrices never moved
        assert not torch.equal(merged[name], base[name])  # the saved file has the adapters in them
    plain = CharTransformer(net.config)
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x)[0], net.eval()(x)[0], atol=1e-5)
    again = add_lora(build_model({"vocab": vocab.chars, "model_config": dataclasses.asdict(net.config),
                                      "model": frozen})[0], rank=4, alpha=8.0)
    load_lora(again, lora_state(net), "state.pth")  # base + adapters, as a resumed run rebuilds them
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], net(x)[0])
    with pytest.raises(CheckpointError, match="lora_rank"):
        load_lora(add_lora(tiny_model(vocab), rank=2, alpha=8.0), lora_state(net), "state.pth")
