"""
Lumi's model (RMSNorm, RoPE, SwiGLU, no biases) against a GPT-2-style baseline (LayerNorm, learned positions,
GELU MLP, biases, as in nanoGPT) with the same parameter count, trained the same way (training.Trainer's AdamW
groups, clipping and bf16 autocast) on the same bins and the same batches, each for the same time budget with
the LR schedule fitted to it. Printed: tokens/s and the val loss each reached, eager and compiled, as ratios
from this one run; and Lumi's eager tokens/s in fp32, which is what configs/tiny.py's precision is chosen
against.

    python benchmarks/bench_train.py                 # configs/tiny.py on data/starter, 120 s an arm
    python benchmarks/bench_train.py --seconds=30    # a quick look
    python benchmarks/bench_train.py --arms=eager --clock=wall --threads=0   # on a machine of your own

The clock is the process's CPU time and torch runs one thread (by default): Lumi's machines are shared by
several engineers, and CPU time counts the compute an arm got whatever else ran beside it, where wall-clock
time would measure the neighbours. On a machine of your own, --clock=wall --threads=0 is "equal
wall-clock" literally. Warm-up steps (compilation) are off the clock and reported apart. The arms run in
the order lumi, gpt2, gpt2, lumi (eager, eager, compiled, compiled). The baseline lives here, not in
model.py: it exists only to be compared against.

Deliberately left out: DDP and gradient accumulation (one process, one micro-step a step).
"""
import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import optim  # noqa: E402
import training  # noqa: E402
import lumi  # noqa: E402
import train  # noqa: E402
from corpus import bins  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402


# -----------------------------------------------------------------------------
# the baseline: GPT-2 as nanoGPT writes it, with the MLP widened to match Lumi's parameter count

class GPT2Block(nn.Module):
    def __init__(self, d, n_head, hidden):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the kernel Lumi uses on CPU too
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate='tanh'))


