"""
What every Lumi stage shares: configuration, the tokenizer and chat template, checkpoints, device and
distributed setup, logging, and the training loop that train.py, sft.py and dpo.py all run.

Deliberately left out: anything one stage alone needs (data formats live in data.py, the model in model.py).
The core never imports a stage at module level; the end-to-end command imports them inside the function
that runs them.
"""
import ast
import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

# -----------------------------------------------------------------------------
# configuration: plain Python files plus --key=value overrides, as in nanoGPT

CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


class Config(dict):
    """A dict whose keys also read as attributes: cfg.batch_size."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def config_defaults(namespace):
    """The configurable values of a stage: its lowercase module-level constants of plain types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and type(v) in CONFIG_TYPES}


def _coerce(key, value, default, known, where):
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if type(value) is type(default):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise ValueError(f"{where}: '{key}' must be {type(default).__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}. Known keys: {', '.join(sorted(known))}")


def load_config(defaults, argv=None):
    """Apply an optional config file (the first argument not starting with --), then --key=value overrides.

    A config file is one Python file read by several stages (configs/tiny.py drives data, model and
    training), so its keys that this stage does not know are ignored. An override on the command line is
    meant for this stage: an unknown key there is an error. Both are type-checked against the default.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = Config(defaults)
    files = [a for a in argv if not a.startswith('--')]
    if len(files) > 1:
        raise ValueError(f"expected at most one config file, got {files}")
    if files:
        path = files[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        namespace = {}
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)
        for key, value in config_defaults(namespace).items():
            if key in cfg:
                cfg[key] = _coerce(key, value, defaults[key], defaults, path)
        cfg['config_file'] = path
    for arg in argv:
        if not arg.startswith('--'):
            continue
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in defaults:
            raise ValueError(f"unknown config key '{key}'. Known keys: {', '.join(sorted(defaults))}")
        if not eq:  # a bare --flag means True
            value = True
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --device=cpu
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 stays a string
        cfg[key] = _coerce(key, value, defaults[key], defaults, f"--{key}")
    return cfg


# -----------------------------------------------------------------------------
# files: atomic writes, hashes, JSON lines

def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write_fn, mode='wb'):
    """Write a file so that a crash leaves either the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str), mode='w')


def read_json(path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def log(msg, rank=None):
    """Print from rank 0 only, flushed, so logs of a torchrun job read like a single process."""
    if (rank if rank is not None else int(os.environ.get('RANK', 0))) == 0:
        print(msg, flush=True)


# -----------------------------------------------------------------------------
# tokenizer and chat template
# The ids of the special tokens are fixed when the tokenizer is trained (data.py), so SFT and DPO never
# resize the embeddings: pad 0, unk 1, bos 2, eos 3, then the chat markers in this order.

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
ROLES = ('system', 'user', 'assistant')


class Tokenizer:
    """A frozen SentencePiece model; its SHA256 (of the serialized model) names it everywhere."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        self.sha256 = sha256_bytes(self.proto)
        self.vocab_size = self.sp.get_piece_size()
        self.role_id = {role: self.sp.piece_to_id(f'<|{role}|>') for role in ROLES}
        self.end_id = self.sp.piece_to_id('<|end|>')
        for name, i in [('pad', PAD_ID), ('unk', UNK_ID), ('bos', BOS_ID), ('eos', EOS_ID)]:
            if getattr(self.sp, f'{name}_id')() != i:
                raise ValueError(f"tokenizer {self.sha256[:12]}: {name} id is {getattr(self.sp, f'{name}_id')()}, "
                                 f"Lumi expects {i}; retrain it with data.py")
        if self.end_id == UNK_ID or UNK_ID in self.role_id.values():
            raise ValueError(f"tokenizer {self.sha256[:12]} lacks the chat tokens {CHAT_TOKENS}")

    @classmethod
    def load(cls, path):
        with open(path, 'rb') as f:
            return cls(f.read())

    def encode(self, text):
        return self.sp.encode(text)

    def encode_batch(self, texts, num_threads=-1):
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i))


def render_chat(tok, messages, add_generation_prompt=False):
    """The one chat template: BOS, then <|role|> content <|end|> per message.

    Returns (ids, mask) where mask is 1 exactly on the tokens the model must learn to produce: each
    assistant reply and the <|end|> that closes it. With add_generation_prompt the ids end in
    <|assistant|>, ready for sampling until <|end|>.
    """
    ids, mask = [BOS_ID], [0]
    for i, m in enumerate(messages):
        role, content = m.get('role'), m.get('content')
        if role not in tok.role_id:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        body = tok.encode(content) + [tok.end_id]
        learn = 1 if role == 'assistant' else 0
        ids += [tok.role_id[role]] + body
        mask += [0] + [learn] * len(body)
    if add_generation_prompt:
        ids.append(tok.role_id['assistant'])
        mask.append(0)
    return ids, mask


# -----------------------------------------------------------------------------
# checkpoints: one torch file, written atomically, loadable with weights_only=True

def save_checkpoint(path, state):
    torch_save = lambda f: torch.save(state, f)
    atomic_write(path, torch_save)


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint file, or the newest checkpoint in a directory."""
    if os.path.isdir(path):
        found = find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    ckpt['path'] = path
    return ckpt


def find_checkpoint(out_dir):
    """The newest step checkpoint in out_dir (ckpt_<step>.pt), or None."""
    if not os.path.isdir(out_dir):
        return None
    steps = [(int(n[5:-3]), n) for n in os.listdir(out_dir)
             if n.startswith('ckpt_') and n.endswith('.pt') and n[5:-3].isdigit()]
    return os.path.join(out_dir, max(steps)[1]) if steps else None


def tokenizer_from_checkpoint(ckpt):
    """Every checkpoint carries its tokenizer's bytes, so it is usable on its own."""
    return Tokenizer(ckpt['tokenizer'].numpy().tobytes())


def tokenizer_tensor(tok):
    return torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)


