"""
Peak memory of one DPO step against one SFT step on the same batch, both with LoRA.

    python benchmarks/bench_dpo.py                      # CPU: peak RSS growth of each step
    python benchmarks/bench_dpo.py --device=cuda        # GPU: torch.cuda.max_memory_allocated

The same 2B rows (B pairs: chosen then rejected, right-padded) go through both arms. SFT: sft.sft_loss, the
mean cross-entropy on the reply tokens. DPO: dpo.score_batch, the reference pass with the adapters off
(no graph) and the policy pass with one, the exact KL between them, then the sigmoid loss. Each arm runs in
a fresh process, so one arm's freed memory cannot hide the other's peak; on CPU the figure is ru_maxrss
after the steps less ru_maxrss just before them (model, adapters, optimizer and batch already built).
The arms run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): by default glibc raises
it as large blocks are freed, after which freed temporaries stay resident and RSS measures the allocator's
history (a loop over 8 MB temporaries grew RSS by 140 MB) rather than the tensors alive at the peak.
The target: a DPO step within 1.3x of an SFT step.

Deliberately left out: step time (bench_lora.py times steps) and full fine-tuning arms.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import lumi  # noqa: E402
from tokenizer import BOS_ID

# defaults: a 6-layer, 256-wide model with Lumi's 32k vocabulary (the logits are the largest activation)
arm = ''                  # internal: 'sft' or 'dpo' runs one arm in this process
device = 'cpu'
threads = 1               # torch threads per arm (the machine is shared)
n_layer = 6
n_embd = 256
n_head = 4
n_kv_head = 4
vocab_size = 32768
block_size = 512
batch_size = 4            # pairs: 2 * batch_size rows
prompt_len = 96
reply_len = 160           # the longest reply; the others are shorter, as in real batches
lora_r = 16
steps = 3
repeats = 2               # fresh processes per arm; the median is reported
seed = 0


def make_batch(cfg):
    """B synthetic pairs rendered as dpo.py renders them, then dpo.collate_pairs."""
    import dpo
    g = torch.Generator().manual_seed(cfg.seed)
    ids = lambda n: torch.randint(8, cfg.vocab_size, (n,), generator=g).tolist()
    pairs = []
    for i in range(cfg.batch_size):
        reply = cfg.reply_len - 7 * i
        pairs.append({'prompt': [BOS_ID] + ids(cfg.prompt_len - 1 - 3 * i), 'chosen': ids(reply),
                      'rejected': ids(reply - 20)})
    return dpo.collate_pairs(pairs)


def run_arm(cfg):
    """One arm in this process; prints a JSON line with its peak memory growth and step time."""
    import dpo
    import sft
    from lora import apply_lora
    from model import GPT, ModelConfig
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cuda = cfg.device.startswith('cuda')
    model = GPT(ModelConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                            n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, ffn_hidden=4 * cfg.n_embd,
                            block_size=cfg.block_size))
    apply_lora(model, r=cfg.lora_r, alpha=2.0 * cfg.lora_r,
               targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))
    model.to(cfg.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {k: v.to(cfg.device) for k, v in make_batch(cfg).items()}
    dpo_cfg = lumi.Config(beta=0.1, loss_type='sigmoid', label_smoothing=0.0)
    dtype = 'bfloat16' if cuda else 'float32'

    def step():
        with lumi.autocast(cfg.device, dtype):
            if cfg.arm == 'sft':
                loss, _ = sft.sft_loss(model, (batch['idx'], batch['targets']))
            else:
                loss = dpo.score_batch(model, batch, dpo_cfg)['loss'].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    t0 = time.time()
    for _ in range(cfg.steps):
        loss = step()
    seconds = (time.time() - t0) / cfg.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps(dict(arm=cfg.arm, peak_mb=peak / 2**20, step_s=seconds, loss=loss,
                          rows=int(batch['idx'].size(0)), seq=int(batch['idx'].size(1)))))


def main(argv=None):
    cfg = lumi.load_config(lumi.declared_keys(__file__), argv)
    if cfg.arm:
        return run_arm(cfg)
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith('--')]
    results = {'sft': [], 'dpo': []}
    for r in range(cfg.repeats):
        for name in ('sft', 'dpo'):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--arm={name}'] + args,
                                 capture_output=True, text=True, cwd=ROOT,
                                 env=dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072'))
            if out.returncode != 0:
                raise SystemExit(f"arm {name} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(res)
            print(f"repeat {r}: {name}: peak +{res['peak_mb']:.1f} MB, {res['step_s']:.2f} s/step "
                  f"({res['rows']} rows x {res['seq']} tokens)", flush=True)
    sft_mb = statistics.median(x['peak_mb'] for x in results['sft'])
    dpo_mb = statistics.median(x['peak_mb'] for x in results['dpo'])
    sft_s = statistics.median(x['step_s'] for x in results['sft'])
    dpo_s = statistics.median(x['step_s'] for x in results['dpo'])
    what = 'torch.cuda.max_memory_allocated' if cfg.device.startswith('cuda') else 'ru_maxrss growth'
    print(f"\nmodel {cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"LoRA r={cfg.lora_r} on all projections; "
          f"batch {cfg.batch_size} pairs = {2 * cfg.batch_size} rows x {results['sft'][0]['seq']} tokens; "
          f"{cfg.device}, {what}, median of {cfg.repeats} fresh processes per arm")
    print(f"SFT step peak  {sft_mb:8.1f} MB   {sft_s:6.2f} s/step")
    print(f"DPO step peak  {dpo_mb:8.1f} MB   {dpo_s:6.2f} s/step")
    print(f"DPO / SFT memory ratio: {dpo_mb / sft_mb:.3f}x (target <= 1.3x)   "
          f"time ratio: {dpo_s / sft_s:.2f}x")
    return dpo_mb / sft_mb


if __name__ == '__main__':
    main()
