"""lumi.py: the shared core (config loading, atomic files, the chat template, the training loop's exact
resume) and the lab's command line (plot, info, and `run`, the whole pipeline end to end)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch

import lumi
import pipeline
import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVG = '{http://www.w3.org/2000/svg}'


# -----------------------------------------------------------------------------
# configuration

DEFAULTS = dict(batch_size=8, learning_rate=1e-3, out_dir='out/x', compile=False, lora_targets=('q', 'v'),
                sources=[('a', 1.0)], init_from='', seed=None)


def test_config_file_then_overrides(tmp_path):
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("batch_size = 4\nlearning_rate = 3\nlora_targets = ['q', 'k']\n"
                        "n_layer = 12  # a key for another stage: ignored here\n_private = 1\n")
    cfg = lumi.load_config(DEFAULTS, [str(cfg_file), '--batch_size=16', '--compile', '--out_dir=123',
                                      '--init-from=ckpt.pt', '--seed=7'])
    assert cfg.batch_size == 16 and cfg['compile'] is True
    assert cfg.learning_rate == 3.0 and isinstance(cfg.learning_rate, float)  # an int where a float is due
    assert cfg.lora_targets == ('q', 'k')  # a list where a tuple is due
    assert cfg.out_dir == '123'  # a string key keeps a numeric-looking value as text
    assert cfg.init_from == 'ckpt.pt' and cfg.seed == 7  # dashes read as underscores; None takes any type
    assert 'n_layer' not in cfg and '_private' not in cfg and cfg.config_file == str(cfg_file)
    assert DEFAULTS['batch_size'] == 8  # the defaults are not modified


def test_later_override_wins_and_literals_parse():
    cfg = lumi.load_config(DEFAULTS, ['--batch_size=2', '--batch_size=3', "--sources=[('b', 2.0)]"])
    assert cfg.batch_size == 3 and cfg.sources == [('b', 2.0)]


@pytest.mark.parametrize('argv, message', [
    (['--batch_size=abc'], "'batch_size' must be int"),
    (['--batch_size=2.5'], "'batch_size' must be int"),
    (['--compile=1'], "'compile' must be bool"),
    (['--learning_rate=fast'], "'learning_rate' must be float"),
    (['--no_such_key=1'], "unknown config key 'no_such_key'"),
    (['a.py', 'b.py'], 'at most one config file'),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(ValueError, match=message) as e:
        lumi.load_config(DEFAULTS, argv)
    if 'must be' in message:
        assert 'Known keys' in str(e.value)


def test_config_file_with_a_wrong_type_names_the_file(tmp_path):
    (tmp_path / 'bad.py').write_text("batch_size = 'eight'\n")
    with pytest.raises(ValueError, match=r"bad\.py: 'batch_size' must be int"):
        lumi.load_config(DEFAULTS, [str(tmp_path / 'bad.py')])
    with pytest.raises(FileNotFoundError, match='config file not found'):
        lumi.load_config(DEFAULTS, [str(tmp_path / 'missing.py')])


# -----------------------------------------------------------------------------
# files

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'state.json'
    lumi.write_json(str(path), {'step': 1})

    def half_then_crash(f):
        f.write('{"step": 2, "half')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        lumi.atomic_write(str(path), half_then_crash, mode='w')
    assert lumi.read_json(str(path)) == {'step': 1}
    assert os.listdir(tmp_path) == ['state.json']  # no temp file left behind
    lumi.atomic_write(str(tmp_path / 'new' / 'x.bin'), lambda f: f.write(b'\x00\x01'))
    assert (tmp_path / 'new' / 'x.bin').read_bytes() == b'\x00\x01'


def test_checkpoint_round_trip_and_newest(tmp_path, tokenizer, tiny_checkpoint):
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    for step in (5, 40, 7):
        lumi.save_checkpoint(str(tmp_path / f'ckpt_{step:07d}.pt'), dict(ckpt, step=step))
    (tmp_path / 'ckpt_notes.pt').write_text('not a step checkpoint')
    assert lumi.find_checkpoint(str(tmp_path)).endswith('ckpt_0000040.pt')
    newest = lumi.load_checkpoint(str(tmp_path))
    assert newest['step'] == 40 and lumi.tokenizer_from_checkpoint(newest).sha256 == tokenizer.sha256
    a, b = lumi.model_from_checkpoint(ckpt), lumi.model_from_checkpoint(newest)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        lumi.load_checkpoint(str(tmp_path / 'missing.pt'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r'no checkpoint \(ckpt_\*\.pt\) in'):
        lumi.load_checkpoint(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match='must match'):
        lumi.check_tokenizer('a' * 64, tokenizer.sha256, 'train.bin')


# -----------------------------------------------------------------------------
# the chat template

def test_render_chat_masks_exactly_the_assistant_replies(tokenizer):
    tok = tokenizer
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello there'},
                {'role': 'assistant', 'content': 'Hi, how are you?'}, {'role': 'user', 'content': 'Fine.'},
                {'role': 'assistant', 'content': 'Good to hear.'}]
    ids, mask = lumi.render_chat(tok, messages)
    # the reference, built piece by piece: BOS, then per message its role token, content and <|end|>
    want_ids, want_mask = [lumi.BOS_ID], [0]
    for m in messages:
        body = tok.encode(m['content']) + [tok.end_id]
        want_ids += [tok.role_id[m['role']]] + body
        want_mask += [0] + [int(m['role'] == 'assistant')] * len(body)
    assert ids == want_ids and mask == want_mask
    learned = [i for i, k in zip(ids, mask) if k]
    assert tok.decode(learned).replace('<|end|>', '|') .startswith('Hi, how are you?')
    assert learned.count(tok.end_id) == 2 and sum(mask) == len(learned)
    gen_ids, gen_mask = lumi.render_chat(tok, messages[:2], add_generation_prompt=True)
    assert gen_ids[-1] == tok.role_id['assistant'] and sum(gen_mask) == 0
    with pytest.raises(ValueError, match="message 1: unknown role 'bot'"):
        lumi.render_chat(tok, [messages[0], {'role': 'bot', 'content': 'x'}])
    with pytest.raises(ValueError, match='content must be a string'):
        lumi.render_chat(tok, [{'role': 'user', 'content': None}])


# -----------------------------------------------------------------------------
# the training loop: an interrupted run, resumed, logs what the uninterrupted run logs, bit for bit

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
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    model = lumi.model_from_checkpoint(ckpt)
    model.cfg.dropout = 0.0
    tok = lumi.tokenizer_from_checkpoint(ckpt)
    cfg = lumi.load_config(lumi.TRAINING_DEFAULTS, [f'--out_dir={out_dir}', '--max_iters=12', '--eval_interval=5',
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
    path = lumi.fit(cfg, model, RandomBatches(model.cfg.vocab_size), loss_fn, evaluate,
                    meta=lumi.checkpoint_meta(model, tok, 'pretrain'))
    return path, lumi.read_jsonl(os.path.join(out_dir, 'metrics.jsonl'))


def test_fit_resume_matches_the_uninterrupted_run(tmp_path, tiny_checkpoint):
    path, full = _fit(str(tmp_path / 'a'), tiny_checkpoint)
    assert path.endswith('ckpt_0000012.pt') and os.path.exists(tmp_path / 'a' / 'best.pt')
    assert [r['step'] for r in full if 'loss' in r] == list(range(1, 13))
    with pytest.raises(Crash):  # dies during step 7, after the checkpoints of steps 4 (interval) and 5 (best)
        _fit(str(tmp_path / 'b'), tiny_checkpoint, crash_at=6)
    assert lumi.load_checkpoint(str(tmp_path / 'b'))['step'] == 5
    assert max(r['step'] for r in lumi.read_jsonl(str(tmp_path / 'b' / 'metrics.jsonl'))) == 6  # 6 is redone
    path, resumed = _fit(str(tmp_path / 'b'), tiny_checkpoint)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('tokens_per_sec', 'mfu')} for r in rs]
    assert strip(resumed) == strip(full)  # losses, lr, grad norms and val losses: identical floats
    a = lumi.load_checkpoint(str(tmp_path / 'a'))['model']
    b = lumi.load_checkpoint(path)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    svg = ET.parse(tmp_path / 'b' / 'loss.svg')  # fit draws its curves at the end
    assert svg.getroot().tag == SVG + 'svg'


# -----------------------------------------------------------------------------
# plot: a well-formed SVG whose polylines hold the logged points

def _polylines(path):
    root = ET.parse(path).getroot()
    assert root.tag == SVG + 'svg'
    out = {}
    for p in root.iter(SVG + 'polyline'):
        pts = [tuple(map(float, xy.split(','))) for xy in p.get('points').split()]
        out[(p.get('data-run'), p.get('data-series'))] = pts
    return out


def _assert_linear_map(data, drawn, tol=0.02):
    """Screen coordinates must be one affine map of the data (up to the 2-decimal rounding)."""
    (d0, s0), (d1, s1) = min(zip(data, drawn)), max(zip(data, drawn))
    scale = (s1 - s0) / (d1 - d0)
    for d, s in zip(data, drawn):
        assert abs(s0 + (d - d0) * scale - s) < tol


def test_plot_svg_holds_every_point(tmp_path):
    runs = []
    for name, scale in (('small', 1.0), ('wide', 1.3)):
        recs = []
        for step in range(1, 31):
            recs.append(dict(step=step, tokens=step * 128, loss=scale * (3 + 5 * math.exp(-step / 6)),
                             lr=1e-3 * min(1, step / 5)))
            if step % 10 == 0:
                recs.append(dict(step=step, tokens=step * 128, val_loss=scale * (3.2 + 5 * math.exp(-step / 6))))
        d = tmp_path / name
        d.mkdir()
        (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs) + '{"step": 31, "lo\n')
        runs.append((str(d), recs))
    out = str(tmp_path / 'both.svg')
    lumi.main(['plot', runs[0][0], runs[1][0], f'--out={out}', '--title=loss <&> lr'])
    lines = _polylines(out)
    assert len(lines) == 6  # train loss, val loss, lr for each run
    text = open(out).read()
    assert 'loss &lt;&amp;&gt; lr' in text  # escaped, or the XML would not have parsed
    for run_dir, recs in runs:
        label = os.path.basename(run_dir)
        for series, key in (('train loss', 'loss'), ('val loss', 'val_loss'), ('learning rate', 'lr')):
            pts = lines[(label, series)]
            rows = [r for r in recs if key in r]
            assert len(pts) == len(rows)
            _assert_linear_map([r['tokens'] for r in rows], [x for x, _ in pts])
            _assert_linear_map([r[key] for r in rows], [y for _, y in pts])
            # SVG's y grows downwards: a larger value is drawn higher up
            assert (pts[0][1] < pts[-1][1]) == (rows[0][key] > rows[-1][key])
    # both runs share the x axis: the same token count lands at the same x
    assert lines[('small', 'train loss')][4][0] == lines[('wide', 'train loss')][4][0]


def test_plot_without_anything_to_draw_is_an_error(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match='nothing to plot'):
        plot.plot_svg([plot.read_run(str(tmp_path))], str(tmp_path / 'x.svg'))


# -----------------------------------------------------------------------------
# info

def test_info_reports_the_checkpoint(tmp_path, tokenizer, tiny_checkpoint, capsys):
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    model = lumi.model_from_checkpoint(ckpt)
    path = tmp_path / 'ckpt_0000042.pt'
    lumi.save_checkpoint(str(path), dict(ckpt, step=42, max_iters=50, tokens_seen=12345, best_val=3.5,
                                         metrics={'loss': 3.25}, config={'batch_size': 8}))
    lumi.append_jsonl(str(tmp_path / 'metrics.jsonl'), {'step': 42, 'loss': 3.25, 'lr': 1e-4, 'tokens': 12345})
    lumi.append_jsonl(str(tmp_path / 'metrics.jsonl'), {'step': 42, 'tokens': 12345, 'val_loss': 3.5})
    info = lumi.main(['info', str(tmp_path)])
    assert info['params'] == model.num_params() and info['params_no_embeddings'] == model.num_params(False)
    assert info['tokens_seen'] == 12345 and info['step'] == 42 and info['kind'] == 'pretrain'
    assert info['tokenizer_sha256'] == tokenizer.sha256 and info['vocab_size'] == tokenizer.vocab_size
    assert info['last_eval']['val_loss'] == 3.5
    out = capsys.readouterr().out
    assert f"{model.num_params():,}" in out and tokenizer.sha256 in out and '12,345' in out and 'batch_size' in out


# -----------------------------------------------------------------------------
# `lumi.py run`: the whole pipeline on a tiny config, interrupted mid-pretrain, resumed, then run again

WORDS = ('the sea wind ship light king queen night day love time world heart eye hand house word god man '
         'woman child friend water fire earth sky star moon sun river tree stone road city land field song '
         'dream voice name truth sleep blood gold silver iron glass bread wine door window garden summer').split()


def _pipeline_files(root, max_iters=60):
    """A tiny but complete lab: text files, a BoolQ-shaped JSONL, SFT chats, preference pairs, three configs."""
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
                                             {'role': 'assistant', 'content': f'The {a} is like the {b}.'}]}) + '\n')
    with open(root / 'pairs.jsonl', 'w') as f:
        for i in range(24):
            a = WORDS[i % len(WORDS)]
            f.write(json.dumps({'system': '', 'question': f'What is the {a}?', 'chosen': f'The {a} is bright.',
                                'rejected': 'No.'}) + '\n')
    common = "device = 'cpu'\ndtype = 'float32'\ncompile = False\nbatch_size = 4\neval_iters = 2\nwarmup_iters = 2\n"
    (root / 'sft.py').write_text(common + f"sources = [({str(root / 'chats.jsonl')!r}, 1.0)]\nmax_iters = 4\n"
                                 "eval_interval = 2\nval_frac = 0.1\nformat_samples = 2\nformat_max_new_tokens = 8\n"
                                 f"cache_dir = {str(root / 'sft_cache')!r}\nlora_r = 4\n")
    (root / 'dpo.py').write_text(common + f"data = {str(root / 'pairs.jsonl')!r}\nmax_iters = 3\neval_interval = 3\n"
                                 "val_frac = 0.2\n")
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
    assert lumi.load_checkpoint(str(run / 'pretrain'))['step'] == 60
    for stage in ('sft', 'dpo'):
        assert (run / stage / 'merged.pt').is_file()
        assert lumi.read_json(str(run / stage / '.lumi_stage.json'))['done'] is True
    report = lumi.read_json(str(run / 'eval_pretrain' / 'report.json'))
    assert report['boolq']['n'] == 8 and 0 <= report['boolq']['accuracy'] <= 1
    summary = (run / 'summary.md').read_text()
    assert 'parameters' in summary and 'boolq' in summary and 'SFT held-out' in summary and 'DPO held-out' in summary
    assert f"python sample.py --ckpt={run / 'dpo' / 'merged.pt'}" in summary
    assert (run / 'pretrain' / 'loss.svg').is_file()
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
    assert {s for s, args in p.routed.items() if '--device=cpu' in args} >= {'train', 'sft', 'dpo', 'eval', 'sample'}
    for argv, message in ((['--no_such_key=1'], "unknown key 'no_such_key'"),
                          (['--stages=data,bake'], "unknown stage(s) ['bake']"),
                          (['--sft_config=missing.py'], 'config file not found: missing.py')):
        with pytest.raises(SystemExit) as e:
            lumi.main(['run'] + argv)
        assert e.value.code == 1 and message in capsys.readouterr().err


def test_run_names_a_missing_stage(monkeypatch, capsys):
    monkeypatch.setitem(pipeline.STAGE_SCRIPT, 'sample', 'no_such_stage')
    with pytest.raises(SystemExit) as e:
        lumi.main(['run'])
    assert e.value.code == 1 and 'stage no_such_stage.py is missing' in capsys.readouterr().err


# -----------------------------------------------------------------------------
# one dtype rule, compile='auto', and the CPU peak behind the printed MFU

def test_dtype_auto_means_one_thing_in_every_stage(monkeypatch):
    monkeypatch.setattr(lumi, 'native_bf16', lambda: True)
    assert lumi.resolve_dtype('auto', 'cpu') == 'bfloat16' and lumi.resolve_dtype('auto', 'cuda:0') == 'bfloat16'
    monkeypatch.setattr(lumi, 'native_bf16', lambda: False)
    assert lumi.resolve_dtype('auto', 'cpu') == 'float32' and lumi.resolve_dtype('auto', 'cuda') == 'bfloat16'
    assert lumi.resolve_dtype('float32', 'cuda') == 'float32' and lumi.resolve_dtype('bfloat16', 'cpu') == 'bfloat16'
    # no stage keeps a rule of its own
    for name in ('train', 'sft', 'dpo', 'eval', 'sample'):
        source = open(os.path.join(ROOT, f'{name}.py')).read()
        assert 'def resolve_dtype' not in source and "dtype == 'auto'" not in source, name


def test_compile_auto_compiles_on_cuda_only_and_takes_booleans():
    assert lumi.resolve_compile('auto', 'cuda:0') is True and lumi.resolve_compile('auto', 'cpu') is False
    assert lumi.resolve_compile(True, 'cpu') is True and lumi.resolve_compile(False, 'cuda') is False
    defaults = dict(lumi.TRAINING_DEFAULTS)
    assert lumi.load_config(defaults, ['--compile=True']).compile is True
    assert lumi.load_config(defaults, ['--compile=False']).compile is False
    assert lumi.load_config(defaults, []).compile == 'auto'


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
    peak, how = lumi.cpu_peak_flops(flags, mhz, cores, dtype, vendor)
    assert peak == pytest.approx(gflops * 1e9)
    assert f"{cores} core(s)" in how and f"{gflops:,.0f} GFLOP/s" in how


def test_cpu_peak_counts_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(lumi, 'cpu_facts', lambda: ('GenuineIntel', AVX2, 2000.0))
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 8)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})  # taskset to two cores: eight threads
    peak, how = lumi.guess_peak_flops('cpu', 'float32')              # still run on two
    assert peak == pytest.approx(2 * 64e9) and how.startswith('2 core(s)')