def check_tokenizer(expected_sha, actual_sha, what):
    if expected_sha != actual_sha:
        raise ValueError(f"{what} was built with tokenizer {str(expected_sha)[:12]}…, but this model's "
                         f"tokenizer is {str(actual_sha)[:12]}…; they must match (re-run data.py or pick "
                         f"the matching checkpoint)")


def checkpoint_meta(model, tok, kind, **extra):
    """What every checkpoint carries besides weights, so that it stands alone: the model's shape, its
    tokenizer (bytes and hash), what stage made it, and its LoRA config if it has adapters."""
    from dataclasses import asdict
    return dict(kind=kind, model_args=asdict(model.cfg), tokenizer=tokenizer_tensor(tok),
                tokenizer_sha256=tok.sha256, lora=dict(getattr(model, 'lora_config', None) or {}), **extra)


def model_from_checkpoint(ckpt, device='cpu'):
    """Rebuild the model a checkpoint describes (adapters included) and load its weights."""
    from model import GPT, ModelConfig, apply_lora  # model.py imports nothing from lumi.py
    model = GPT(ModelConfig(**ckpt['model_args']))
    if ckpt.get('lora'):
        apply_lora(model, **ckpt['lora'])
    model.load_state_dict(ckpt['model'])
    return model.to(device)


# -----------------------------------------------------------------------------
# device, precision, seeding, distributed

def pick_device(name='auto'):
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    return 'cpu'


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, dtype_name):
    """bf16 autocast where asked; 'float32' runs plain. (fp16 would need a grad scaler; Lumi uses bf16.)"""
    if dtype_name in ('bfloat16', 'bf16'):
        return torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16)
    if dtype_name not in ('float32', 'fp32'):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype_name!r}")
    return nullcontext()


def setup_distributed(device_name='auto'):
    """Initialise torch.distributed when launched by torchrun; returns (device, rank, local_rank, world)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_name)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
    return device, rank, local_rank, world


def rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state()[1].tolist(),
             'numpy_pos': int(np.random.get_state()[2]), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(('MT19937', np.array(state['numpy'], dtype=np.uint32), state['numpy_pos'], 0, 0.0))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -----------------------------------------------------------------------------
# the training loop shared by train.py, sft.py and dpo.py: each stage brings a model, a batch source with
# state_dict()/load_state_dict(), a loss function and an evaluation; the loop brings the optimizer, the
# schedule, accumulation, clipping, precision, compile, DDP, progress, metrics and exact resume.

TRAINING_DEFAULTS = dict(
    out_dir='out/run',
    device='auto',            # auto: cuda when present, else cpu
    dtype='auto',             # auto: bfloat16 on CUDA, float32 on CPU; or 'bfloat16' / 'float32'
    compile=False,
    seed=1337,
    batch_size=8,             # sequences per micro-step on each process
    gradient_accumulation_steps=1,
    max_iters=0,              # optimizer steps; 0 lets the stage derive it (e.g. from a token budget)
    max_minutes=0.0,          # > 0: a wall-clock cap; the schedule is fitted to the steps that fit in it
    learning_rate=1e-3,
    min_lr=1e-4,
    lr_schedule='cosine',     # cosine | wsd (warmup-stable-decay) | constant
    warmup_iters=20,
    decay_frac=0.2,           # wsd: the fraction of steps spent decaying at the end
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    eval_interval=100,
    eval_iters=20,
    ckpt_interval=100,
    keep_last=2,              # step checkpoints kept besides best.pt
    resume='auto',            # auto: continue from the newest checkpoint in out_dir; never; or a path
    peak_flops=0.0,           # for MFU; 0 guesses from the device
)


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters: matrices decay, norms and vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    # the fused kernel exists for CUDA and CPU; on a 2-core CPU it steps the tiny model's 14.7M parameters
    # ~8x faster than the per-tensor loop (0.017 s against 0.14 s)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.split(':')[0] in ('cuda', 'cpu'))


def lr_at(step, max_iters, cfg):
    """Linear warmup, then cosine to min_lr, or flat then a linear decay over the last decay_frac (wsd)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == 'constant':
        return cfg.learning_rate
    if cfg.lr_schedule == 'wsd':
        decay_start = int(max_iters * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.learning_rate
        frac = (step - decay_start) / max(1, max_iters - decay_start)
        return cfg.learning_rate + min(frac, 1.0) * (cfg.min_lr - cfg.learning_rate)
    if cfg.lr_schedule != 'cosine':
        raise ValueError(f"lr_schedule must be cosine, wsd or constant, got {cfg.lr_schedule!r}")
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


def guess_peak_flops(device, dtype):
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        dense_bf16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, '4090': 165e12}
        peak = next((v for k, v in dense_bf16.items() if k in name), 100e12)
        return peak if dtype == 'bfloat16' else peak / 2
    # a nominal figure for a recent x86 core with AVX-512: 2 FMA units x 16 fp32 lanes x 2 x ~2.5 GHz; bf16
    # dot products (AVX512-BF16) do twice the multiply-adds per instruction
    return torch.get_num_threads() * 160e9 * (2 if dtype == 'bfloat16' else 1)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class TrainingDiverged(RuntimeError):
    pass


def resolve_dtype(cfg, device):
    if cfg.dtype == 'auto':
        return 'bfloat16' if device.startswith('cuda') else 'float32'
    return cfg.dtype


