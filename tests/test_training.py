"""training.py: the loop's exact resume (an interrupted run logs what the uninterrupted one logs, bit for
bit), best.pt after a kill at any write, a resume asked for more steps, a metrics.jsonl cut short by a kill,
the named steps called alone (train_step, evaluate, save, plan_budget), the schedule, the CPU peak behind MFU,
and the unigram entropy the pretraining report is held to."""
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import checkpoint
import optim
import lumi
import training

SVG = '{http://www.w3.org/2000/svg}'

# -----------------------------------------------------------------------------
# exact resume


class RandomBatches:
    """Random token windows from a torch generator whose state is the sampler position."""

    def __init__(self, vocab, seed=0):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def next_batch(self):
        x = torch.randint(0, 16, (4, 33), generator=self.g)  # a skewed unigram: learnable in a few steps
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {'g': self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state['g'])


class Crash(Exception):
    pass


def _fit(out_dir, tiny_checkpoint, crash_at=None, resume='auto'):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    model = checkpoint.model_from_checkpoint(ckpt)
    model.cfg.dropout = 0.0
    tok = checkpoint.tokenizer_from_checkpoint(ckpt)
    cfg = lumi.load_config(lumi.declared_keys('training.py'),
                           [f'--out_dir={out_dir}', '--max_iters=12', '--eval_interval=5',
                            '--ckpt_interval=4', '--warmup_iters=3', '--keep_last=1',
                            '--device=cpu', '--dtype=float32', f'--resume={resume}'])
    val = RandomBatches(model.cfg.vocab_size, seed=99).next_batch()
    steps = []

    def loss_fn(m, batch):
        if crash_at is not None and len(steps) == crash_at:
            raise Crash()
        steps.append(1)
        return m(batch[0], batch[1])[1]

    def evaluate(m):
        return {'val_loss': m(val[0], val[1])[1].item()}
    path = training.fit(cfg, model, RandomBatches(model.cfg.vocab_size), loss_fn, evaluate,
                    meta=checkpoint.checkpoint_meta(model, tok, 'pretrain'))
    return path, lumi.read_jsonl(os.path.join(out_dir, 'metrics.jsonl'))


def test_fit_resume_matches_the_uninterrupted_run(tmp_path, tiny_checkpoint):
    path, full = _fit(str(tmp_path / 'a'), tiny_checkpoint)
    assert path.endswith('ckpt_0000012.pt') and os.path.exists(tmp_path / 'a' / 'best.pt')
    assert [r['step'] for r in full if 'loss' in r] == list(range(1, 13))
    with pytest.raises(Crash):  # dies during step 7, after the checkpoints of steps 4 (interval) and 5 (best)
        _fit(str(tmp_path / 'b'), tiny_checkpoint, crash_at=6)
    assert checkpoint.load_checkpoint(checkpoint.latest_step(str(tmp_path / 'b')))['step'] == 5
    metrics = tmp_path / 'b' / 'metrics.jsonl'
    assert max(r['step'] for r in lumi.read_jsonl(str(metrics))) == 6  # 6 is redone
    with open(metrics, 'a') as f:  # and a kill during the next append left half a line
        f.write('{"step": 7, "loss": 3.1')
    path, resumed = _fit(str(tmp_path / 'b'), tiny_checkpoint)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('tokens_per_sec', 'mfu')} for r in rs]
    assert strip(resumed) == strip(full)  # losses, lr, grad norms and val losses: identical floats
    a = checkpoint.load_checkpoint(checkpoint.latest_step(str(tmp_path / 'a')))['model']
    b = checkpoint.load_checkpoint(path)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    svg = ET.parse(tmp_path / 'b' / 'loss.svg')  # fit draws its curves at the end
    assert svg.getroot().tag == SVG + 'svg'


# -----------------------------------------------------------------------------
# best.pt after a kill, a resume asked for more steps


