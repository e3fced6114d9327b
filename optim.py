"""
The optimizers and the learning-rate schedule the training loop steps with: AdamW over every trainable
parameter (matrices decayed, norms and vectors not), or Muon for the hidden matrices beside AdamW for the
rest; every group at its own peak rate (lr_groups), all following one schedule: warmup then cosine,
warmup-stable-decay or a constant rate.

Muon (Keller Jordan, 2024; the optimizer of the modded-nanogpt speedruns and of nanochat) is SGD with
Nesterov momentum whose update, for each weight matrix of a hidden linear layer, is replaced by the nearest
semi-orthogonal matrix (U V^T of the update's SVD U S V^T, approximated by a Newton-Schulz iteration): every
direction of the update moves by about as much, so directions a small batch's gradient barely shows are
learned as fast as the common ones. The embedding and the LM head (lookups and a softmax over the vocabulary,
not hidden maps), norms and vectors stay with AdamW.

Keys: the optimizer's own are here (optimizer, matrix_lr, lr_groups, Muon's momentum and iterations); the
schedule's and AdamW's (learning_rate, min_lr, lr_schedule, warmup_iters, weight_decay, beta1, beta2) are
training.py's, which takes these (its KEY_FILES).

NorMuon (Li et al. 2025, as nanochat uses it) on top: Muon's orthogonal update still moves some neurons more
than others, so each row along the matrix's longer side is divided by the root of its own running mean
square, and the whole update is scaled back to the Frobenius norm it had. At configs/cpu.py's 1,200 steps it
ended 0.027 nats lower on val than Muon alone (docs/BENCHMARKS.md, "Optimizer refinements").

Deliberately left out: when and how often the loop steps (training.py); Muon's own sharding across ranks
(DDP averages the gradients first, so every rank runs the same update on whole matrices); nanochat's other
refinements of Muon (Polar Express coefficients, row equilibration with a norm snap, cautious weight decay),
which lost at equal steps here, together or alone.
"""
import math
import re
from fnmatch import fnmatch

import torch

from lumi import LumiError, fused_adamw, native_bf16

# -----------------------------------------------------------------------------
# the optimizer's keys, which training.py takes (KEY_FILES) and so train.py, sft.py and dpo.py
optimizer = 'adamw'         # adamw: AdamW for every parameter; muon: Muon for the hidden matrices (every
                            # linear layer's weight but the LM head's), AdamW for the embedding, head, norms
matrix_lr = 0.02            # [0, inf) Muon's peak learning rate (optimizer=muon); the schedule scales it as
                            # it scales learning_rate
lr_groups = {}              # {name pattern: peak learning rate}: parameters whose name matches the pattern
                            # (fnmatch: 'tok_emb.*', 'layers.*.mlp.*') learn at their own peak, which the
                            # schedule scales alike; the first match wins, the rest keep learning_rate
                            # (AdamW) or matrix_lr (Muon); a pattern that matches nothing is an error
muon_momentum = 0.95        # [0, 1) Muon's Nesterov momentum, once warmed up
muon_momentum_start = 0.85  # [0, 1) Muon's momentum at step 0, rising linearly to muon_momentum
muon_momentum_warmup = 300  # [0, inf) steps of that rise (a high momentum early averages gradients of a
                            # model that no longer exists)
ns_steps = 5                # [1, inf) Newton-Schulz iterations per Muon update
muon_beta2 = 0.9            # [0, 1) NorMuon's decay of each neuron's mean square update (nanochat's 0.9);
                            # 0: off, plain Muon

OPTIMIZERS = ('adamw', 'muon')


# -----------------------------------------------------------------------------
# Muon

# Keller Jordan's quintic: a, b, c make the slope at zero as steep as the iteration allows while every
# singular value still lands in about [0.7, 1.2] within five steps, from any start in (0, 1]. It does not
# converge to exactly 1 (U S' V^T, not U V^T), which trains as well and costs half the steps of the cubic
# iteration that does.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, dtype=None):
    """Approximately the nearest semi-orthogonal matrix to each matrix in G (..., m, n): U S' V^T where
    G = U S V^T is its SVD and S' holds singular values in about [0.7, 1.2] (those of G above ~1e-3 of its
    norm; smaller ones grow, but not as far). Iterated in dtype: by default bf16 on a GPU, else fp32."""
    a, b, c = NS_COEFFS
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        X = X.mT
    # the Frobenius norm bounds the spectral norm: every singular value starts in (0, 1], the iteration's
    # range
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    mm = torch.addmm if X.dim() == 2 else torch.baddbmm  # beta * M + alpha * (P @ Q) in one call
    for _ in range(steps):
        A = X @ X.mT
        X = mm(X, mm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A^2) X
    return (X.mT if tall else X).to(G.dtype)