def fit(cfg, model, batches, loss_fn, evaluate=None, meta=None, on_start=None):
    """Train model and return the path of the final checkpoint.

    batches: has next_batch(), state_dict() and load_state_dict(); loss_fn(model, batch) returns the loss
    or (loss, stats) where stats is a dict of floats to log (and 'tokens', the tokens the batch trained);
    evaluate(model) returns a dict of held-out metrics, 'val_loss' among them for the best checkpoint;
    meta is stored in every checkpoint (model_args, tokenizer, kind, ...). The model must already be on
    the device. on_start(step) runs once after resume, before the first step.
    """
    from tqdm import tqdm
    device, rank, _, world = setup_distributed(cfg.device)
    dtype = resolve_dtype(cfg, device)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    raw = model
    optimizer = make_optimizer(raw, cfg, device)
    step, tokens_seen, best_val, max_iters = 0, 0, float('inf'), cfg.max_iters

    ckpt_path = None
    if cfg.resume == 'auto':
        ckpt_path = find_checkpoint(cfg.out_dir)
    elif cfg.resume != 'never':
        ckpt_path = cfg.resume
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        raw.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        step, tokens_seen, best_val = ckpt['step'], ckpt['tokens_seen'], ckpt['best_val']
        max_iters = ckpt['max_iters']
        sampler = ckpt['sampler']
        batches.load_state_dict(sampler[rank] if isinstance(sampler, list) else sampler)
        set_rng_state(ckpt['rng'][rank] if isinstance(ckpt['rng'], list) else ckpt['rng'])
        if master and os.path.exists(metrics_path):  # drop what was logged after the checkpoint
            kept = [r for r in read_jsonl(metrics_path) if r.get('step', 0) <= step]
            atomic_write(metrics_path, lambda f: f.writelines(json.dumps(r) + '\n' for r in kept), mode='w')
        log(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    model = raw
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)
    peak = cfg.peak_flops or guess_peak_flops(device, dtype)
    flops_per_token = raw.flops_per_token() if hasattr(raw, 'flops_per_token') else 0

    def run_eval():
        if evaluate is None:
            return {}
        raw.eval()
        with torch.no_grad(), autocast(device, dtype):
            out = evaluate(raw)
        raw.train()
        if world > 1 and out:  # ranks must agree on `improved`, or only some of them enter save()'s gather
            import torch.distributed as dist
            keys = sorted(k for k, v in out.items() if isinstance(v, (int, float)))
            t = torch.tensor([float(out[k]) for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            out = dict(out, **{k: t[i].item() / world for i, k in enumerate(keys)})
        return out

    def save(path_step, val_metrics, last_metrics):
        samplers, rngs = batches.state_dict(), rng_state()
        if world > 1:
            import torch.distributed as dist
            gathered = [None] * world
            dist.all_gather_object(gathered, (samplers, rngs))
            samplers, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        if not master:
            return None
        state = dict(meta or {}, model=raw.state_dict(), optimizer=optimizer.state_dict(), step=path_step,
                     max_iters=max_iters, tokens_seen=tokens_seen, best_val=best_val, sampler=samplers,
                     rng=rngs, config=dict(cfg), metrics=dict(last_metrics, **val_metrics))
        path = os.path.join(cfg.out_dir, f'ckpt_{path_step:07d}.pt')
        save_checkpoint(path, state)
        old = sorted(n for n in os.listdir(cfg.out_dir) if n.startswith('ckpt_') and n.endswith('.pt'))
        for name in old[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            os.remove(os.path.join(cfg.out_dir, name))
        return path, state

    if on_start is not None:
        on_start(step)
    t_start = time.time()
    budget_s = cfg.max_minutes * 60
    replan = budget_s > 0 and not ckpt_path  # fit the schedule to the clock; a resumed run keeps its plan
    planned, cap, recent = False, max_iters or 10**12, []  # recent: the last step times, for the plan
    last, final_path = {}, ckpt_path  # resuming a finished run returns the checkpoint it resumed
    raw.train()
    bar = tqdm(total=max_iters or None, initial=step, disable=not master, dynamic_ncols=True, desc=cfg.out_dir)
    eval_s, resumed_at = 0.0, step if ckpt_path else -1
    while True:
        # evaluate and checkpoint on schedule, and at the end; the step we resumed at was done before
        done = bool(max_iters and step >= max_iters)
        if budget_s > 0 and not done:  # the clock is a safety net past the plan; every rank must agree on it
            over = torch.tensor(float(time.time() - t_start > budget_s * 1.05), device=device)
            if world > 1:
                import torch.distributed as dist
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            done = bool(over.item())
        if step == resumed_at:
            pass
        elif step % cfg.eval_interval == 0 or done:
            t0 = time.time()
            val = run_eval()
            eval_s = time.time() - t0
            if val and master:
                append_jsonl(metrics_path, dict(step=step, tokens=tokens_seen, **val))
                bar.write(f"step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float)))
            improved = 'val_loss' in val and val['val_loss'] < best_val
            if improved:
                best_val = val['val_loss']
            if step > 0 and (improved or step % cfg.ckpt_interval == 0 or done):
                saved = save(step, val, last)
                if saved:
                    final_path = saved[0]
                    if improved:
                        save_checkpoint(os.path.join(cfg.out_dir, 'best.pt'), saved[1])
        elif step % cfg.ckpt_interval == 0:
            saved = save(step, {}, last)
            final_path = saved[0] if saved else final_path
        if done:
            break

        lr = lr_at(step, max_iters or 1, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        loss_sum, stats_sum, step_tokens = 0.0, {}, 0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = _to_device(batches.next_batch(), device)
            sync = micro == cfg.gradient_accumulation_steps - 1
            ctx = model.no_sync() if world > 1 and not sync else nullcontext()
            with ctx, autocast(device, dtype):
                out = loss_fn(model, batch)
                loss, stats = out if isinstance(out, tuple) else (out, {})
                (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.item()
            step_tokens += int(stats.pop('tokens', batch[0].numel() if isinstance(batch, (list, tuple)) else 0))
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        loss_val = loss_sum / cfg.gradient_accumulation_steps
        if world > 1:
            import torch.distributed as dist
            t = torch.tensor([loss_val, step_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            loss_val, step_tokens = t[0].item() / world, int(t[1].item())
        if not math.isfinite(loss_val):
            bar.close()
            good = find_checkpoint(cfg.out_dir)
            raise TrainingDiverged(f"loss is {loss_val} at step {step}: stopping. The last good checkpoint "
                                   f"{good or '(none yet)'} is untouched; lower learning_rate or raise warmup_iters.")
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        step += 1
        if step > 1:  # the first step is not timed: it holds torch.compile's compilation (~30 s on 2 cores)
            recent = (recent + [dt])[-10:]
        tokens_seen += step_tokens
        tps = step_tokens / max(dt, 1e-9)
        last = dict(step=step, loss=loss_val, lr=lr, tokens=tokens_seen, tokens_per_sec=round(tps, 1),
                    mfu=round(flops_per_token * tps / peak, 5),
                    **{k: v / cfg.gradient_accumulation_steps for k, v in stats_sum.items()})
        if grad_norm is not None:
            last['grad_norm'] = float(grad_norm)
        if master:
            append_jsonl(metrics_path, last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * last['mfu']:.1f}%")
        if replan and len(recent) >= max(2, min(10, cfg.warmup_iters // 2)):
            # fit the schedule to the clock: steps left = (time left - the final eval) / (step time + the evals
            # to come), planned again after every step from the last ten, so that a machine that slows down
            # midway (a shared one does) still finishes its cosine on time instead of being cut off high
            per_step = sum(recent) / len(recent)
            left = budget_s - (time.time() - t_start) - eval_s
            n = max(0, int(left / (per_step + eval_s / max(1, cfg.eval_interval))))
            if world > 1:  # rank 0's plan for all: ranks that stopped at different steps would hang
                import torch.distributed as dist
                t = torch.tensor([n], dtype=torch.int64, device=device)
                dist.broadcast(t, 0)
                n = int(t.item())
            max_iters = max(step, min(cap, step + n))
            bar.total = max_iters
            if not planned:
                log(f"max_minutes={cfg.max_minutes}: {per_step:.3f}s a step, planning {max_iters} steps")
            planned = True
    bar.close()
    if master:
        write_loss_plot(cfg.out_dir)  # defined with the command line below; it never raises
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return final_path


# =============================================================================
# the lab's command line: `python lumi.py run | export | plot | info`. Nothing above calls into it, except
# fit(), which draws loss.svg at the end of a run.

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# pictures: loss (and learning rate) against tokens as a hand-written SVG, one polyline per series

PALETTE = ('#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2')
MAX_PLOT_POINTS = 5000  # a longer series keeps every k-th point (its first and last included)


def _nice_ticks(lo, hi, count=5):
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _fmt_tick(v, step):
    if v == 0:
        return '0'
    if abs(v) >= 1e9:
        return f"{v / 1e9:g}B"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3 and step >= 100:
        return f"{v / 1e3:g}k"
    return f"{round(v, 12):.3g}"


def _thin(points):
    if len(points) <= MAX_PLOT_POINTS:
        return points
    k = math.ceil(len(points) / MAX_PLOT_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def plot_series(runs):
    """From (label, metrics records) pairs, the series to draw: per run its train loss, val loss and LR
    against tokens (or steps when the records lack token counts)."""
    x_key = 'tokens' if all('tokens' in r for _, recs in runs for r in recs) else 'step'
    series = []
    for i, (label, recs) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        for panel, key, name, dashed in (('loss', 'loss', 'train loss', False), ('loss', 'val_loss', 'val loss', True),
                                         ('lr', 'lr', 'learning rate', False)):
            pts = [(float(r[x_key]), float(r[key])) for r in recs
                   if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                series.append(dict(run=label, name=name, panel=panel, color=color, dashed=dashed, points=_thin(pts)))
    return x_key, series


def plot_svg(runs, path, title=''):
    """Draw loss against tokens (top panel) and the learning rate (bottom) for one or several runs.

    runs: (label, records) pairs, records as in metrics.jsonl. Written without matplotlib: axes, ticks,
    labels, a legend and one <polyline> per series, which carries data-run and data-series attributes so
    that a reader (or a test) can find each curve. Returns path.
    """
    from xml.sax.saxutils import escape, quoteattr
    x_key, series = plot_series(runs)
    if not series:
        raise ValueError("nothing to plot: the runs have no loss, val_loss or lr records")
    W, left, right, top = 1000, 80, 250, 50
    panels = {'loss': (top, 300), 'lr': (top + 300 + 70, 140)}  # panel -> (y of its top, height)
    H = panels['lr'][0] + panels['lr'][1] + 60
    pw = W - left - right
    xs = [x for s in series for x, _ in s['points']]
    xticks = _nice_ticks(min(xs), max(xs), 6)
    x0, x1 = xticks[0], xticks[-1]
    X = lambda x: left + (x - x0) / (x1 - x0) * pw
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="28" font-size="16" font-weight="bold">{escape(title or "Lumi training curves")}</text>']
    for panel, (py, ph) in panels.items():
        ps = [s for s in series if s['panel'] == panel]
        ys = [y for s in ps for _, y in s['points']] or [0.0, 1.0]
        yticks = _nice_ticks(min(ys), max(ys), 5)
        y0, y1 = yticks[0], yticks[-1]
        Y = lambda y, py=py, ph=ph, y0=y0, y1=y1: py + ph - (y - y0) / (y1 - y0) * ph
        out.append(f'<g class="panel" data-panel="{panel}">')
        out.append(f'<rect x="{left}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
        ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1
        for t in yticks:
            y = Y(t)
            out.append(f'<line x1="{left}" y1="{y:.2f}" x2="{left + pw}" y2="{y:.2f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.2f}" text-anchor="end">{_fmt_tick(t, ystep)}</text>')
        xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1
        for t in xticks:
            x = X(t)
            out.append(f'<line x1="{x:.2f}" y1="{py}" x2="{x:.2f}" y2="{py + ph}" stroke="#f0f0f0"/>')
            out.append(f'<text x="{x:.2f}" y="{py + ph + 16}" text-anchor="middle">{_fmt_tick(t, xstep)}</text>')
        out.append(f'<text x="{left + pw / 2}" y="{py + ph + 34}" text-anchor="middle">{x_key}</text>')
        label = 'loss (nats/token)' if panel == 'loss' else 'learning rate'
        out.append(f'<text transform="translate({left - 58},{py + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{label}</text>')
        for s in ps:
            pts = ' '.join(f"{X(x):.2f},{Y(y):.2f}" for x, y in s['points'])
            dash = ' stroke-dasharray="6,4"' if s['dashed'] else ''
            out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="1.6"{dash} '
                       f'data-run={quoteattr(s["run"])} data-series="{s["name"]}" points="{pts}"/>')
            if s['dashed'] or len(s['points']) == 1:  # evals are few: mark each; a lone point needs a dot
                out += [f'<circle cx="{X(x):.2f}" cy="{Y(y):.2f}" r="2.8" fill="{s["color"]}"/>'
                        for x, y in s['points']]
        out.append('</g>')
    ly, lx = top + 10, left + pw + 20  # the legend, right of the panels: each run, then its loss curves
    for label, _ in runs:
        mine = [s for s in series if s['run'] == label and s['panel'] == 'loss']
        if not mine:
            continue
        out.append(f'<text x="{lx}" y="{ly + 4}" font-weight="bold" fill="{mine[0]["color"]}">'
                   f'{escape(label if len(label) <= 30 else "…" + label[-29:])}</text>')
        ly += 18
        for s in mine:
            dash = ' stroke-dasharray="6,4"' if s['dashed'] else ''
            out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 28}" y2="{ly}" stroke="{s["color"]}" stroke-width="2"{dash}/>')
            out.append(f'<text x="{lx + 34}" y="{ly + 4}">{s["name"]}, last {s["points"][-1][1]:.3f}</text>')
            ly += 18
        ly += 8
    out.append('</svg>')
    text = '\n'.join(out) + '\n'
    atomic_write(path, lambda f: f.write(text), mode='w')
    return path


def _run_label(path):
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path)) if path.endswith('.jsonl') else os.path.basename(path)


def read_run(path):
    """(label, records) of a run directory or a metrics.jsonl file."""
    metrics = os.path.join(path, 'metrics.jsonl') if os.path.isdir(path) else path
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    records = []
    with open(metrics) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # a line cut by a kill: skip it, say so
                log(f"{metrics}:{n}: skipped a malformed line ({e.msg})")
    return _run_label(path), records


def write_loss_plot(out_dir):
    """fit()'s picture at the end of a run: out_dir/loss.svg. Never lets a plotting problem fail training."""
    try:
        path = plot_svg([read_run(out_dir)], os.path.join(out_dir, 'loss.svg'), title=f"{out_dir}")
        log(f"wrote {path}")
    except Exception as e:  # noqa: BLE001 - a picture is never worth a failed run
        log(f"could not draw {out_dir}/loss.svg: {type(e).__name__}: {e}")


# -----------------------------------------------------------------------------
# facts about a checkpoint

def _short(value, width=100):
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 1] + '…'


def checkpoint_info(path):
    """The facts `lumi.py info` prints, as a dict: kind, shape, parameters, tokenizer, progress, metrics."""
    ckpt = load_checkpoint(path)
    info = dict(path=ckpt['path'], kind=ckpt.get('kind', '?'), bytes=os.path.getsize(ckpt['path']))
    if 'model' not in ckpt:  # an adapter file (sft.py / dpo.py): small, points at its base
        info.update({k: ckpt[k] for k in ('lora', 'base_path', 'base_sha256', 'tokenizer_sha256') if k in ckpt})
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
        records = read_run(log_path)[1]
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
    for key, name in (('metrics', 'checkpoint metrics'), ('last_train', 'last train step'), ('last_eval', 'last eval')):
        if info.get(key):
            print(f"  {name:<19} " + ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in info[key].items()))
    if info.get('config'):
        print("  config")
        for k in sorted(info['config']):
            print(f"    {k:<26} {_short(info['config'][k])}")


# -----------------------------------------------------------------------------
# the whole lab in one command: data -> pretrain -> eval -> SFT -> eval -> DPO -> eval -> a sample.
# Each stage runs as the subprocess a user would type, so an interrupted run resumes through the stage's
# own --resume=auto. A stamp (<stage dir>/.lumi_stage.json) records the hash of what the stage read: its
# resolved config, the data's meta.json and its parent checkpoint. Done with the same inputs: skipped.
# Started with the same inputs but never finished: run again, which resumes. Other inputs: started afresh.

PIPELINE_DEFAULTS = dict(
    run_dir='',                       # '' -> runs/<config name>; one folder per stage inside
    train_config='',                  # what data.py and train.py read; '' -> the config file given to `run`
    sft_config='configs/sft_tiny.py',  # skipped when it does not exist (sft.py's defaults then)
    dpo_config='configs/dpo_tiny.py',
    data_dir='',                      # '' -> the train config's data_dir
    pretrain_minutes=0.0,             # > 0: train.py --max_minutes (the LR schedule is fitted to it)
    sft_minutes=0.0,
    dpo_minutes=0.0,
    data_args=[], pretrain_args=[], sft_args=[], dpo_args=[], eval_args=[], sample_args=[],  # --key=value per stage
    eval_tasks='ppl,boolq,piqa,siqa,openbookqa,commonsenseqa',  # after pretraining
    tuned_eval_tasks='ppl,boolq',     # after SFT and after DPO: did tuning keep what pretraining learned
    eval_limit=0,                     # > 0: examples per choice task (and ppl windows) in these evals
    sample_prompt='What should I read to learn about the sea?',
    sample_tokens=64,
    stages='data,pretrain,eval_pretrain,sft,eval_sft,dpo,eval_dpo,sample',
)
PIPELINE_STAGES = ('data', 'pretrain', 'eval_pretrain', 'sft', 'eval_sft', 'dpo', 'eval_dpo', 'sample')
STAGE_SCRIPT = {'data': 'data', 'pretrain': 'train', 'eval_pretrain': 'eval', 'sft': 'sft', 'eval_sft': 'eval',
                'dpo': 'dpo', 'eval_dpo': 'eval', 'sample': 'sample'}
STAMP = '.lumi_stage.json'


class PipelineError(RuntimeError):
    pass


def stage_defaults(script):
    """The keys a stage script resolves its config against: its module constants over the training loop's."""
    import importlib
    try:
        mod = importlib.import_module(script)
    except ModuleNotFoundError as e:
        if e.name != script:
            raise
        raise PipelineError(f"stage {script}.py is missing from {ROOT}: the pipeline needs every stage") from None
    base = dict(TRAINING_DEFAULTS) if script in ('train', 'sft', 'dpo') else {}
    return {**base, **config_defaults(vars(mod))}


def _digest(obj):
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def _fingerprint(path, known=None):
    """path's sha256, reusing a known fingerprint when size and mtime are unchanged (a rerun stays fast)."""
    st = os.stat(path)
    if known and known.get('path') == path and known.get('size') == st.st_size and known.get('mtime_ns') == st.st_mtime_ns:
        return known
    return dict(path=path, sha256=sha256_file(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _flag_key(arg):
    return arg[2:].partition('=')[0].replace('-', '_')


class Pipeline:
    """The stages of one `lumi.py run`, their inputs and products, and the stamps that make reruns cheap."""

    def __init__(self, argv):
        files = [a for a in argv if not a.startswith('--')]
        flags = [a for a in argv if a.startswith('--')]
        own = [a for a in flags if _flag_key(a) in PIPELINE_DEFAULTS]
        self.cfg = cfg = load_config(PIPELINE_DEFAULTS, files + own)
        self.config_file = files[0] if files else ''
        name = os.path.splitext(os.path.basename(self.config_file))[0] or 'default'
        self.run_dir = cfg.run_dir or os.path.join('runs', name)
        self.stages = [s.strip() for s in cfg.stages.split(',') if s.strip()]
        bad = [s for s in self.stages if s not in PIPELINE_STAGES]
        if bad:
            raise PipelineError(f"unknown stage(s) {bad} in --stages; the stages are {', '.join(PIPELINE_STAGES)}")
        # every script is imported now, so that a missing stage fails before hours of pretraining
        self.defaults = {s: stage_defaults(s) for s in dict.fromkeys(STAGE_SCRIPT.values())}
        self.routed = {s: [] for s in self.defaults}
        for arg in flags:  # an override the pipeline does not know goes to each stage that does
            if arg in own:
                continue
            targets = [s for s in self.defaults if _flag_key(arg) in self.defaults[s]]
            if not targets:
                raise PipelineError(f"unknown key '{_flag_key(arg)}': neither a pipeline key "
                                    f"({', '.join(sorted(PIPELINE_DEFAULTS))}) nor a key of any stage")
            for s in targets:
                self.routed[s].append(arg)
        self.train_config = cfg.train_config or self.config_file
        self.sft_config = self._optional_config(cfg.sft_config, 'sft_config')
        self.dpo_config = self._optional_config(cfg.dpo_config, 'dpo_config')
        base = load_config(self.defaults['train'], [self.train_config] if self.train_config else [])
        self.data_dir = cfg.data_dir or base.data_dir
        self.report = {}

    def _optional_config(self, path, key):
        if path and not os.path.isfile(path):
            if path == PIPELINE_DEFAULTS[key]:
                return ''  # the default file is optional: the stage's own defaults then
            raise PipelineError(f"--{key}: config file not found: {path}")
        return path

    def dir(self, stage):
        return os.path.join(self.run_dir, stage)

    def stamp(self, stage):
        path = os.path.join(self.dir(stage), STAMP)
        return read_json(path) if os.path.isfile(path) else None

    def product(self, stage):
        """The fingerprint of a finished stage's output, for the stages after it."""
        stamp = self.stamp(stage)
        if not stamp or not stamp.get('done') or not os.path.exists(stamp['product']['path']):
            raise PipelineError(f"stage {stage} has not finished in {self.run_dir}: include it in --stages")
        return _fingerprint(stamp['product']['path'], stamp['product'])

    # --- what each stage reads, and the command line that runs it

    def _resolved(self, script, args):
        cfg = load_config(self.defaults[script], args)
        return {k: v for k, v in cfg.items() if k not in ('config_file', 'resume')}

    def _trainer_args(self, stage, config, minutes, extra, forced):
        script = STAGE_SCRIPT[stage]
        args = ([config] if config else []) + ([f'--max_minutes={minutes}'] if minutes > 0 else [])
        return args + list(extra) + self.routed[script] + forced + ['--resume=auto']

    def command(self, stage):
        """(script, argv, inputs): the stage's command line and everything its result depends on."""
        c, D = self.cfg, self.data_dir
        if stage == 'data':
            argv = ([self.train_config] if self.train_config else []) + list(c.data_args) + \
                self.routed['data'] + [f'--data_dir={D}']
            return 'data', argv, {'config': self._resolved('data', argv)}
        data = self.product('data')['sha256']
        if stage == 'pretrain':
            argv = self._trainer_args(stage, self.train_config, c.pretrain_minutes, c.pretrain_args,
                                      [f'--data_dir={D}', f'--out_dir={self.dir(stage)}'])
            return 'train', argv, {'config': self._resolved('train', argv), 'data': data}
        if stage in ('sft', 'dpo'):
            parent = self.product('pretrain' if stage == 'sft' else 'sft')
            config, minutes, extra = ((self.sft_config, c.sft_minutes, c.sft_args) if stage == 'sft'
                                      else (self.dpo_config, c.dpo_minutes, c.dpo_args))
            forced = [f'--init_from={parent["path"]}', f'--out_dir={self.dir(stage)}']
            argv = self._trainer_args(stage, config, minutes, extra, forced)
            return stage, argv, {'config': self._resolved(stage, argv), 'parent': parent['sha256']}
        if stage.startswith('eval_'):
            parent = self.product(stage[len('eval_'):])
            tasks = c.eval_tasks if stage == 'eval_pretrain' else c.tuned_eval_tasks
            argv = [parent['path'], f'--tasks={tasks}', f'--data_dir={D}'] + \
                ([f'--limit={c.eval_limit}'] if c.eval_limit > 0 else []) + list(c.eval_args) + \
                self.routed['eval'] + [f"--out={os.path.join(self.dir(stage), 'report.json')}"]
            return 'eval', argv, {'argv': argv, 'parent': parent['sha256'], 'data': data}
        if stage == 'sample':
            parent = self.product(self.last_model_stage())
            argv = [f'--ckpt={parent["path"]}', f'--prompt={c.sample_prompt}', f'--max_new_tokens={c.sample_tokens}',
                    '--temperature=0'] + list(c.sample_args) + self.routed['sample']
            return 'sample', argv, {'argv': argv, 'parent': parent['sha256']}
        raise PipelineError(f"unknown stage {stage}")

    def last_model_stage(self):
        done = [s for s in ('dpo', 'sft', 'pretrain') if (self.stamp(s) or {}).get('done')]
        if not done:
            raise PipelineError("no model stage has finished: nothing to sample from")
        return done[0]

    def find_product(self, stage):
        d = self.dir(stage)
        if stage == 'data':
            import data
            return os.path.join(self.data_dir, 'meta.json') if data.data_ready(self.data_dir) else None
        if stage == 'pretrain':
            return find_checkpoint(d)
        if stage in ('sft', 'dpo'):
            merged = os.path.join(d, 'merged.pt')
            return merged if os.path.isfile(merged) else find_checkpoint(d)
        name = 'reply.txt' if stage == 'sample' else 'report.json'
        return os.path.join(d, name) if os.path.isfile(os.path.join(d, name)) else None

    # --- running

    def run_stage(self, stage):
        """Skip, resume or (re)start one stage; returns what happened: skipped, ran, resumed or restarted."""
        script, argv, inputs = self.command(stage)
        key = _digest(inputs)
        d, stamp = self.dir(stage), self.stamp(stage)
        product = self.find_product(stage)
        if stamp and stamp['inputs'] == key and stamp.get('done') and product:
            log(f"[{stage}] up to date: skipped ({product})")
            return 'skipped'
        if stamp and stamp['inputs'] == key and not stamp.get('done'):
            status = 'resumed'
            log(f"[{stage}] was interrupted: running it again, it resumes from its newest checkpoint")
        elif stamp:
            status = 'restarted'
            why = 'its output is gone' if stamp['inputs'] == key else 'its inputs changed (config, data or parent)'
            log(f"[{stage}] {why}: starting it afresh")
            if stage != 'data':  # a stage folder holds only what the pipeline made there
                import shutil
                shutil.rmtree(d)
        else:
            status = 'ran'
            if stage != 'data' and os.path.isdir(d) and os.listdir(d):
                raise PipelineError(f"{d} exists but was not made by `lumi.py run`; move it or pick another --run_dir")
        os.makedirs(d, exist_ok=True)
        write_json(os.path.join(d, STAMP), dict(stage=stage, inputs=key, done=False, argv=argv, started=time.time()))
        import subprocess
        cmd = [sys.executable, os.path.join(ROOT, f'{script}.py')] + argv
        log(f"[{stage}] $ python {script}.py " + ' '.join(_quote(a) for a in argv))
        t0 = time.time()
        if stage == 'sample':  # its stdout is the reply, kept for the summary
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            print(proc.stdout, end='', flush=True)
            if proc.returncode == 0:
                atomic_write(os.path.join(d, 'reply.txt'), lambda f: f.write(proc.stdout), mode='w')
        else:
            proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise PipelineError(f"stage {stage} failed (python {script}.py exited with {proc.returncode}); fix the "
                                f"cause and run the same command again: finished stages are skipped")
        product = self.find_product(stage)
        if not product:
            raise PipelineError(f"stage {stage} exited 0 but left no output in {d}")
        write_json(os.path.join(d, STAMP), dict(stage=stage, inputs=key, done=True, argv=argv, finished=time.time(),
                                                seconds=round(time.time() - t0, 1), product=_fingerprint(product)))
        return status

    def run(self):
        import signal

        def terminated(*_):  # a kill stops the running stage too (subprocess.run kills it on any exception)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, terminated)
        t0 = time.time()
        log(f"lumi run: {', '.join(self.stages)} -> {self.run_dir} (data {self.data_dir})")
        for stage in self.stages:
            self.report[stage] = self.run_stage(stage)
        summary = self.summary(time.time() - t0)
        print(summary, flush=True)
        atomic_write(os.path.join(self.run_dir, 'summary.md'), lambda f: f.write(summary), mode='w')
        return summary

    # --- the summary table

    def _done(self, stage):
        return bool((self.stamp(stage) or {}).get('done'))

    def _report(self, stage):
        path = os.path.join(self.dir(stage), 'report.json')
        return read_json(path) if self._done(stage) and os.path.isfile(path) else None

    def _metrics(self, stage):
        path = os.path.join(self.dir(stage), 'metrics.jsonl')
        return read_run(path)[1] if self._done(stage) and os.path.isfile(path) else []

    def summary(self, seconds):
        lines = [f"# Lumi run: {self.run_dir}", "",
                 f"config {self.config_file or '(defaults)'}, data {self.data_dir}, {seconds:.1f}s this time", "",
                 "| stage | this run | took |", "|---|---|---|"]
        for s in PIPELINE_STAGES:
            st = self.stamp(s)
            took = f"{st['seconds']:.0f}s" if st and st.get('seconds') is not None else '-'
            lines.append(f"| {s} | {self.report.get(s, 'not selected')} | {took} |")
        lines.append("")
        pre = (self.stamp('pretrain') or {}).get('product')
        if pre and os.path.isfile(pre['path']):
            info = checkpoint_info(pre['path'])
            lines += [f"- parameters: {info['params']:,} ({info['params_no_embeddings']:,} without embeddings)",
                      f"- tokens seen in pretraining: {info.get('tokens_seen', 0):,} in {info.get('step', 0):,} steps"]
        evals = [(s, self._report(s)) for s in ('eval_pretrain', 'eval_sft', 'eval_dpo')]
        evals = [(s[len('eval_'):], r) for s, r in evals if r]
        if evals:
            limit = self.cfg.eval_limit
            lines += ["", "Evaluation" + (f" (at most {limit} examples per set here; `python eval.py` runs whole sets)"
                                           if limit else " (whole sets)") + ":", "",
                      "| task | metric | " + " | ".join(name for name, _ in evals) + " | baseline |",
                      "|---|---|" + "---|" * len(evals) + "---|"]
            order = (self.cfg.eval_tasks + ',' + self.cfg.tuned_eval_tasks).split(',')
            tasks = sorted({t for _, r in evals for t in r if t != 'meta' and isinstance(r[t], dict)},
                           key=lambda t: (order.index(t) if t in order else len(order), t))
            for t in tasks:
                if t == 'ppl':
                    source = next(r[t].get('source', '') for _, r in evals if t in r)
                    base = ''
                    if source.endswith('.bin') and os.path.isfile(source):  # the loss of a context-blind model
                        import train
                        base = f"{train.unigram_entropy(source, 1 << 16):.4f} (unigram entropy of val.bin)"
                    for k, name, b in (('loss', 'val loss', base), ('bpb', 'bits per byte', '')):
                        vals = [f"{r[t][k]:.4f}" if t in r and k in r[t] else '-' for _, r in evals]
                        lines.append(f"| ppl | {name} | " + " | ".join(vals) + f" | {b} |")
                elif any('accuracy' in r.get(t, {}) for _, r in evals):
                    vals = [f"{r[t]['accuracy']:.3f} ± {r[t].get('stderr', 0):.3f}" if t in r else '-' for _, r in evals]
                    first = next(r[t] for _, r in evals if t in r)
                    base = f"{first.get('baseline', float('nan')):.3f} majority, {first.get('random_baseline', float('nan')):.3f} random"
                    lines.append(f"| {t} (n={first.get('n', '?')}) | accuracy | " + " | ".join(vals) + f" | {base} |")
        def trained(records):
            last = next((r for r in reversed(records) if 'loss' in r), None)
            return f" ({last['step']:,} steps, {last.get('tokens', 0):,} tokens)" if last else ''
        sft = self._metrics('sft')
        held = [r for r in sft if 'val_loss' in r]
        if held:
            lines.append(f"\n- SFT held-out assistant loss: {held[0]['val_loss']:.4f} at step {held[0]['step']} -> "
                         f"{held[-1]['val_loss']:.4f} at step {held[-1]['step']}" + trained(sft))
        dpo = self._metrics('dpo')
        held = [r for r in dpo if 'val_reward_accuracy' in r]
        if held:
            first, last = held[0], held[-1]
            lines.append(f"- DPO held-out preference accuracy: {first['val_reward_accuracy']:.3f} at step "
                         f"{first['step']} -> {last['val_reward_accuracy']:.3f} at step {last['step']}, reward "
                         f"margin {last.get('val_reward_margin', float('nan')):.3f}" + trained(dpo))
        reply_path = os.path.join(self.dir('sample'), 'reply.txt')
        if os.path.isfile(reply_path):
            with open(reply_path) as f:
                reply = f.read().strip()
            lines += ["", f"Sample ({self.cfg.sample_prompt!r}, greedy):", "", "> " + reply.replace('\n', '\n> ')]
        try:
            final = self.product(self.last_model_stage())['path']
            lines += ["", "Chat with the result:", "", f"    python sample.py --ckpt={final}"]
        except PipelineError:
            pass
        return '\n'.join(lines) + '\n'


def _quote(arg):
    import shlex
    return shlex.quote(arg)


def run_pipeline(argv):
    """`lumi.py run [CONFIG] [--key=value ...]`: every stage in order; returns the summary text."""
    return Pipeline(argv).run()


# -----------------------------------------------------------------------------
# entry point

USAGE = """usage: python lumi.py COMMAND ...
  run [CONFIG] [--key=value ...]     every stage in order: data, pretrain, eval, SFT, eval, DPO, eval, a sample
  export CKPT OUT [--format=hf|pt]   a Hugging Face Llama directory (safetensors) or a plain state dict
  plot RUN [RUN ...] [--out=FILE]    train/val loss and LR against tokens as an SVG
  info CKPT                          config, parameters, tokenizer, tokens seen, last metrics"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # run as a script, this file is __main__; the stages it imports must find it as `lumi`, not load it again
    sys.modules.setdefault('lumi', sys.modules[__name__])
    if not argv or argv[0] not in ('run', 'export', 'plot', 'info'):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    try:
        if command == 'run':
            return run_pipeline(rest)
        if command == 'export':
            import export
            return export.main(rest)
        if command == 'plot':
            runs = [a for a in rest if not a.startswith('--')]
            if not runs:
                sys.exit("usage: python lumi.py plot RUN [RUN ...] [--out=FILE.svg]")
            cfg = load_config({'out': '', 'title': ''}, [a for a in rest if a.startswith('--')])
            out = cfg.out or (os.path.join(runs[0], 'loss.svg') if len(runs) == 1 and os.path.isdir(runs[0])
                              else 'loss.svg')
            path = plot_svg([read_run(r) for r in runs], out, title=cfg.title or ', '.join(map(os.path.normpath, runs)))
            log(f"wrote {path}")
            return path
        pos = [a for a in rest if not a.startswith('--')]
        if len(pos) != 1:
            sys.exit("usage: python lumi.py info CKPT")
        info = checkpoint_info(pos[0])
        print_info(info)
        return info
    except KeyboardInterrupt:
        log("\ninterrupted: run the same command again to resume")
        sys.exit(130)
    except (PipelineError, FileNotFoundError, ValueError) as e:
        log(f"error: {e}")
        sys.exit(1)


if __name__ == '__main__':
    main()
