"""
The command line of every stage: a user error is one line on stderr (`error: ...`) and a non-zero exit, never
a traceback (--debug shows it); --help lists every key with its default and a line; `--key value` works
beside `--key=value`; a typo gets "did you mean"; numeric keys are range-checked; every entry point refuses
an unusable checkpoint or adapter in one line naming the file. Also eval.py's --limit on --text perplexity.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import dpo
import eval as ev
import export
import lora
import checkpoint
import engine
import lumi
import pipeline
import sample
import serve
import sft
import train
from test_train import write_bins
from tokenizer import BOS_ID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
CHILD_ENV.pop('LUMI_DEBUG', None)


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, *needles):
    """rc 1, no traceback, and the error in one line `error: ...` holding every needle: stderr's last line and
    its only one, bar what the command said about its progress before (sample.py
    names the model it loaded)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith('error: ')]
    assert 'Traceback' not in proc.stderr and errors == lines[-1:], proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


# -----------------------------------------------------------------------------
# parsing

# shift has no range: any float, negative ones included
DEFAULTS = dict(batch_size=8, learning_rate=1e-3, compile=False, out_dir='out/x', shift=0.0, prompt='')


def test_key_space_value_and_key_equals_value_read_the_same(tmp_path):
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("batch_size = 4\n")
    a = lumi.load_config(DEFAULTS, ['--batch_size', '16', '--compile', str(cfg_file), '--out_dir', '123',
                                    '--shift', '-0.5', '--prompt', 'a=b'])
    b = lumi.load_config(DEFAULTS, ['--batch_size=16', '--compile', str(cfg_file), '--out_dir=123',
                                    '--shift=-0.5', '--prompt=a=b'])
    assert a == b and a.batch_size == 16 and a['compile'] is True and a.config_file == str(cfg_file)
    # a negative number is a value, not a flag
    assert a.shift == -0.5 and a.out_dir == '123' and a.prompt == 'a=b'
    assert lumi.load_config(DEFAULTS, ['--compile', 'False']).compile is False  # True/False may follow a flag
    pos, flags = lumi.split_args(['CKPT', '--compile', 'B', '--batch_size', '-3'], DEFAULTS)
    assert pos == ['CKPT', 'B'] and flags == ['--compile', '--batch_size=-3']  # a bool flag takes no value
    with pytest.raises(lumi.LumiError, match='--batch_size needs a value'):
        lumi.load_config(DEFAULTS, ['--batch_size'])


@pytest.mark.parametrize('typo, hint', [
    ('--lerning_rate=0.1', 'did you mean learning_rate?'),
    ('--batchsize 4', 'did you mean batch_size?'),
    ('--zzz=1', 'known keys: batch_size, compile'),
])
def test_a_mistyped_key_says_did_you_mean(typo, hint):
    with pytest.raises(lumi.LumiError,
                       match=f"unknown config key '{typo[2:].split()[0].split('=')[0]}'") as e:
        lumi.load_config(DEFAULTS, typo.split())
    assert hint in str(e.value) and '--help lists every key' in str(e.value)


def test_the_pipeline_takes_key_space_value_too(tmp_path):
    p = pipeline.Pipeline(['--pretrain_minutes', '2', '--n_layer', '3', '--compile',
                           '--run_dir', str(tmp_path)])
    assert p.cfg.pretrain_minutes == 2.0 and p.run_dir == str(tmp_path) and p.config_file == ''
    assert p.routed['train'] == ['--n_layer=3', '--compile']


# -----------------------------------------------------------------------------
# ranges

