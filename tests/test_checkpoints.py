"""
Checkpoints that cannot be used are refused in one line naming the file (lumi.load_checkpoint,
model_from_checkpoint, tokenizer_from_checkpoint): tensor checksums written at save and verified at load,
a tokenizer hash that does not match the tokenizer bytes, model_args that do not fit the stored tensors
(checked on the meta device, before anything is allocated). And the training loop's checkpoints: best.pt
consistent after a kill at any write, a resume asked for more steps than its checkpoint planned.
"""
import os

import pytest
import torch

import lumi
import model as model_py
from test_lumi import Crash, RandomBatches


def _ckpt(tiny_checkpoint, **changes):
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    del ckpt['path']
    ckpt.update(changes)
    return ckpt


def _flip_a_bit(path, tensor):
    """Flip one bit inside the stored bytes of a tensor: the zip file stays valid, torch.load succeeds."""
    raw = bytearray(open(path, 'rb').read())
    at = raw.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 7] ^= 0x10
    open(path, 'wb').write(bytes(raw))


# -----------------------------------------------------------------------------
# checksums

def test_checksums_round_trip_and_a_flipped_bit_names_the_tensor(tmp_path, tiny_checkpoint):
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    stored = torch.load(tiny_checkpoint, weights_only=True)['tensor_sha256']
    assert 'model.tok_emb.weight' in stored and 'tokenizer' in stored  # every tensor, nested ones by dotted name
    assert 'tensor_sha256' not in ckpt  # verified, then out of the caller's way
    path = str(tmp_path / 'flipped.pt')
    lumi.save_checkpoint(path, _ckpt(tiny_checkpoint))
    name = next(k for k in ckpt['model'] if k.endswith('mlp.up_proj.weight'))
    _flip_a_bit(path, ckpt['model'][name])
    with pytest.raises(lumi.LumiError, match=rf"{path}: tensor 'model\.{name}' does not match its checksum"):
        lumi.load_checkpoint(path)


