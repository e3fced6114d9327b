"""optim.py: the learning-rate schedules against hand computation, and AdamW's groups (matrices decay, norms
and vectors do not, frozen parameters are left out)."""
import copy
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


# -----------------------------------------------------------------------------
# Muon

def _tiny(tied=True, **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=48,
                           block_size=8, tie_embeddings=tied, **kw))


@pytest.mark.parametrize('shape', [(64, 32), (32, 64), (48, 48), (4, 24, 40)])
def test_newton_schulz_matches_the_svd_orthogonalisation(shape):
    """orthogonalize(G) = U S' V^T for G = U S V^T: the same singular vectors as U V^T, and every singular
    value in Keller Jordan's band [0.68, 1.2] (the quintic trades convergence to 1 for speed)."""
    g = torch.Generator().manual_seed(sum(shape))
    *batch, m, n = shape
    k = min(m, n)
    # singular values spread 50x (a gradient's spectrum is far from flat), vectors at random
    Q1 = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    G = Q1 @ torch.diag_embed(3 * torch.linspace(0.02, 1.0, k, dtype=torch.float64).expand(*batch, k)) @ Q2.mT
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = optim.orthogonalize(G, steps=5)
    assert O.dtype == G.dtype and O.shape == G.shape
    inner = U.mT @ O @ Vh.mT  # diagonal exactly when O shares G's singular vectors
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diag)).abs().max() < 1e-5
    assert diag.min() > 0.68 and diag.max() < 1.2, (diag.min(), diag.max())
    polar = U @ Vh  # the exact orthogonalisation: O is within the band's distance of it
    assert (O - polar).norm() / polar.norm() < 0.3
    assert (optim.orthogonalize(G, steps=12) - polar).norm() / polar.norm() < 0.3  # more steps stay in band


def test_hand_written_adamw_equals_torch_adamw():
    a, b = _tiny(), _tiny()
    opt_a = optim.MuonAdamW([{'params': list(a.parameters()), 'kind': 'adamw', 'lr': 3e-3,
                              'weight_decay': 0.1, 'betas': (0.9, 0.95), 'eps': 1e-8}])
    opt_b = torch.optim.AdamW(b.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    idx = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=n)


def test_a_muon_step_is_weight_decay_then_the_orthogonalised_nesterov_momentum():
    w = torch.nn.Parameter(torch.randn(24, 8))  # tall: its step is scaled by sqrt(24 / 8)
    w0 = w.detach().clone()
    opt = optim.MuonAdamW([{'params': [w], 'kind': 'muon', 'lr': 0.02, 'weight_decay': 0.1, 'momentum': 0.95,
                            'momentum_start': 0.85, 'momentum_warmup': 10, 'ns_steps': 5}])
    grads = [torch.randn(24, 8) for _ in range(3)]
    buf, want = torch.zeros(24, 8), w0.clone()
    for t, g in enumerate(grads):
        mu = 0.85 + 0.1 * t / 10  # the momentum warms up with the step
        buf = mu * buf + (1 - mu) * g
        want = want * (1 - 0.02 * 0.1) - 0.02 * 3 ** 0.5 * optim.orthogonalize(g + mu * (buf - g))
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-6)
    assert opt.state[w]['step'] == 3


@pytest.mark.parametrize('shape', [(24, 8), (8, 24)])
def test_normuon_divides_each_neuron_by_its_running_rms_and_keeps_the_step_size(shape):
    """NorMuon by hand, a row (or column) at a time: each row along the longer side divided by the root of
    its running mean square of orthogonalised updates (decayed by beta2), the whole rescaled to the norm it
    had."""
    w = torch.nn.Parameter(torch.randn(*shape))
    want = w.detach().clone()
    opt = optim.MuonAdamW([{'params': [w], 'kind': 'muon', 'lr': 0.02, 'weight_decay': 0.0, 'momentum': 0.9,
                            'momentum_start': 0.9, 'momentum_warmup': 0, 'ns_steps': 5, 'beta2': 0.8}])
    tall = shape[0] >= shape[1]
    rows = shape[0] if tall else shape[1]
    moment, buf = [0.0] * rows, torch.zeros(shape)
    for g in [torch.randn(shape) for _ in range(3)]:
        buf = 0.9 * buf + 0.1 * g
        O = optim.orthogonalize(g + 0.9 * (buf - g))
        lines = [O[i] if tall else O[:, i] for i in range(rows)]
        moment = [0.8 * m + 0.2 * float((line ** 2).mean()) for m, line in zip(moment, lines)]
        scaled = [line / m ** 0.5 for line, m in zip(lines, moment)]
        N = torch.stack(scaled) if tall else torch.stack(scaled, dim=1)
        want -= 0.02 * max(1.0, shape[0] / shape[1]) ** 0.5 * N * (O.norm() / N.norm())
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-6)
    assert opt.state[w]['second_moment'].shape == ((rows, 1) if tall else (1, rows))