@pytest.mark.parametrize('defaults, flag, message', [
    (train.KEYS, '--max_iters=-5', "'max_iters' must be in [0, inf), got -5"),
    (train.KEYS, '--eval_interval=0', "'eval_interval' must be in [1, inf), got 0"),
    (train.KEYS, '--gradient_accumulation_steps=0',
     "'gradient_accumulation_steps' must be in [1, inf), got 0"),
    (train.KEYS, '--batch_size=0', "'batch_size' must be in [1, inf), got 0"),
    (train.KEYS, '--learning_rate=-1e-3', "'learning_rate' must be in [0, inf), got -0.001"),
    (train.KEYS, '--dropout=1.0', "'dropout' must be in [0, 1), got 1.0"),
    (sft.KEYS, '--lora_r=-4', "'lora_r' must be in [0, inf), got -4"),
    (dpo.KEYS, '--beta=0', "'beta' must be in (0, inf), got 0.0"),
    (sample.KEYS, '--max_new_tokens=-1', "'max_new_tokens' must be in [1, inf), got -1"),
    (serve.KEYS, '--port=99999', "'port' must be in [0, 65535], got 99999"),
    (sample.KEYS, '--top_p=1.5', "'top_p' must be in (0, 1], got 1.5"),
    (ev.KEYS, '--limit=-1', "'limit' must be in [0, inf), got -1"),
    (data.KEYS, '--val_fraction=1.0', "'val_fraction' must be in [0, 1), got 1.0"),
    (pipeline.KEYS, '--eval_limit=-2', "'eval_limit' must be in [0, inf), got -2"),
])
def test_numeric_keys_are_range_checked(defaults, flag, message):
    with pytest.raises(lumi.LumiError) as e:
        lumi.load_config(defaults, [flag])
    assert str(e.value) == f"{flag.split('=')[0]}: {message}"


def test_a_config_file_value_out_of_range_names_the_file_and_stages_narrow_ranges(tmp_path):
    (tmp_path / 'bad.py').write_text("batch_size = -1\n")
    with pytest.raises(lumi.LumiError, match=r"bad\.py:1: 'batch_size' must be in \[1, inf\), got -1"):
        lumi.load_config(train.KEYS, [str(tmp_path / 'bad.py')])
    assert lumi.load_config(dpo.KEYS, ['--eval_iters=0']).eval_iters == 0  # dpo.py: 0 is "all"
    with pytest.raises(lumi.LumiError, match=r"'eval_iters' must be in \[1, inf\)"):
        lumi.load_config(train.KEYS, ['--eval_iters=0'])  # train.py averages eval_iters batches


STAGE_FILES = ['train.py', 'sft.py', 'dpo.py', 'data.py', 'eval.py', 'sample.py', 'serve.py', 'export.py',
               'curves.py', 'pipeline.py']


@pytest.mark.parametrize('stage', STAGE_FILES)
def test_every_range_is_well_formed_and_beside_its_key(stage):
    for key, k in lumi.declared_keys(stage).items():
        numeric = isinstance(k.default, (int, float)) and not isinstance(k.default, bool)
        if numeric and k.doc[:1] in '[(':  # a number's comment that opens like an interval must be one
            assert k.range and k.doc.startswith(k.range), (stage, key, k.doc)
        if k.range:
            lo, hi = (float(x) for x in k.range[1:-1].split(','))
            assert (lo < hi and isinstance(k.default, (int, float))
                    and lumi.in_range(k.default, k.range)), (stage, key)
    assert lumi.in_range(0, '[0, 1)') and not lumi.in_range(1, '[0, 1)') and not lumi.in_range(0, '(0, 1]')


def test_a_range_in_a_comment_is_read_and_a_redeclared_key_keeps_its_base_range(tmp_path):
    (tmp_path / 'base.py').write_text("steps = 10  # [1, 100] steps to take\nrate = 0.5  # (0, 1] a share\n")
    (tmp_path / 'stage.py').write_text(f"KEY_FILES = ({str(tmp_path / 'base.py')!r},)\nsteps = 20\n"
                                       "rate = 0.25  # [0, 1] a share,\n"
                                       "             # 0 included\ncount = 3\nname = 'x'  # a name\n")
    keys = lumi.declared_keys(str(tmp_path / 'stage.py'))
    assert keys == {'steps': lumi.Key(20, '[1, 100] steps to take', '[1, 100]'),
                    'rate': lumi.Key(0.25, '[0, 1] a share, 0 included', '[0, 1]'),
                    'count': lumi.Key(3, '', ''),  # the line above continues rate's comment: not count's
                    'name': lumi.Key('x', 'a name', '')}
    assert lumi.load_config(keys, ['--rate=0']).rate == 0.0
    with pytest.raises(lumi.LumiError, match=r"'steps' must be in \[1, 100\], got 101"):
        lumi.load_config(keys, ['--steps=101'])


