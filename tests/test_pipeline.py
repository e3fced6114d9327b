"""The end-to-end command's summary: it must say plainly when a stage ended worse than its baseline.
(Running the whole pipeline, interrupted and resumed, is tested in test_lumi.py.)"""
import math
import os

import numpy as np
import pytest

import lumi
import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(tmp_path, loss, accuracy, reply, dpo_accuracy):
    """A run folder as `lumi.py run` leaves it, with the figures given: stamps, eval reports, metrics, reply."""
    run = tmp_path / 'run'
    val = tmp_path / 'val.bin'
    np.array([4, 5, 6, 7] * 100, dtype=np.uint16).tofile(val)  # unigram entropy ln 4 = 1.3863 nats
    for stage in ('pretrain', 'eval_pretrain', 'sft', 'dpo', 'sample'):
        (run / stage).mkdir(parents=True)
        product = run / stage / ('reply.txt' if stage == 'sample' else 'x')
        product.write_text(reply if stage == 'sample' else '')
        lumi.write_json(str(run / stage / pipeline.STAMP), dict(stage=stage, inputs='k', done=True, seconds=1.0,
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
        keys = lumi.config_defaults(_exec(os.path.join(ROOT, path)))
        known = set(p.defaults[stage]) | (set(p.defaults['data']) if stage == 'train' else set())
        assert set(keys) <= known, (path, set(keys) - known)
    train = lumi.config_defaults(_exec(os.path.join(ROOT, p.train_config)))
    assert train['vocab_size'] <= 8192 and train['data_dir'] != 'data/starter'  # its own small-vocabulary data
    assert train['compile'] == 'auto' and train['dtype'] == 'auto'
    assert p.cfg.pretrain_minutes + p.cfg.sft_minutes + p.cfg.dpo_minutes <= 16  # room for data and evals in 20


def _exec(path):
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    return namespace
