"""lumi.py: config loading (files and overrides, unknown keys in a file, shared files, every config in
configs/), atomic files and JSON lines, the chat template, the one dtype rule and compile='auto', and the
lab's command line dispatching to the stage files."""
import glob
import os
import subprocess
import sys

import pytest
import torch

import data
import dpo
import lumi
import pipeline
import sft
import train
from tokenizer import BOS_ID, render_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# configuration

DEFAULTS = dict(batch_size=8, learning_rate=1e-3, out_dir='out/x', compile=False, lora_targets=('q', 'v'),
                sources=[('a', 1.0)], init_from='', seed=None)


def test_config_file_then_overrides(tmp_path):
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("batch_size = 4\nlearning_rate = 3\nlora_targets = ['q', 'k']\n"
                        "n_layer = 12  # a key of train.py, which shares the file: ignored here\n"
                        "_private = 1\n")
    cfg = lumi.load_config(DEFAULTS, [str(cfg_file), '--batch_size=16', '--compile', '--out_dir=123',
                                      '--init-from=ckpt.pt', '--seed=7'], shares_with=('train.py',))
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
    with pytest.raises(ValueError, match=r"bad\.py:1: 'batch_size' must be int"):
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


# -----------------------------------------------------------------------------
# the chat template

def test_render_chat_masks_exactly_the_assistant_replies(tokenizer):
    tok = tokenizer
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello there'},
                {'role': 'assistant', 'content': 'Hi, how are you?'}, {'role': 'user', 'content': 'Fine.'},
                {'role': 'assistant', 'content': 'Good to hear.'}]
    ids, mask = render_chat(tok, messages)
    # the reference, built piece by piece: BOS, then per message its role token, content and <|end|>
    want_ids, want_mask = [BOS_ID], [0]
    for m in messages:
        body = tok.encode(m['content']) + [tok.end_id]
        want_ids += [tok.role_id[m['role']]] + body
        want_mask += [0] + [int(m['role'] == 'assistant')] * len(body)
    assert ids == want_ids and mask == want_mask
    learned = [i for i, k in zip(ids, mask) if k]
    assert tok.decode(learned).replace('<|end|>', '|') .startswith('Hi, how are you?')
    assert learned.count(tok.end_id) == 2 and sum(mask) == len(learned)
    gen_ids, gen_mask = render_chat(tok, messages[:2], add_generation_prompt=True)
    assert gen_ids[-1] == tok.role_id['assistant'] and sum(gen_mask) == 0
    with pytest.raises(ValueError, match="message 1: unknown role 'bot'"):
        render_chat(tok, [messages[0], {'role': 'bot', 'content': 'x'}])
    with pytest.raises(ValueError, match='content must be a string'):
        render_chat(tok, [{'role': 'user', 'content': None}])


# -----------------------------------------------------------------------------
# the training loop: an interrupted run, resumed, logs what the uninterrupted run logs, bit for bit


# -----------------------------------------------------------------------------
# plot: a well-formed SVG whose polylines hold the logged points


# -----------------------------------------------------------------------------
# info


# -----------------------------------------------------------------------------
# `lumi.py run`: the whole pipeline on a tiny config, interrupted mid-pretrain, resumed, then run again


# -----------------------------------------------------------------------------
# one dtype rule, compile='auto', and the CPU peak behind the printed MFU

