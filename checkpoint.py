"""
Checkpoints: the one rule for which checkpoint a directory means; what every checkpoint carries besides
weights (its shape, its tokenizer's bytes, the stage that made it); the one loader of a model for inference
(sample.py, serve.py, eval.py, export.py) or as a starting point (sft.py, dpo.py), with the keys that choose
it; merged checkpoints; the facts `lumi.py info` prints.

Also here: the files themselves, written atomically, loadable with weights_only=True, every tensor
checksummed.

Deliberately left out: what a training checkpoint holds to resume (training.py), what an adapter file holds
(lora.py), and any format but torch's own (export.py writes safetensors).
"""
import difflib
import glob
import hashlib
import math
import os
from dataclasses import asdict

import torch

from lora import apply_adapter, apply_lora, check_adapter, merge_lora
from lumi import LumiError, atomic_write, cli, log, read_json, read_jsonl, sha256_bytes, sha256_file, \
    short_repr, split_args
from model import GPT, ModelConfig
from tokenizer import Tokenizer, check_tokenizer

# -----------------------------------------------------------------------------
# the keys that choose a model to run (sample.py, serve.py)
KEY_FILES = ('lumi.py',)   # device and dtype
ckpt = ''                  # checkpoint file or directory; '' = the newest model under out_root and runs_root
adapter = ''               # a LoRA adapter file (sft.py) applied on top of ckpt, or alone (its base_path)
tokenizer = ''             # a tokenizer.model or data dir: refuse a checkpoint built with another tokenizer
out_root = 'out'           # where ckpt='' looks: the stages' out_dirs (out/<name>/)
runs_root = 'runs'         # where ckpt='' looks too: lumi.py run's runs (runs/<config>/<stage>/)

# -----------------------------------------------------------------------------
# which checkpoint a directory means
# A training run leaves ckpt_<step>.pt (step checkpoints, the newest where it ended) and best.pt; sft.py and
# dpo.py also leave merged.pt, the standalone model with any adapters folded in, and adapter.pt.

MERGED = 'merged.pt'


def step_of(name):
    """The step of a step checkpoint's file name (ckpt_0000200.pt -> 200), else None."""
    name = os.path.basename(name)
    digits = name[5:-3]
    return int(digits) if name.startswith('ckpt_') and name.endswith('.pt') and digits.isdigit() else None


def step_path(out_dir, step):
    return os.path.join(out_dir, f'ckpt_{step:07d}.pt')


def latest_step(out_dir):
    """The newest step checkpoint in out_dir (the highest step), or None: where a run resumes."""
    if not os.path.isdir(out_dir):
        return None
    steps = [(step_of(n), n) for n in os.listdir(out_dir) if step_of(n) is not None]
    return os.path.join(out_dir, max(steps)[1]) if steps else None