class OneBatch(RandomBatches):
    """The same batch every step, and as the val set: the model learns it, so the val
    loss falls at every eval."""

    def __init__(self, vocab):
        super().__init__(vocab, seed=3)
        self.batch = super().next_batch()

    def next_batch(self):
        return self.batch


def _fit_one_batch(out_dir, tiny_checkpoint, *flags, die_writing=None):
    """training.fit on the tiny model with a val loss that falls at every eval; die_writing='best' or 'step':
    the process dies (Crash) while writing the file of the last eval's improvement, the
    other not yet written."""
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    model = checkpoint.model_from_checkpoint(ckpt)
    tok = checkpoint.tokenizer_from_checkpoint(ckpt)
    cfg = lumi.load_config(lumi.declared_keys('training.py'),
                           [f'--out_dir={out_dir}', '--max_iters=10', '--eval_interval=5',
                            '--ckpt_interval=100', '--warmup_iters=2', '--keep_last=0',
                            '--device=cpu', '--dtype=float32', '--learning_rate=3e-3',
                            *flags])
    batches = OneBatch(model.cfg.vocab_size)
    real_save = training.save_checkpoint  # what the loop calls

    def save(path, state):
        last = state['step'] == cfg.max_iters
        dying = 'best.pt' if die_writing == 'best' else f"ckpt_{state['step']:07d}.pt"
        if last and die_writing and os.path.basename(path) == dying:
            raise Crash()
        real_save(path, state)
    training.save_checkpoint = save
    try:
        return training.fit(cfg, model, batches, lambda m, b: m(b[0], b[1])[1],
                        lambda m: {'val_loss': m(*batches.batch)[1].item()},
                        meta=checkpoint.checkpoint_meta(model, tok, 'pretrain'))
    finally:
        training.save_checkpoint = real_save


def _best_is_the_best(out_dir):
    evals = [r for r in lumi.read_jsonl(os.path.join(out_dir, 'metrics.jsonl')) if 'val_loss' in r]
    best = min(evals, key=lambda r: r['val_loss'])
    saved = checkpoint.load_checkpoint(os.path.join(out_dir, 'best.pt'))
    assert (saved['step'], saved['metrics']['val_loss']) == (best['step'], best['val_loss'])
    step_ckpt = checkpoint.load_checkpoint(os.path.join(out_dir, f"ckpt_{best['step']:07d}.pt"))
    assert all(torch.equal(saved['model'][k], step_ckpt['model'][k]) for k in saved['model'])


@pytest.mark.parametrize('die_writing', ['best', 'step'])
def test_a_kill_between_best_and_step_checkpoint_leaves_best_consistent_after_resume(tmp_path,
                                                                                     tiny_checkpoint,
                                                                                     die_writing):
    out = str(tmp_path / die_writing)
    with pytest.raises(Crash):
        _fit_one_batch(out, tiny_checkpoint, die_writing=die_writing)
    assert checkpoint.latest_step(out).endswith('ckpt_0000005.pt')  # the step-10 checkpoint never landed
    _fit_one_batch(out, tiny_checkpoint)  # resumes at step 5 and does step 10 again: its eval improves again
    _best_is_the_best(out)
    assert checkpoint.load_checkpoint(os.path.join(out, 'best.pt'))['step'] == 10


def test_resume_with_more_steps_extends_the_run_and_says_so(tmp_path, tiny_checkpoint, capsys):
    out = str(tmp_path / 'run')
    assert _fit_one_batch(out, tiny_checkpoint).endswith('ckpt_0000010.pt')
    capsys.readouterr()
    final = _fit_one_batch(out, tiny_checkpoint, '--max_iters=15')
    said = capsys.readouterr().out
    assert ('max_iters=15: the checkpoint planned 10 steps; '
            'the learning-rate schedule is re-planned over 15' in said)
    assert final.endswith('ckpt_0000015.pt') and checkpoint.load_checkpoint(final)['max_iters'] == 15
    steps = [r['step'] for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r]
    assert steps == list(range(1, 16))
    with pytest.raises(lumi.LumiError, match=r"ckpt_0000015\.pt is at step 15, past max_iters=12"):
        _fit_one_batch(out, tiny_checkpoint, '--max_iters=12')


