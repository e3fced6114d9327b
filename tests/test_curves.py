"""curves.py and its `lumi.py plot` command: a well-formed SVG whose polylines hold the logged points, several
runs on one axis, a metrics.jsonl line cut short by a kill skipped, and nothing to draw said plainly. The
trackers, with the real tensorboard and wandb (offline) packages: the same scalars as metrics.jsonl and the
config, a resumed run on the same curves, a fresh run on fresh ones, a failing tracker dropped with one
warning, a typo and a missing package said in one line."""
import ast
import glob
import importlib.util
import json
import math
import os
import re
import struct
import xml.etree.ElementTree as ET

import pytest

import checkpoint
import curves
import lumi
import training
from test_training import Crash, RandomBatches

SVG = '{http://www.w3.org/2000/svg}'


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
                recs.append(dict(step=step, tokens=step * 128,
                                 val_loss=scale * (3.2 + 5 * math.exp(-step / 6))))
        d = tmp_path / name
        d.mkdir()
        (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs) + '{"step": 31, "lo\n')
        runs.append((str(d), recs))
    out = str(tmp_path / 'both.svg')
    curves.main([runs[0][0], runs[1][0], '--out', out, '--title=loss <&> lr'])
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
        curves.plot_svg([curves.read_run(str(tmp_path))], str(tmp_path / 'x.svg'))



# -----------------------------------------------------------------------------
# trackers: TensorBoard and W&B (offline), with the real packages (requirements-test.txt)