def normalize_neurons(O, state, beta2):
    """NorMuon: O (m, n) with each row along its longer side divided by the root of that row's running mean
    square (state['second_moment'], decayed by beta2), then scaled back to O's Frobenius norm: rows that Muon
    keeps moving far are slowed and the rest sped up, the step's size unchanged."""
    dim = -1 if O.size(0) >= O.size(1) else -2  # one statistic per row of a tall matrix, per column of a wide
    mean_sq = O.square().mean(dim=dim, keepdim=True)
    if 'second_moment' not in state:
        state['second_moment'] = torch.zeros_like(mean_sq)
    state['second_moment'].lerp_(mean_sq, 1 - beta2)
    N = O * state['second_moment'].clamp_min(1e-10).rsqrt()
    return N * (O.norm() / N.norm().clamp_min(1e-10))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups of kind 'muon' (2-D weights), AdamW for those of kind 'adamw', in one optimizer
    whose state_dict holds both (so a checkpoint resumes either exactly).

    A Muon group: lr, weight_decay (decoupled, as AdamW's), momentum, momentum_start, momentum_warmup (the
    momentum at a parameter's step t is momentum_start + (momentum - momentum_start) * min(1, t / warmup)),
    ns_steps, beta2 (NorMuon's; 0 or absent: plain Muon, as in a checkpoint from before it). An AdamW group:
    lr, weight_decay, betas, eps, with torch.optim.AdamW's arithmetic."""

    def __init__(self, groups, ns_dtype=None):
        for g in groups:
            if g.get('kind') not in ('muon', 'adamw'):
                raise ValueError(f"a group's kind must be muon or adamw, got {g.get('kind')!r}")
            if g['kind'] == 'muon' and any(p.dim() != 2 for p in g['params']):
                raise ValueError("Muon takes 2-D weights only")
        super().__init__(groups, {})
        self.ns_dtype = ns_dtype  # Newton-Schulz's float; None: orthogonalize's default (_orthogonalize_all)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if params:
                (self._muon if group['kind'] == 'muon' else self._adamw)(group, params)

    def _muon(self, group, params):
        states = [self.state[p] for p in params]
        for p, s in zip(params, states):
            if not s:
                s['step'], s['momentum_buffer'] = 0, torch.zeros_like(p)
        t = states[0]['step']
        warm = min(1.0, t / group['momentum_warmup']) if group['momentum_warmup'] else 1.0
        mu = group['momentum_start'] + (group['momentum'] - group['momentum_start']) * warm
        grads, bufs = [p.grad for p in params], [s['momentum_buffer'] for s in states]
        torch._foreach_lerp_(bufs, grads, 1 - mu)  # buf = mu buf + (1 - mu) g
        updates = torch._foreach_lerp(grads, bufs, mu)  # Nesterov: g + mu (buf - g), momentum looked ahead
        for p, update in zip(params, self._orthogonalize_all(updates, group['ns_steps'])):
            # a semi-orthogonal step moves each weight by ~1/sqrt(max(in, out)): x sqrt(out/in) for a tall
            # matrix, so that every weight moves by ~1/sqrt(in) whatever the shape (Keller Jordan's rule)
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if group.get('beta2'):
                update = normalize_neurons(update, self.state[p], group['beta2'])
            if group['weight_decay']:
                p.mul_(1 - group['lr'] * group['weight_decay'])
            p.add_(update, alpha=-group['lr'] * scale)
        for s in states:
            s['step'] += 1

    def _orthogonalize_all(self, updates, steps):
        """orthogonalize each update. In bf16 (make_optimizer's choice where bf16 is native), the updates of
        one shape stacked into one batched call: configs/cpu.py's 28 matrices took 15 ms a step against
        34 ms one at a time in fp32 on an AMX core (bench_recipe.py --ns_time). Otherwise one matrix at a
        time: on an AVX2 core, batching fp32 was slower (0.12 s against 0.08 s a step)."""
        if self.ns_dtype != torch.bfloat16:
            return [orthogonalize(u, steps, self.ns_dtype) for u in updates]
        by_shape, out = {}, [None] * len(updates)
        for i, u in enumerate(updates):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        for idx in by_shape.values():
            stacked = orthogonalize(torch.stack([updates[i] for i in idx]), steps, self.ns_dtype)
            for i, o in zip(idx, stacked.unbind(0)):
                out[i] = o
        return out

    def _adamw(self, group, params):
        beta1, beta2 = group['betas']
        lr, eps, wd = group['lr'], group['eps'], group['weight_decay']
        for p in params:
            s = self.state[p]
            if not s:
                s['step'], s['exp_avg'], s['exp_avg_sq'] = 0, torch.zeros_like(p), torch.zeros_like(p)
            s['step'] += 1
            g = p.grad
            p.mul_(1 - lr * wd)
            s['exp_avg'].lerp_(g, 1 - beta1)
            s['exp_avg_sq'].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (s['exp_avg_sq'].sqrt() / math.sqrt(1 - beta2 ** s['step'])).add_(eps)
            p.addcdiv_(s['exp_avg'], denom, value=-lr / (1 - beta1 ** s['step']))


# -----------------------------------------------------------------------------
# the groups, the optimizer and the schedule the loop uses

def hidden_matrices(model):
    """The weights Muon takes: every nn.Linear's but the LM head's (the embedding is no nn.Linear; LoRA's
    matrices are parameters of lora.LoRALinear, so they stay with AdamW)."""
    return {id(m.weight) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split('.')[-1] != 'lm_head'}


def parameter_groups(model, cfg):
    """The trainable parameters in groups of one kind (muon or adamw), decay and peak learning rate, in the
    order of model.named_parameters(): [{'params', 'kind', 'weight_decay', 'peak_lr'}]. Refuses an unknown
    optimizer and an lr_groups pattern that matches no trainable parameter, in one line."""
    if cfg.optimizer not in OPTIMIZERS:
        raise LumiError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    patterns = dict(cfg.lr_groups)
    for pattern, lr in patterns.items():
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
            raise LumiError(f"lr_groups: {pattern!r} must map to a learning rate >= 0, got {lr!r}")
        if not any(fnmatch(n, pattern) for n, _ in named):
            names = ', '.join(sorted({re.sub(r'\.\d+\.', '.N.', n) for n, _ in named}))
            raise LumiError(f"lr_groups: {pattern!r} matches no trainable parameter (they are {names})")
    muon = hidden_matrices(model) if cfg.optimizer == 'muon' else set()
    groups = {}
    for name, p in named:
        kind = 'muon' if id(p) in muon else 'adamw'
        pattern = next((pat for pat in patterns if fnmatch(name, pat)), None)
        lr = float(patterns[pattern] if pattern is not None else
                   cfg.matrix_lr if kind == 'muon' else cfg.learning_rate)
        decay = cfg.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((kind, decay, lr), []).append(p)
    return [{'params': ps, 'kind': kind, 'weight_decay': decay, 'peak_lr': lr, 'lr': lr}
            for (kind, decay, lr), ps in groups.items()]


def make_optimizer(model, cfg, device, dtype='float32'):
    """cfg.optimizer over the trainable parameters: torch's AdamW (matrices decay, norms and vectors do not),
    or MuonAdamW (Muon for the hidden matrices, AdamW for the rest); every group at its own peak rate
    (parameter_groups). Muon's Newton-Schulz runs in bf16 on a GPU, and on a CPU where the run (dtype, as
    resolved) trains in bf16 natively (AVX512-BF16 or AMX); an fp32 run keeps it fp32."""
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == 'adamw':
        for g in groups:
            del g['kind']
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                 fused=fused_adamw(device))  # where torch has the fused kernel (lumi.py)
    for g in groups:
        if g['kind'] == 'muon':
            g.update(momentum=cfg.muon_momentum, momentum_start=cfg.muon_momentum_start,
                     momentum_warmup=cfg.muon_momentum_warmup, ns_steps=cfg.ns_steps, beta2=cfg.muon_beta2)
        else:
            g.update(betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    bf16 = device.startswith('cuda') or device == 'cpu' and dtype == 'bfloat16' and native_bf16()
    return MuonAdamW(groups, torch.bfloat16 if bf16 else None)


def set_lr(optimizer, lr, peak):
    """Each group at lr / peak of its own peak rate: the schedule lr_at computes for learning_rate (peak)
    scales every group alike. A group restored from a checkpoint of before per-group rates peaks at peak."""
    scale = lr / peak if peak else 0.0
    for group in optimizer.param_groups:
        group['lr'] = group.get('peak_lr', peak) * scale


def lr_at(step, max_iters, cfg):
    """Linear warmup, then cosine to min_lr, or flat then a linear decay over the last decay_frac (wsd)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == 'constant':
        return cfg.learning_rate
    if cfg.lr_schedule == 'wsd':
        decay_start = int(max_iters * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.learning_rate
        frac = (step - decay_start) / max(1, max_iters - decay_start)
        return cfg.learning_rate + min(frac, 1.0) * (cfg.min_lr - cfg.learning_rate)
    if cfg.lr_schedule != 'cosine':
        raise ValueError(f"lr_schedule must be cosine, wsd or constant, got {cfg.lr_schedule!r}")
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)
