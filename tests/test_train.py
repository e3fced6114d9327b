"""
train.py end to end on a tiny model and tiny bins: the command-line contract, a kill -9 in the middle of
writing a checkpoint then --resume=auto (every later logged loss equal bit for bit), DDP under torchrun with
gloo against one process at the same global batch, the NaN stop, the guards on resuming, the fresh-machine
path through data.py, and the unigram entropy the final report compares against.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import checkpoint
import training
import lumi
import train
from conftest import TINY_TEXT
from tokenizer import BOS_ID, CHAT_TOKENS, EOS_ID, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a 2-layer model on 32-token windows: a step takes milliseconds, so the tests pay mostly for process starts
TINY = ['--n_layer=2', '--n_embd=64', '--n_head=4', '--n_kv_head=2', '--ffn_hidden=128', '--block_size=32',
        '--batch_size=4', '--eval_iters=2', '--device=cpu', '--dtype=float32', '--compile=False',
        '--warmup_iters=5', '--learning_rate=3e-3']
# the recipe with Muon, QK-norm and a group at its own rate: its state must resume and average as AdamW's does
MUON = ['--optimizer=muon', '--qk_norm=True', '--muon_momentum_warmup=20', "--lr_groups={'tok_emb.*': 0.01}"]
TIMING = ('tokens_per_sec', 'mfu')  # the only fields that may differ between two runs of the same steps


def write_bins(d, tok, train_tokens=6000, val_tokens=1000, seed=0):
    """Bins as data.py writes them: BOS text EOS per document (sentences of real text, shuffled), uint16,
    the tokenizer beside them and a meta.json naming it."""
    os.makedirs(os.path.join(d, 'tokenizer'), exist_ok=True)
    with open(os.path.join(d, 'tokenizer', 'tokenizer.model'), 'wb') as f:
        f.write(tok.proto)
    sentences = [s for s in TINY_TEXT.replace('?', '.').split('.') if s.strip()]
    docs = [[BOS_ID] + tok.encode(s) + [EOS_ID] for s in sentences]
    rng = np.random.default_rng(seed)
    sizes = {}
    for split, n in (('train', train_tokens), ('val', val_tokens)):
        ids = []
        while len(ids) < n:
            ids += docs[rng.integers(len(docs))]
        np.array(ids[:n], dtype=np.uint16).tofile(os.path.join(d, f'{split}.bin'))
        sizes[f'{split}_tokens'] = n
    lumi.write_json(os.path.join(d, 'meta.json'),
                    dict(tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, **sizes))
    return str(d)


@pytest.fixture(scope='module')
def bins(tmp_path_factory, tokenizer):
    return write_bins(tmp_path_factory.mktemp('bins'), tokenizer)


def run_train(args, kill_at=None, launcher=None, check=True):
    """train.py in a fresh process, as a user runs it. kill_at=N: SIGKILL the process while it writes the
    checkpoint of step N, half of the temp file on disk."""
    code = 'import sys, train; train.main(sys.argv[1:])'
    if kill_at is not None:
        code = textwrap.dedent(f"""
            import os, signal, sys, torch, lumi, train, training
            real_save = training.save_checkpoint  # what the loop calls
            def dying_save(path, state):
                if not path.endswith('ckpt_{kill_at:07d}.pt'):
                    return real_save(path, state)
                def half(f):
                    torch.save(state, f)
                    f.flush(); f.truncate(f.tell() // 2); f.flush(); os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                lumi.atomic_write(path, half)
            training.save_checkpoint = dying_save
            train.main(sys.argv[1:])""")
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = (launcher or [sys.executable]) + (['-c', code] if launcher is None else ['train.py']) + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def metrics(out_dir):
    records = lumi.read_jsonl(os.path.join(out_dir, 'metrics.jsonl'))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# -----------------------------------------------------------------------------

def test_contract_config_file_overrides_metrics_and_checkpoints(bins, tmp_path, tokenizer):
    """python train.py CONFIG --data_dir=D --out_dir=O --max_iters=N, the model shape overridden."""
    out = str(tmp_path / 'o')
    final = train.main(['configs/tiny.py', f'--data_dir={bins}', f'--out_dir={out}', '--max_iters=12',
                        '--eval_interval=5', '--ckpt_interval=5', '--seed=7'] + TINY)
    assert final == os.path.join(out, 'ckpt_0000012.pt')
    recs = lumi.read_jsonl(os.path.join(out, 'metrics.jsonl'))
    assert [r['step'] for r in recs if 'loss' in r] == list(range(1, 13))
    assert [r['step'] for r in recs if 'val_loss' in r] == [0, 5, 10, 12]
    assert all(math.isfinite(r['loss']) for r in recs if 'loss' in r)
    losses = [r['val_loss'] for r in recs if 'val_loss' in r]
    # a fresh model guesses uniformly
    assert losses[0] == pytest.approx(math.log(tokenizer.vocab_size), abs=0.3)
    assert losses[-1] < losses[0] - 0.5  # and it learns
    ckpt = torch.load(final, map_location='cpu', weights_only=True)
    assert ckpt['kind'] == 'pretrain' and ckpt['step'] == 12 and ckpt['tokenizer_sha256'] == tokenizer.sha256
    assert ckpt['model_args']['n_layer'] == 2 and ckpt['model_args']['n_embd'] == 64
    assert ckpt['model_args']['vocab_size'] == tokenizer.vocab_size  # from the bins' meta.json
    assert ckpt['config']['seed'] == 7 and ckpt['config']['out_dir'] == out
    best = checkpoint.load_checkpoint(os.path.join(out, 'best.pt'))  # the checkpoint of the lowest val loss
    assert best['metrics']['val_loss'] == min(losses)
    model = checkpoint.model_from_checkpoint(ckpt)
    assert model.num_params() == 106_816


def test_token_budget_defaults_to_tokens_per_param(bins, tmp_path):
    out = str(tmp_path / 'o')
    final = train.main([f'--data_dir={bins}', f'--out_dir={out}', '--tokens_per_param=0.02',
                        '--eval_interval=1000'] + TINY)
    # 106,816 parameters x 0.02 tokens / (4 x 32 tokens a step) = 16.7 -> 17 steps
    assert checkpoint.load_checkpoint(final)['max_iters'] == 17 == math.ceil(106_816 * 0.02 / 128)


def test_max_minutes_fits_the_schedule_to_the_clock(bins, tmp_path):
    """--max_minutes plans the steps from the measured step time (re-planned as it goes), so the run ends on
    its planned last step with the cosine finished, instead of being cut off by the clock at a high LR."""
    out = str(tmp_path / 'o')
    final = train.main([f'--data_dir={bins}', f'--out_dir={out}', '--max_minutes=0.2', '--min_lr=1e-4']
                       + TINY)
    ckpt = checkpoint.load_checkpoint(final)
    steps = [r for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r]
    assert ckpt['max_iters'] < math.ceil(20 * 106_816 / 128)  # planned below the 20 tokens/param budget
    assert steps[-1]['step'] == ckpt['step'] == ckpt['max_iters']
    assert steps[-1]['lr'] < 1.2e-4  # the cosine reached min_lr
    assert 'val_loss' in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl'))[-1]  # and the final eval ran


@pytest.mark.slow
# float16: its loss scale resumes too; muon: its momentum buffers, through the optimizer's state_dict
@pytest.mark.parametrize('dtype, recipe', [('float32', []), ('float16', []), ('float32', MUON)],
                         ids=['float32', 'float16', 'muon'])
def test_kill9_while_checkpointing_then_resume_is_bit_exact(bins, tmp_path, dtype, recipe):
    args = [f'--data_dir={bins}', '--max_iters=24', '--eval_interval=6', '--ckpt_interval=6',
            '--keep_last=2'] + TINY + [f'--dtype={dtype}'] + recipe
    full = str(tmp_path / 'full')
    train.main(args + [f'--out_dir={full}'])  # in this process: one fewer start, the same arithmetic

    cut = str(tmp_path / 'cut')
    proc = run_train(args + [f'--out_dir={cut}'], kill_at=18, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(os.listdir(cut))
    assert 'ckpt_0000018.pt' not in names and any(n.startswith('ckpt_0000018.pt.tmp') for n in names)
    assert checkpoint.latest_step(cut).endswith('ckpt_0000012.pt')  # the half-written file is never picked
    assert max(r['step'] for r in metrics(cut)) == 18  # steps 13-18 were logged, then lost with the process

    run_train(args + [f'--out_dir={cut}', '--resume=auto'])
    assert not any('.tmp.' in n for n in os.listdir(cut))  # the resumed run cleared the half-written file
    assert metrics(cut) == metrics(full)  # every loss, lr, grad norm and val loss: the same floats
    a = torch.load(os.path.join(full, 'ckpt_0000024.pt'), weights_only=True)
    b = torch.load(os.path.join(cut, 'ckpt_0000024.pt'), weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_float16_learns_like_float32(bins, tmp_path):
    """The same 40 steps on the same batches: float16 autocast with loss scaling ends within 0.15 nats of
    float32's val loss, and both learned (the val loss fell by over 1 nat from the first evaluation)."""
    args = [f'--data_dir={bins}', '--max_iters=40', '--eval_interval=20', '--ckpt_interval=40'] + TINY
    val = {}
    for dtype in ('float32', 'float16'):
        out = str(tmp_path / dtype)
        train.main(args + [f'--out_dir={out}', f'--dtype={dtype}'])
        val[dtype] = [r['val_loss'] for r in metrics(out) if 'val_loss' in r]
    assert abs(val['float16'][-1] - val['float32'][-1]) < 0.15, val
    assert all(v[0] - v[-1] > 1.0 for v in val.values()), val


def test_activation_checkpointing_trains_the_same_floats(bins, tmp_path):
    args = [f'--data_dir={bins}', '--max_iters=6', '--eval_interval=3', '--ckpt_interval=6'] + TINY
    train.main(args + [f'--out_dir={tmp_path / "kept"}'])
    train.main(args + [f'--out_dir={tmp_path / "recomputed"}', '--activation_checkpointing=True'])
    assert metrics(str(tmp_path / 'kept')) == metrics(str(tmp_path / 'recomputed'))


@pytest.mark.slow
@pytest.mark.parametrize('dtype, tol, recipe', [('float32', 1e-4, []), ('float16', 2e-3, []),
                                                ('float32', 1e-4, MUON)], ids=['float32', 'float16', 'muon'])
def test_ddp_two_processes_match_one_at_the_same_global_batch(bins, tmp_path, dtype, tol, recipe):
    """torchrun --nproc_per_node=2 (gloo) with batch 2 per rank against one process with batch 4: the same
    rows each step (GlobalBatches), so the losses agree up to fp32 summation order. Tolerance 1e-4 nats; a run
    that failed to average gradients across ranks, or fed both ranks the same rows, would be off by ~1e-2.
    float16: fp16 rounding on top (2e-3), and the ranks skip the same steps as the one process. Muon
    orthogonalises the averaged gradient's momentum on every rank alike."""
    args = [f'--data_dir={bins}', '--max_iters=8', '--eval_interval=4', '--ckpt_interval=4'] + TINY
    args += [f'--dtype={dtype}'] + recipe
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    train.main(args + [f'--out_dir={one}'])
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    run_train(args + [f'--out_dir={two}', '--batch_size=2'], launcher=torchrun)
    a, b = metrics(one), metrics(two)
    assert [r['step'] for r in a] == [r['step'] for r in b]
    for ra, rb in zip(a, b):
        for key in ('loss', 'val_loss'):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=tol), (ra['step'], key)
        assert ra['tokens'] == rb['tokens']  # the tokens of both ranks are counted
        assert ra.get('skipped_steps') == rb.get('skipped_steps')
    wa = checkpoint.load_checkpoint(one)['model']
    wb = checkpoint.load_checkpoint(two)['model']
    assert all(torch.allclose(wa[k], wb[k], atol=tol) for k in wa)


