"""
Decode speed of the generation engine (engine.py: KV cache, one prefill, then one token per forward pass)
against recomputing the whole context for every new token (nanoGPT's sample.py), at 128, 512 and 1024 new
tokens; then, with the cache, a batch of 8 prompts of different lengths against one prompt, and bf16 weights
against fp32. Goal: >= 5x at 512 new tokens on a CPU for the tiny model.

    python benchmarks/bench_sample.py [--lengths=(128,512,1024)] [--threads=1] [--device=cpu]

Both paths run in lockstep, one token of each in turn, each token timed on its own, so a neighbour's load
falls on both alike; tokens/s are given by the wall clock and by this process's CPU time (which, with one
thread, is what an idle core would take). Model: the shape of configs/tiny.py (ModelConfig defaults when
that file is missing), random init, fp32; speed does not depend on the weights. Greedy, no stop tokens, so
every run makes exactly its tokens. Both paths compute the LM head at the last position only, so the ratio
is the cache's alone. Past the window (block_size) the engine slides it by half and the baseline crops the
context, so their tokens are checked to agree only while the context fits.

Deliberately left out: sampling filters (they cost the same on both paths) and serving overhead.
"""
import copy
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import lumi  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

model_config = 'configs/tiny.py'
lengths = (128, 512, 1024)
prompt_tokens = 16
batch = 8
threads = 1        # 0: torch's default; 1 keeps CPU time equal to an idle core's wall time
device = 'cpu'
seed = 0


def timed(fn):
    """(result, wall seconds, CPU seconds) of fn()."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def race(n, runners):
    """Advance each token generator one token in turn, n times; (tokens, wall s, CPU s) of each."""
    tokens, wall, cpu = [[] for _ in runners], [0.0] * len(runners), [0.0] * len(runners)
    for _ in range(n):
        for i, run in enumerate(runners):
            t, w, c = timed(lambda: next(run))
            tokens[i].append(t)
            wall[i] += w
            cpu[i] += c
    return tokens, wall, cpu


@torch.no_grad()
def recompute_greedy(model, prompt, n):
    """nanoGPT's decoding, the baseline: no cache, the whole context (its last block_size tokens) run again
    for every new token."""
    seq = list(prompt)
    for _ in range(n):
        token = int(model(torch.tensor([seq[-model.cfg.block_size:]]))[0][0, -1].argmax())
        yield token
        seq.append(token)


def main(argv=None):
    cfg = lumi.load_config(lumi.declared_keys(__file__), argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    defaults = dict(vocab_size=32768, **{k: v.default for k, v in lumi.declared_keys('model.py').items()})
    found = os.path.exists(cfg.model_config)
    margs = lumi.load_config(defaults, [cfg.model_config] if found else [])
    margs.pop('config_file', None)
    model = GPT(ModelConfig(**margs)).eval().to(cfg.device)
    block = model.cfg.block_size
    cpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    cpu = next((l.split(':', 1)[1].strip() for l in cpu.splitlines() if l.startswith('Model name')), '?')
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cfg.device}")
    print(f"model: {cfg.model_config if found else 'ModelConfig defaults'} "
          f"({model.num_params():,} parameters, block {block}), random init, fp32; "
          f"prompt {cfg.prompt_tokens} tokens, greedy")

    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(8, model.cfg.vocab_size, (cfg.prompt_tokens,), generator=g).tolist()
    greedy = lambda n: engine.Sampling(max_new_tokens=n, temperature=0.0, top_p=1.0)
    cached = lambda n, prompts=(prompt,), net=model: (
        ts for _, ts in engine.generate_ids(net, list(prompts), greedy(n)))
    recompute = lambda n: recompute_greedy(model, prompt, n)
    race(16, [cached(16), recompute(16)])  # warm-up

    print(f"\n{'new tokens':>10} | {'cache tok/s':>18} | {'recompute tok/s':>18} | {'speed-up':>15} | "
          f"agree while it fits")
    print(f"{'':>10} | {'wall':>8} {'CPU':>9} | {'wall':>8} {'CPU':>9} | {'wall':>6} {'CPU':>8} |")
    for n in cfg.lengths:
        (fast, slow), wall, cpu = race(n, [cached(n), recompute(n)])
        fits = min(n, block - len(prompt) + 1)
        fast = [ts[0] for ts in fast]  # the engine yields each step's tokens of the batch, here of one row
        same = next((i for i, (a, b) in enumerate(zip(fast[:fits], slow[:fits])) if a != b), fits)
        print(f"{n:>10} | {n / wall[0]:>8.1f} {n / cpu[0]:>9.1f} | {n / wall[1]:>8.1f} {n / cpu[1]:>9.1f} | "
              f"{wall[1] / wall[0]:>5.1f}x {cpu[1] / cpu[0]:>7.1f}x | {same}/{fits} tokens", flush=True)

    n = max(cfg.lengths[0], 128)
    prompts = [torch.randint(8, model.cfg.vocab_size, (cfg.prompt_tokens * (1 + i % 4),),
                             generator=g).tolist()
               for i in range(cfg.batch)]
    (one, many), wall, cpu = race(n, [cached(n), cached(n, prompts)])
    rate = lambda tokens, seconds: sum(len(t) for t in tokens) / seconds
    print(f"\nbatch of {cfg.batch} prompts of {cfg.prompt_tokens}-{4 * cfg.prompt_tokens} tokens "
          f"(left-padded), {n} new tokens each: "
          f"{rate(many, wall[1]):.1f} tok/s wall, {rate(many, cpu[1]):.1f} CPU, against "
          f"{rate(one, wall[0]):.1f} / {rate(one, cpu[0]):.1f} for one prompt: "
          f"{rate(many, cpu[1]) / rate(one, cpu[0]):.1f}x by CPU time")

    half = copy.deepcopy(model)
    for p in half.parameters():  # what checkpoint.load_model does for --dtype=bfloat16
        p.data = p.data.to(torch.bfloat16)
    (fp32, bf16), wall, cpu = race(n, [cached(n), cached(n, net=half)])
    same = sum(a == b for a, b in zip(fp32, bf16))
    print(f"bf16 weights (--dtype=bfloat16), one prompt, {n} new tokens: {n / wall[1]:.1f} tok/s wall, "
          f"{n / cpu[1]:.1f} CPU, against {n / wall[0]:.1f} / {n / cpu[0]:.1f} in fp32: "
          f"{cpu[0] / cpu[1]:.2f}x by CPU time; {same}/{n} greedy tokens equal to fp32's")

if __name__ == '__main__':
    main()
