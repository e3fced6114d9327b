"""
Checkpoints that cannot be used are refused in one line naming the file (checkpoint.load_checkpoint,
model_from_checkpoint, tokenizer_from_checkpoint): tensor checksums written at save and verified at load,
a tokenizer hash that does not match the tokenizer bytes, model_args that do not fit the stored tensors
(checked on the meta device, before anything is allocated). And the training loop's checkpoints: best.pt
consistent after a kill at any write, a resume asked for more steps than its checkpoint planned.
"""
import os
import subprocess
import sys

import pytest
import torch

import lora
import checkpoint
import lumi
import model as model_py
from lora import apply_lora
from tokenizer import BOS_ID, CHAT_TOKENS, check_tokenizer


def _ckpt(tiny_checkpoint, **changes):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
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
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    stored = torch.load(tiny_checkpoint, weights_only=True)['tensor_sha256']
    # every tensor, nested ones by dotted name
    assert 'model.tok_emb.weight' in stored and 'tokenizer' in stored
    assert 'tensor_sha256' not in ckpt  # verified, then out of the caller's way
    path = str(tmp_path / 'flipped.pt')
    checkpoint.save_checkpoint(path, _ckpt(tiny_checkpoint))
    name = next(k for k in ckpt['model'] if k.endswith('mlp.up_proj.weight'))
    _flip_a_bit(path, ckpt['model'][name])
    with pytest.raises(lumi.LumiError, match=rf"{path}: tensor 'model\.{name}' does not match its checksum"):
        checkpoint.load_checkpoint(path)


def test_a_checkpoint_saved_before_checksums_still_loads(tmp_path, tiny_checkpoint):
    old = _ckpt(tiny_checkpoint)
    path = str(tmp_path / 'old.pt')
    torch.save(old, path)  # what save_checkpoint wrote before checksums: no tensor_sha256
    loaded = checkpoint.load_checkpoint(path)
    a, b = (checkpoint.model_from_checkpoint(loaded),
            checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tiny_checkpoint)))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_tensor_added_or_removed_after_saving_is_refused(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state['model']['extra'] = torch.zeros(3)
    path = str(tmp_path / 'added.pt')
    torch.save(state, path)
    with pytest.raises(lumi.LumiError, match=r"added\.pt: its tensors differ from those its checksums list "
                                             r"\(model\.extra\)"):
        checkpoint.load_checkpoint(path)


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
        checkpoint.load_checkpoint(path)
    assert str(e.value).startswith(path) and '\n' not in str(e.value)


# -----------------------------------------------------------------------------
# the tokenizer and the model a checkpoint describes

def test_a_tokenizer_hash_that_does_not_match_its_bytes_is_refused(tmp_path, tiny_checkpoint, tokenizer):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    raw = ckpt['tokenizer'].numpy().tobytes()
    for accepted in (lumi.sha256_bytes(raw), tokenizer.sha256):  # what Tokenizer.sha256 means may change
        assert (checkpoint.tokenizer_from_checkpoint(dict(ckpt, tokenizer_sha256=accepted)).vocab_size
                == tokenizer.vocab_size)
    with pytest.raises(lumi.LumiError,
                       match=r"ckpt_0000000\.pt: its tokenizer_sha256 aaaaaaaaaaaa… is not the hash"):
        checkpoint.tokenizer_from_checkpoint(dict(ckpt, tokenizer_sha256='a' * 64))
    with pytest.raises(lumi.LumiError, match='its stored tokenizer is unusable'):
        checkpoint.tokenizer_from_checkpoint(dict(ckpt, tokenizer=torch.tensor([1, 2, 3], dtype=torch.uint8)))


def test_crafted_model_args_are_refused_before_anything_is_allocated(tiny_checkpoint, monkeypatch):
    built_on = []
    real_init = model_py.GPT.__init__

    def spy(self, cfg):
        built_on.append(torch.get_default_device().type)
        real_init(self, cfg)
    monkeypatch.setattr(model_py.GPT, '__init__', spy)
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    huge = dict(ckpt, model_args=dict(ckpt['model_args'], n_embd=1 << 16, n_head=4, ffn_hidden=1 << 18))
    with pytest.raises(lumi.LumiError,
                       match=r"ckpt_0000000\.pt: its weights do not fit its model_args or lora: "
                             r"tok_emb\.weight is \(512, 64\), expected \(512, 65536\)"):
        checkpoint.model_from_checkpoint(huge)
    assert built_on == ['meta']  # 65536 wide would have been 9 GB of float32
    checkpoint.model_from_checkpoint(ckpt)
    assert built_on == ['meta', 'meta', 'cpu']


def test_an_adapter_with_a_crafted_lora_config_is_refused_before_allocating(tmp_path, tiny_checkpoint,
                                                                            tokenizer, monkeypatch):
    from lora import apply_lora
    model = apply_lora(checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tiny_checkpoint)),
                       r=2, alpha=4.0, targets=('q',))
    path = str(tmp_path / 'adapter.pt')
    checkpoint.save_checkpoint(path, lora.adapter_state(model, tiny_checkpoint, tokenizer))
    adapter = checkpoint.load_checkpoint(path)
    del adapter['path']
    checkpoint.save_checkpoint(path, dict(adapter, lora=dict(adapter['lora'], r=1 << 20)))
    real_apply = lora.apply_lora
    applied_on = []
    def spy(m, **kw):
        applied_on.append(m.tok_emb.weight.device.type)
        return real_apply(m, **kw)
    monkeypatch.setattr(lora, 'apply_lora', spy)
    with pytest.raises(lumi.LumiError,
                       match=r"adapter\.pt: its weights do not fit its base .*ckpt_0000000\.pt with "
                             r"its lora config: layers\.0\.attn\.q_proj\.lora_a is \(2, 64\), "
                             r"expected \(1048576, 64\)"):
        checkpoint.load_model(tiny_checkpoint, adapter=path)
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
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    ckpt = dict(ckpt, model=dict(ckpt['model']), model_args=dict(ckpt['model_args']))
    change(ckpt)
    with pytest.raises(lumi.LumiError, match=message) as e:
        checkpoint.model_from_checkpoint(ckpt)
    assert str(e.value).startswith(ckpt['path'])