def test_nan_loss_stops_and_leaves_the_last_checkpoint_untouched(bins, tmp_path, monkeypatch):
    out = str(tmp_path / 'o')
    written = {}
    real_save, real_loss = checkpoint.save_checkpoint, train.pretrain_loss

    def recording_save(path, state):
        real_save(path, state)
        written[path] = lumi.sha256_file(path)

    calls = []

    def loss_going_nan(model, batch):
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float('nan') if len(calls) == 13 else loss

    monkeypatch.setattr(training, 'save_checkpoint', recording_save)  # what the loop calls
    monkeypatch.setattr(train, 'pretrain_loss', loss_going_nan)
    with pytest.raises(training.TrainingDiverged,
                       match=r"loss is nan at step 12.*ckpt_0000010\.pt is untouched"):
        train.main([f'--data_dir={bins}', f'--out_dir={out}', '--max_iters=30', '--eval_interval=5',
                    '--ckpt_interval=5'] + TINY)
    assert checkpoint.latest_step(out).endswith('ckpt_0000010.pt')
    on_disk = {os.path.join(out, n) for n in os.listdir(out) if n.endswith('.pt')}
    assert on_disk <= set(written) and all(lumi.sha256_file(p) == written[p] for p in on_disk)
    # nothing logged after
    assert max(r['step'] for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl'))) == 12


def test_resume_refuses_other_bins_or_another_model(bins, tmp_path, tokenizer):
    import sentencepiece as spm
    out = str(tmp_path / 'o')
    train.main([f'--data_dir={bins}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=100'] + TINY)
    with pytest.raises(ValueError, match="n_embd: checkpoint 64, config 32"):
        train.main([f'--data_dir={bins}', f'--out_dir={out}', '--max_iters=6'] + TINY + ['--n_embd=32'])
    # the same text tokenized by another tokenizer: resuming would feed the model ids it never learned
    (tmp_path / 'corpus.txt').write_text(TINY_TEXT * 20)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / 'corpus.txt'), model_prefix=str(tmp_path / 'other'), vocab_size=400,
        model_type='bpe', byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(CHAT_TOKENS), minloglevel=2)
    other = write_bins(tmp_path / 'other_bins', Tokenizer.load(str(tmp_path / 'other.model')))
    with pytest.raises(ValueError, match="tokenizer"):
        train.main([f'--data_dir={other}', f'--out_dir={out}', '--max_iters=6'] + TINY)
    with pytest.raises(ValueError, match="unknown config key 'n_layers'"):
        train.main([f'--data_dir={bins}', '--n_layers=3'])