# -----------------------------------------------------------------------------
# --help

STAGES = [(train, train.KEYS), (sft, sft.KEYS), (dpo, dpo.KEYS), (data, data.KEYS),
          (ev, ev.KEYS), (sample, sample.KEYS), (export, export.KEYS),
          (pipeline, pipeline.KEYS)]


@pytest.mark.parametrize('module, defaults', STAGES, ids=lambda x: getattr(x, '__name__', ''))
def test_help_gives_every_key_its_default_and_a_line(module, defaults):
    text = lumi.config_help(defaults, 'usage: x')
    rows = text.split('\nkeys:\n')[1].replace('\n    ', ' ').splitlines()  # a long flag puts its line below
    described = {}
    for row in rows:
        flag, _, note = row.strip().partition(' ')
        described[flag.split('=')[0][2:]] = note.strip()
    assert set(described) == set(defaults)
    assert not [k for k, note in described.items() if not note], "keys without a line of help"


def test_help_from_the_command_line():
    proc = run('train.py', '--help')
    assert proc.returncode == 0 and proc.stdout.startswith('usage: python train.py')
    assert '--n_embd=256' in proc.stdout and 'width of the residual stream' in proc.stdout
    assert '--learning_rate=0.001' in proc.stdout and 'peak AdamW learning rate' in proc.stdout
    proc = run('lumi.py', 'run', '--help')
    assert proc.returncode == 0 and '--eval_limit=0' in proc.stdout


# -----------------------------------------------------------------------------
# unusable checkpoints and adapters, at every entry point

def _corrupt(kind, good, path, tokenizer):
    """Write a checkpoint that cannot be used, of one kind, at path."""
    raw = open(good, 'rb').read()
    ckpt = checkpoint.load_checkpoint(good)
    del ckpt['path']
    if kind == 'truncated':
        open(path, 'wb').write(raw[:len(raw) // 3])
    elif kind == 'pickle':
        torch.save(dict(ckpt, extra=engine.Sampling()), path)
    elif kind == 'bitflip':
        checkpoint.save_checkpoint(path, ckpt)
        flipped = bytearray(open(path, 'rb').read())
        at = flipped.find(ckpt['model']['layers.1.mlp.down_proj.weight'].numpy().tobytes()[:16])
        flipped[at + 1] ^= 1
        open(path, 'wb').write(bytes(flipped))
    elif kind == 'tokenizer':
        checkpoint.save_checkpoint(path, dict(ckpt, tokenizer_sha256='f' * 64))
    elif kind == 'shape':
        checkpoint.save_checkpoint(path, dict(ckpt, model_args=dict(ckpt['model_args'], n_embd=4096,
                                                              ffn_hidden=1 << 16)))
    elif kind == 'missing':
        checkpoint.save_checkpoint(path, dict(ckpt, model={k: v for k, v in ckpt['model'].items()
                                                     if k != 'norm.weight'}))
    return path


@pytest.fixture(scope='module')
def adapter(tmp_path_factory, tiny_checkpoint, tokenizer):
    from lora import apply_lora
    model = apply_lora(checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tiny_checkpoint)),
                       r=2, alpha=4.0, targets=('q',))
    path = str(tmp_path_factory.mktemp('adapter') / 'adapter.pt')
    checkpoint.save_checkpoint(path, lora.adapter_state(model, tiny_checkpoint, tokenizer))
    return path