def test_a_checkpoint_saved_before_checksums_still_loads(tmp_path, tiny_checkpoint):
    old = _ckpt(tiny_checkpoint)
    path = str(tmp_path / 'old.pt')
    torch.save(old, path)  # what save_checkpoint wrote before checksums: no tensor_sha256
    loaded = lumi.load_checkpoint(path)
    a, b = lumi.model_from_checkpoint(loaded), lumi.model_from_checkpoint(lumi.load_checkpoint(tiny_checkpoint))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_tensor_added_or_removed_after_saving_is_refused(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state['model']['extra'] = torch.zeros(3)
    path = str(tmp_path / 'added.pt')
    torch.save(state, path)
    with pytest.raises(lumi.LumiError, match=r"added\.pt: its tensors differ from those its checksums list "
                                             r"\(model\.extra\)"):
        lumi.load_checkpoint(path)


# -----------------------------------------------------------------------------
# files that are not checkpoints

class Payload:
    pass


@pytest.mark.parametrize('kind, message', [
    ('truncated', 'not a torch checkpoint, or cut short'),
    ('empty', 'not a torch checkpoint, or cut short'),
    ('text', 'not a torch checkpoint, or cut short'),
    ('pickle', 'pickled objects other than tensors'),
    ('list', 'not a Lumi checkpoint'),
])
def test_files_that_are_not_checkpoints_are_refused_naming_the_file(tmp_path, tiny_checkpoint, kind, message):
    path = str(tmp_path / f'{kind}.pt')
    raw = open(tiny_checkpoint, 'rb').read()
    if kind == 'truncated':
        open(path, 'wb').write(raw[:len(raw) // 2])
    elif kind == 'empty':
        open(path, 'wb').close()
    elif kind == 'text':
        open(path, 'w').write('hello\n')
    elif kind == 'pickle':
        torch.save({'model': Payload()}, path)
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(lumi.LumiError, match=message) as e:
        lumi.load_checkpoint(path)
    assert str(e.value).startswith(path) and '\n' not in str(e.value)


# -----------------------------------------------------------------------------
# the tokenizer and the model a checkpoint describes

def test_a_tokenizer_hash_that_does_not_match_its_bytes_is_refused(tmp_path, tiny_checkpoint, tokenizer):
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    raw = ckpt['tokenizer'].numpy().tobytes()
    for accepted in (lumi.sha256_bytes(raw), tokenizer.sha256):  # what Tokenizer.sha256 means may change
        assert lumi.tokenizer_from_checkpoint(dict(ckpt, tokenizer_sha256=accepted)).vocab_size == tokenizer.vocab_size
    with pytest.raises(lumi.LumiError, match=r"ckpt_0000000\.pt: its tokenizer_sha256 aaaaaaaaaaaa… is not the hash"):
        lumi.tokenizer_from_checkpoint(dict(ckpt, tokenizer_sha256='a' * 64))
    with pytest.raises(lumi.LumiError, match='its stored tokenizer is unusable'):
        lumi.tokenizer_from_checkpoint(dict(ckpt, tokenizer=torch.tensor([1, 2, 3], dtype=torch.uint8)))


def test_crafted_model_args_are_refused_before_anything_is_allocated(tiny_checkpoint, monkeypatch):
    built_on = []
    real_init = model_py.GPT.__init__

    def spy(self, cfg):
        built_on.append(torch.get_default_device().type)
        real_init(self, cfg)
    monkeypatch.setattr(model_py.GPT, '__init__', spy)
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    huge = dict(ckpt, model_args=dict(ckpt['model_args'], n_embd=1 << 16, n_head=4, ffn_hidden=1 << 18))
    with pytest.raises(lumi.LumiError, match=r"ckpt_0000000\.pt: its weights do not fit its model_args or lora: "
                                             r"tok_emb\.weight is \(512, 64\), expected \(512, 65536\)"):
        lumi.model_from_checkpoint(huge)
    assert built_on == ['meta']  # 65536 wide would have been 9 GB of float32
    lumi.model_from_checkpoint(ckpt)
    assert built_on == ['meta', 'meta', 'cpu']


def test_an_adapter_with_a_crafted_lora_config_is_refused_before_allocating(tmp_path, tiny_checkpoint, tokenizer,
                                                                            monkeypatch):
    import sft
    from model import apply_lora
    model = apply_lora(lumi.model_from_checkpoint(lumi.load_checkpoint(tiny_checkpoint)), r=2, alpha=4.0, targets=('q',))
    path = str(tmp_path / 'adapter.pt')
    sft.save_adapter(path, model, tiny_checkpoint, tokenizer)
    adapter = lumi.load_checkpoint(path)
    del adapter['path']
    lumi.save_checkpoint(path, dict(adapter, lora=dict(adapter['lora'], r=1 << 20)))
    real_apply = model_py.apply_lora
    applied_on = []
    def spy(m, **kw):
        applied_on.append(m.tok_emb.weight.device.type)
        return real_apply(m, **kw)
    monkeypatch.setattr(model_py, 'apply_lora', spy)
    monkeypatch.setattr(sft, 'apply_lora', spy)
    with pytest.raises(lumi.LumiError, match=r"adapter\.pt: its weights do not fit its base .*ckpt_0000000\.pt with "
                                             r"its lora config: layers\.0\.attn\.q_proj\.lora_a is \(2, 64\), "
                                             r"expected \(1048576, 64\)"):
        sft.load_adapter(tiny_checkpoint, path)
    assert applied_on == ['meta']  # r = 2**20 on a real model: 2 x 2 layers x 2**20 x 64 floats


@pytest.mark.parametrize('change, message', [
    (lambda c: c['model'].pop('norm.weight'), r"missing \['norm\.weight'\]"),
    (lambda c: c['model'].update(stray=torch.zeros(1)), r"unexpected \['stray'\]"),
    (lambda c: c['model_args'].update(n_layer=3), r"missing \['layers\.2\."),
    (lambda c: c['model_args'].update(bogus=1), "do not describe a Lumi model"),
    (lambda c: c['model_args'].update(n_head=3), "do not describe a Lumi model: n_embd=64 is not divisible"),
    (lambda c: c.pop('model'), "not a Lumi model checkpoint"),
])
def test_weights_that_do_not_fit_their_model_args_are_refused(tiny_checkpoint, change, message):
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    ckpt = dict(ckpt, model=dict(ckpt['model']), model_args=dict(ckpt['model_args']))
    change(ckpt)
    with pytest.raises(lumi.LumiError, match=message) as e:
        lumi.model_from_checkpoint(ckpt)
    assert str(e.value).startswith(ckpt['path'])


# -----------------------------------------------------------------------------
# the training loop: best.pt after a kill, a resume asked for more steps

class OneBatch(RandomBatches):
    """The same batch every step, and as the val set: the model learns it, so the val loss falls at every eval."""

    def __init__(self, vocab):
        super().__init__(vocab, seed=3)
        self.batch = super().next_batch()

    def next_batch(self):
        return self.batch


def _fit(out_dir, tiny_checkpoint, *flags, die_writing=None):
    """lumi.fit on the tiny model with a val loss that falls at every eval; die_writing='best' or 'step': the
    process dies (Crash) while writing the file of the last eval's improvement, the other not yet written."""
    ckpt = lumi.load_checkpoint(tiny_checkpoint)
    model = lumi.model_from_checkpoint(ckpt)
    tok = lumi.tokenizer_from_checkpoint(ckpt)
    cfg = lumi.load_config(lumi.TRAINING_DEFAULTS, [f'--out_dir={out_dir}', '--max_iters=10', '--eval_interval=5',
                                                    '--ckpt_interval=100', '--warmup_iters=2', '--keep_last=0',
                                                    '--device=cpu', '--dtype=float32', '--learning_rate=3e-3',
                                                    *flags])
    batches = OneBatch(model.cfg.vocab_size)
    real_save = lumi.save_checkpoint

    def save(path, state):
        last = state['step'] == cfg.max_iters
        dying = 'best.pt' if die_writing == 'best' else f"ckpt_{state['step']:07d}.pt"
        if last and die_writing and os.path.basename(path) == dying:
            raise Crash()
        real_save(path, state)
    lumi.save_checkpoint = save
    try:
        return lumi.fit(cfg, model, batches, lambda m, b: m(b[0], b[1])[1],
                        lambda m: {'val_loss': m(*batches.batch)[1].item()},
                        meta=lumi.checkpoint_meta(model, tok, 'pretrain'))
    finally:
        lumi.save_checkpoint = real_save


def _best_is_the_best(out_dir):
    evals = [r for r in lumi.read_jsonl(os.path.join(out_dir, 'metrics.jsonl')) if 'val_loss' in r]
    best = min(evals, key=lambda r: r['val_loss'])
    saved = lumi.load_checkpoint(os.path.join(out_dir, 'best.pt'))
    assert (saved['step'], saved['metrics']['val_loss']) == (best['step'], best['val_loss'])
    step_ckpt = lumi.load_checkpoint(os.path.join(out_dir, f"ckpt_{best['step']:07d}.pt"))
    assert all(torch.equal(saved['model'][k], step_ckpt['model'][k]) for k in saved['model'])


@pytest.mark.parametrize('die_writing', ['best', 'step'])
def test_a_kill_between_best_and_step_checkpoint_leaves_best_consistent_after_resume(tmp_path, tiny_checkpoint,
                                                                                       die_writing):
    out = str(tmp_path / die_writing)
    with pytest.raises(Crash):
        _fit(out, tiny_checkpoint, die_writing=die_writing)
    assert lumi.find_checkpoint(out).endswith('ckpt_0000005.pt')  # the step-10 checkpoint never landed
    _fit(out, tiny_checkpoint)  # resumes at step 5 and does step 10 again: its eval improves again
    _best_is_the_best(out)
    assert lumi.load_checkpoint(os.path.join(out, 'best.pt'))['step'] == 10


def test_resume_with_more_steps_extends_the_run_and_says_so(tmp_path, tiny_checkpoint, capsys):
    out = str(tmp_path / 'run')
    assert _fit(out, tiny_checkpoint).endswith('ckpt_0000010.pt')
    capsys.readouterr()
    final = _fit(out, tiny_checkpoint, '--max_iters=15')
    said = capsys.readouterr().out
    assert 'max_iters=15: the checkpoint planned 10 steps; the learning-rate schedule is re-planned over 15' in said
    assert final.endswith('ckpt_0000015.pt') and lumi.load_checkpoint(final)['max_iters'] == 15
    steps = [r['step'] for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r]
    assert steps == list(range(1, 16))
    with pytest.raises(lumi.LumiError, match=r"ckpt_0000015\.pt is at step 15, past max_iters=12"):
        _fit(out, tiny_checkpoint, '--max_iters=12')


def test_resume_from_a_file_that_is_no_training_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(lumi.LumiError, match=r"ckpt_0000000\.pt: not a training checkpoint to resume \(it has no "
                                             r"optimizer, best_val, max_iters, sampler, rng\)"):
        _fit(str(tmp_path / 'r'), tiny_checkpoint, f'--resume={tiny_checkpoint}')
