"""
Step time and peak memory of LoRA fine-tuning against full fine-tuning, one fresh process per arm so that
each arm's peak memory is its own.

    python benchmarks/bench_lora.py                      # the model of configs/tiny.py, batch 8 x 256
    python benchmarks/bench_lora.py --batch_size=4 --steps=5

Arms: full fine-tuning, then LoRA (all seven projections) at r=8 and r=16 through the torch path. On CUDA
two more: LoRA r=16 through the fused Triton kernel, and the torch path beside it, in bf16 autocast.
A step is an SFT step, training.Trainer.train_step over sft.sft_loss (logits on the learned positions only;
here the second half of each row, as a prompt then a reply): backward, grad clip, AdamW, on random tokens (the
data does not change the cost). Step time is the median over the timed steps,
by the wall clock and by the process's CPU time (on a shared machine the CPU time is what an idle core would
take with one thread).
Memory: CPU, the peak resident set (ru_maxrss) of the arm's process above what it held once torch was
imported (the allocator keeps freed blocks, so temporaries count too); CUDA, torch.cuda.max_memory_allocated.
Counted exactly besides: the training state (weights, plus gradients and AdamW's two moments of the
trainable ones) and the activations one forward saves for backward. Ratios are against the full fine-tuning
arm of this run.

Deliberately left out: the fused kernel on CPU (it runs only on CUDA) and quality (the data is random).
"""
import json
import os
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import training  # noqa: E402
import lumi  # noqa: E402
import sft  # noqa: E402
import model as model_lib  # noqa: E402
from lora import apply_lora
from model import GPT, ModelConfig  # noqa: E402

config = os.path.join(ROOT, 'configs', 'tiny.py')  # model shape: its n_layer, n_embd, ... (if present)
batch_size = 8
seq_len = 256
steps = 10
warmup = 3
threads = 1  # the tiny model's ops are too small to split; on a shared machine two threads wait on each other
arm = ''  # set by the parent for each child process
device = 'auto'
dtype = 'float32'  # CPU: float32 or bfloat16 autocast; CUDA arms always run bf16 autocast
KEYS = lumi.declared_keys(__file__)
TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def model_config(path):
    """ModelConfig from the model keys of a config file (the rest of it is other stages' business)."""
    fields = ModelConfig.__dataclass_fields__
    values = {}
    if path and os.path.exists(path):
        namespace = {}
        exec(compile(open(path).read(), path, 'exec'), namespace)
        values = {k: v for k, v in namespace.items() if k in fields}
    return ModelConfig(**values)


class SameBatch:
    """One batch, again and again: the step's cost does not depend on the data."""

    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def run_arm(cfg):
    """One arm in this process: returns its timings and memory as a dict."""
    dev = lumi.pick_device(cfg.device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    mcfg = model_config(cfg.config)
    mcfg.block_size = max(mcfg.block_size, cfg.seq_len)
    model = GPT(mcfg)
    kind, _, rest = cfg.arm.partition('_r')
    if kind != 'full':
        r, _, path = rest.partition('_')
        apply_lora(model, r=int(r), alpha=2.0 * int(r), targets=TARGETS)
        if path == 'torch':  # the LoRA dispatch alone falls back to torch; attention keeps its kernel
            kernel = model_lib._kernel
            model_lib._kernel = lambda name: None if name == 'lora' else kernel(name)
    model.to(dev).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, mcfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(dev)
    y = x[:, 1:].clone()
    y[:, :cfg.seq_len // 2] = -1  # the prompt: no loss
    dtype = 'bfloat16' if dev.startswith('cuda') else cfg.dtype
    out_dir = tempfile.mkdtemp(prefix='bench_lora_')
    run = training.Trainer(lumi.Config(lumi.load_config(lumi.declared_keys('training.py'), []), device=dev,
                                       dtype=dtype, compile=False, resume='never', out_dir=out_dir),
                           model, SameBatch((x[:, :-1], y)), sft.sft_loss)
    if dev.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for i in range(cfg.warmup + cfg.steps):
        if dev.startswith('cuda'):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        run.train_step(run.cfg.learning_rate)  # the SFT step itself: loss, backward, clipping, AdamW
        if dev.startswith('cuda'):
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if dev.startswith('cuda'):
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    # what the two ways must hold, counted exactly: activations saved for backward (unique storages, weights
    # excluded), and the training state (weights + gradients and AdamW's two moments of what trains)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lumi.autocast(dev, dtype):
        loss, _ = sft.sft_loss(model, (x[:, :-1], y))
    shutil.rmtree(out_dir, ignore_errors=True)
    state = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())
    return dict(arm=cfg.arm, device=torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu',
                step_ms=1000 * statistics.median(times), cpu_ms=1000 * statistics.median(cpu_times),
                mem_mb=mem, saved_mb=sum(saved.values()) / 2**20, state_mb=state / 2**20, trainable=trainable,
                total=total, loss=float(loss))


def main(argv):
    cfg = lumi.load_config(KEYS, argv)
    if cfg.arm:
        print(json.dumps(run_arm(cfg)))
        return
    arms = ['full', 'lora_r8_torch', 'lora_r16_torch']
    if torch.cuda.is_available() and cfg.device != 'cpu':
        arms.append('lora_r16_fused')
    mcfg = model_config(cfg.config)
    print(f"model {mcfg.n_layer} layers, d {mcfg.n_embd}, ffn {mcfg.ffn_hidden}, "
          f"heads {mcfg.n_head}/{mcfg.n_kv_head}, "
          f"vocab {mcfg.vocab_size}; batch {cfg.batch_size} x {cfg.seq_len}, {cfg.steps} timed steps after "
          f"{cfg.warmup}, {cfg.threads} threads, CPU dtype {cfg.dtype}", flush=True)
    results = []
    for name in arms:
        args = ([sys.executable, os.path.abspath(__file__), f'--arm={name}']
                + [a for a in argv if not a.startswith('--arm')])
        out = subprocess.run(args, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=str(cfg.threads)))
        if out.returncode:
            raise SystemExit(f"arm {name} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done", flush=True)
    full = results[0]
    mem_name = 'peak CUDA MB' if full['device'] != 'cpu' else 'peak RSS MB'
    print(f"\ndevice {full['device']}")
    print(f"{'arm':16s} {'trainable':>16s} {'wall ms':>9s} {'/full':>6s} {'CPU ms':>9s} {'/full':>6s} "
          f"{mem_name:>13s} {'/full':>6s} {'state MB':>9s} {'saved MB':>9s} {'sum/full':>9s}")
    for r in results:
        both = (r['state_mb'] + r['saved_mb']) / (full['state_mb'] + full['saved_mb'])
        print(f"{r['arm']:16s} {r['trainable']:>9,d} {100 * r['trainable'] / r['total']:5.2f}% "
              f"{r['step_ms']:9.1f} {r['step_ms'] / full['step_ms']:6.2f} "
              f"{r['cpu_ms']:9.1f} {r['cpu_ms'] / full['cpu_ms']:6.2f} "
              f"{r['mem_mb']:13.0f} {r['mem_mb'] / full['mem_mb']:6.2f} "
              f"{r['state_mb']:9.0f} {r['saved_mb']:9.0f} {both:9.2f}")


if __name__ == '__main__':
    main(sys.argv[1:])