def wandb_history(run_dir):
    """{step: {key: value}} of the W&B history in an offline run's .wandb files (a LevelDB-style log of
    protobuf records: a 7-byte header, then 32 KiB blocks of records, each crc32, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb
    rows, config = {}, {}
    for path in sorted(glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*', 'run-*.wandb'))):
        data, pos, chunk = open(path, 'rb').read(), 7, b''
        assert data[:4] == b':W&B'
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
            if n == kind == 0:
                break
            chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = pb.Record()
                record.ParseFromString(chunk)
                chunk = b''
                if record.WhichOneof('record_type') == 'history':
                    row = rows.setdefault(record.history.step.num, {})
                    items = {i.key or '.'.join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item}
                    row.update({k: v for k, v in items.items() if not k.startswith('_')})
                elif record.WhichOneof('record_type') == 'config':
                    config.update({i.key: json.loads(i.value_json) for i in record.config.update})
                elif record.WhichOneof('record_type') == 'run':
                    config['_project'] = record.run.project
    return rows, config


def tensorboard_run(run_dir):
    """({tag: {step: value}} as TensorBoard shows them (what a purge_step dropped is gone), {hyperparameter:
    value} of its HPARAMS tab)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(os.path.join(run_dir, 'tensorboard'), size_guidance={'scalars': 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']}
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent('hparams')['_hparams_/session_start_info']).session_start_info
    hparams = {k: v.WhichOneof('kind') and getattr(v, v.WhichOneof('kind')) for k, v in start.hparams.items()}
    return scalars, hparams


def jsonl_scalars(run_dir):
    """{tag: {step: value}} of metrics.jsonl, the record the trackers must show."""
    out = {}
    for r in lumi.read_jsonl(os.path.join(run_dir, 'metrics.jsonl')):
        for k, v in curves.scalars(r).items():
            out.setdefault(k, {})[r['step']] = v
    return out


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its own files under tmp: nothing reaches the network or the home directory."""
    pytest.importorskip('wandb')
    for var, value in dict(WANDB_MODE='offline', WANDB_SILENT='true', WANDB_PROJECT='lumi-tests',
                           WANDB_CONFIG_DIR=tmp_path / 'wandb-config',
                           WANDB_CACHE_DIR=tmp_path / 'wandb-cache',
                           WANDB_DATA_DIR=tmp_path / 'wandb-data').items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv('WANDB_DIR', raising=False)
    monkeypatch.delenv('WANDB_API_KEY', raising=False)


def _fit_logged(out_dir, tiny_checkpoint, log, crash_at=None):
    """training.fit on the tiny model for 12 steps with --log=log, evaluating every 5 and checkpointing every
    4; crash_at: the loss function raises Crash at that call."""
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    model = checkpoint.model_from_checkpoint(ckpt)
    cfg = lumi.load_config(lumi.declared_keys('training.py'),
                           [f'--out_dir={out_dir}', '--max_iters=12', '--eval_interval=5',
                            '--ckpt_interval=4',
                            '--warmup_iters=3', '--keep_last=1', '--device=cpu', '--dtype=float32',
                            f'--log={log}'])
    val = RandomBatches(model.cfg.vocab_size, seed=99).next_batch()
    calls = []

    def loss_fn(m, batch):
        if len(calls) == crash_at:
            raise Crash()
        calls.append(1)
        loss = m(batch[0], batch[1])[1]
        return loss, {'margin': loss.item() / 2}  # a stage's own metric, as DPO's accuracy and margins

    meta = checkpoint.checkpoint_meta(model, checkpoint.tokenizer_from_checkpoint(ckpt), 'pretrain')
    return training.fit(cfg, model, RandomBatches(model.cfg.vocab_size), loss_fn,
                        lambda m: {'val_loss': m(val[0], val[1])[1].item()}, meta)


def test_trackers_show_metrics_jsonl_and_a_resumed_run_continues_them(tmp_path, tiny_checkpoint,
                                                                       offline_wandb):
    pytest.importorskip('tensorboard')
    run = str(tmp_path / 'run')
    with pytest.raises(Crash):  # dies in step 7, with step 6 logged after the newest checkpoint (5)...
        _fit_logged(run, tiny_checkpoint, 'tensorboard,wandb', crash_at=6)
    run_id = open(os.path.join(run, curves.WANDB_ID)).read().strip()
    _fit_logged(run, tiny_checkpoint, 'tensorboard,wandb')  # ...and the resumed run logs it again
    expected = jsonl_scalars(run)
    assert {'loss', 'lr', 'tokens', 'tokens_per_sec', 'mfu', 'grad_norm', 'margin',
            'val_loss'} <= set(expected)
    assert sorted(expected['loss']) == list(range(1, 13)) and sorted(expected['val_loss']) == [0, 5, 10, 12]
    board, hparams = tensorboard_run(run)
    assert hparams['max_iters'] == 12 and hparams['out_dir'] == run and hparams['log'] == 'tensorboard,wandb'
    assert set(board) == set(expected)
    for tag, points in expected.items():  # the same steps (none twice) and values (float32 in event files)
        assert sorted(board[tag]) == sorted(points), tag
        for step, value in points.items():
            assert board[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    assert open(os.path.join(run, curves.WANDB_ID)).read().strip() == run_id  # the same W&B run
    history, config = wandb_history(run)
    assert sorted(history) == list(range(0, 13))
    for tag, points in expected.items():
        if tag not in ('tokens_per_sec', 'mfu'):  # timings differ where steps 5 and 6 were redone
            for step, value in points.items():
                assert history[step][tag] == pytest.approx(value, rel=1e-12), (tag, step)
    assert config['max_iters'] == 12 and config['out_dir'] == run and config['log'] == 'tensorboard,wandb'
    assert config['_project'] == 'lumi-tests'  # WANDB_PROJECT
    # both runs' folders carry the one id, so `wandb sync` makes them one run; wandb adds '-1' to the second
    # folder's name when both started within the same second
    runs = glob.glob(os.path.join(run, 'wandb', 'offline-run-*'))
    assert len(runs) == 2 and all(re.search(rf'-{run_id}(-\d+)?$', r) for r in runs), runs


def test_a_fresh_run_starts_fresh_curves(tmp_path, tiny_checkpoint):
    pytest.importorskip('tensorboard')
    run = str(tmp_path / 'run')
    _fit_logged(run, tiny_checkpoint, 'tensorboard')
    for name in os.listdir(run):  # no checkpoint left to resume from
        if name.endswith('.pt'):
            os.remove(os.path.join(run, name))
    _fit_logged(run, tiny_checkpoint, 'tensorboard')
    assert len(os.listdir(os.path.join(run, 'tensorboard'))) == 1  # the old event file went with the old run
    assert sorted(tensorboard_run(run)[0]['loss']) == list(range(1, 13))


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    pytest.importorskip('tensorboard')
    calls = []

    def broken(self, record):
        calls.append(record['step'])
        raise ConnectionError("no network")
    monkeypatch.setattr(curves.TensorBoardLog, 'log', broken)
    path = _fit_logged(str(tmp_path / 'run'), tiny_checkpoint, 'tensorboard')
    assert path.endswith('ckpt_0000012.pt') and calls == [0]  # dropped after its first failure
    said = capsys.readouterr().out
    assert said.count('--log=tensorboard failed (ConnectionError: no network)') == 1
    assert len(lumi.read_jsonl(str(tmp_path / 'run' / 'metrics.jsonl'))) == 12 + 4  # steps, evals


def test_log_names_the_choices_and_the_pip_command(tmp_path, monkeypatch):
    with pytest.raises(lumi.LumiError, match=r"unknown tracker 'tensorbord' \(did you mean tensorboard\?\); "
                                             r"choose from tensorboard, wandb"):
        curves.Trackers('tensorbord', str(tmp_path), {})
    assert curves.parse_trackers(' wandb, tensorboard,wandb ,') == ['wandb', 'tensorboard']
    assert curves.Trackers('', str(tmp_path), {}).active == {}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'wandb' else real(name, *a))
    with pytest.raises(lumi.LumiError, match=r"^--log=wandb needs the wandb package: pip install wandb$"):
        curves.Trackers('wandb', str(tmp_path), {})


def test_a_log_typo_stops_the_run_in_one_line(tmp_path, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit:
        lumi.guard(lambda argv: _fit_logged(str(tmp_path / 'run'), tiny_checkpoint, 'tensorboard,wandbb'), [])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith("error: --log: unknown tracker 'wandbb' (did you mean wandb?)")
    assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')  # before the first step


def test_training_calls_lumi_log_never_the_log_key():
    # training.py declares the key `log` (--log=tensorboard): a bare log(...) there would call that string
    tree = ast.parse(open(os.path.join(lumi.ROOT, 'training.py')).read())
    bare = [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'log']
    assert not bare, f"training.py calls log(...) at lines {bare}: use lumi.log"


@pytest.mark.parametrize('stage', ['train', 'sft', 'dpo'])
def test_each_stage_refuses_a_tracker_typo_before_it_loads_anything(stage, tmp_path, capsys):
    # --init_from and --data_dir name nothing: the stage must stop at --log before it looks for them
    module = importlib.import_module(stage)
    missing = f'--data_dir={tmp_path}/none' if stage == 'train' else f'--init_from={tmp_path}/none.pt'
    argv = ['--log=tensorbord', f'--out_dir={tmp_path}/out', missing]
    with pytest.raises(SystemExit) as exit:
        lumi.guard(module.main, argv)
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.startswith("error: --log: unknown tracker 'tensorbord'"), err