def test_missing_bins_are_prepared_through_data_py(tmp_path):
    """A fresh machine: the config names its sources and data_dir, and train.py builds the bins first."""
    src = tmp_path / 'texts'
    src.mkdir()
    paragraphs = [p for p in TINY_TEXT.split('\n') if p.strip()]
    rng = np.random.default_rng(1)
    for i in range(40):  # distinct documents (near-duplicates would be removed by data.py)
        words = ' '.join(rng.permutation(' '.join(paragraphs).split()))
        (src / f'doc{i:02d}.txt').write_text(words + '\n')
    config = tmp_path / 'fresh.py'
    config.write_text(f"sources = [({str(src)!r}, 1.0)]\nvocab_size = 400\nval_fraction = 0.1\n")
    D, out = str(tmp_path / 'bins'), str(tmp_path / 'o')
    final = train.main([str(config), f'--data_dir={D}', f'--out_dir={out}', '--max_iters=2',
                        '--eval_interval=100', '--block_size=16', '--eval_iters=1']
                       + [a for a in TINY if 'block_size' not in a])
    meta = json.load(open(os.path.join(D, 'meta.json')))
    assert meta["vocab_size"] == 400 and meta['train_tokens'] > 0
    assert checkpoint.load_checkpoint(final)['tokenizer_sha256'] == meta['tokenizer_sha256']