def test_dtype_auto_means_one_thing_in_every_stage(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # an A100
    monkeypatch.setattr(lumi, 'native_bf16', lambda: True)
    assert (lumi.resolve_dtype('auto', 'cpu') == 'bfloat16'
            and lumi.resolve_dtype('auto', 'cuda:0') == 'bfloat16')
    monkeypatch.setattr(lumi, 'native_bf16', lambda: False)
    assert lumi.resolve_dtype('auto', 'cpu') == 'float32' and lumi.resolve_dtype('auto', 'cuda') == 'bfloat16'
    assert (lumi.resolve_dtype('float32', 'cuda') == 'float32'
            and lumi.resolve_dtype('bfloat16', 'cpu') == 'bfloat16')
    # no stage keeps a rule of its own
    for name in ('train', 'sft', 'dpo', 'eval', 'sample'):
        source = open(os.path.join(ROOT, f'{name}.py')).read()
        assert 'def resolve_dtype' not in source and "dtype == 'auto'" not in source, name


def test_compile_auto_compiles_on_cuda_and_where_it_pays_on_a_cpu_and_takes_booleans(monkeypatch):
    monkeypatch.setattr(lumi.importlib.util, 'find_spec', lambda name: object())  # triton imports
    assert lumi.resolve_compile('auto', 'cuda:0') is True and lumi.resolve_compile('auto', 'cpu') is False
    # a CPU: only with native bf16, on Linux with a C++ compiler and Python's headers, batches of one shape
    # and a budget of at least 3 minutes
    monkeypatch.setattr(lumi, 'native_bf16', lambda: True)
    monkeypatch.setattr(lumi.sys, 'platform', 'linux')
    monkeypatch.setattr(lumi.shutil, 'which', lambda name: '/usr/bin/' + name)
    monkeypatch.setattr(lumi.os.path, 'isfile', lambda path: path.endswith('Python.h'))
    assert lumi.resolve_compile('auto', 'cpu', one_shape=True, minutes=9.0) is True
    assert lumi.resolve_compile('auto', 'cpu', one_shape=False, minutes=9.0) is False  # SFT's, DPO's batches
    assert lumi.resolve_compile('auto', 'cpu', one_shape=True, minutes=2.0) is False
    assert lumi.resolve_compile('auto', 'cpu', one_shape=True) is False  # no budget: a run of unknown length
    assert lumi.resolve_compile('auto', 'mps', one_shape=True, minutes=9.0) is False
    with monkeypatch.context() as m:
        m.setattr(lumi, 'native_bf16', lambda: False)  # bf16 emulated: compiling gained nothing
        assert lumi.resolve_compile('auto', 'cpu', one_shape=True, minutes=9.0) is False
    with monkeypatch.context() as m:
        m.setattr(lumi.os.path, 'isfile', lambda path: False)  # no Python.h
        assert lumi.resolve_compile('auto', 'cpu', one_shape=True, minutes=9.0) is False
    with monkeypatch.context() as m:
        m.setattr(lumi.shutil, 'which', lambda name: None)  # no C++ compiler
        assert lumi.resolve_compile('auto', 'cpu', one_shape=True, minutes=9.0) is False
    monkeypatch.setattr(lumi.sys, 'platform', 'win32')  # inductor would need MSVC
    assert lumi.resolve_compile('auto', 'cpu', one_shape=True, minutes=9.0) is False
    assert lumi.resolve_compile(True, 'cpu') is True and lumi.resolve_compile(False, 'cuda') is False
    defaults = dict(lumi.declared_keys('training.py'))
    assert lumi.load_config(defaults, ['--compile=True']).compile is True
    assert lumi.load_config(defaults, ['--compile=False']).compile is False
    assert lumi.load_config(defaults, []).compile == 'auto'


# -----------------------------------------------------------------------------
# a config file: an unknown key is an error as on the command line, unless another
# stage sharing the file has it

def test_a_typo_in_a_config_file_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / 'typo.py').write_text("batch_size = 4\nlerning_rate = 1e-3\n")
    with pytest.raises(lumi.LumiError, match=r"typo\.py:2: unknown config key 'lerning_rate' \(did you mean "
                                             r"learning_rate\?.*nor a key of data\.py, pipeline\.py"):
        lumi.load_config(train.KEYS, [str(tmp_path / 'typo.py')], shares_with=train.SHARES_WITH)
    with pytest.raises(lumi.LumiError, match=r"typo\.py:2: unknown config key 'lerning_rate'"):
        lumi.load_config(sft.KEYS, [str(tmp_path / 'typo.py')], shares_with=())