# -----------------------------------------------------------------------------
# the training loop: best.pt after a kill, a resume asked for more steps


def test_load_refuses_another_tokenizer_and_finds_checkpoints(tmp_path, lively_checkpoint, tokenizer):
    import sentencepiece as spm
    (tmp_path / 'c.txt').write_text("completely different text for another tokenizer\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / 'c.txt'), model_prefix=str(tmp_path / 'other'), vocab_size=300, model_type='bpe',
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=list(CHAT_TOKENS),
        minloglevel=2)
    with pytest.raises(ValueError, match='must match'):
        checkpoint.load_model(lively_checkpoint, tokenizer=str(tmp_path / 'other.model'))
    _, tok, info = checkpoint.load_model(os.path.dirname(lively_checkpoint),
                                         tokenizer=tok_path(tokenizer, tmp_path))
    assert tok.sha256 == tokenizer.sha256 and info['kind'] == 'pretrain' and info['path'] == lively_checkpoint
    with pytest.raises(FileNotFoundError):
        checkpoint.newest_checkpoint(str(tmp_path / 'nothing'))


def tok_path(tok, tmp_path):
    path = tmp_path / 'same.model'
    path.write_bytes(tok.proto)
    return str(path)


def test_base_plus_adapter_equals_the_lora_model(tmp_path, lively_checkpoint, tokenizer):
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(lively_checkpoint)).eval()
    apply_lora(model, r=4, alpha=8.0, targets=('q', 'v', 'down'))
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if 'lora_b' in name:
            p.data.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    path = str(tmp_path / 'adapter.pt')
    checkpoint.save_checkpoint(path, lora.adapter_state(model, lively_checkpoint, tokenizer))
    idx = torch.tensor([[BOS_ID] + torch.randint(8, 512, (19,),
                                                 generator=torch.Generator().manual_seed(1)).tolist()])
    with torch.no_grad():
        want = model(idx)[0]
        for merged, _, info in [checkpoint.load_model(lively_checkpoint, adapter=path),
                                checkpoint.load_model(path)]:
            torch.testing.assert_close(merged(idx)[0], want, rtol=1e-4, atol=1e-4)
            assert info['kind'] == 'sft' and info['adapter'] == path and info['path'] == lively_checkpoint
    adapter = torch.load(path, weights_only=True)
    checkpoint.save_checkpoint(path, dict(adapter, tokenizer_sha256='0' * 64))
    with pytest.raises(ValueError, match='tokenizer'):
        checkpoint.load_model(lively_checkpoint, adapter=path)