def checkpoint_of(path):
    """The one rule for the checkpoint a path means: a file is itself; a directory means its merged.pt (the
    finished model of an SFT or DPO run), else its newest step checkpoint (where a training run ended).
    best.pt is one --ckpt=DIR/best.pt away."""
    if not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, MERGED)):
        return os.path.join(path, MERGED)
    found = latest_step(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint (merged.pt or ckpt_<step>.pt) in {path}{could_mean(path)}")
    return found


# the stages of a run, in the order each is tuned from the one before: the folders `lumi.py run` makes in a
# run (runs/<config>/pretrain/, ...), and the stages' default out_dirs (out/pretrain/, out/sft/, out/dpo/)
RUN_STAGES = ('pretrain', 'sft', 'dpo')
# the sample.py flags a run recommends for its models (a small model's repetition penalties), written by
# pipeline.py beside them: a model's folder or its run's
SAMPLE_ARGS = 'sample_args.json'


def model_dirs(root):
    """The folders root/, root/*/ and root/*/*/ that hold a model (checkpoint_of finds one in them)."""
    found = []
    for d in [root] + sorted(glob.glob(os.path.join(root, '*', ''))) + \
            sorted(glob.glob(os.path.join(root, '*', '*', ''))):
        d = os.path.normpath(d)
        if os.path.isfile(os.path.join(d, MERGED)) or latest_step(d):
            found.append(d)
    return found


def newest_checkpoint(*roots):
    """The one rule for the model that ckpt='' means: the newest this checkout made under roots (out_root,
    runs_root), as the checkpoint file checkpoint_of picks in its folder.

    A run (a folder holding stage folders named as RUN_STAGES) offers its last stage: dpo/merged.pt before
    sft's and pretrain's, except a stage older than the one it was tuned from (left from before that one
    ran again). Any other folder offers its own model. Of those, the most recently written wins."""
    offers, runs = {}, {}
    for d in dict.fromkeys(d for root in roots for d in model_dirs(root)):
        parent, name = os.path.split(d)
        if name in RUN_STAGES:
            runs.setdefault(parent, {})[name] = checkpoint_of(d)
        else:
            offers[d] = checkpoint_of(d)
    for run, stages in runs.items():
        last = None
        for stage in (s for s in RUN_STAGES if s in stages):
            if last is None or os.path.getmtime(stages[stage]) >= os.path.getmtime(last):
                last = stages[stage]
        offers[run] = last
    if not offers:
        raise FileNotFoundError(f"no model under {', '.join(r + '/' for r in roots)}: make one (python "
                                f"lumi.py run configs/pipeline_cpu.py; or train.py, sft.py) "
                                f"or pass --ckpt=PATH")
    return max(offers.values(), key=os.path.getmtime)


def recommended_args(path):
    """(flags, file): the sample.py flags recorded beside the model at path (SAMPLE_ARGS in its folder, else
    in its run's), and the file that holds them; ([], None) where there is none."""
    here = os.path.dirname(os.path.normpath(checkpoint_of(path) if os.path.isdir(path) else path))
    for d in dict.fromkeys((here, os.path.dirname(here))):
        found = os.path.join(d, SAMPLE_ARGS)
        if os.path.isfile(found):
            args = read_json(found).get('sample_args', [])
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise LumiError(f"{found}: sample_args must be a list of --key=value strings, got {args!r}")
            return args, found
    return [], None


def could_mean(path, roots=(out_root, runs_root)):
    """The checkpoints that a path which names none could have meant: the .pt files under its nearest
    existing folder and under roots, closest to it first (at most five), as text for an error message."""
    near = os.path.relpath(path)
    while near not in ('', '.') and not os.path.isdir(near):
        near = os.path.dirname(near)
    # below the working directory only: a mistyped absolute path must not walk the whole disk
    where = [near] if near not in ('', '.') and not near.startswith('..') else []
    files = {os.path.normpath(f) for root in dict.fromkeys(where + [r for r in roots if os.path.isdir(r)])
             for depth in range(4) for f in glob.glob(os.path.join(root, *['*'] * depth, '*.pt'))}
    if not files:
        return f"; there is no checkpoint under {', '.join(r + '/' for r in roots)}"
    close = sorted(files, key=lambda f: -difflib.SequenceMatcher(None, os.path.normpath(path), f).ratio())
    return f"; did you mean {', '.join(close[:5])}?"


# -----------------------------------------------------------------------------
# checkpoints on disk: torch files written atomically, every tensor checksummed

def _tensors(obj, prefix=''):
    """(dotted name, tensor) for every tensor in a nested checkpoint, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k != 'tensor_sha256':
                yield from _tensors(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def tensor_sha256(t):
    """SHA256 of a tensor's dtype, shape and bytes (about 2 GB/s: a 60 MB checkpoint costs 0.03 s)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _RecordedFile:
    """A file that remembers why a write failed: torch.save turns the OSError of a full disk into a
    RuntimeError ('unexpected pos 704 vs 598') that no longer says so."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _torch_save(state, f):
    recorded = _RecordedFile(f)
    try:
        torch.save(state, recorded)
    except RuntimeError:
        if recorded.error is None:
            raise
        raise recorded.error from None  # the full disk, which atomic_write says in one line naming the file


def save_checkpoint(path, state):
    """Write state to path atomically, with the SHA256 of every tensor in it, so that a flipped bit is
    found when the file is loaded instead of training or answering on silently wrong weights."""
    state = dict(state, tensor_sha256={name: tensor_sha256(t) for name, t in _tensors(state)})
    atomic_write(path, lambda f: _torch_save(state, f))


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint file, or the one a directory means (checkpoint_of), and verify its tensors' checksums
    (a file saved before they existed loads unchecked). Any file that cannot be used, for
    any reason, is refused in one line naming it (LumiError): not a checkpoint, cut short, pickled objects
    beyond plain data, a tensor whose bytes changed."""
    path = checkpoint_of(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}{could_mean(path)}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch says why in several types: UnpicklingError, RuntimeError, EOFError, ...
        said = (str(e).strip().splitlines() or [type(e).__name__])[0].split('. ')[0][:120]
        if 'Weights only load failed' in said:
            reason = "it holds pickled objects other than tensors and plain data, which Lumi never writes"
        else:
            reason = f"not a torch checkpoint, or cut short ({type(e).__name__}: {said})"
        raise LumiError(f"{path}: cannot load this checkpoint: {reason}") from e
    if not isinstance(ckpt, dict):
        raise LumiError(f"{path}: not a Lumi checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    stored = ckpt.pop('tensor_sha256', None)
    if stored is not None:
        names = dict(_tensors(ckpt))
        if set(names) != set(stored):
            odd = sorted(set(names) ^ set(stored))
            raise LumiError(f"{path}: its tensors differ from those its checksums list "
                            f"({', '.join(odd[:3])}): the file was altered")
        for name, t in names.items():
            if tensor_sha256(t) != stored[name]:
                raise LumiError(f"{path}: tensor '{name}' does not match its checksum: the file is corrupt")
    ckpt['path'] = path
    return ckpt


# -----------------------------------------------------------------------------
# what a checkpoint carries besides weights, and rebuilding its model

def tokenizer_from_checkpoint(ckpt):
    """Every checkpoint carries its tokenizer's bytes, so it is usable on its own. Refuses bytes that are not
    a tokenizer, or that do not match the stored tokenizer_sha256 (which may be the hash of the bytes or
    Tokenizer.sha256)."""
    where = ckpt.get('path', 'checkpoint')
    if not isinstance(ckpt.get('tokenizer'), torch.Tensor):
        raise LumiError(f"{where}: not a Lumi checkpoint: it has no 'tokenizer'")
    raw = ckpt['tokenizer'].numpy().tobytes()
    try:
        tok = Tokenizer(raw)
    except Exception as e:  # sentencepiece raises RuntimeError on bytes that are not a model
        raise LumiError(f"{where}: its stored tokenizer is unusable: {' '.join(str(e).split())[:200]}") from e
    stored = ckpt.get('tokenizer_sha256')
    if stored is not None and stored not in (sha256_bytes(raw), tok.sha256):
        raise LumiError(f"{where}: its tokenizer_sha256 {str(stored)[:12]}… is not the hash of the "
                        f"tokenizer it carries ({sha256_bytes(raw)[:12]}…): the file was altered or "
                        f"assembled from two models")
    return tok


def tokenizer_tensor(tok):
    return torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)


def checkpoint_meta(model, tok, kind, **extra):
    """What every checkpoint carries besides weights, so that it stands alone: the model's shape, its
    tokenizer (bytes and hash), what stage made it, and its LoRA config if it has adapters."""
    return dict(kind=kind, model_args=asdict(model.cfg), tokenizer=tokenizer_tensor(tok),
                tokenizer_sha256=tok.sha256, lora=dict(getattr(model, 'lora_config', None) or {}), **extra)


def check_fit(where, weights, model_args, lora=None, against='its model_args', keys=None):
    """Refuse, in one line naming `where`, tensors whose names and shapes are not those that model_args (and
    lora) imply; keys picks the names to compare (an adapter holds the LoRA tensors alone). The model is
    built on the meta device, shapes without storage, so a crafted n_embd=10**9 or r=10**6 allocates
    nothing."""
    try:
        with torch.device('meta'):
            model = GPT(ModelConfig(**model_args))
            if lora:
                apply_lora(model, **lora)
    except (TypeError, ValueError, AssertionError) as e:
        raise LumiError(f"{where}: {against} do not describe a Lumi model: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if keys is None or keys(k)}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise LumiError(f"{where}: its weights do not fit {against}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    wrong = [f"{k} is {tuple(weights[k].shape)}, expected {s}" for k, s in expected.items()
             if tuple(weights[k].shape) != s]
    if wrong:
        raise LumiError(f"{where}: its weights do not fit {against}: {'; '.join(wrong[:3])}")


def model_from_checkpoint(ckpt, device='cpu'):
    """Rebuild the model a checkpoint describes (adapters included) and load its weights, once check_fit has
    held the shapes its model_args imply against the stored tensors."""
    where = ckpt.get('path', 'checkpoint')
    if not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('model_args'), dict):
        raise LumiError(f"{where}: not a Lumi model checkpoint: it has no 'model' weights and 'model_args'")
    check_fit(where, ckpt['model'], ckpt['model_args'], ckpt.get('lora'), 'its model_args or lora')
    model = GPT(ModelConfig(**ckpt['model_args']))
    if ckpt.get('lora'):
        apply_lora(model, **ckpt['lora'])
    model.load_state_dict(ckpt['model'])
    return model.to(device)



# -----------------------------------------------------------------------------
# merged checkpoints: a model with its adapters folded in, standalone

def save_merged(path, model, tok, kind='sft', **extra):
    """A standalone checkpoint of kind `kind` with every adapter folded into the base weights (merged.pt)."""
    merge_lora(model)
    save_checkpoint(path, dict(checkpoint_meta(model, tok, kind, **extra), model=model.state_dict()))


def merge_adapter(base, adapter_path, out):
    """The merge helper: base + adapter -> one standalone checkpoint with the adapter folded in."""
    base_ckpt = load_checkpoint(base)
    tok = tokenizer_from_checkpoint(base_ckpt)
    adapter = check_adapter(load_checkpoint(adapter_path), adapter_path, base_ckpt['path'], tok)
    model = apply_adapter(model_from_checkpoint(base_ckpt), adapter, adapter_path)
    save_merged(out, model, tok, parent=base_ckpt['path'], parent_sha256=sha256_file(base_ckpt['path']),
                adapter=os.path.abspath(adapter_path))
    log(f"merged {adapter_path} into {base_ckpt['path']} -> {out}")
    return out


# -----------------------------------------------------------------------------
# the one loader: a model for inference, or to fine-tune from

def is_adapter(ckpt):
    return ckpt.get('kind') == 'adapter' or ('lora_state' in ckpt and 'model' not in ckpt)


def load_model(path, device='cpu', dtype='float32', adapter='', tokenizer='', adapters=True, train=False):
    """(model, tokenizer, info): the one way every stage loads a model to run or to fine-tune.

    path is a checkpoint file or directory (checkpoint_of), or an adapter file alone when `adapters` allows it
    (its base is the one it names); `adapter` applies an adapter file on top. LoRA adapters, in the checkpoint
    or in an adapter file, are merged into the base weights: the same outputs at the cost of a plain model.
    The weights are cast to dtype once (autocast would cast every matrix again at every decoding step, which
    costs more than it saves when each step reads each weight once); the RoPE tables stay float32. Unless
    `train`, the model comes frozen and in eval mode. Refuses a `tokenizer` (a tokenizer.model or data dir)
    whose hash differs from the checkpoint's, and an adapter made for another base or tokenizer.

    info is the checkpoint's dict without its weights, plus kind (an adapter pair is 'sft': a chat model),
    adapter (the adapter file applied, or '') and created (the file's time)."""
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = checkpoint_of(path)
    ckpt = load_checkpoint(path)
    if is_adapter(ckpt):
        if not adapters:
            raise ValueError(f"{path} holds adapters only (kind {ckpt.get('kind')!r}); use the merged "
                             f"checkpoint beside it (merged.pt) or merge it onto its base first")
        if adapter:
            raise ValueError(f"{path} is a LoRA adapter; pass its base as --ckpt")
        if not ckpt.get('base_path'):
            raise ValueError(f"adapter {path} does not name its base; pass the base as --ckpt")
        path, adapter = ckpt['base_path'], path
        ckpt = load_checkpoint(path)
    for key in ('model', 'model_args', 'tokenizer', 'tokenizer_sha256'):
        if key not in ckpt:
            raise LumiError(f"{path} is not a Lumi checkpoint: it has no '{key}'")
    tok = tokenizer_from_checkpoint(ckpt)  # refuses bytes that do not match the stored hash
    if tokenizer:
        if os.path.isdir(tokenizer):  # a data dir from data.py
            tokenizer = os.path.join(tokenizer, 'tokenizer', 'tokenizer.model')
        check_tokenizer(Tokenizer.load(tokenizer).sha256, tok.sha256, f"--tokenizer {tokenizer}")
    kind = ckpt.get('kind', 'pretrain')
    if adapter:  # its base is checked before the base's model is built
        state = check_adapter(load_checkpoint(adapter), adapter, ckpt['path'], tok)
    model = model_from_checkpoint(ckpt)
    if adapter:
        apply_adapter(model, state, adapter)
        kind = 'sft'  # an adapter pair is a fine-tuned model: chat
    if tok.vocab_size > model.cfg.vocab_size:
        raise LumiError(f"checkpoint {ckpt['path']}: tokenizer has {tok.vocab_size} tokens, the model "
                        f"{model.cfg.vocab_size}")
    if getattr(model, 'lora_config', None):
        merge_lora(model)
    if not train:
        model.requires_grad_(False)
    for p in model.parameters():  # a tied LM head is the embedding's Parameter: cast once, still tied
        p.data = p.data.to(getattr(torch, dtype))
    info = {k: v for k, v in ckpt.items() if k not in ('model', 'optimizer')}
    info.update(kind=kind, adapter=adapter, created=int(os.path.getmtime(ckpt['path'])))
    model = model.to(device)
    return (model if train else model.eval()), tok, info


# -----------------------------------------------------------------------------
# facts about a checkpoint

def checkpoint_info(path):
    """The facts `lumi.py info` prints, as a dict: kind, shape, parameters, tokenizer, progress, metrics."""
    ckpt = load_checkpoint(path)
    info = dict(path=ckpt['path'], kind=ckpt.get('kind', '?'), bytes=os.path.getsize(ckpt['path']))
    if 'model' not in ckpt:  # an adapter file (sft.py / dpo.py): small, points at its base
        info.update({k: ckpt[k] for k in ('lora', 'base_path', 'base_sha256', 'tokenizer_sha256')
                     if k in ckpt})
        info['adapter_params'] = sum(t.numel() for t in ckpt.get('lora_state', {}).values())
        return info
    model = model_from_checkpoint(ckpt)
    info.update(model_args=ckpt.get('model_args'), params=model.num_params(),
                params_no_embeddings=model.num_params(embeddings=False),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                lora=ckpt.get('lora') or None, tokenizer_sha256=ckpt.get('tokenizer_sha256'),
                vocab_size=tokenizer_from_checkpoint(ckpt).vocab_size if 'tokenizer' in ckpt else None)
    for k in ('step', 'max_iters', 'tokens_seen', 'best_val', 'parent', 'parent_sha256', 'metrics', 'config'):
        if k in ckpt:
            info[k] = ckpt[k]
    log_path = os.path.join(os.path.dirname(ckpt['path']), 'metrics.jsonl')
    if os.path.isfile(log_path):  # the run's log knows more than the checkpoint's last step
        records = read_jsonl(log_path)  # a line cut short by a kill is skipped
        info['last_train'] = next((r for r in reversed(records) if 'loss' in r), None)
        info['last_eval'] = next((r for r in reversed(records) if 'val_loss' in r), None)
    return info


def print_info(info):
    print(f"{info['path']}  ({info['bytes'] / 1e6:.1f} MB)")
    print(f"  kind                {info['kind']}")
    if 'params' not in info:
        for k in ('lora', 'adapter_params', 'base_path', 'base_sha256', 'tokenizer_sha256'):
            if k in info:
                print(f"  {k:<19} {info[k]}")
        return
    a = info['model_args'] or {}
    print(f"  model               {a.get('n_layer')} layers, d {a.get('n_embd')}, {a.get('n_head')} heads "
          f"({a.get('n_kv_head')} kv), ffn {a.get('ffn_hidden')}, context {a.get('block_size')}, "
          f"vocab {a.get('vocab_size')}, {'tied' if a.get('tie_embeddings') else 'untied'} head")
    print(f"  parameters          {info['params']:,} ({info['params_no_embeddings']:,} without embeddings)")
    if info.get('lora'):
        print(f"  lora                {info['lora']} ({info['trainable_params']:,} trainable)")
    print(f"  tokenizer           {info['tokenizer_sha256']} (vocab {info['vocab_size']})")
    if 'step' in info:
        print(f"  step                {info['step']:,} of {info.get('max_iters') or '?'}")
    if 'tokens_seen' in info:
        print(f"  tokens seen         {info['tokens_seen']:,}")
    if 'best_val' in info and math.isfinite(info['best_val']):
        print(f"  best val loss       {info['best_val']:.4f}")
    if info.get('parent'):
        print(f"  parent              {info['parent']}")
    for key, name in (('metrics', 'checkpoint metrics'), ('last_train', 'last train step'),
                      ('last_eval', 'last eval')):
        if info.get(key):
            print(f"  {name:<19} " + ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in info[key].items()))
    if info.get('config'):
        print("  config")
        for k in sorted(info['config']):
            print(f"    {k:<26} {short_repr(info['config'][k])}")



# -----------------------------------------------------------------------------
# `python lumi.py info CKPT` (or python checkpoint.py CKPT)

def main(argv):
    pos, flags = split_args(argv, {})
    if len(pos) != 1 or flags:
        raise LumiError("usage: python lumi.py info CKPT")
    info = checkpoint_info(pos[0])
    print_info(info)
    return info


if __name__ == '__main__':
    cli(main, {}, "usage: python lumi.py info CKPT   (config, parameters, tokenizer, tokens seen, "
                  "last metrics)")