def test_resume_from_a_file_that_is_no_training_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(lumi.LumiError,
                       match=r"ckpt_0000000\.pt: not a training checkpoint to resume \(it has no "
                             r"optimizer, best_val, max_iters, sampler, rng\)"):
        _fit_one_batch(str(tmp_path / 'r'), tiny_checkpoint, f'--resume={tiny_checkpoint}')


# -----------------------------------------------------------------------------
# the CPU peak behind the printed MFU, and the unigram baseline


AVX2 = {'fma', 'avx', 'avx2', 'sse4_2'}


AVX512_BF16 = AVX2 | {'avx512f', 'avx512bw', 'avx512vl', 'avx512_bf16'}


@pytest.mark.parametrize('flags, vendor, mhz, cores, dtype, gflops', [
    (AVX2, 'AuthenticAMD', 2450, 1, 'float32', 78.4),             # Zen 3: 2 FMA x 8 lanes x 2 x 2.45 GHz
    (AVX2, 'AuthenticAMD', 2450, 2, 'bfloat16', 156.8),           # no bf16 units: emulated, fp32 rate
    (AVX512_BF16, 'GenuineIntel', 2000, 2, 'float32', 256.0),     # 16 lanes
    (AVX512_BF16, 'GenuineIntel', 2000, 2, 'bfloat16', 512.0),    # bf16 dot products: twice
    (AVX512_BF16, 'AuthenticAMD', 2600, 2, 'bfloat16', 332.8),    # Zen 4: 512-bit ops as two 256-bit halves
    (AVX512_BF16 | {'avx512_vp2intersect'}, 'AuthenticAMD', 2600, 1, 'float32', 166.4),  # Zen 5: full width
])
def test_cpu_peak_comes_from_flags_clock_and_cores(flags, vendor, mhz, cores, dtype, gflops):
    peak, how = training.cpu_peak_flops(flags, mhz, cores, dtype, vendor)
    assert peak == pytest.approx(gflops * 1e9)
    assert f"{cores} core(s)" in how and f"{gflops:,.0f} GFLOP/s" in how


def test_cpu_peak_counts_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(training, 'cpu_facts', lambda: ('GenuineIntel', AVX2, 2000.0))
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 8)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})  # taskset to two cores: eight threads
    peak, how = training.guess_peak_flops('cpu', 'float32')              # still run on two
    assert peak == pytest.approx(2 * 64e9) and how.startswith('2 core(s)')


def test_unigram_entropy_against_hand_computation(tmp_path):
    path = str(tmp_path / 'val.bin')
    np.array([5, 5, 5, 5, 7, 7, 9, 9], dtype=np.uint16).tofile(path)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert training.unigram_entropy(path, 16) == pytest.approx(expected, rel=1e-12)


# -----------------------------------------------------------------------------
# what a plan costs: its measured duration, and how often it reads its data

def test_plan_seconds_counts_the_steps_and_the_evaluations_left():
    # step 100 of 1000 at 2 s, an evaluation every 100 steps at 3 s: 900 steps, evals at 200 ... 1000
    assert training.plan_seconds(100, 1000, 2.0, 100, 3.0) == 900 * 2.0 + 9 * 3.0
    # a plan that does not end on an interval still evaluates at its end
    assert training.plan_seconds(100, 1050, 2.0, 100, 3.0) == 950 * 2.0 + 10 * 3.0
    assert training.plan_seconds(1000, 1000, 2.0, 100, 3.0) == 0.0