ENTRY_POINTS = {  # name -> the command, BAD standing for the unusable file
    'sample': lambda bad, good, adapter, out, bins: ['sample.py', f'--ckpt={bad}', '--prompt=x'],
    'sample --adapter': lambda bad, good, adapter, out, bins: ['sample.py', f'--ckpt={good}',
                                                              f'--adapter={bad}', '--prompt=x'],
    'eval': lambda bad, good, adapter, out, bins: ['eval.py', bad, '--tasks=ppl'],
    'sft --init_from': lambda bad, good, adapter, out, bins: ['sft.py', f'--init_from={bad}',
                                                             f'--out_dir={out}'],
    'sft merge': lambda bad, good, adapter, out, bins: ['sft.py', 'merge', bad, adapter, f'{out}/m.pt'],
    'sft merge adapter': lambda bad, good, adapter, out, bins: ['sft.py', 'merge', good, bad, f'{out}/m.pt'],
    'dpo --init_from': lambda bad, good, adapter, out, bins: ['dpo.py', f'--init_from={bad}',
                                                             f'--out_dir={out}'],
    'train --resume': lambda bad, good, adapter, out, bins: ['train.py', f'--data_dir={bins}',
                                                            f'--out_dir={out}', f'--resume={bad}',
                                                            '--device=cpu'],
    'lumi info': lambda bad, good, adapter, out, bins: ['lumi.py', 'info', bad],
    'lumi export': lambda bad, good, adapter, out, bins: ['lumi.py', 'export', bad, out],
}
KINDS = ('truncated', 'pickle', 'bitflip', 'tokenizer', 'shape', 'missing')
MESSAGES = {'truncated': 'not a torch checkpoint, or cut short',
            'pickle': 'pickled objects other than tensors',
            'bitflip': "tensor 'model.layers.1.mlp.down_proj.weight' does not match its checksum",
            'tokenizer': 'is not the hash of the tokenizer it carries', 'shape': 'do not fit its model_args',
            'missing': "missing ['norm.weight']"}
# an adapter file has no model: shape/missing are moot
ADAPTER_ONLY = ('sample --adapter', 'sft merge adapter')


def _cases():
    """Every entry point with a truncated file, and with one other kind each, in
    turn, so every kind is met."""
    others = [k for k in KINDS if k != 'truncated']
    cases = []
    for i, name in enumerate(ENTRY_POINTS):
        cases.append((name, 'truncated'))
        kind = others[i % len(others)]
        if name in ADAPTER_ONLY and kind in ('shape', 'missing', 'tokenizer'):
            kind = 'bitflip'
        cases.append((name, kind))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize('entry, kind', _cases())
def test_every_entry_point_refuses_an_unusable_file_in_one_line(entry, kind, tmp_path, tiny_checkpoint,
                                                                adapter, tokenizer):
    source = adapter if entry in ADAPTER_ONLY else tiny_checkpoint
    if kind == 'bitflip' and entry in ADAPTER_ONLY:
        bad = str(tmp_path / 'bad.pt')
        state = checkpoint.load_checkpoint(adapter)
        del state['path']
        checkpoint.save_checkpoint(bad, state)
        name, t = next(iter(sorted(state['lora_state'].items())))
        raw = bytearray(open(bad, 'rb').read())
        raw[raw.find(t.numpy().tobytes()[:16]) + 1] ^= 1
        open(bad, 'wb').write(bytes(raw))
        expected = f"tensor 'lora_state.{name}' does not match its checksum"
    else:
        bad = _corrupt(kind, source, str(tmp_path / 'bad.pt'), tokenizer)
        expected = MESSAGES[kind]
        if entry == 'sft merge' and kind in ('tokenizer', 'shape', 'missing'):
            expected = 'was trained on base'  # the adapter's check of its base's SHA256 comes first
    bins = write_bins(tmp_path / 'bins', tokenizer) if entry == 'train --resume' else ''
    proc = run(*ENTRY_POINTS[entry](bad, tiny_checkpoint, adapter, str(tmp_path / 'out'), bins))
    assert_one_line_error(proc, bad, expected)


def test_debug_shows_the_traceback(tmp_path, tiny_checkpoint, tokenizer):
    bad = _corrupt('truncated', tiny_checkpoint, str(tmp_path / 'bad.pt'), tokenizer)
    proc = run('sample.py', f'--ckpt={bad}', '--prompt=x', '--debug')
    assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'LumiError' in proc.stderr


def test_a_missing_file_and_a_bad_flag_are_one_line_too(tmp_path):
    assert_one_line_error(run('eval.py', str(tmp_path / 'nope.pt')), 'checkpoint not found', 'nope.pt')
    assert_one_line_error(run('sample.py', '--max_new_tokens', '-1'), "'max_new_tokens' must be in [1, inf)")
    assert_one_line_error(run('lumi.py', 'info', str(tmp_path / 'nope.pt')), 'checkpoint not found')
    assert_one_line_error(run('data.py', '--vocab_sise=512'), "did you mean vocab_size?")