class GPT2(nn.Module):
    def __init__(self, vocab_size, n_layer, n_head, n_embd, hidden, block_size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(GPT2Block(n_embd, n_head, hidden) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # GPT-2's init, residual projections scaled by depth
            if p.dim() == 2:
                std = (0.02 / math.sqrt(2 * n_layer) if name.endswith(('c_proj.weight', 'mlp_proj.weight'))
                       else 0.02)
                nn.init.normal_(p, 0.0, std)
            elif name.endswith('bias') and 'ln' not in name:
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                            targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def gpt2_matching(cfg, target):
    """The GPT-2 MLP width whose total parameter count is nearest to target (Lumi's)."""
    def count(h):
        d, L = cfg.n_embd, cfg.n_layer
        per_layer = 4 * d * d + 4 * d + 2 * d * h + h + d + 4 * d  # attention, MLP, two LayerNorms
        return cfg.vocab_size * d + cfg.block_size * d + L * per_layer + 2 * d
    d, L = cfg.n_embd, cfg.n_layer
    h = round((target - count(0)) / (L * (2 * d + 1)))
    return h, count(h)


# -----------------------------------------------------------------------------
# one arm: training.Trainer's own steps (AdamW with decay groups, clipping, bf16 autocast) and its own
# schedule (warmup + cosine over the steps planned to fit the budget, re-planned after every step), on a clock

def run_arm(name, model, cfg, budget_s, compile_, dtype, val_batches, clock):
    arm = lumi.Config(cfg, compile=compile_, dtype=dtype, device='cpu', resume='never', max_iters=0,
                      max_minutes=0.0, out_dir=tempfile.mkdtemp(prefix='bench_train_'))
    run = training.Trainer(arm, model, train.make_batches(cfg, 'train', cfg.seed, 0, 1), train.pretrain_loss)
    planned = 10**12  # until two step times are known: the warmup does not depend on it

    wall0, c0 = time.time(), clock()
    for _ in range(2):  # warm-up, off the clock: compiling (and a possible recompile) is not training time
        run.train_step(optim.lr_at(run.step, planned, cfg))
    warmup = clock() - c0
    used, losses, recent = 0.0, [], []
    while used < budget_s:
        c = clock()
        last, _ = run.train_step(optim.lr_at(run.step, planned, cfg))
        recent = (recent + [clock() - c])[-10:]
        used += recent[-1]
        losses.append(last['loss'])
        if len(recent) >= 2:
            planned, _ = run.plan_budget(budget_s, used, recent, 0.0, 10**12)
    shutil.rmtree(arm.out_dir, ignore_errors=True)
    model.eval()
    with torch.no_grad(), lumi.autocast('cpu', dtype):
        val = statistics.fmean(model(x, y)[1].item() for x, y in val_batches)
    model.train()
    tokens = len(losses) * cfg.batch_size * cfg.block_size
    row = dict(steps=len(losses), tok_s=tokens / used, val_loss=val, warmup=warmup,
               train_loss=statistics.fmean(losses[-5:]))
    print(f"{name:16s} {row['steps']:5d} steps {tokens / 1e6:6.3f}M tokens {row['tok_s']:7,.0f} tok/s  "
          f"last train {row['train_loss']:.4f}  val {val:.4f}  (warm-up {warmup:4.0f}s, wall "
          f"{time.time() - wall0:4.0f}s)", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'tiny.py'))
    p.add_argument('--data_dir', default='')
    p.add_argument('--seconds', type=float, default=120.0,
                   help='training budget of each arm, in clock seconds')
    p.add_argument('--clock', choices=('cpu', 'wall'), default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    p.add_argument('--arms', default='eager,compiled')
    p.add_argument('--val_batches', type=int, default=10)
    p.add_argument('--fp32_seconds', type=float, default=20.0, help="Lumi eager fp32 timing arm (0 skips)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == 'cpu' else time.time

    cfg = lumi.load_config(train.KEYS, [a.config] + ([f'--data_dir={a.data_dir}'] if a.data_dir else []))
    cfg.data_dir = cfg.data_dir if os.path.isabs(cfg.data_dir) else os.path.join(ROOT, cfg.data_dir)
    train.prepare_data(cfg, 0)
    meta = bins.load_meta(cfg.data_dir)
    cfg.tokenizer_sha256 = meta['tokenizer_sha256']
    dtype = lumi.resolve_dtype(cfg.dtype, 'cpu')
    mcfg = ModelConfig(**{k: cfg[k] for k in train.MODEL_KEYS}, vocab_size=meta['vocab_size'])
    hidden, _ = gpt2_matching(mcfg, GPT(mcfg).num_params())
    val_loader = train.make_batches(cfg, 'val', 1, 0, 1)
    val_batches = [val_loader.next_batch() for _ in range(a.val_batches)]

    def lumi_model():
        torch.manual_seed(cfg.seed)
        return GPT(mcfg)

    def gpt2_model():
        torch.manual_seed(cfg.seed)
        return GPT2(mcfg.vocab_size, mcfg.n_layer, mcfg.n_head, mcfg.n_embd, hidden, mcfg.block_size)

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}; clock: {a.clock} time, {a.seconds:g} s of training an arm")
    print(f"data: {cfg.data_dir} ({meta['train_tokens']:,} train tokens), "
          f"batch {cfg.batch_size} x {cfg.block_size}, "
          f"lr {cfg.learning_rate} warmup + cosine to {cfg.min_lr} over the budget, {dtype} autocast")
    print(f"lumi: {lumi_model().num_params():,} parameters ({mcfg.n_layer} x {mcfg.n_embd}, RMSNorm, RoPE, "
          f"SwiGLU {mcfg.ffn_hidden}, no biases)")
    print(f"gpt2: {gpt2_model().num_params():,} parameters ({mcfg.n_layer} x {mcfg.n_embd}, LayerNorm, "
          f"learned positions, GELU MLP {hidden}, biases); val loss on {a.val_batches} fixed batches\n")

    rows = {}
    arms = [m.strip() for m in a.arms.split(',') if m.strip()]
    for mode in arms:
        order = [('lumi', lumi_model), ('gpt2', gpt2_model)]
        if mode == 'compiled':
            order.reverse()  # lumi, gpt2, gpt2, lumi: a drift in the machine's load tilts neither model
        for name, make in order:
            rows[name, mode] = run_arm(f"{name} {mode}", make(), cfg, a.seconds, mode == 'compiled', dtype,
                                       val_batches, clock)
    fp32 = None
    if a.fp32_seconds and dtype != 'float32':
        fp32 = run_arm("lumi eager fp32", lumi_model(), cfg, a.fp32_seconds, False, 'float32',
                       val_batches[:1], clock)

    print("\nratios from this run:")
    for mode in arms:
        lu, g2 = rows['lumi', mode], rows['gpt2', mode]
        print(f"  {mode:8s} lumi / gpt2 tokens/s {lu['tok_s'] / g2['tok_s']:.2f}x; "
              f"val loss at equal {a.clock} time "
              f"{lu['val_loss']:.4f} vs {g2['val_loss']:.4f} ({lu['val_loss'] - g2['val_loss']:+.4f} nats)")
    if 'eager' in arms and 'compiled' in arms:
        for name in ('lumi', 'gpt2'):
            compiled, eager = rows[name, 'compiled'], rows[name, 'eager']
            print(f"  {name} compiled / eager tokens/s {compiled['tok_s'] / eager['tok_s']:.2f}x "
                  f"(compiling took {compiled['warmup']:.0f}s)")
    if fp32 and 'eager' in arms:
        print(f"  lumi eager {dtype} / fp32 tokens/s {rows['lumi', 'eager']['tok_s'] / fp32['tok_s']:.2f}x")


if __name__ == '__main__':
    main()
