"""
The pretraining stage: a LLaMA-style model (model.py) from scratch on the uint16 token bins that data.py
writes.

    python train.py configs/tiny.py                      # prepares data/starter first if its bins are missing
    python train.py configs/tiny.py --max_minutes=10     # the LR schedule is fitted to a 10-minute budget
    python train.py configs/tiny.py --data_dir=D --out_dir=O --max_iters=N --n_layer=4 --batch_size=16
    torchrun --nproc_per_node=2 train.py configs/tiny.py # DDP: nccl on GPU, gloo on CPU

The loop itself (AdamW with decay groups, warmup + cosine or warmup-stable-decay, accumulation, clipping,
bf16 autocast, torch.compile, DDP, metrics.jsonl, atomic checkpoints with every RNG and the sampler's
position, --resume=auto, the NaN stop) is training.fit, which sft.py and dpo.py run too. This file decides
what pretraining is: the model's shape, the token budget, the batches, the held-out loss, and the report at
the end (val loss against the unigram entropy of the val set, the loss of a model that ignores context).

Deliberately left out: initialising from another checkpoint (sft.py's init_from does that), curriculum or
sequence-length warm-up, and mixing several bin sets (bins.BinLoader can, one data_dir is enough here).
"""
import math
import os
import subprocess
import sys
import time
from dataclasses import fields

import torch

import checkpoint
import curves
import lumi
import training
from corpus import bins
from model import GPT, ModelConfig
from tokenizer import Tokenizer, check_tokenizer

# -----------------------------------------------------------------------------
# keys: set in a config file (configs/tiny.py) or as --key=value. The model's shape (n_layer, n_embd, ...) is
# model.py's, the loop's (learning_rate, batch_size, max_iters, max_minutes, compile, dtype, ...)
# training.py's.
KEY_FILES = ('model.py', 'training.py')
data_dir = 'data/starter'   # the built-in starter corpus; bins missing here are built first through data.py
tokens_per_param = 20.0     # (0, inf) the token budget when max_iters = 0: tokens per parameter
                            # (Chinchilla: 20)
num_threads = 0             # [0, inf) CPU threads for torch; 0 keeps torch's default (one per core). On a
                            # machine shared with other jobs 1 is faster: with two, each op waits for the
                            # descheduled one
out_dir = 'out/pretrain'    # where checkpoints, metrics.jsonl and loss.svg go
eval_iters = 20             # [1, inf) held-out batches per evaluation: the val loss averages them

KEYS = lumi.declared_keys(__file__)
# a config file sets the data's keys beside the model's (configs/tiny.py), and may be the lab's own too
# (lumi.py run LAB.py reads it, then hands it to data.py and train.py)
SHARES_WITH = ('data.py', 'pipeline.py')
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name != 'vocab_size')


# -----------------------------------------------------------------------------
# pieces main() is made of

def prepare_data(cfg, rank):
    """Make sure finished bins exist in cfg.data_dir; on a fresh machine rank 0 builds them with data.py,
    reading the same config file (its sources and vocab_size), while the other ranks wait for meta.json."""
    if bins.data_ready(cfg.data_dir):
        return
    if rank == 0:
        lumi.log(f"{cfg.data_dir} has no finished bins: preparing them with data.py first")
        argv = ([cfg.config_file] if cfg.get('config_file') else []) + [f'--data_dir={cfg.data_dir}']
        done = subprocess.run([sys.executable, os.path.join(lumi.ROOT, 'data.py'), *argv])
        if done.returncode != 0:
            raise lumi.LumiError(f"data.py {' '.join(argv)} exited with {done.returncode}: the bins in "
                                 f"{cfg.data_dir} are not ready")
    else:  # polling, not a barrier: building the starter corpus outlasts NCCL's default collective timeout
        while not bins.data_ready(cfg.data_dir):
            time.sleep(2)


def resume_path(cfg):
    """The checkpoint training.fit will resume from (the same rule), or None."""
    if cfg.resume == 'auto':
        return checkpoint.latest_step(cfg.out_dir)
    return None if cfg.resume == 'never' else cfg.resume