@pytest.mark.parametrize('bf16', [True, False])
def test_muon_stacks_same_shaped_updates_in_bf16(bf16):
    """Newton-Schulz in bf16 runs on the updates of one shape stacked: the same update, to bf16's rounding,
    as each matrix on its own; by default (fp32 on a CPU) one at a time, exactly orthogonalize's."""
    g = torch.Generator().manual_seed(3)
    shapes = [(24, 8), (8, 24), (24, 8), (16, 16), (24, 8)]
    ws = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    w0 = [w.detach().clone() for w in ws]
    opt = optim.MuonAdamW([{'params': ws, 'kind': 'muon', 'lr': 0.02, 'weight_decay': 0.0, 'momentum': 0.9,
                            'momentum_start': 0.9, 'momentum_warmup': 0, 'ns_steps': 5}],
                          torch.bfloat16 if bf16 else None)
    grads = [torch.randn(*s, generator=g) for s in shapes]
    for w, gr in zip(ws, grads):
        w.grad = gr.clone()
    opt.step()
    for w, start, gr in zip(ws, w0, grads):
        scale = max(1.0, w.size(0) / w.size(1)) ** 0.5
        exact = optim.orthogonalize(0.19 * gr, 5, torch.float32)  # g + 0.9 (0.1 g - g): Nesterov's first step
        one = optim.orthogonalize(0.19 * gr, 5, torch.bfloat16) if bf16 else exact
        step = (start - w.detach()) / (0.02 * scale)  # how far w moved, in units of the learning rate
        torch.testing.assert_close(step, one, rtol=0, atol=0.02 if bf16 else 1e-4)
        assert (step - exact).norm() / exact.norm() < (0.03 if bf16 else 1e-5)


@pytest.mark.parametrize('native, dtype, want', [(True, 'bfloat16', torch.bfloat16), (True, 'float32', None),
                                                 (False, 'bfloat16', None), (False, 'float32', None)])
def test_make_optimizer_runs_newton_schulz_in_bf16_only_where_the_run_trains_in_native_bf16(
        monkeypatch, native, dtype, want):
    monkeypatch.setattr(optim, 'native_bf16', lambda: native)
    assert optim.make_optimizer(_tiny(), _cfg_muon(), 'cpu', dtype).ns_dtype == want


def _cfg_muon(**kw):
    return _cfg(optimizer='muon', **kw)


