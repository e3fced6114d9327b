"""pipeline.py: the end-to-end command's summary (it must say plainly when a stage ended worse than its
baseline), the CPU profile's configs, routing of overrides, and the whole pipeline on a tiny lab, interrupted
mid-pretrain, resumed, then run again."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoint
import lumi
import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(tmp_path, loss, accuracy, reply, dpo_accuracy):
    """A run folder as `lumi.py run` leaves it, with the figures given: stamps, eval
    reports, metrics, reply."""
    run = tmp_path / 'run'
    val = tmp_path / 'val.bin'
    np.array([4, 5, 6, 7] * 100, dtype=np.uint16).tofile(val)  # unigram entropy ln 4 = 1.3863 nats
    for stage in ('pretrain', 'eval_pretrain', 'sft', 'dpo', 'sample'):
        (run / stage).mkdir(parents=True)
        product = run / stage / ('reply.txt' if stage == 'sample' else 'x')
        product.write_text(reply if stage == 'sample' else '')
        lumi.write_json(str(run / stage / pipeline.STAMP),
                        dict(stage=stage, inputs='k', done=True, seconds=1.0,
                             product=dict(path=str(product))))
    lumi.write_json(str(run / 'eval_pretrain' / 'report.json'), {
        'ppl': dict(loss=loss, bpb=2.0, source=str(val)),
        'boolq': dict(accuracy=accuracy, stderr=0.05, baseline=0.62, random_baseline=0.5, n=50)})
    for r in (dict(step=0, val_loss=3.0), dict(step=10, loss=2.5, tokens=100), dict(step=10, val_loss=2.8),
              dict(step=10, format_end_rate=0.95, format_prompts=20, greedy_distinct2=0.7, greedy_loops=0,
                   greedy_prompts=20)):
        lumi.append_jsonl(str(run / 'sft' / 'metrics.jsonl'), r)
    for r in (dict(step=0, val_reward_accuracy=0.5), dict(step=5, val_reward_accuracy=dpo_accuracy)):
        lumi.append_jsonl(str(run / 'dpo' / 'metrics.jsonl'), r)
    p = pipeline.Pipeline([f'--run_dir={run}', '--stages=sample'])
    return p


@pytest.fixture(autouse=True)
def no_checkpoint_facts(monkeypatch):
    # the fake run has no real checkpoints; the summary's parameter lines are not under test here
    monkeypatch.setattr(pipeline, 'checkpoint_info', lambda path: dict(params=1, params_no_embeddings=1))


def test_summary_says_plainly_when_stages_end_worse_than_their_baselines(tmp_path):
    text = _fake_run(tmp_path, loss=1.5, accuracy=0.48, reply='. . . . . . . .', dpo_accuracy=0.45).summary(0)
    assert 'Worse than its baseline' in text
    assert f"val loss 1.5000 is at or above the unigram entropy {math.log(4):.4f}" in text
    assert '⚠ worse than unigram' in text and '⚠ at or below random' in text
    assert 'boolq accuracy 0.480 is at or below random (0.500)' in text
    assert 'DPO held-out preference accuracy 0.450 is at or below chance' in text
    assert 'the greedy sample is not words' in text
    assert 'SFT replies to held-out prompts ending with <|end|>: 95.0% of 20' in text


def test_summary_of_a_run_that_beats_every_baseline_warns_of_nothing(tmp_path):
    text = _fake_run(tmp_path, loss=1.0, accuracy=0.7, reply='The sea is wide and the ships sail on it.',
                     dpo_accuracy=0.7).summary(0)
    assert 'Worse than its baseline' not in text and '⚠' not in text


@pytest.mark.parametrize('text, words', [
    ('The sea is wide and the ships sail on it.', True),
    ('................................................................', False),
    (', , , , , ; ; ;', False),
    ('the the the the the the', False),
    ('I am', False),
])
def test_looks_like_words(text, words):
    assert pipeline.looks_like_words(text) is words


def test_the_cpu_profile_names_real_configs_whose_keys_their_stages_know():
    """configs/pipeline_cpu.py and the files it points to: a key its stage does not know would be silently
    ignored in a config file, so each must be a key of the stage that reads it."""
    p = pipeline.Pipeline([os.path.join(ROOT, 'configs', 'pipeline_cpu.py'), '--run_dir=/nonexistent'])
    for stage, path in (('train', p.train_config), ('sft', p.sft_config), ('dpo', p.dpo_config)):
        assert path and os.path.isfile(os.path.join(ROOT, path)), (stage, path)
        keys = {k for k, v in _exec(os.path.join(ROOT, path)).items() if lumi.is_key(k, v)}
        known = set(p.keys[stage]) | (set(p.keys['data']) if stage == 'train' else set())
        assert set(keys) <= known, (path, set(keys) - known)
    train = _exec(os.path.join(ROOT, p.train_config))
    # its own small-vocabulary data
    assert train['vocab_size'] <= 8192 and train['data_dir'] != 'data/starter'
    assert train['compile'] == 'auto' and train['dtype'] == 'auto'
    # room for data and evals in 20
    assert p.cfg.pretrain_minutes + p.cfg.sft_minutes + p.cfg.dpo_minutes <= 16


def _exec(path):
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    return namespace


# -----------------------------------------------------------------------------
# `lumi.py run`: the whole pipeline on a tiny config, interrupted mid-pretrain, resumed, then run again


WORDS = ('the sea wind ship light king queen night day love time world heart eye hand house word god man '
         'woman child friend water fire earth sky star moon sun river tree stone road city land field song '
         'dream voice name truth sleep blood gold silver iron glass bread wine door window garden '
         'summer').split()


def _pipeline_files(root, max_iters=60):
    """A tiny but complete lab: text files, a BoolQ-shaped JSONL, SFT chats,
    preference pairs, three configs."""
    import random
    rng = random.Random(0)
    (root / 'corpus').mkdir()
    for f in range(6):  # 60 documents of random sentences: distinct, so dedupe keeps them all
        docs = []
        for _ in range(10):
            sents = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + '.'
                     for _ in range(rng.randint(5, 9))]
            docs.append(' '.join(sents))
        (root / 'corpus' / f'part{f}.txt').write_text('\n\n\n'.join(docs))
    with open(root / 'boolq.jsonl', 'w') as f:
        for i in range(12):
            f.write(json.dumps({'question': f'is the {WORDS[i]} near the {WORDS[i + 1]}', 'title': WORDS[i],
                                'passage': f'The {WORDS[i]} is near the {WORDS[i + 1]} at night.',
                                'answer': 'True' if i % 3 else 'False'}) + '\n')
    with open(root / 'chats.jsonl', 'w') as f:
        for i in range(40):
            a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
            f.write(json.dumps({'messages': [{'role': 'user', 'content': f'Tell me about the {a}.'},
                                             {'role': 'assistant',
                                              'content': f'The {a} is like the {b}.'}]}) + '\n')
    with open(root / 'pairs.jsonl', 'w') as f:
        for i in range(24):
            a = WORDS[i % len(WORDS)]
            f.write(json.dumps({'system': '', 'question': f'What is the {a}?',
                                'chosen': f'The {a} is bright.', 'rejected': 'No.'}) + '\n')
    common = ("device = 'cpu'\ndtype = 'float32'\ncompile = False\nbatch_size = 4\neval_iters = 2\n"
              "warmup_iters = 2\n")
    (root / 'sft.py').write_text(common + f"sources = [({str(root / 'chats.jsonl')!r}, 1.0)]\nmax_iters = 4\n"
                                 "eval_interval = 2\nval_frac = 0.1\nformat_samples = 2\n"
                                 "format_max_new_tokens = 8\n"
                                 f"cache_dir = {str(root / 'sft_cache')!r}\nlora_r = 4\n")
    (root / 'dpo.py').write_text(common + f"data = {str(root / 'pairs.jsonl')!r}\nmax_iters = 3\n"
                                 "eval_interval = 3\nval_frac = 0.2\n")
    (root / 'lab.py').write_text(common + f"""
