"""
Peak memory of a training step with and without activation checkpointing, on the tiny shape at context 1024.

    python benchmarks/bench_memory.py                   # CPU: peak RSS (ru_maxrss)
    python benchmarks/bench_memory.py --device=cuda     # GPU: torch.cuda.max_memory_allocated too

The tiny model of configs/tiny.py (6 layers x 256, 4 heads, SwiGLU 1024, 32768-token vocabulary, tied head,
14.7M parameters) takes `steps` AdamW steps on batch_size x 1024 random tokens, in the dtype 'auto' gives
the device (lumi.resolve_dtype), once keeping every block's activations for the backward pass ('kept') and
once keeping only each block's input and recomputing the rest in the backward ('recomputed', training.py's
--activation_checkpointing=True, in GPT.forward). Each arm runs in a fresh process, so one arm's freed memory
cannot hide the other's peak. On CPU the figures are the process's peak RSS (ru_maxrss) and its growth over
the steps (the model, optimizer and batch already built; the optimizer's moments appear at the first step, in
both arms); the arms run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), as in
bench_dpo.py, so that freed temporaries do not stay resident and RSS follows the tensors alive at the peak.
Also printed, as context only: each arm's CPU seconds a step, whose ratio is what the recomputation costs.

Deliberately left out: wall-clock speed claims (bench_train.py), LoRA and DPO steps (bench_lora.py,
bench_dpo.py), and Windows (ru_maxrss comes from the POSIX resource module).
"""
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import lumi  # noqa: E402

arm = ''                  # internal: 'kept' or 'recomputed' runs one arm in this process
device = 'cpu'
dtype = 'auto'            # what lumi.resolve_dtype makes of it on the device (fp32 on an AVX2 CPU)
threads = 1               # [1, inf) torch threads per arm (the machine is shared)
vocab_size = 32768        # [1, inf) the tiny shape: configs/tiny.py
n_layer = 6               # [1, inf)
n_embd = 256              # [1, inf)
n_head = 4                # [1, inf)
ffn_hidden = 1024         # [1, inf)
block_size = 1024         # [1, inf) the context the benchmark is about
batch_size = 4            # [1, inf) configs/tiny.py's
steps = 2                 # [1, inf) optimizer steps per arm
seed = 0                  # [0, inf)

ARMS = ('kept', 'recomputed')


def run_arm(cfg):
    """One arm in this process; prints a JSON line with its peak memory and CPU seconds a step."""
    import optim
    from model import GPT, ModelConfig
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = lumi.pick_device(cfg.device)
    dt = lumi.resolve_dtype(cfg.dtype, dev)
    model = GPT(ModelConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                            n_head=cfg.n_head, n_kv_head=cfg.n_head, ffn_hidden=cfg.ffn_hidden,
                            block_size=cfg.block_size)).to(dev).train()
    model.activation_checkpointing = cfg.arm == 'recomputed'
    keys = lumi.load_config(lumi.declared_keys('training.py'), [])
    optimizer = optim.make_optimizer(model, keys, dev)
    scaler = lumi.loss_scaler(dev, dt)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=g).to(dev)
    cuda = dev.startswith('cuda')
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    cpu0 = time.process_time()
    for _ in range(cfg.steps):
        with lumi.autocast(dev, dt):
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    loss = loss.item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = dict(arm=cfg.arm, device=dev, dtype=dt, peak_rss_mb=peak / 2**20, growth_mb=(peak - base) / 2**20,
               cpu_s_per_step=(time.process_time() - cpu0) / cfg.steps, loss=loss,
               params=model.num_params())
    if cuda:
        out['gpu_peak_mb'] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    print(json.dumps(out))


def cpu_flags():
    """The vector flags behind a CPU figure (from /proc/cpuinfo where there is one)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return 'unknown'
    return ' '.join(f for f in flags if f.startswith(('avx', 'amx'))) or 'no AVX'


def main(argv=None):
    cfg = lumi.load_config(lumi.declared_keys(__file__), argv, shares_with=())
    if cfg.arm:
        return run_arm(cfg)
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith('--')]
    results = {}
    for name in ARMS:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--arm={name}'] + args,
                              capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072', OMP_NUM_THREADS='1'))
        if proc.returncode != 0:
            raise SystemExit(f"arm {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    kept, rec = results['kept'], results['recomputed']
    print(f"tiny shape {cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}, {kept['params'] / 1e6:.1f}M "
          f"parameters; batch {cfg.batch_size} x {cfg.block_size} tokens, {cfg.steps} AdamW steps; "
          f"{kept['device']} {kept['dtype']}, {cfg.threads} thread(s); CPU flags: {cpu_flags()}")
    print(f"{'arm':<11} {'peak RSS MB':>11} {'growth MB':>10} {'CPU s/step':>10}"
          + (f" {'GPU peak MB':>11}" if 'gpu_peak_mb' in kept else ''))
    for name in ARMS:
        r = results[name]
        print(f"{name:<11} {r['peak_rss_mb']:>11.0f} {r['growth_mb']:>10.0f} {r['cpu_s_per_step']:>10.2f}"
              + (f" {r['gpu_peak_mb']:>11.0f}" if 'gpu_peak_mb' in r else ''))
    ratio = lambda key: rec[key] / kept[key]
    print(f"recomputed / kept: peak RSS {ratio('peak_rss_mb'):.2f}x, growth {ratio('growth_mb'):.2f}x, "
          f"CPU time {ratio('cpu_s_per_step'):.2f}x"
          + (f", GPU peak {ratio('gpu_peak_mb'):.2f}x" if 'gpu_peak_mb' in kept else '')
          + f"; last loss {'identical' if kept['loss'] == rec['loss'] else 'differs'} ({kept['loss']:.6f})")
    return results


if __name__ == '__main__':
    main()
