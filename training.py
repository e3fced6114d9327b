"""
The training loop that train.py, sft.py and dpo.py all run, in named steps: a Trainer holds one run's state
(model, optimizer, batches, step, tokens seen, best val loss) and offers `train_step`, `evaluate_and_save` and
`replan` (on `evaluate`, `save` and `plan_budget`); `fit` is the short loop that calls them. Each stage brings
a model, a batch source with next_batch()/state_dict()/load_state_dict(), a loss function and an evaluation;
the loop brings the optimizer, the schedule, accumulation, clipping, precision, compile, DDP, progress,
metrics and exact resume. Also here: the loop's keys, AdamW's groups, the learning-rate schedule, the peak
FLOP/s behind MFU, the unigram entropy of a bin (the val loss of a model that ignores context), and what SFT
and DPO share: the LM head at target positions only (target_logits) and epochs of planned batches
(EpochBatches).

Deliberately left out: what a stage trains on or how it scores (train.py, sft.py, dpo.py), and the optimizer
and learning-rate schedule themselves (optim.py).
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import curves
import lumi
from optim import lr_at, make_optimizer, set_lr
from checkpoint import latest_step, load_checkpoint, save_checkpoint, step_of, step_path
from lumi import LumiError, append_jsonl, atomic_write, autocast, loss_scaler, read_jsonl, resolve_compile, \
    resolve_dtype, setup_distributed

# -----------------------------------------------------------------------------
# the training loop's keys, which train.py, sft.py and dpo.py take (KEY_FILES) and may set otherwise
KEY_FILES = ('lumi.py', 'optim.py')  # device and dtype; the optimizer (adamw or muon) and its groups
out_dir = 'out/run'         # where checkpoints, metrics.jsonl and loss.svg go
compile = 'auto'            # auto: torch.compile on CUDA, and on a CPU where it pays (bf16 native, one batch
                            # shape, max_minutes >= 3: lumi.resolve_compile); True / False
activation_checkpointing = False  # keep each block's input alone and recompute its activations in the
                                  # backward: less memory (docs/BENCHMARKS.md, "Memory"), a second forward
seed = 1337                 # [0, inf) seeds init, batches and dropout; a resumed run restores its RNGs
batch_size = 8              # [1, inf) sequences per micro-step on each process
gradient_accumulation_steps = 1  # [1, inf) micro-steps per optimizer step
max_iters = 0               # [0, inf) optimizer steps; 0 lets the stage derive it (e.g. from a token budget)
max_minutes = 0.0           # [0, inf) > 0: a wall-clock cap; the schedule is fitted to the steps that
                            # fit in it
learning_rate = 1e-3        # [0, inf) peak AdamW learning rate, after warmup
min_lr = 1e-4               # [0, inf) where cosine and wsd end
lr_schedule = 'cosine'      # cosine | wsd (warmup-stable-decay) | constant
warmup_iters = 20           # [0, inf) steps of linear warmup
decay_frac = 0.2            # [0, 1] wsd: the fraction of steps spent decaying at the end
weight_decay = 0.1          # [0, inf) AdamW decay on matrices (norms and vectors never decay)
beta1 = 0.9                 # [0, 1) AdamW's first-moment decay
beta2 = 0.95                # [0, 1) AdamW's second-moment decay
grad_clip = 1.0             # [0, inf) clip the gradient norm to this; 0 is off
eval_interval = 100         # [1, inf) steps between held-out evaluations
eval_iters = 20             # [0, inf) held-out batches per evaluation
ckpt_interval = 100         # [1, inf) steps between step checkpoints (an improved val loss saves too)
keep_last = 2               # [0, inf) step checkpoints kept besides best.pt
resume = 'auto'             # auto: continue from the newest checkpoint in out_dir; never; or a path
peak_flops = 0.0            # [0, inf) for MFU; 0 guesses from the device
# (this key takes the name `log` in this file: its messages go through lumi.log)
log = ''                    # trackers fed metrics.jsonl's scalars too: a comma list of tensorboard,
                            # wandb; '' is none (curves.Trackers)


def cpu_facts():
    """(vendor, flags, MHz) from /proc/cpuinfo: what the CPU peak is derived from. Empty where it is
    missing."""
    facts = {}
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                key, _, value = line.partition(':')
                facts.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    mhz = float(facts.get('cpu MHz') or 0)
    try:  # the rated maximum, where the kernel exposes it, beats the momentary clock
        with open('/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq', encoding='utf-8') as f:
            mhz = int(f.read()) / 1000
    except (OSError, ValueError):
        pass
    return facts.get('vendor_id', ''), set(facts.get('flags', '').split()), mhz


def cpu_peak_flops(flags, mhz, cores, dtype, vendor=''):
    """Nominal dense peak of `cores` x86 cores and how it was derived: 2 FMA units x fp32 lanes x 2 FLOPs x
    clock.

    Lanes come from the widest vector unit: 16 with AVX-512, 8 with AVX2/FMA, 4 otherwise. AMD Zen 4 runs a
    512-bit op as two 256-bit halves (it lacks Zen 5's avx512_vp2intersect), so it counts 8. bf16 counts twice
    the fp32 rate only where the CPU has AVX512-BF16 dot products; elsewhere torch emulates bf16 on fp32
    units."""
    lanes = 16 if 'avx512f' in flags else 8 if {'avx2', 'fma'} <= flags else 4
    if lanes == 16 and vendor == 'AuthenticAMD' and 'avx512_vp2intersect' not in flags:
        lanes = 8
    ghz = (mhz or 2500) / 1000
    bf16 = 2 if dtype == 'bfloat16' and 'avx512_bf16' in flags else 1
    peak = cores * 2 * lanes * 2 * ghz * 1e9 * bf16
    how = (f"{cores} core(s) x 2 FMA x {lanes} fp32 lanes x 2 x {ghz:.2f} GHz"
           f"{' x 2 (avx512_bf16)' if bf16 > 1 else ''}"
           f"{'' if mhz else ' (clock unknown: 2.5 GHz assumed)'} = {peak / 1e9:,.0f} GFLOP/s")
    return peak, how


def guess_peak_flops(device, dtype):
    """(peak FLOP/s, how it was found) for MFU: a table of GPUs, or the CPU's flags and clock."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        # dense bf16 (fp16 as fast), and fp16 on the GPUs without bf16 units
        dense_half = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, '4090': 165e12,
                      'T4': 65e12, 'V100': 125e12}
        peak = next((v for k, v in dense_half.items() if k in name), 100e12)
        peak = peak if dtype in ('bfloat16', 'float16') else peak / 2
        return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s dense {dtype}"
    # the cores used: torch's threads, but no more than this process may run on
    cores = min(torch.get_num_threads(),
                len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 1)
    vendor, flags, mhz = cpu_facts()
    return cpu_peak_flops(flags, mhz, cores, dtype, vendor)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# every generator a step draws from (Python's, numpy's, torch's, CUDA's), saved in each checkpoint so that a