def check_resume(path, model_args, tokenizer_sha, data_dir):
    """Refuse to resume onto other bins or another model shape: the run would silently become another run."""
    ckpt = checkpoint.load_checkpoint(path)
    if not isinstance(ckpt.get('model_args'), dict) or 'tokenizer_sha256' not in ckpt:
        raise lumi.LumiError(f"{path}: not a pretraining checkpoint (no model_args or tokenizer_sha256); use "
                             f"another --out_dir or --resume=never")
    checkpoint.tokenizer_from_checkpoint(ckpt)  # its stored hash is its tokenizer's, before it is compared
    check_tokenizer(tokenizer_sha, ckpt['tokenizer_sha256'], f"the bins in {data_dir} (resuming {path})")
    differ = [f"{k}: checkpoint {v!r}, config {model_args.get(k)!r}" for k, v in ckpt['model_args'].items()
              if model_args.get(k) != v]
    if differ:
        raise lumi.LumiError(f"{path} holds a model with other settings ({'; '.join(differ)}); "
                         f"use another --out_dir or --resume=never")


class GlobalBatches:
    """Each step's global batch (batch_size rows per rank) is drawn once from one stream, and each rank keeps
    its own rows. So N processes train on exactly the batches one process with N times the batch size sees,
    and a DDP run reproduces a single-process run (tests/test_train.py holds them to each other)."""

    one_shape = True  # every batch is (batch_size, block_size): torch.compile compiles once (resolve_compile)

    def __init__(self, loader, rank, world):
        self.loader, self.rank, self.world = loader, rank, world

    def next_batch(self):
        x, y = self.loader.next_batch()
        rows = slice(self.rank * x.size(0) // self.world, (self.rank + 1) * x.size(0) // self.world)
        return x[rows], y[rows]

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def make_batches(cfg, split, seed, rank, world):
    loader = bins.BinLoader(cfg.data_dir, split, block_size=cfg.block_size, batch_size=cfg.batch_size * world,
                            seed=seed, tokenizer_sha256=cfg.tokenizer_sha256)
    return GlobalBatches(loader, rank, world)


def make_pretrain_evaluate(cfg, rank, world):
    """Mean loss over the same eval_iters val batches at every eval, so the curve compares like with like
    (training.fit averages it over ranks; each rank scores its rows of the global batch)."""
    def evaluate(model):
        val = make_batches(cfg, 'val', cfg.seed, rank, world)
        device = next(model.parameters()).device
        losses = [model(x.to(device), y.to(device))[1].item()
                  for x, y in (val.next_batch() for _ in range(cfg.eval_iters))]
        return {'val_loss': sum(losses) / len(losses)}
    return evaluate


def pretrain_loss(model, batch):
    x, y = batch
    return model(x, y)[1]


def plan_warnings(cfg, device, tokens, data_tokens):
    """What to say about a plan before it starts: that it reads the data too many times over (a plan fitted
    to max_minutes is known only once measured), and on a CPU without a clock, where the cheap paths are.
    How long it takes follows once its first steps are timed (training.Trainer.measured_plan)."""
    lines = []
    passes = training.passes_warning(tokens, data_tokens, 'tokens', cfg.data_dir,
                                     "`python data.py configs/data_tiny.py` prepares the design's 500M-token "
                                     "corpus (then --data_dir=data/web_tiny)")
    if passes and not cfg.max_minutes:
        lines.append(f"warning: {passes}")
    if device == 'cpu' and not cfg.max_minutes:
        profile = os.path.basename(cfg.get('config_file') or '') == 'cpu.py'
        lines.append("on a CPU: --max_minutes=N fits the learning-rate schedule to N minutes"
                     + ('' if profile else "; configs/cpu.py is the model sized for 2 cores (`python lumi.py "
                                           "run configs/pipeline_cpu.py` runs the whole lab in ~15 minutes)"))
    return lines


def baseline_verdict(val_loss, entropy):
    """The val loss beside the unigram entropy in words, with a positive number: below it is learning."""
    gap = entropy - val_loss
    where = f"{abs(gap):.4f} {'below' if gap > 0 else 'above'}"
    text = f"unigram entropy of the val set {entropy:.4f} nats/token, the val loss is {where} it"
    return text if gap > 0 else text + " (WORSE THAN A UNIGRAM MODEL: the model has not learned from context)"


# -----------------------------------------------------------------------------

def main(argv=None):
    """Train; returns the path of the final checkpoint (None on ranks other than 0)."""
    cfg = lumi.load_config(KEYS, argv, shares_with=SHARES_WITH)
    curves.check_trackers(cfg.log)
    device, rank, _, world = lumi.setup_distributed(cfg.device)
    cfg.dtype = lumi.resolve_dtype(cfg.dtype, device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (optimizer, loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    prepare_data(cfg, rank)
    meta = bins.load_meta(cfg.data_dir)
    tok = Tokenizer.load(os.path.join(cfg.data_dir, 'tokenizer', 'tokenizer.model'))
    check_tokenizer(meta['tokenizer_sha256'], tok.sha256, f"the bins in {cfg.data_dir}")
    cfg.tokenizer_sha256 = tok.sha256
    model_args = dict({k: cfg[k] for k in MODEL_KEYS}, vocab_size=meta['vocab_size'])
    resuming = resume_path(cfg)
    if resuming:
        check_resume(resuming, model_args, tok.sha256, cfg.data_dir)

    lumi.seed_everything(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    model = GPT(ModelConfig(**model_args)).to(device)
    n_params, n_body = model.num_params(), model.num_params(embeddings=False)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    if not cfg.max_iters:
        cfg.max_iters = max(1, math.ceil(cfg.tokens_per_param * n_params / tokens_per_step))
    lumi.log(f"model: {n_params:,} parameters ({n_body:,} without embeddings), {cfg.n_layer} layers x "
             f"{cfg.n_embd}, {cfg.n_head} heads ({cfg.n_kv_head} kv), context {cfg.block_size}, vocab "
             f"{model_args['vocab_size']}")
    compiled = lumi.resolve_compile(cfg.compile, device, GlobalBatches.one_shape, cfg.max_minutes)
    lumi.log(f"data: {cfg.data_dir}, {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens; "
             f"{tokens_per_step:,} tokens a step on {world} process(es), {device} {cfg.dtype}"
             f"{', compiled' if compiled else ''}")
    budget = f"{cfg.max_iters:,} steps = {cfg.max_iters * tokens_per_step / 1e6:,.1f}M tokens"
    if cfg.max_minutes:
        budget += f", or fewer: the schedule is fitted to {cfg.max_minutes:g} minutes"
    lumi.log(f"budget: {budget} ({cfg.max_iters * tokens_per_step / n_params:.2f} tokens per parameter; "
             f"{cfg.tokens_per_param:g} is compute-optimal)")
    for line in plan_warnings(cfg, device, cfg.max_iters * tokens_per_step, meta['train_tokens']):
        lumi.log(line)

    batches = make_batches(cfg, 'train', cfg.seed, rank, world)
    ckpt_meta = checkpoint.checkpoint_meta(model, tok, 'pretrain', data_dir=cfg.data_dir)
    final = training.fit(cfg, model, batches, pretrain_loss, make_pretrain_evaluate(cfg, rank, world),
                         ckpt_meta)

    if rank != 0:
        return None
    evals = [r for r in lumi.read_jsonl(os.path.join(cfg.out_dir, 'metrics.jsonl')) if 'val_loss' in r]
    entropy = training.unigram_entropy(os.path.join(cfg.data_dir, 'val.bin'), model_args['vocab_size'])
    if evals:
        final_val = evals[-1]['val_loss']
        lumi.log(f"final val loss {final_val:.4f} nats/token at step {evals[-1]['step']} (best "
                 f"{min(r['val_loss'] for r in evals):.4f}); {baseline_verdict(final_val, entropy)}; "
                 f"ln(vocab) {math.log(model_args['vocab_size']):.4f}")
    lumi.log(f"final checkpoint: {final}")
    return final


if __name__ == '__main__':
    lumi.cli(main, KEYS)