@pytest.mark.parametrize('tied', [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tied):
    model = _tiny(tied, qk_norm=True)
    opt = optim.make_optimizer(model, _cfg_muon(learning_rate=2e-3, matrix_lr=0.03), 'cpu')
    names = {id(p): n for n, p in model.named_parameters()}
    kind = {names[id(p)]: (g['kind'], g['peak_lr'], g['weight_decay'])
            for g in opt.param_groups for p in g['params']}
    assert set(kind) == set(names.values())  # every parameter, once
    for n, (k, lr, wd) in kind.items():
        if n.startswith('layers.') and n.endswith('proj.weight'):
            assert (k, lr, wd) == ('muon', 0.03, 0.1), n
        else:  # the embedding, the untied head, RMSNorm and QK-norm weights
            assert k == 'adamw' and lr == 2e-3 and wd == (0.1 if n.endswith(('emb.weight', 'head.weight'))
                                                         else 0.0), n
    assert ('lm_head.weight' in kind) == (not tied)


def test_lr_groups_give_each_group_its_peak_scaled_by_the_schedule():
    model = _tiny(False)
    cfg = _cfg_muon(learning_rate=2e-3, min_lr=1e-4, matrix_lr=0.02, warmup_iters=0,
                    lr_groups={'tok_emb.*': 0.05, 'lm_head.*': 0.004, 'layers.*.mlp.*': 0.01})
    opt = optim.make_optimizer(model, cfg, 'cpu')
    peak = {n: g['peak_lr'] for g in opt.param_groups for n, p in model.named_parameters()
            if any(p is q for q in g['params'])}
    assert peak['tok_emb.weight'] == 0.05 and peak['lm_head.weight'] == 0.004
    assert peak['layers.1.mlp.down_proj.weight'] == 0.01 and peak['layers.1.attn.q_proj.weight'] == 0.02
    assert peak['norm.weight'] == 2e-3
    lr = optim.lr_at(100, 100, cfg)  # the cosine's end: min_lr, 1/20 of the peak
    optim.set_lr(opt, lr, cfg.learning_rate)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([g['peak_lr'] / 20 for g in opt.param_groups])


def test_lr_groups_apply_to_adamw_too():
    opt = optim.make_optimizer(_tiny(), _cfg(learning_rate=1e-3, lr_groups={'tok_emb.*': 0.01}), 'cpu')
    # the embedding alone, then the norms (the first after it) and the 14 block matrices
    assert [(g['peak_lr'], g['weight_decay'], len(g['params'])) for g in opt.param_groups] == \
        [(0.01, 0.1, 1), (1e-3, 0.0, 5), (1e-3, 0.1, 14)]


@pytest.mark.parametrize('kw, message', [
    (dict(optimizer='adamm'), "optimizer must be one of adamw, muon, got 'adamm'"),
    (dict(lr_groups={'tok_embedding.*': 0.1}), "lr_groups: 'tok_embedding.*' matches no trainable parameter"),
    (dict(lr_groups={'lm_head.*': 0.1}), "'lm_head.*' matches no trainable parameter"),  # tied: no head
    (dict(lr_groups={'tok_emb.*': 'fast'}), "'tok_emb.*' must map to a learning rate >= 0, got 'fast'"),
])
def test_bad_optimizer_settings_are_one_clear_line(kw, message):
    with pytest.raises(lumi.LumiError) as e:
        optim.make_optimizer(_tiny(), _cfg(**kw), 'cpu')
    assert message in str(e.value) and '\n' not in str(e.value)


def test_train_py_refuses_an_unknown_optimizer_in_one_line(tmp_path, tokenizer):
    from test_cli import assert_one_line_error, run
    from test_train import TINY, write_bins
    bins = write_bins(tmp_path / 'bins', tokenizer)
    proc = run('train.py', f'--data_dir={bins}', f'--out_dir={tmp_path / "o"}', '--optimizer=adamm',
               '--max_iters=2', *TINY)
    assert_one_line_error(proc, "optimizer must be one of adamw, muon, got 'adamm'")
    proc = run('train.py', f'--data_dir={bins}', f'--out_dir={tmp_path / "o"}', '--optimizer=muon',
               "--lr_groups={'head.*': 0.01}", '--max_iters=2', *TINY)
    assert_one_line_error(proc, "lr_groups: 'head.*' matches no trainable parameter", 'tok_emb.weight')


def test_muon_state_round_trips_and_continues_bit_identically():
    """What a checkpoint holds (state_dict) resumes the same trajectory, float for float: the momentum
    buffers, AdamW's moments and every group's step count (which Muon's momentum warmup reads)."""
    idx = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(2))

    def steps(model, opt, n):
        for _ in range(n):
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()

    cfg = _cfg_muon(muon_momentum_warmup=4)
    a = _tiny(False)
    opt_a = optim.make_optimizer(a, cfg, 'cpu')
    steps(a, opt_a, 3)
    saved = copy.deepcopy((a.state_dict(), opt_a.state_dict()))
    steps(a, opt_a, 3)
    b = _tiny(False)
    b.load_state_dict(saved[0])
    opt_b = optim.make_optimizer(b, cfg, 'cpu')
    opt_b.load_state_dict(saved[1])
    steps(b, opt_b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
