"""The character vocabulary and the chat template: how text and conversations become ids.

Imports no torch, so data preparation and the tests of the template run without it.
"""
import numpy as np

# ----------------------------------------------------------------------------------------------
# 1. Vocabulary
# ----------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["<|unk|>", "<|user|>", "<|bot|>", "<|end|>", "<|system|>"]
UNK, USER, BOT, END, SYSTEM = range(len(SPECIAL_TOKENS))
ROLE_TOKENS = {"user": USER, "assistant": BOT, "system": SYSTEM}
TURN_ENDS = (END, USER, BOT, SYSTEM)  # a reply ends at <|end|>, or where the model opens another turn


class Vocab:
    """Ids 0-4 are the special tokens; every later id is one character.

    Special tokens are ids, never strings: encode() looks at one character at a time, so text that
    spells "<|bot|>" becomes seven ordinary characters and can never forge a turn.
    """

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("a vocabulary is a list of distinct single characters")
        self.itos = SPECIAL_TOKENS + self.chars
        self.stoi = {c: i for i, c in enumerate(self.chars, start=len(SPECIAL_TOKENS))}

    @classmethod
    def from_text(cls, texts):
        """Build from a string or an iterable of strings; ids follow sorted character order."""
        chars = set()
        for text in [texts] if isinstance(texts, str) else texts:
            chars.update(text)
        return cls(sorted(chars))

    def __len__(self):
        return len(self.itos)

    def encode(self, text):
        """Characters to ids. Unknown characters become UNK; unknown_chars() names them."""
        return [self.stoi.get(c, UNK) for c in text]

    def unknown_chars(self, text):
        """The characters of `text` this vocabulary lacks, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def decode(self, ids):
        """Ids to text; special ids print as their names, e.g. <|end|>."""
        return "".join(self.itos[i] for i in ids)

    def extended(self, new_chars):
        """A new Vocab with `new_chars` appended: every old id keeps its meaning."""
        return Vocab(self.chars + [c for c in dict.fromkeys(new_chars) if c not in self.stoi])


# ----------------------------------------------------------------------------------------------
# 2. The chat template
# ----------------------------------------------------------------------------------------------
# A conversation renders as  <|user|>hi<|end|><|bot|>hello!<|end|>  ... A newline inside a message
# is an ordinary character; only <|end|> closes a turn.

def render_chat(messages, vocab, add_generation_prompt=False):
    """Render [{"role", "content"}, ...] to (ids, loss_mask).

    loss_mask[i] is True where id i belongs to an assistant turn (its text and its <|end|>), the
    part a chatbot is trained to produce. add_generation_prompt appends <|bot|> so the model replies.
    """
    ids, mask = [], []
    for message in messages:
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {role!r}: use user, assistant or system")
        body = vocab.encode(message["content"]) + [END]
        ids += [ROLE_TOKENS[role]] + body
        mask += [False] + [role == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(BOT)
        mask.append(False)
    return ids, mask


REPLY_RESERVE = 4  # when old turns must go, keep 1/4 of the window free for the reply


def rendered_length(message):
    """How many ids render_chat gives one message: its role token, its text (one id a character)
    and <|end|>."""
    return len(message["content"]) + 2


def turns_to_drop(messages, seq_length, pinned=0):
    """How many messages after the first `pinned` (a system prompt) to drop, oldest first and whole,
    so that the rendered prompt leaves a quarter of the window for the reply. The newest message
    always stays; a turn is never cut in half. Linear: each message is measured once."""
    budget = seq_length * (REPLY_RESERVE - 1) // REPLY_RESERVE
    total = sum(map(rendered_length, messages)) + 1  # + the <|bot|> that asks for the reply
    dropped = 0
    while pinned + dropped < len(messages) - 1 and total > budget:
        total -= rendered_length(messages[pinned + dropped])
        dropped += 1
    return dropped


def parse_chat(ids, vocab):
    """Inverse of render_chat: ids back to a list of messages (a trailing open turn is kept)."""
    roles = {token: role for role, token in ROLE_TOKENS.items()}
    messages = []
    for i in ids:
        if i in roles:
            messages.append({"role": roles[i], "content": ""})
        elif i != END and messages:
            messages[-1]["content"] += vocab.itos[i]
    return messages


def encode_documents(documents, vocab, assistant_only):
    """data.py's documents -> one int32 array of ids and a bool array, True where the next-id loss
    counts. Chats go through the template; prose (and, unless assistant_only, every turn) trains."""
    ids, mask = [], []
    for kind, doc in documents:
        if kind == "chat":
            doc_ids, doc_mask = render_chat(doc, vocab)
            mask += doc_mask if assistant_only else [True] * len(doc_ids)
        else:
            doc_ids = vocab.encode(doc + "\n\n")  # a blank line between paragraphs, as in the file
            mask += [True] * len(doc_ids)
        ids += doc_ids
    return np.array(ids, dtype=np.int32), np.array(mask, dtype=bool)


def chat_prompt(messages, vocab, seq_length):
    """(ids, messages dropped, characters dropped): the prompt a chat stage asks the model to reply
    to, built here for ChatAI.py and serve.py alike. Characters the model never saw are left out
    (rather than fed as <|unk|>); leading system messages stay; when the history outgrows the
    window the oldest turns after them go whole (turns_to_drop)."""
    kept, unknown = [], 0
    for message in messages:
        text, _ = unknown_chars_dropped(message["content"], vocab)
        unknown += len(message["content"]) - len(text)
        kept.append({**message, "content": text})
    pinned = next((i for i, m in enumerate(kept) if m["role"] != "system"), len(kept))
    cut = turns_to_drop(kept, seq_length, pinned)
    ids, _ = render_chat(kept[:pinned] + kept[pinned + cut:], vocab, add_generation_prompt=True)
    return ids, cut, unknown


def unknown_chars_dropped(text, vocab):
    """(text without the characters the model never saw, those characters in order of appearance).
    Chat stages drop them and say so, rather than feeding the model <|unk|>."""
    return "".join(c for c in text if c in vocab.stoi), vocab.unknown_chars(text)