def test_passes_warning_is_the_issues_arithmetic():
    said = training.passes_warning(71_697 * 4 * 1024, 7_000_000, 'tokens', 'data/starter', 'prepare more')
    assert said == "294M tokens is 42 passes over data/starter's 7.0M: expect overfitting; prepare more"
    assert training.passes_warning(28_000_000, 7_000_000, 'tokens', 'data/starter') == ''  # 4 passes: fine
    assert training.passes_warning(2400, 200, 'batches', 'the SFT set').startswith(
        "2,400 batches is 12 passes over the SFT set's 200")
    assert [training.duration(s) for s in (45, 750, 40.2 * 3600, 4 * 86400)] == \
        ['45 s', '12.5 minutes', '40.2 hours', '4.0 days']


def test_the_eta_is_the_median_of_the_recent_steps_said_once_measured(tmp_path, tiny_checkpoint, capsys):
    cfg, model, _ = _trainer(str(tmp_path), tiny_checkpoint, '--max_iters=1000', '--eval_interval=100')
    run = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size), lambda m, b: m(*b)[1])
    run.start()
    run.eval_s = 3.0
    # step times as a shared machine gives them: the first holds the warm-up, one more a neighbour's burst
    times = [300.0, 20.0, 21.0, 19.0, 400.0, 20.0, 22.0, 18.0]
    for i, dt in enumerate(times):
        run.step = i + 1
        assert run.eta() is None or i >= training.MEASURED_STEPS
        run.record(dict(step=run.step, loss=1.0, tokens_per_sec=1.0, mfu=0.0), dt)
    run.bar.close()
    assert run.step_times == times[1:]  # the first step is not timed
    median = float(np.median(times[1:]))  # 20: the 400 s step moves it not at all
    assert run.eta() == training.plan_seconds(8, 1000, median, 100, 3.0) == 992 * 20.0 + 10 * 3.0
    out = capsys.readouterr().out
    assert out.count('measured over steps') == 1
    assert ("measured over steps 2-6: 20 s a step and 3 s an evaluation; the plan of 1,000 steps takes about "
            "5.5 hours more on this machine") in out  # 994 x 20 s + 10 x 3 s
    assert '--max_minutes=N fits' in out  # a CPU, more than an hour, no clock: where the cap is


# -----------------------------------------------------------------------------
# the named steps, called alone, are the loop

def _trainer(out_dir, tiny_checkpoint, *flags):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    model = checkpoint.model_from_checkpoint(ckpt)
    model.cfg.dropout = 0.0
    cfg = lumi.load_config(lumi.declared_keys('training.py'),
                           [f'--out_dir={out_dir}', '--max_iters=4', '--warmup_iters=2',
                            '--device=cpu', '--dtype=float32', '--resume=never', *flags])
    return cfg, model, checkpoint.tokenizer_from_checkpoint(ckpt)


def test_train_step_alone_takes_the_steps_fit_takes(tmp_path, tiny_checkpoint):
    cfg, model, tok = _trainer(str(tmp_path / 'fit'), tiny_checkpoint)
    training.fit(cfg, model, RandomBatches(model.cfg.vocab_size), lambda m, b: m(*b)[1],
                 meta=checkpoint.checkpoint_meta(model, tok, 'pretrain'))
    by_fit = [r for r in lumi.read_jsonl(str(tmp_path / 'fit' / 'metrics.jsonl')) if 'loss' in r]
    cfg, model, tok = _trainer(str(tmp_path / 'alone'), tiny_checkpoint)
    run = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size), lambda m, b: m(*b)[1])
    alone = [run.train_step(optim.lr_at(s, cfg.max_iters, cfg))[0] for s in range(cfg.max_iters)]
    assert [(r['step'], r['loss'], r['lr'], r['grad_norm']) for r in alone] == \
        [(r['step'], r['loss'], r['lr'], r['grad_norm']) for r in by_fit]
    assert run.step == 4 and run.tokens_seen == 4 * 4 * 32
    path = run.save({'val_loss': 1.5}, alone[-1], best=True)
    saved = checkpoint.load_checkpoint(path)
    assert path.endswith('ckpt_0000004.pt') and saved['step'] == 4 and saved['metrics']['val_loss'] == 1.5
    assert torch.equal(saved['sampler']['g'], run.batches.state_dict()['g'])
    assert checkpoint.load_checkpoint(str(tmp_path / 'alone' / 'best.pt'))['step'] == 4
    assert run.evaluate() == {}  # no evaluation given: nothing to report
    run.eval_fn = lambda m: {'val_loss': 2.0, 'training_mode': float(m.training)}
    # eval mode, then back
    assert run.evaluate() == {'val_loss': 2.0, 'training_mode': 0.0} and model.training