sources = [({str(root / 'corpus')!r}, 1.0)]
vocab_size = 400
val_fraction = 0.2
num_threads = 2
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 64
ffn_hidden = 128
block_size = 64
max_iters = {max_iters}
eval_interval = 1000
ckpt_interval = 10
run_dir = {str(root / 'run')!r}
data_dir = {str(root / 'data')!r}
sft_config = {str(root / 'sft.py')!r}
dpo_config = {str(root / 'dpo.py')!r}
eval_tasks = 'ppl,boolq'
tuned_eval_tasks = 'ppl'
eval_limit = 8
eval_args = ['--boolq_source={root / 'boolq.jsonl'}']
sample_tokens = 8
""")
    return str(root / 'lab.py')


def _lumi_run(config, *overrides, **kw):
    # one thread per stage process: on a shared 2-core machine, spinning OpenMP threads make tiny steps slow
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'lumi.py'), 'run', config, *overrides],
                            cwd=str(kw.pop('cwd')),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


@pytest.mark.slow
def test_run_interrupted_resumes_then_skips_everything(tmp_path):
    config = _pipeline_files(tmp_path)
    run = tmp_path / 'run'
    # 1. start the lab and kill it (the whole process group, as a closed terminal would) mid-pretrain
    proc = _lumi_run(config, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 120
    while not list((run / 'pretrain').glob('ckpt_*.pt')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    first = proc.communicate()[0]
    assert (run / 'pretrain').is_dir(), first
    stamp = lumi.read_json(str(run / 'pretrain' / '.lumi_stage.json'))
    assert stamp['done'] is False
    assert lumi.read_json(str(run / 'data' / '.lumi_stage.json'))['done'] is True
    # 2. the same command again: data is skipped, pretraining resumes from its checkpoint, the rest runs
    proc = _lumi_run(config, cwd=tmp_path)
    second = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, second[-3000:]
    assert '[data] up to date: skipped' in second and '[pretrain] was interrupted' in second
    assert 'resumed from' in second
    steps = [r['step'] for r in lumi.read_jsonl(str(run / 'pretrain' / 'metrics.jsonl')) if 'loss' in r]
    assert steps == list(range(1, 61))  # every step logged once: nothing lost, nothing twice
    assert checkpoint.load_checkpoint(str(run / 'pretrain'))['step'] == 60
    for stage, parent in (('sft', run / 'pretrain' / 'ckpt_0000060.pt'), ('dpo', run / 'sft' / 'merged.pt')):
        merged = checkpoint.load_checkpoint(str(run / stage / 'merged.pt'))  # each tuned on the one before
        assert merged['kind'] == stage and merged['parent_sha256'] == lumi.sha256_file(str(parent))
        assert lumi.read_json(str(run / stage / '.lumi_stage.json'))['done'] is True
    report = lumi.read_json(str(run / 'eval_pretrain' / 'report.json'))
    boolq = report['boolq']  # 8 examples: a count of right answers over 8, beside its majority baseline
    assert boolq['n'] == 8 and boolq['accuracy'] * 8 == round(boolq['accuracy'] * 8) and 'baseline' in boolq
    summary = (run / 'summary.md').read_text()
    assert ('parameters' in summary and 'boolq' in summary and 'SFT held-out' in summary
            and 'DPO held-out' in summary)
    assert f"python sample.py --ckpt={run / 'dpo' / 'merged.pt'}" in summary
    # `python sample.py` with no --ckpt finds the run's DPO model, and the settings the run records beside it
    assert checkpoint.newest_checkpoint(str(tmp_path)) == str(run / 'dpo' / 'merged.pt')
    assert checkpoint.recommended_args(str(run / 'dpo')) == ([], str(run / 'sample_args.json'))
    assert (run / 'pretrain' / 'loss.svg').read_text().lstrip().startswith(('<svg', '<?xml'))
    # 3. and again: every stage is skipped, no stage process starts, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in run.glob('*/.lumi_stage.json')}
    proc = _lumi_run(config, cwd=tmp_path)
    third = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, third[-3000:]
    assert third.count('up to date: skipped') == 8 and '$ python' not in third
    assert {p: p.stat().st_mtime_ns for p in run.glob('*/.lumi_stage.json')} == stamps
    # 4. a changed input re-runs that stage alone, from scratch
    (run / 'sample' / 'leftover.txt').write_text('from the previous run')
    proc = _lumi_run(config, '--sample_tokens=4', cwd=tmp_path)
    fourth = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, fourth[-3000:]
    assert fourth.count('up to date: skipped') == 7 and '[sample] its inputs changed' in fourth
    assert not (run / 'sample' / 'leftover.txt').exists() and (run / 'sample' / 'reply.txt').is_file()


def test_run_routes_overrides_and_refuses_unknown_keys(tmp_path, capsys):
    p = pipeline.Pipeline(['--n_layer=3', '--device=cpu', '--eval_limit=5', f'--run_dir={tmp_path}'])
    assert p.cfg.eval_limit == 5 and p.run_dir == str(tmp_path)
    assert [s for s, args in p.routed.items() if '--n_layer=3' in args] == ['train']
    assert ({s for s, args in p.routed.items() if '--device=cpu' in args}
            >= {'train', 'sft', 'dpo', 'eval', 'sample'})
    for argv, message in ((['--no_such_key=1'], "unknown key 'no_such_key'"),
                          (['--stages=data,bake'], "unknown stage(s) ['bake']"),
                          (['--sft_config=missing.py'], 'config file not found: missing.py')):
        with pytest.raises(SystemExit) as e:
            lumi.guard(pipeline.run_pipeline, argv)
        assert e.value.code == 1 and message in capsys.readouterr().err


def test_watching_a_run_in_tensorboard_does_not_make_its_stages_run_again(tmp_path):
    plain = pipeline.Pipeline([f'--run_dir={tmp_path}'])
    watched = pipeline.Pipeline(['--log=tensorboard', f'--run_dir={tmp_path}'])
    assert '--log=tensorboard' in watched.routed['train']
    for stage in ('train', 'sft', 'dpo'):
        assert watched._resolved(stage, watched.routed[stage]) == plain._resolved(stage, plain.routed[stage])
    assert (pipeline.Pipeline(['--n_layer=3', f'--run_dir={tmp_path}'])._resolved('train', ['--n_layer=3'])
            != plain._resolved('train', plain.routed['train']))


def test_run_names_a_missing_stage(monkeypatch, capsys):
    monkeypatch.setitem(pipeline.STAGE_SCRIPT, 'sample', 'no_such_stage')
    with pytest.raises(SystemExit) as e:
        lumi.guard(pipeline.run_pipeline, [])
    assert e.value.code == 1 and 'stage no_such_stage.py is missing' in capsys.readouterr().err

