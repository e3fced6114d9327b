"""optim.py: the learning-rate schedules against hand computation, and AdamW's groups (matrices decay, norms
and vectors do not, frozen parameters are left out)."""
import math

import pytest
import torch

import lumi
import optim
from model import GPT, ModelConfig


def _cfg(**kw):
    return lumi.Config(lumi.load_config(lumi.declared_keys('training.py'), []), **kw)


@pytest.mark.parametrize('schedule, step, want', [
    ('cosine', 0, 1e-3 * 1 / 10), ('cosine', 9, 1e-3), ('cosine', 10, 1e-3),
    ('cosine', 55, 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4), ('cosine', 100, 1e-4),
    ('cosine', 500, 1e-4),
    ('wsd', 50, 1e-3), ('wsd', 79, 1e-3), ('wsd', 90, 1e-3 + 0.5 * (1e-4 - 1e-3)), ('wsd', 100, 1e-4),
    ('constant', 5, 1e-3 * 6 / 10), ('constant', 99, 1e-3),
])
def test_learning_rate_schedules_against_hand_computation(schedule, step, want):
    cfg = _cfg(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, decay_frac=0.2, lr_schedule=schedule)
    assert optim.lr_at(step, 100, cfg) == pytest.approx(want, rel=1e-12)


def test_an_unknown_schedule_is_refused():
    cfg = _cfg(lr_schedule='linear', warmup_iters=0)
    with pytest.raises(ValueError, match='cosine, wsd or constant'):
        optim.lr_at(5, 100, cfg)


def test_adamw_decays_matrices_only_and_leaves_out_frozen_parameters():
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, ffn_hidden=32,
                            block_size=8))
    model.norm.weight.requires_grad_(False)
    opt = optim.make_optimizer(model, _cfg(weight_decay=0.1), 'cpu')
    decayed, plain = opt.param_groups
    assert decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decayed['params']) and all(p.dim() < 2 for p in plain['params'])
    names = {id(p): n for n, p in model.named_parameters()}
    assert 'norm.weight' not in {names[id(p)] for g in opt.param_groups for p in g['params']}
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert isinstance(opt, torch.optim.AdamW)