def test_a_plan_that_rereads_its_data_says_so_and_a_cpu_hears_of_its_profile():
    cfg = lumi.Config(data_dir='data/starter', max_minutes=0.0, config_file='configs/tiny.py')
    lines = train.plan_warnings(cfg, 'cpu', 71_697 * 4 * 1024, 7_000_000)
    assert lines[0] == ("warning: 294M tokens is 42 passes over data/starter's 7.0M: expect overfitting; "
                        "`python data.py configs/data_tiny.py` prepares the design's 500M-token corpus "
                        "(then --data_dir=data/web_tiny)")
    assert '--max_minutes=N' in lines[1] and 'configs/pipeline_cpu.py' in lines[1]
    assert train.plan_warnings(cfg, 'cuda', 20_000_000, 7_000_000) == []  # 3 passes, and a GPU
    cfg.max_minutes = 10.0  # a plan fitted to the clock: its passes are known once measured
    assert train.plan_warnings(cfg, 'cpu', 71_697 * 4 * 1024, 7_000_000) == []


def test_the_closing_line_says_below_or_above_with_a_positive_number():
    assert train.baseline_verdict(5.0, 6.5) == ("unigram entropy of the val set 6.5000 nats/token, "
                                                "the val loss is 1.5000 below it")
    worse = train.baseline_verdict(7.0, 6.5)
    assert 'the val loss is 0.5000 above it' in worse and 'WORSE THAN A UNIGRAM MODEL' in worse
    assert '-' not in train.baseline_verdict(5.0, 6.5) + worse
