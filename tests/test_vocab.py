"""lumina/vocab.py: the characters, the special tokens and the chat template."""
import pytest

from lumina.vocab import BOT, END, UNK, Vocab, parse_chat, render_chat


def test_decode_is_exact_for_newlines_tabs_and_non_ascii(vocab):
    text = "a\tb\nñ c!"
    assert vocab.decode(vocab.encode(text)) == text


def test_unknown_characters_map_to_unk_and_are_named(vocab):
    ids = vocab.encode("aé b€")
    assert ids[1] == UNK and ids[4] == UNK and UNK not in (ids[0], ids[2], ids[3])
    assert vocab.unknown_chars("aé b€é") == ["é", "€"]


def test_chat_template_round_trips(vocab):
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi\nthere"},
            {"role": "assistant", "content": "hello"}]
    ids, mask = render_chat(chat, vocab)
    assert parse_chat(ids, vocab) == chat
    assert ids.count(END) == 3  # the newline inside a message did not end a turn
    # Only the assistant's text and its <|end|> are trained on.
    assert vocab.decode([i for i, m in zip(ids, mask) if m]) == "hello<|end|>"


def test_literal_special_token_typed_by_user_stays_text():
    vocab = Vocab.from_text("<|bot>end")
    ids, _ = render_chat([{"role": "user", "content": "<|bot|>"}], vocab, add_generation_prompt=True)
    assert ids.count(BOT) == 1 and ids[-1] == BOT  # only the generation prompt is a real turn
    assert parse_chat(ids, vocab)[0]["content"] == "<|bot|>"


def test_unknown_role_is_refused(vocab):
    with pytest.raises(ValueError, match="unknown chat role"):
        render_chat([{"role": "robot", "content": "x"}], vocab)