# resumed run draws what the uninterrupted one would have

def rng_state():
    """The state of every random generator a training step may draw from."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state()[1].tolist(),
             'numpy_pos': int(np.random.get_state()[2]), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state['mps'] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(('MT19937', np.array(state['numpy'], dtype=np.uint32), state['numpy_pos'], 0, 0.0))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if 'mps' in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state['mps'])


class TrainingDiverged(LumiError, RuntimeError):
    pass


def unigram_entropy(path, vocab_size):
    """Entropy in nats/token of the token frequencies in a bin: the val loss of the best model that ignores
    context, which a language model must get far below."""
    counts = np.bincount(np.memmap(path, dtype=np.uint16, mode='r'), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# what a plan costs: its duration on this machine, measured, and how often it reads its data

# the ETA is the median of the last ETA_STEPS step times (a step slowed by a neighbour moves it not at all; a
# machine slowed for good moves it within ~25), said once MEASURED_STEPS steps after the first are timed
ETA_STEPS, MEASURED_STEPS, MAX_PASSES = 50, 5, 4  # past MAX_PASSES over its data a model learns it by heart


def plan_seconds(step, max_iters, step_s, eval_interval, eval_s):
    """Seconds the rest of a plan takes: the steps from step to max_iters at step_s each, and the held-out
    evaluations still to come (one every eval_interval steps, and one at the end) at eval_s each."""
    evals = max_iters // eval_interval - step // eval_interval + (max_iters % eval_interval != 0)
    return max(0, max_iters - step) * step_s + max(0, evals) * eval_s


def duration(s):
    """A duration in words: '45 s', '12.5 minutes', '40.2 hours', '3.1 days'."""
    size, unit = (1, 's') if s < 90 else (60, 'minutes') if s < 5400 else (3600, 'hours') if s < 172800 \
        else (86400, 'days')
    return f"{s / size:.{0 if size == 1 else 1}f} {unit}"


def passes_warning(planned, available, unit, data, advice=''):
    """A line saying that a plan of `planned` units (tokens, batches, pairs) reads the `available` ones of its
    data more than MAX_PASSES times over, or ''."""
    short = lambda n: f"{n / 1e6:.{1 if n < 1e7 else 0}f}M" if n >= 1e6 else f"{n:,.0f}"
    return '' if planned <= MAX_PASSES * available else (
        f"{short(planned)} {unit} is {planned / available:.0f} passes over {data}'s {short(available)}: "
        f"expect overfitting" + (f"; {advice}" if advice else ''))


# -----------------------------------------------------------------------------
# what the fine-tuning stages share: the LM head at target positions only, and epochs of planned batches

def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def target_logits(model, idx, targets):
    """The LM head's logits at the positions that have a target (targets != -1) only: (N, V), in row order.
    Prompts and padding need no logits, and with a 32768-token vocabulary the head is the largest part of a
    small model's step (~57 % of a tiny LoRA step's FLOPs: 2 x 32768 x 256 a token forward, as much for dx),
    so SFT learns and DPO scores with the head run where they need it."""
    hidden = model(idx, return_hidden=True)  # through the DDP / compile wrappers, so they see the forward
    return unwrap(model).lm_head(hidden[targets != -1])


class EpochBatches:
    """Shuffled passes over fixed examples, as training.fit reads them: a subclass's plan(epoch) gives an
    epoch's batches (lists of example indices), the same on every rank, each rank takes every world-th of the
    usable ones, and collate(index) makes a batch. state_dict() is the (epoch, position) to resume at
    exactly."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world = rank, world_size
        self.epoch, self.pos = 0, 0
        self.batches = self._mine(0)

    def plan(self, epoch):
        raise NotImplementedError

    def collate(self, index):
        raise NotImplementedError

    def _mine(self, epoch):
        batches = self.plan(epoch)
        usable = len(batches) - len(batches) % self.world  # every rank takes as many steps
        return batches[self.rank:usable:self.world]

    def __len__(self):
        return len(self.batches)

    def next_batch(self):
        if self.pos >= len(self.batches):  # the remainder waits for the next epoch's shuffle
            self.epoch, self.pos = self.epoch + 1, 0
            self.batches = self._mine(self.epoch)
        index = self.batches[self.pos]
        self.pos += 1
        return self.collate(index)

    def state_dict(self):
        return {'epoch': self.epoch, 'pos': self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = int(state['epoch']), int(state['pos'])
        self.batches = self._mine(self.epoch)


# -----------------------------------------------------------------------------
# one run, in named steps

class Trainer:
    """One training run: set up (distributed, precision, optimizer, resume from out_dir, compile, DDP) when
    made; then train_step, evaluate, save and plan_budget, which fit calls on schedule and a benchmark may
    call alone.

    batches: has next_batch(), state_dict() and load_state_dict(); loss_fn(model, batch) returns the loss or
    (loss, stats) where stats is a dict of floats to log (and 'tokens', the tokens the batch trained);
    evaluate(model) returns a dict of held-out metrics, 'val_loss' among them for the best checkpoint; meta is
    stored in every checkpoint (model_args, tokenizer, kind, ...). The model must already be on the device."""

    def __init__(self, cfg, model, batches, loss_fn, evaluate=None, meta=None):
        self.cfg, self.raw, self.batches, self.loss_fn, self.eval_fn, self.meta = \
            cfg, model, batches, loss_fn, evaluate, meta
        self.device, self.rank, _, self.world = setup_distributed(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.scaler = loss_scaler(self.device, self.dtype)  # float16's; the other dtypes pass through it
        self.skipped = 0  # float16 steps skipped because their gradients overflowed
        model.activation_checkpointing = cfg.activation_checkpointing
        self.master = self.rank == 0
        os.makedirs(cfg.out_dir, exist_ok=True)
        if self.master:  # a kill during a checkpoint write leaves its temp file; it was never a checkpoint
            for name in os.listdir(cfg.out_dir):
                if name.startswith(('ckpt_', 'best.pt')) and '.tmp.' in name:
                    os.remove(os.path.join(cfg.out_dir, name))
        self.metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
        self.optimizer = make_optimizer(model, cfg, self.device, self.dtype)
        self.step, self.tokens_seen, self.best_val, self.max_iters = 0, 0, float('inf'), cfg.max_iters
        self.resumed_from = None
        if cfg.resume == 'auto':
            self.resumed_from = latest_step(cfg.out_dir)
        elif cfg.resume != 'never':
            self.resumed_from = cfg.resume
        if self.resumed_from:
            self._resume(self.resumed_from)
        elif self.master and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run starts a fresh log

        self.model = model
        if resolve_compile(cfg.compile, self.device, getattr(batches, 'one_shape', False), cfg.max_minutes):
            self.model = torch.compile(self.model)
        if self.world > 1:
            self.model = DistributedDataParallel(
                self.model,
                device_ids=[int(self.device.split(':')[1])] if self.device.startswith('cuda') else None)
        self.peak, how = ((cfg.peak_flops, f"peak_flops={cfg.peak_flops:.3g}") if cfg.peak_flops
                          else guess_peak_flops(self.device, self.dtype))
        if self.master:
            lumi.log(f"MFU against {how}")
        self.flops_per_token = model.flops_per_token() if hasattr(model, 'flops_per_token') else 0

    def _resume(self, path):
        cfg = self.cfg
        ckpt = load_checkpoint(path, map_location=self.device)
        lacking = [k for k in ('model', 'optimizer', 'step', 'tokens_seen', 'best_val', 'max_iters',
                               'sampler', 'rng')
                   if k not in ckpt]
        if lacking:
            raise LumiError(f"{path}: not a training checkpoint to resume (it has no {', '.join(lacking)}); "
                            f"use another --out_dir or --resume=never")
        try:
            self.raw.load_state_dict(ckpt['model'])
            self.optimizer.load_state_dict(ckpt['optimizer'])
        except (RuntimeError, ValueError) as e:
            raise LumiError(f"{path}: its weights do not fit this model ({' '.join(str(e).split())[:200]}); "
                            f"use another --out_dir or --resume=never") from e
        self.step, self.tokens_seen, self.best_val = ckpt['step'], ckpt['tokens_seen'], ckpt['best_val']
        self.max_iters = ckpt['max_iters']
        if ckpt.get('scaler'):  # float16's loss scale and growth count, so the resumed steps scale the same
            self.scaler.load_state_dict(ckpt['scaler'])
        self.skipped = ckpt.get('skipped_steps', 0)
        # a resumed run keeps its plan unless asked for another length: then the schedule is re-planned over
        # the new one (a plan fitted to max_minutes is kept: the clock made it)
        if cfg.max_iters and cfg.max_iters != self.max_iters:
            if cfg.max_minutes:
                lumi.log(f"keeping the checkpoint's plan of {self.max_iters} steps (fitted to max_minutes), "
                         f"not max_iters={cfg.max_iters}; pass --max_minutes=0 for max_iters")
            elif cfg.max_iters < self.step:
                raise LumiError(f"{path} is at step {self.step}, past max_iters={cfg.max_iters}: "
                                f"raise max_iters or start afresh with --resume=never")
            else:
                lumi.log(f"max_iters={cfg.max_iters}: the checkpoint planned {self.max_iters} steps; "
                         f"the learning-rate schedule is re-planned over {cfg.max_iters}")
                self.max_iters = cfg.max_iters
        sampler, rank = ckpt['sampler'], self.rank
        self.batches.load_state_dict(sampler[rank] if isinstance(sampler, list) else sampler)
        set_rng_state(ckpt['rng'][rank] if isinstance(ckpt['rng'], list) else ckpt['rng'])
        if self.master and os.path.exists(self.metrics_path):  # drop what was logged after the checkpoint
            kept = [r for r in read_jsonl(self.metrics_path) if r.get('step', 0) <= self.step]
            atomic_write(self.metrics_path, lambda f: f.writelines(json.dumps(r) + '\n' for r in kept),
                         mode='w')
        lumi.log(f"resumed from {path} at step {self.step}")

    def train_step(self, lr):
        """One optimizer step at learning rate lr over gradient_accumulation_steps micro-batches; returns the
        step's metrics (loss, lr, tokens, tokens_per_sec, mfu, the loss function's stats, grad_norm; under
        float16 the loss scale and the steps skipped so far, a skipped step having no grad_norm) and its
        seconds. Raises TrainingDiverged on a loss that is not finite, before the optimizer steps."""
        cfg, device, world = self.cfg, self.device, self.world
        accum = cfg.gradient_accumulation_steps
        set_lr(self.optimizer, lr, cfg.learning_rate)  # each group at its own peak, scaled alike
        t0 = time.time()
        loss_sum, stats_sum, step_tokens = 0.0, {}, 0
        for micro in range(accum):
            batch = _to_device(self.batches.next_batch(), device)
            sync = micro == accum - 1
            ctx = self.model.no_sync() if world > 1 and not sync else nullcontext()
            with ctx, autocast(device, self.dtype):
                out = self.loss_fn(self.model, batch)
                loss, stats = out if isinstance(out, tuple) else (out, {})
                # scale the loss to account for gradient accumulation (and by float16's loss scale)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.item()
            step_tokens += int(stats.pop('tokens',
                                         batch[0].numel() if isinstance(batch, (list, tuple)) else 0))
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        loss_val = loss_sum / accum
        if world > 1:
            t = torch.tensor([loss_val, step_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            loss_val, step_tokens = t[0].item() / world, int(t[1].item())
        if not math.isfinite(loss_val):
            good = latest_step(cfg.out_dir)
            raise TrainingDiverged(f"loss is {loss_val} at step {self.step}: stopping. The last good "
                                   f"checkpoint {good or '(none yet)'} is untouched; lower learning_rate or "
                                   f"raise warmup_iters.")
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not float16's scaled ones
        params = self.raw.parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        # float16: a step whose gradients overflowed is skipped and the scale halved (so it fell: skipped);
        # DDP ranks agree, as they hold the same all-reduced gradients
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale
        self.skipped += skipped
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        self.step += 1
        self.tokens_seen += step_tokens
        tps = step_tokens / max(dt, 1e-9)
        last = dict(step=self.step, loss=loss_val, lr=lr, tokens=self.tokens_seen,
                    tokens_per_sec=round(tps, 1), mfu=round(self.flops_per_token * tps / self.peak, 5),
                    **{k: v / accum for k, v in stats_sum.items()})
        if grad_norm is not None and not skipped:
            last['grad_norm'] = float(grad_norm)
        if self.scaler.is_enabled():
            last.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.skipped)
        return last, dt

    def evaluate(self):
        """The stage's held-out metrics, in eval mode without gradients, averaged over ranks."""
        if self.eval_fn is None:
            return {}
        self.raw.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            out = self.eval_fn(self.raw)
        self.raw.train()
        # ranks must agree on `improved`, or only some of them enter save()'s gather
        if self.world > 1 and out:
            keys = sorted(k for k, v in out.items() if isinstance(v, (int, float)))
            t = torch.tensor([float(out[k]) for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            out = dict(out, **{k: t[i].item() / self.world for i, k in enumerate(keys)})
        return out

    def save(self, val_metrics, last_metrics, best=False):
        """The step checkpoint of this step (and best.pt when best), with everything an exact resume needs:
        weights, optimizer, every rank's sampler position and RNGs; keeps the newest keep_last step
        checkpoints. Returns its path on rank 0, None elsewhere."""
        cfg = self.cfg
        samplers, rngs = self.batches.state_dict(), rng_state()
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (samplers, rngs))
            samplers, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        if not self.master:
            return None
        state = dict(self.meta or {}, model=self.raw.state_dict(), optimizer=self.optimizer.state_dict(),
                     step=self.step, max_iters=self.max_iters, tokens_seen=self.tokens_seen,
                     best_val=self.best_val, sampler=samplers, rng=rngs, config=dict(cfg),
                     metrics=dict(last_metrics, **val_metrics))
        if self.scaler.is_enabled():
            state.update(scaler=self.scaler.state_dict(), skipped_steps=self.skipped)
        path = step_path(cfg.out_dir, self.step)
        # best.pt first: a kill before the step checkpoint resumes from an earlier one and redoes both
        if best:
            save_checkpoint(os.path.join(cfg.out_dir, 'best.pt'), state)
        save_checkpoint(path, state)
        old = sorted(n for n in os.listdir(cfg.out_dir) if step_of(n) is not None)
        for name in old[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            os.remove(os.path.join(cfg.out_dir, name))
        return path

    def plan_budget(self, budget_s, elapsed_s, recent, eval_s, cap):
        """Fit the schedule to the clock: the steps left are (time left - the final eval) / (step time + the
        evals to come), from the mean of the recent step times; rank 0's plan is everyone's (ranks that
        stopped at different steps would hang). Returns the new max_iters, never below the current step."""
        per_step = sum(recent) / len(recent)
        left = budget_s - elapsed_s - eval_s
        n = max(0, int(left / (per_step + eval_s / max(1, self.cfg.eval_interval))))
        if self.world > 1:
            t = torch.tensor([n], dtype=torch.int64, device=self.device)
            dist.broadcast(t, 0)
            n = int(t.item())
        return max(self.step, min(cap, self.step + n)), per_step

    # --- what fit calls, in order, once the run has started

    def start(self):
        """Start the clock (max_minutes) and the progress bar."""
        cfg = self.cfg
        # the trackers (rank 0's), on the same curves when resumed; a missing package stops the run here
        self.tracker = curves.Trackers(cfg.get('log', '') if self.master else '', cfg.out_dir, dict(cfg),
                                       self.step if self.resumed_from else None)
        self.t_start, self.budget_s = time.time(), cfg.max_minutes * 60
        # fit the schedule to the clock; a resumed run keeps its plan
        self.replanning = self.budget_s > 0 and not self.resumed_from
        # recent: the last step times
        self.planned, self.cap, self.recent = False, self.max_iters or 10**12, []
        # a finished run returns its checkpoint
        self.last, self.eval_s, self.final_path = {}, 0.0, self.resumed_from
        self.resumed_at = self.step if self.resumed_from else -1  # that step was evaluated and saved before
        self.raw.train()
        self.step_times = []  # the last ETA_STEPS step times: the ETA (the bar's own swings with its rate)
        self.bar = tqdm(total=self.max_iters or None, initial=self.step, disable=not self.master,
                        dynamic_ncols=True, desc=cfg.out_dir, bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} '
                                                                        '[{elapsed}{postfix}]')

    def finished(self):
        """Whether the planned steps are done, or the clock ran out past the plan (a safety net: every rank
        must agree on it)."""
        done = bool(self.max_iters and self.step >= self.max_iters)
        if self.budget_s > 0 and not done:
            over = torch.tensor(float(time.time() - self.t_start > self.budget_s * 1.05), device=self.device)
            if self.world > 1:
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            done = bool(over.item())
        return done

    def evaluate_and_save(self, done):
        """Evaluate and checkpoint on schedule, and at the end: every eval_interval steps the held-out metrics
        (logged), and a checkpoint when they improved, every ckpt_interval steps, and at the end."""
        cfg, step = self.cfg, self.step
        if step == self.resumed_at:
            return
        if step % cfg.eval_interval == 0 or done:
            t0 = time.time()
            val = self.evaluate()
            self.eval_s = time.time() - t0
            if val and self.master:
                append_jsonl(self.metrics_path, dict(step=step, tokens=self.tokens_seen, **val))
                self.tracker.log(dict(step=step, tokens=self.tokens_seen, **val))
                self.bar.write(f"step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in val.items()
                                                           if isinstance(v, float)))
            improved = 'val_loss' in val and val['val_loss'] < self.best_val
            if improved:
                self.best_val = val['val_loss']
            if step > 0 and (improved or step % cfg.ckpt_interval == 0 or done):
                self.final_path = self.save(val, self.last, best=improved) or self.final_path
        elif step % cfg.ckpt_interval == 0:
            self.final_path = self.save({}, self.last) or self.final_path

    def record(self, last, dt):
        """Log a step's metrics (metrics.jsonl, the progress bar) and keep its time for the plan."""
        self.last = last
        # the first step is not timed: it holds torch.compile's compilation (~30 s on 2 cores)
        if self.step > 1:
            self.recent = (self.recent + [dt])[-10:]
        if self.step > max(self.resumed_at, 0) + 1:  # not this process's first step either
            self.step_times = (self.step_times + [dt])[-ETA_STEPS:]
        if self.master:
            append_jsonl(self.metrics_path, last)
            self.tracker.log(last)
            self.bar.update(1)
            eta = self.eta()
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:,.0f}",
                                 mfu=f"{100 * last['mfu']:.1f}%", **({'eta': duration(eta)} if eta else {}))
            if len(self.step_times) == MEASURED_STEPS and not self.replanning and self.max_iters:
                self.bar.write(self.measured_plan(eta))

    def eta(self):
        """Seconds the rest of the plan takes (plan_seconds), once MEASURED_STEPS steps are timed."""
        if len(self.step_times) >= MEASURED_STEPS and self.max_iters:
            return plan_seconds(self.step, self.max_iters, float(np.median(self.step_times)),
                                self.cfg.eval_interval, self.eval_s)

    def measured_plan(self, eta):
        """The plan's cost on this machine; on a CPU, past an hour with no clock, where the cap is."""
        text = (f"measured over steps {self.step - MEASURED_STEPS + 1}-{self.step}: "
                f"{np.median(self.step_times):.3g} s a step"
                f"{f' and {self.eval_s:.3g} s an evaluation' if self.eval_s else ''}; the plan of "
                f"{self.max_iters:,} steps takes about {duration(eta)} more on this machine")
        if self.device == 'cpu' and not self.budget_s and eta > 3600:
            text += " (--max_minutes=N fits the learning-rate schedule to N minutes instead)"
        return text

    def replan(self):
        """Re-fit max_iters to the clock after every step from the last ten step times, so that a machine that
        slows down midway (a shared one does) still finishes its schedule on time instead of being cut off
        high."""
        if not self.replanning or len(self.recent) < max(2, min(10, self.cfg.warmup_iters // 2)):
            return
        self.max_iters, per_step = self.plan_budget(self.budget_s, time.time() - self.t_start, self.recent,
                                                    self.eval_s, self.cap)
        self.bar.total = self.max_iters
        if not self.planned:
            lumi.log(f"max_minutes={self.cfg.max_minutes}: {per_step:.3f}s a step, "
                     f"planning {self.max_iters} steps")
        self.planned = True


def fit(cfg, model, batches, loss_fn, evaluate=None, meta=None):
    """Train model and return the path of the final checkpoint: a Trainer's steps on schedule. See Trainer for
    what the arguments are."""
    run = Trainer(cfg, model, batches, loss_fn, evaluate, meta)
    run.start()
    try:
        while True:
            done = run.finished()
            run.evaluate_and_save(done)
            if done:
                break
            run.record(*run.train_step(lr_at(run.step, run.max_iters or 1, cfg)))
            run.replan()
    finally:
        run.bar.close()
        run.tracker.close()
    if run.master:
        curves.write_loss_plot(cfg.out_dir)  # never raises
    if run.world > 1:
        dist.barrier()
    return run.final_path