def test_a_loss_that_is_not_finite_stops_before_the_optimizer_steps(tmp_path, tiny_checkpoint):
    cfg, model, _ = _trainer(str(tmp_path), tiny_checkpoint)
    run = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size),
                           lambda m, b: m(*b)[1] * float('inf'))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(training.TrainingDiverged, match=r"loss is inf at step 0.*\(none yet\)"):
        run.train_step(1e-3)
    assert run.step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_float16_skips_a_step_whose_gradients_overflow_counts_it_and_checkpoints_the_scale(tmp_path,
                                                                                          tiny_checkpoint):
    """--dtype=float16 (on the CPU here): a step whose scaled gradients overflow leaves the weights as they
    were, halves the loss scale and is counted in the step's metrics; the scale and the count are saved in the
    checkpoint and restored by a resumed run."""
    cfg, model, _ = _trainer(str(tmp_path), tiny_checkpoint, '--dtype=float16')
    blow_up = []  # a loss of ~1e30 is finite in fp32, but its scaled gradients are not in fp16
    run = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size),
                           lambda m, b: m(*b)[1] * (1e30 if blow_up else 1.0))
    first = run.train_step(1e-3)[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    blow_up.append(True)
    second = run.train_step(1e-3)[0]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert second['skipped_steps'] == first['skipped_steps'] + 1 and 'grad_norm' not in second
    assert second['loss_scale'] == first['loss_scale'] / 2 and run.step == 2
    blow_up.clear()
    third = run.train_step(1e-3)[0]
    assert third['skipped_steps'] == second['skipped_steps'] and math.isfinite(third['grad_norm'])
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    path = run.save({}, third)
    saved = checkpoint.load_checkpoint(path)
    assert (saved['scaler']['scale'], saved['skipped_steps']) == (third['loss_scale'], third['skipped_steps'])
    cfg, model, _ = _trainer(str(tmp_path), tiny_checkpoint, '--dtype=float16', f'--resume={path}')
    resumed = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size), lambda m, b: m(*b)[1])
    assert resumed.scaler.get_scale() == third['loss_scale'] and resumed.skipped == third['skipped_steps']
    cfg, model, _ = _trainer(str(tmp_path / 'fp32'), tiny_checkpoint)
    plain = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size), lambda m, b: m(*b)[1])
    assert not plain.scaler.is_enabled() and 'skipped_steps' not in plain.train_step(1e-3)[0]


def test_plan_budget_fits_the_steps_left_to_the_clock(tmp_path, tiny_checkpoint):
    cfg, model, _ = _trainer(str(tmp_path), tiny_checkpoint, '--eval_interval=100')
    run = training.Trainer(cfg, model, RandomBatches(model.cfg.vocab_size), lambda m, b: m(*b)[1])
    run.step = 20
    # 10 s budget, 2 s gone, the final eval takes 0.5 s: 7.5 s left at 0.1 s a step +
    # 0.5 s / 100 steps of evals
    assert run.plan_budget(10.0, 2.0, [0.1] * 10, 0.5, 10**12) == (20 + int(7.5 / 0.105), pytest.approx(0.1))
    assert run.plan_budget(10.0, 2.0, [0.1] * 10, 0.5, 50)[0] == 50         # never past the cap
    assert run.plan_budget(10.0, 12.0, [0.1, 0.3], 0.5, 10**12)[0] == 20    # out of time: stop here
