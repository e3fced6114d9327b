"""
The optimizer and the learning-rate schedule the training loop steps with: AdamW over the trainable
parameters, matrices decayed and norms and vectors not, and warmup then cosine, warmup-stable-decay or a
constant rate. Their keys (learning_rate, weight_decay, lr_schedule, ...) are training.py's, among the loop's.

Deliberately left out: when and how often the loop steps (training.py), and any optimizer but AdamW.
"""
import math

import torch

from lumi import fused_adamw


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters: matrices decay, norms and vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused_adamw(device))  # where torch has the fused kernel (lumi.py)


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