def test_a_shared_config_file_sets_each_stage_its_own_keys(tmp_path):
    (tmp_path / 'both.py').write_text("vocab_size = 512\nn_layer = 3\nmin_doc_chars = 5\nrun_dir = 'r'\n")
    cfg = lumi.load_config(train.KEYS, [str(tmp_path / 'both.py')], shares_with=train.SHARES_WITH)
    assert (cfg.n_layer == 3 and 'vocab_size' not in cfg and 'min_doc_chars' not in cfg
            and 'run_dir' not in cfg)
    with pytest.raises(lumi.LumiError, match="unknown config key 'vocab_size'"):  # not shared: data.py's key
        lumi.load_config(train.KEYS, [str(tmp_path / 'both.py')], shares_with=())


def _reader(name):
    """The stage (defaults, shares_with) that reads a config file of configs/, by its name."""
    if name.startswith('sft_'):
        return [(sft.KEYS, ())]
    if name.startswith('dpo_'):
        return [(dpo.KEYS, ())]
    if name.startswith('pipeline_'):
        return [(pipeline.KEYS, pipeline.SHARES_WITH)]
    return [(train.KEYS, train.SHARES_WITH), (data.KEYS, ('train.py', 'pipeline.py'))]


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))),
                         ids=os.path.basename)
def test_every_config_loads_under_the_strict_rule(path):
    for defaults, shares in _reader(os.path.basename(path)):
        cfg = lumi.load_config(defaults, [path], shares_with=shares)
        assert cfg.config_file == path
        mine = {k for k, v in _exec(path).items() if lumi.is_key(k, v) and k in defaults}
        assert mine and all(cfg[k] == _exec(path)[k] or isinstance(cfg[k], float) for k in mine)


def _exec(path):
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    return namespace


@pytest.mark.parametrize('defaults', [train.KEYS, sft.KEYS, dpo.KEYS, pipeline.KEYS],
                         ids=['train', 'sft', 'dpo', 'pipeline'])
def test_key_space_value_and_key_equals_value_mean_the_same(defaults):
    key = next(k for k, v in defaults.items() if isinstance(v.default, float) and v.range)
    assert lumi.load_config(defaults, [f'--{key}', '0.5']) == lumi.load_config(defaults, [f'--{key}=0.5'])
    assert lumi.load_config(defaults, [f'--{key}', '0.5'])[key] == 0.5 != defaults[key].default


# -----------------------------------------------------------------------------
# JSON lines: a last line cut short by a kill is skipped and said; a bad line before it is refused

def test_read_jsonl_skips_a_cut_last_line_and_refuses_a_bad_one_inside(tmp_path, capsys):
    path = tmp_path / 'm.jsonl'
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert lumi.read_jsonl(str(path)) == [{'step': 1}, {'step': 2}]
    assert f"{path}:4: skipped the last line, cut short" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(lumi.LumiError, match=rf"{path}:2: not a JSON record"):
        lumi.read_jsonl(str(path))


# -----------------------------------------------------------------------------
# `python lumi.py COMMAND` runs the stage file that does it

def test_lumi_py_dispatches_to_the_stage_files_and_says_its_usage():
    assert set(lumi.COMMANDS.values()) <= {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '*.py'))}
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, 'lumi.py'), *a], capture_output=True,
                                    text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    proc = run('bake')
    assert proc.returncode == 2 and 'usage: python lumi.py COMMAND' in proc.stderr
    proc = run('plot', '--help')
    assert proc.returncode == 0 and '--out=' in proc.stdout and 'usage: python lumi.py plot' in proc.stdout


def test_native_bf16_needs_the_hardware_and_torch_allowed_to_use_it(monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 keeps torch's kernels off AVX-512: bf16 would be
    # emulated there, so 'auto' is fp32
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    assert lumi.native_bf16() and lumi.resolve_dtype('auto', 'cpu') == 'bfloat16'
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    assert not lumi.native_bf16() and lumi.resolve_dtype('auto', 'cpu') == 'float32'
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    assert not lumi.native_bf16()


def test_a_failed_append_names_the_file(tmp_path, monkeypatch):
    import builtins
    import errno
    real_open = builtins.open

    def full(path, mode='r', *a, **kw):
        if 'a' in mode:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(builtins, 'open', full)
    with pytest.raises(OSError, match=f"cannot write {tmp_path}/m.jsonl: No space left on device"):
        lumi.append_jsonl(str(tmp_path / 'm.jsonl'), {'step': 1})