def test_a_device_that_is_not_here_a_bad_dtype_and_a_mistyped_flag_are_one_line(tmp_path, tiny_checkpoint):
    # this machine has no Apple GPU; float16 where torch cannot train in it is tests/test_platforms.py's
    assert_one_line_error(run('train.py', '--device=mps', f'--out_dir={tmp_path}'),
                          '--device=mps: no Apple GPU here')
    assert_one_line_error(run('eval.py', tiny_checkpoint, '--dtype=float8'), '--dtype=float8: not a dtype')
    wrong = "'activation_checkpointing' must be bool (default False), got str 'maybe'"
    assert_one_line_error(run('sft.py', '--activation_checkpointing=maybe'), wrong)
    for stage in (train, dpo):  # the training loop's key: every stage that trains takes it
        with pytest.raises(lumi.LumiError, match=re.escape(wrong)):
            lumi.load_config(stage.KEYS, ['--activation_checkpointing=maybe'])


def test_a_corrupt_sft_cache_is_rebuilt(tmp_path, tokenizer, capsys):
    spec = str(tmp_path / 'chat.jsonl')
    rows = [{'instruction': f'Say {w}.', 'output': f'{w.title()}!'}
            for w in ('hello', 'goodbye', 'yes', 'no', 'maybe')]
    open(spec, 'w').write('\n'.join(json.dumps(r) for r in rows) + '\n')
    cache = str(tmp_path / 'cache')
    first = sft.prepare_sft_data(tokenizer, [spec], 48, cache, val_frac=0.2)
    (path,) = [os.path.join(cache, n) for n in os.listdir(cache)]
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[:len(raw) // 2])
    capsys.readouterr()
    again = sft.prepare_sft_data(tokenizer, [spec], 48, cache, val_frac=0.2)
    assert f"SFT cache {path} is unusable" in capsys.readouterr().out
    assert torch.equal(again['ids'], first['ids'])
    # the rebuilt cache is whole again
    assert torch.equal(checkpoint.load_checkpoint(path)['lengths'], first['lengths'])


def test_resume_onto_other_bins_names_both_tokenizers_the_right_way_round(tiny_checkpoint, tokenizer):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    with pytest.raises(lumi.LumiError) as e:
        train.check_resume(tiny_checkpoint, ckpt['model_args'], 'b' * 64, 'D')
    assert str(e.value).startswith(f"the bins in D (resuming {tiny_checkpoint}) was built with tokenizer "
                                   f"bbbbbbbbbbbb…, but this model's tokenizer is "
                                   f"{tokenizer.sha256[:12]}…")


# -----------------------------------------------------------------------------
# eval.py --limit on --text

def test_limit_bounds_text_perplexity(tiny_checkpoint, monkeypatch):
    model, tok, _ = checkpoint.load_model(tiny_checkpoint, 'cpu', adapters=False)
    block = model.cfg.block_size
    long_doc = "To be, or not to be, that is the question. " * 20_000  # 880 kB: thousands of windows
    encoded = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, 'encode', lambda text: encoded.append(len(text)) or real_encode(text))
    r = ev.ppl_documents(model, tok, iter([long_doc, 'never reached']), stride=block // 2, limit=3)
    assert r['windows'] == 3 and r['documents'] == 1 and r['documents_cut'] == 1
    # the first window scores block tokens, each next one a stride
    assert r['tokens'] == block + 2 * (block // 2)
    assert max(encoded) <= (block + 2 * (block // 2) + 1) * ev.MAX_PIECE_CHARS  # never the whole text
    ids = [BOS_ID] + real_encode(long_doc[:20_000])
    first = ev.ppl_documents(model, tok, iter([tok.decode(ids[1:r['tokens'] + 1])]), stride=block // 2)
    # the same tokens scored whole: the same loss (the decoded text re-encodes to the same ids here)
    assert first['tokens'] == r['tokens'] and first['loss'] == pytest.approx(r['loss'], rel=1e-6)
    short = ev.ppl_documents(model, tok, iter(['Hello there.', 'A second one.']), limit=5)
    assert (short['documents'] == 2 and short['documents_cut'] == 0
            and short['bytes'] == len('Hello there.A second one.'))
