"""The transformer: a small decoder-only character model (pre-norm, SDPA attention, rotary
positions, SwiGLU MLP, tied embeddings, optional hashed n-gram embeddings). Generation's cache
lives in engine.py: a forward pass gets a view of it that says where the new ids sit, and hands it
each layer's keys and values (cache.attend).

Design choice, measured (benchmarks/arch_choice.py, README "Choosing the architecture"): rotary
positions and a SwiGLU MLP. At the CPU preset, each trained for the same 2.5 minutes, val bits/char
was 2.241 for rotary + SwiGLU, 2.263 rotary + squared ReLU, 2.375 rotary + GELU and 2.688 for a
learned position table + GELU.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    seq_length: int = 256     # context window, in characters
    hidden_size: int = 256    # width of the residual stream
    num_layers: int = 4
    nhead: int = 4            # attention heads; hidden_size must divide evenly
    dropout: float = 0.0      # on the residual branches only; attention dropout is 4.5x slower on CPU
    ngram_buckets: int = 0    # rows of each hashed n-gram table (NgramEmbedding); 0: none (files of format 2)
    qk_norm: bool = False     # queries and keys scaled to unit RMS per head before attention (files before: off)
    logit_softcap: float = 0.0  # > 0: logits squashed smoothly into (-cap, cap) by cap * tanh(logits / cap); 0: off

    def __post_init__(self):
        if self.hidden_size % self.nhead or (self.hidden_size // self.nhead) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be nhead ({self.nhead}) times an even "
                             f"head size, because rotary positions rotate pairs of numbers")

    def block_params(self):
        """Parameters in the transformer blocks: attention's 4 w^2, the SwiGLU MLP's 3 w (8w / 3) and
        two norms each. Scaling laws count these, not the embeddings, head or n-gram tables, whose
        lookups cost next to nothing."""
        w = self.hidden_size
        return self.num_layers * (4 * w * w + 3 * w * (8 * w // 3) + 4 * w)


def rotary_tables(seq_length, head_dim, base=10000.0):
    """cos and sin tables, each (seq_length, head_dim), for apply_rotary. Pair i of a head (features
    i and i + head_dim/2) turns at frequency base^(-i / (head_dim/2)): fast pairs tell near
    positions apart, slow ones far. sin carries the rotation's sign: -sin for the first halves."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), freqs)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate each pair (a, b) = (x[..., i], x[..., i + half]) of x (..., head_dim) by its angle:
    (a cos - b sin, b cos + a sin). Rolling x by half a head puts b beside a, so the whole rotation
    is two products and a sum. The dot product of a rotated query and key then depends only on how
    far apart they are, not where they sit."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast, keep q and k in bf16/fp16, not fp32
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nhead, self.qk_norm = config.nhead, config.qk_norm
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, rotary, cache=None, layer=0, attention=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.nhead, C // self.nhead)
        qk = qkv[:, :, :2]
        if self.qk_norm:  # QK-norm: a query's dot products with the keys cannot grow without bound
            qk = F.rms_norm(qk, (qk.shape[-1],))
        # Rotate queries and keys together, then (B, T, nhead, head_dim) -> (B, nhead, T, head_dim).
        q, k = apply_rotary(qk, *rotary).transpose(1, 3).unbind(dim=2)
        v = qkv[:, :, 2].transpose(1, 2)
        if attention is not None:  # a pass that shows its attention: the last query's weights, made explicit
            attention.append(last_query_weights(q, k))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask = cache.attend(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def last_query_weights(q, k):
    """The attention weights (B, nhead, T) of the last query of a window over every key, in float32:
    the softmax of its scaled dot products (the last query sees every key, so no mask). What
    scaled_dot_product_attention computes inside and never hands out, for the one query a view of
    the next character needs: a T-fold smaller sum than the whole (T, T) map."""
    return (q[:, :, -1:].float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)[:, :, 0]


class NgramEmbedding(nn.Module):
    """What the last two and three characters say, added to each character's embedding: a table
    of (previous, current) pairs and one of (two back, previous, current) triples, each hashed into
    `buckets` rows (a few pairs share a row). They start at zero, so a new model starts as the
    plain one; at the character level these n-grams carry much of what the first steps learn.
    Every caller passes the true predecessors of a pass's first ids (`before`, -1 at the start of
    a text), so a window, a cached step and an exported graph see the same n-grams."""
    PRIMES = (1_000_003, 998_244_353)  # hash multipliers: the ids (below 2**16) never overflow int64

    def __init__(self, buckets, width):
        super().__init__()
        self.buckets = buckets
        self.pair, self.triple = nn.Embedding(buckets, width), nn.Embedding(buckets, width)

    def forward(self, idx, before):
        ids = torch.cat([before, idx], dim=1) + 1  # (B, 2 + T); +1: the text's start (-1) hashes as 0
        two_back, previous, current = ids[:, :-2], ids[:, 1:-1], ids[:, 2:]
        pair = (previous * self.PRIMES[0] + current) % self.buckets
        triple = (two_back * self.PRIMES[1] + previous * self.PRIMES[0] + current) % self.buckets
        return self.pair(pair) + self.triple(triple)


def dropout(p):
    """Dropout, or nothing at all when p is 0: even a disabled Dropout module costs a call on every
    layer of every generated character (about 4% of a chat step at the CPU preset)."""
    return nn.Dropout(p) if p else nn.Identity()


class MLP(nn.Module):
    """SwiGLU: a SiLU-gated product of two projections. Its width is 8/3 of the stream, so it has
    the parameters of a 4x GELU MLP; it trained better per second than GELU or squared ReLU."""

    def __init__(self, config):
        super().__init__()
        width = 8 * config.hidden_size // 3
        self.up = nn.Linear(config.hidden_size, 2 * width, bias=False)  # gate and value in one matmul
        self.proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). The residual path is never normalised."""

    def __init__(self, config):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.attn, self.mlp = CausalSelfAttention(config), MLP(config)
        self.drop = dropout(config.dropout)

    def forward(self, x, rotary, cache=None, layer=0, attention=None):
        x = x + self.drop(self.attn(self.norm1(x), rotary, cache, layer, attention))
        return x + self.drop(self.mlp(self.norm2(x)))


class CharTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.ngram = NgramEmbedding(config.ngram_buckets, config.hidden_size) if config.ngram_buckets else None
        # Positions enter as rotations of queries and keys (rotary), not as a learned table:
        # fixed tables, so they are buffers and never saved.
        # Shaped (seq_length, 1, 1, head_dim) to broadcast over (batch, T, q/k, nhead, head_dim).
        cos, sin = rotary_tables(config.seq_length, config.hidden_size // config.nhead)
        self.register_buffer("cos", cos[:, None, None, :], persistent=False)
        self.register_buffer("sin", sin[:, None, None, :], persistent=False)
        self.drop = dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one matrix reads and writes characters
        self.apply(self._init_weights)
        # Each residual branch adds to the stream; scale their outputs so depth keeps variance flat.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.num_layers))
            elif name.startswith("ngram."):
                nn.init.zeros_(p)  # n-grams start at zero: a new model starts as the plain one

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None, label_smoothing=0.0, before=None, target_weights=None,
                attention=None):
        """idx (B, T) ids -> logits (B, T, vocab). With targets, also the mean loss over targets
        that are not -1 (masked), each target id weighted by target_weights (vocab,) if given.
        `before` (B, 2) holds the two ids that precede each row's first
        id in its text (-1 where there are none; None: none at all); only n-grams read them.
        `attention`, a list (without a cache): each layer appends its last query's weights (B, nhead, T).

        With a cache (a view from engine.py for this one pass), row b's ids continue the positions
        the cache holds for it: the view says where they sit (`start`, the same for every row, or
        `positions` (B, T)), and `attend(layer, k, v)` stores the new keys and values and returns
        every key and value the rows may see, with the mask that says which."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.start
        end = T if cache is None else cache.end
        if end > self.config.seq_length:
            raise ValueError(f"{end} positions exceed the context window of {self.config.seq_length}")
        if cache is None or cache.positions is None:  # every row at the same positions: a slice
            rotary = (self.cos[start:start + T], self.sin[start:start + T])
        else:  # each row its own positions: (B, T, 1, 1, head_dim)
            rotary = (self.cos[cache.positions], self.sin[cache.positions])
        x = self.tok_emb(idx)
        if self.ngram is not None:
            x = x + self.ngram(idx, torch.full_like(idx[:, :2], -1) if before is None else before)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, cache, layer, attention)
        logits = self.head(self.norm(x))
        if self.config.logit_softcap:  # the soft-cap: no logit beyond +-cap, however confident the model grows
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), weight=target_weights,
                               ignore_index=-1, label_smoothing=label_smoothing)
        return logits, loss