# -----------------------------------------------------------------------------
# which checkpoint a directory means, loading, and `lumi.py info`


def test_checkpoint_round_trip_and_newest(tmp_path, tokenizer, tiny_checkpoint):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    for step in (5, 40, 7):
        checkpoint.save_checkpoint(str(tmp_path / f'ckpt_{step:07d}.pt'), dict(ckpt, step=step))
    (tmp_path / 'ckpt_notes.pt').write_text('not a step checkpoint')
    assert checkpoint.latest_step(str(tmp_path)).endswith('ckpt_0000040.pt')
    newest = checkpoint.load_checkpoint(str(tmp_path))
    assert newest['step'] == 40 and checkpoint.tokenizer_from_checkpoint(newest).sha256 == tokenizer.sha256
    a, b = checkpoint.model_from_checkpoint(ckpt), checkpoint.model_from_checkpoint(newest)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        checkpoint.load_checkpoint(str(tmp_path / 'missing.pt'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r'no checkpoint \(merged\.pt or ckpt_<step>\.pt\) in'):
        checkpoint.load_checkpoint(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match='must match'):
        check_tokenizer('a' * 64, tokenizer.sha256, 'train.bin')


def test_info_reports_the_checkpoint(tmp_path, tokenizer, tiny_checkpoint, capsys):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    model = checkpoint.model_from_checkpoint(ckpt)
    path = tmp_path / 'ckpt_0000042.pt'
    checkpoint.save_checkpoint(str(path), dict(ckpt, step=42, max_iters=50, tokens_seen=12345, best_val=3.5,
                                         metrics={'loss': 3.25}, config={'batch_size': 8}))
    lumi.append_jsonl(str(tmp_path / 'metrics.jsonl'),
                      {'step': 42, 'loss': 3.25, 'lr': 1e-4, 'tokens': 12345})
    lumi.append_jsonl(str(tmp_path / 'metrics.jsonl'), {'step': 42, 'tokens': 12345, 'val_loss': 3.5})
    info = checkpoint.main([str(tmp_path)])
    assert info['params'] == model.num_params() and info['params_no_embeddings'] == model.num_params(False)
    assert info['tokens_seen'] == 12345 and info['step'] == 42 and info['kind'] == 'pretrain'
    assert info['tokenizer_sha256'] == tokenizer.sha256 and info['vocab_size'] == tokenizer.vocab_size
    assert info['last_eval']['val_loss'] == 3.5
    out = capsys.readouterr().out
    assert (f"{model.num_params():,}" in out and tokenizer.sha256 in out and '12,345' in out
            and 'batch_size' in out)


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path):
    # issue 28: a full disk while saving a checkpoint ended in a 39-line traceback: torch.save turns the
    # file's OSError into a RuntimeError ('unexpected pos ...'). A file size limit fails writes the same way
    # (EFBIG) without needing a tmpfs, in a child process.
    path = tmp_path / 'ckpt.pt'
    script = f"""
import resource, signal, sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import checkpoint, lumi
checkpoint.save_checkpoint({str(path)!r}, {{'w': torch.zeros(1000)}})  # 4 KB: fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
lumi.guard(lambda argv: checkpoint.save_checkpoint({str(path)!r}, {{'w': torch.zeros(1_000_000)}}), [])
"""
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip() == f"error: cannot write {path}: File too large (the previous file is unchanged)"
    assert checkpoint.load_checkpoint(str(path))['w'].shape == (1000,)
    assert os.listdir(tmp_path) == ['ckpt.pt']
