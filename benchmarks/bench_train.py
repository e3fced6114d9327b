"""
Lumi's model (RMSNorm, RoPE, SwiGLU, no biases) against a GPT-2-style baseline (LayerNorm, GELU MLP, learned
positions, biases, as in nanoGPT) of the same parameter count, trained by the same loop (lumi.fit) on the
same bins with the same batches, optimizer and schedule fitted to the same wall-clock budget. Printed:
steady-state tokens/s and the val loss reached, eager and compiled, as ratios from this one run; and, to
justify configs/tiny.py's precision, Lumi's eager tokens/s in fp32.

    python benchmarks/bench_train.py                 # configs/tiny.py on data/starter, 2 minutes an arm (~10 min)
    python benchmarks/bench_train.py --minutes=0.5   # a quick look
    python benchmarks/bench_train.py --arms=eager    # only the eager pair

The arms run in the order lumi, gpt2, gpt2, lumi (eager, eager, compiled, compiled) so that a drift in the
machine's load (others share its cores) tilts neither model. The baseline lives here, not in model.py: it
exists only to be compared against.
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import lumi  # noqa: E402
import train  # noqa: E402
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
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(('c_proj.weight', 'mlp_proj.weight')) else 0.02
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

def run_arm(name, model, cfg, minutes, compile_, dtype, val_batches, max_iters=0):
    """Train with lumi.fit for `minutes` (or max_iters steps); steady tokens/s and the val loss after."""
    with tempfile.TemporaryDirectory() as out:
        args = dict(cfg, out_dir=out, compile=compile_, dtype=dtype, max_minutes=minutes, max_iters=max_iters,
                    eval_interval=10 ** 9, ckpt_interval=10 ** 9, resume='never')
        run_cfg = lumi.Config(args)
        batches = train.make_batches(run_cfg, 'train', cfg.seed, 0, 1)
        lumi.seed_everything(cfg.seed)
        t0 = time.time()
        lumi.fit(run_cfg, model, batches, train.pretrain_loss)
        wall = time.time() - t0
        recs = [r for r in lumi.read_jsonl(os.path.join(out, 'metrics.jsonl')) if 'loss' in r]
    steady = [r['tokens_per_sec'] for r in recs[2:]] or [recs[-1]['tokens_per_sec']]  # step 1 compiles
    model.eval()
    with torch.no_grad(), lumi.autocast('cpu', dtype):
        val = statistics.fmean(model(x, y)[1].item() for x, y in val_batches)
    model.train()
    row = dict(arm=name, steps=recs[-1]['step'], tokens=recs[-1]['tokens'], tok_s=statistics.median(steady),
               train_loss=statistics.fmean(r['loss'] for r in recs[-10:]), val_loss=val, wall=wall)
    print(f"{name:22s} {row['steps']:6d} steps {row['tokens'] / 1e6:6.2f}M tokens {row['tok_s']:8,.0f} tok/s "
          f"(median of steps 3+)  train {row['train_loss']:.4f}  val {val:.4f}  {wall:5.0f}s", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'tiny.py'))
    p.add_argument('--data_dir', default='')
    p.add_argument('--minutes', type=float, default=2.0, help='wall-clock budget of each training arm')
    p.add_argument('--arms', default='eager,compiled')
    p.add_argument('--val_batches', type=int, default=10)
    p.add_argument('--fp32_steps', type=int, default=8, help="Lumi eager fp32 timing steps (0 skips)")
    a = p.parse_args()

    cfg = lumi.load_config(train.DEFAULTS, [a.config] + ([f'--data_dir={a.data_dir}'] if a.data_dir else []))
    cfg.data_dir = cfg.data_dir if os.path.isabs(cfg.data_dir) else os.path.join(ROOT, cfg.data_dir)
    train.prepare_data(cfg, 0)
    meta = data.load_meta(cfg.data_dir)
    cfg.tokenizer_sha256 = meta['tokenizer_sha256']
    dtype = train.resolve_dtype(cfg.dtype, 'cpu')
    mcfg = ModelConfig(**{k: cfg[k] for k in train.MODEL_KEYS}, vocab_size=meta['vocab_size'])
    hidden, gpt2_params = gpt2_matching(mcfg, GPT(mcfg).num_params())
    val_loader = train.make_batches(cfg, 'val', 1, 0, 1)
    val_batches = [val_loader.next_batch() for _ in range(a.val_batches)]

    def lumi_model():
        torch.manual_seed(cfg.seed)
        return GPT(mcfg)

    def gpt2_model():
        torch.manual_seed(cfg.seed)
        return GPT2(mcfg.vocab_size, mcfg.n_layer, mcfg.n_head, mcfg.n_embd, hidden, mcfg.block_size)

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"data: {cfg.data_dir} ({meta['train_tokens']:,} train tokens), batch {cfg.batch_size} x {cfg.block_size}, "
          f"lr {cfg.learning_rate} cosine to {cfg.min_lr} over the planned steps, {dtype} autocast")
    print(f"lumi: {lumi_model().num_params():,} parameters ({mcfg.n_layer} x {mcfg.n_embd}, SwiGLU {mcfg.ffn_hidden})")
    print(f"gpt2: {gpt2_model().num_params():,} parameters ({mcfg.n_layer} x {mcfg.n_embd}, GELU MLP {hidden}, "
          f"learned positions, biases); budget {a.minutes:g} min an arm, val on {a.val_batches} fixed batches\n")

    rows = {}
    arms = [m.strip() for m in a.arms.split(',') if m.strip()]
    for mode in arms:
        order = [('lumi', lumi_model), ('gpt2', gpt2_model)]
        if mode == 'compiled':
            order.reverse()  # lumi, gpt2, gpt2, lumi
        for name, make in order:
            rows[name, mode] = run_arm(f"{name} {mode}", make(), cfg, a.minutes, mode == 'compiled', dtype, val_batches)
    fp32 = None
    if a.fp32_steps and dtype != 'float32':
        fp32 = run_arm("lumi eager fp32", lumi_model(), cfg, 0.0, False, 'float32', val_batches[:1],
                       max_iters=a.fp32_steps)

    print("\nratios (lumi / gpt2, same run):")
    for mode in arms:
        lu, g2 = rows['lumi', mode], rows['gpt2', mode]
        print(f"  {mode:8s} tokens/s {lu['tok_s'] / g2['tok_s']:.2f}x   val loss at equal wall-clock "
              f"{lu['val_loss']:.4f} vs {g2['val_loss']:.4f} ({lu['val_loss'] - g2['val_loss']:+.4f} nats, "
              f"{lu['val_loss'] / g2['val_loss']:.3f}x)")
    if 'eager' in arms and 'compiled' in arms:
        for name in ('lumi', 'gpt2'):
            print(f"  {name} compiled / eager tokens/s: {rows[name, 'compiled']['tok_s'] / rows[name, 'eager']['tok_s']:.2f}x")
    if fp32 and 'eager' in arms:
        print(f"  lumi eager {dtype} / fp32 tokens/s: {rows['lumi', 'eager']['tok_s'] / fp32['tok_s']:.2f}x")


if __name__ == '__main__':
    main()
