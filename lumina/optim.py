"""Optimizers and the learning-rate schedule: Muon for the blocks' matrices, AdamW for the rest."""
import math

import torch


def lr_at(progress, config):
    """The learning rate at progress in [0, 1]: a linear warmup, then down to min_lr_ratio *
    learning_rate, by a cosine over the rest of the run or, with decay_ratio > 0, warmup-stable-decay:
    the peak held, then a linear decay over the last decay_ratio of the run (Hägele et al. 2024;
    a run that stops at its budget has spent its decay however long it ran)."""
    peak, warmup, tail = config.learning_rate, config.warmup_ratio, config.decay_ratio
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    floor = peak * config.min_lr_ratio
    if tail:
        return peak - (peak - floor) * min(1.0, max(0.0, progress - (1 - tail)) / tail)
    decay = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * decay))


def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to each matrix of g (..., rows, cols), roughly: five
    Newton-Schulz iterations of the quintic x <- a x + (b A + c A^2) x with A = x x^T, whose
    coefficients push every singular value towards 1 fast (to 0.5-1.5, which trains as well as
    exactly 1). Run in g's own dtype: torch.optim.Muon always uses bf16, which CPUs without native
    bf16 emulate about 100x slower than fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values at most 1: it converges
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x  # A = x x^T is then the smaller square
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised (Keller Jordan's Muon): each 2-D weight moves by an orthogonalised
    Nesterov momentum, so every direction of the matrix learns at the same rate. The step is scaled
    by 0.2 sqrt(max(rows, cols)) to the size of AdamW's (Moonshot's rule), so it takes AdamW's
    learning rate and decoupled weight decay. Momentum warms up from 0.85 to 0.95 over the first
    300 steps, as in the speedruns: early gradients change fast, and a long memory of them slows
    the start (0.089 bits/char lower after 5 minutes, benchmarks/README.md)."""

    def __init__(self, params, lr, weight_decay, momentum=(0.85, 0.95), warmup_steps=300, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, parts=1,
                                      warmup_steps=warmup_steps, steps=0, ns_steps=ns_steps))

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for group in self.param_groups:  # a run saved before the warm-up existed keeps its constant momentum
            if isinstance(group["momentum"], float):
                group.update(momentum=(group["momentum"],) * 2, steps=0, warmup_steps=1)
            group.setdefault("ns_steps", 5)  # saved before the iterations were a setting

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            start, end = group["momentum"]
            momentum = start + (end - start) * min(1.0, group["steps"] / group["warmup_steps"])
            group["steps"] += 1  # kept in the group, so a resumed run goes on warming up where it was
            by_shape = {}  # matrices of one shape (the same layer in every block) go through together
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                bufs = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
                grads = [p.grad for p in params]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                nesterov = torch.stack(torch._foreach_add(grads, bufs, alpha=momentum))
                # A fused matrix (q, k and v; gate and value) is orthogonalised part by part.
                parts = nesterov.view(len(params), group["parts"], shape[0] // group["parts"], shape[1])
                updates = orthogonalize(parts, group["ns_steps"]).view(nesterov.shape).unbind(0)  # one per matrix
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, updates, alpha=-group["lr"] * 0.2 * math.sqrt(max(parts.shape[-2:])))


class Optimizers:
    """Several optimizers stepped as one, so the loop sets one learning rate, clips once and saves
    one state, whichever optimizers the config chose."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states):
        states = [states] if isinstance(states, dict) else states  # a state saved before Muon: one AdamW
        if len(states) != len(self.optimizers):
            raise SystemExit("error: cannot resume: the saved optimizer state does not match --optimizer; "
                             "resume with the optimizer the run started with")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)


def make_optimizer(net, config, device):
    """Muon (optimizer=muon, the default) for the blocks' 2-D weight matrices and AdamW for the
    embedding (tied to the head) and the norms, as the nanoGPT speedruns do, or AdamW for every
    parameter (optimizer=adamw); both take learning_rate and weight_decay. Matrices decay; norms do
    not. AdamW uses the fused kernel on CUDA and CPU, torch's default (for-each) one on MPS."""
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    use_muon = lambda name, p: config.optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2
    matrices = [p for name, p in named if use_muon(name, p)]
    rest = [(name, p) for name, p in named if not use_muon(name, p)]
    decays = lambda p: p.dim() >= 2 and not hasattr(p, "trained_rows")  # LoRA's embedding: its frozen rows must stay put
    adamw = torch.optim.AdamW([{"params": [p for _, p in rest if decays(p)], "weight_decay": config.weight_decay},
                               {"params": [p for _, p in rest if not decays(p)], "weight_decay": 0.0}],
                              lr=config.learning_rate, betas=(0.9, config.beta2), fused=device.type in ("cuda", "cpu"))
    if not matrices:
        return Optimizers([adamw])
    # q, k and v (and the MLP's gate and value) are separate matrices that share one weight for
    # speed; orthogonalised as their parts they learned more (benchmarks/README.md, "Muon").
    parts = lambda name: 3 if name.endswith("attn.qkv.weight") else 2 if name.endswith("mlp.up.weight") else 1
    groups = [{"params": [p for name, p in named if use_muon(name, p) and parts(name) == n], "parts": n} for n in (1, 2, 3)]
    muon = Muon([g for g in groups if g["params"]], config.learning_rate, config.weight_decay,
                ns_steps=config.muon_steps)
    return Optimizers([muon, adamw])
