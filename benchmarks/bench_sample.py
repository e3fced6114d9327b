"""
Decode speed of the generation engine (engine.generate_ids: one prefill, then model.decode_step per token)
against Hugging Face generate on the same exported weights, each beside the memory-bandwidth floor: the
weights' bytes over this core's read bandwidth, measured in the same run, is the least time a step can take
when it reads every weight once.

    taskset -c 1 python benchmarks/bench_sample.py [--shapes="('cpu', '6x256')"] [--dtypes=...] [--rounds=5]

Shapes: 'cpu' is the CPU profile's model (configs/cpu.py: 4 layers x 128, context 256, vocab 4096, QK-norm,
an untied head), 'cpu_llama' the same without QK-norm and tied (the profile before issue 25), '6x256'
6 layers x 256 with context 1024 and the same vocabulary. Weights: random, at ~40x the init scale (as
tests/conftest.py's lively model) so that each token depends on the whole context and the greedy tokens are
a real check; speed does not depend on the values. They are exported with export.py (hf_state_dict, hf_config,
save_safetensors) and loaded back with AutoModelForCausalLM.from_pretrained (Llama or Qwen3): the baseline
runs what `lumi.py export --format=hf` writes. Greedy, no stop tokens, a 16-token prompt (batch 8: 8 prompts
of 16), and as many new tokens as fit the context, at most 256, so both sides see the same positions.

Three arms, alternating in one process, a whole generation each in turn, `rounds` times: Hugging Face
generate; the engine with forward() for each new token (how Lumi decoded before issue 29, with today's
engine loop); the engine with decode_step (DecodeWeights: stacked, transposed matrices with the norms folded
in, RoPE as one product). tok/s are by this process's CPU time (one thread: what an idle core would do; run it
pinned, `taskset -c 1`, on a shared machine) and are the median over rounds; "x HF" is the median of each
round's ratio. "same" counts the greedy tokens equal to Hugging Face's.

Deliberately left out: sampling filters (they cost the same on both sides), prefill speed, serving overhead,
and torch.compile (on this CPU it took 64-105 s to compile the decoding step and made it no faster:
docs/BENCHMARKS.md, "Sampling").
"""
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import export  # noqa: E402
import lumi  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

shapes = ('cpu', '6x256')
dtypes = ('float32', 'bfloat16')
batches = (1, 8)
max_new = 256        # new tokens at most; fewer where prompt + new would pass the context
prompt_tokens = 16
rounds = 5
threads = 1          # 1: CPU time is what an idle core would take
arms = ('hf', 'forward', 'decode_step')
seed = 0

# 'cpu' is configs/cpu.py's model as it stands (issue 25: QK-norm and an untied head, exported as Qwen3);
# 'cpu_llama' the same shape as a plain Llama (tied, no QK-norm), the CPU profile before issue 25
SHAPES = {'cpu': dict(n_layer=4, n_head=2, n_kv_head=2, n_embd=128, ffn_hidden=512, block_size=256,
                      qk_norm=True, tie_embeddings=False),
          'cpu_llama': dict(n_layer=4, n_head=2, n_kv_head=2, n_embd=128, ffn_hidden=512, block_size=256),
          '6x256': dict(n_layer=6, n_head=4, n_kv_head=4, n_embd=256, ffn_hidden=1024, block_size=1024)}
VOCAB = 4096


def cpu_time(fn):
    """(fn(), CPU seconds it took)."""
    c0 = time.process_time()
    out = fn()
    return out, time.process_time() - c0


def read_bandwidth(nbytes, repeats=30):
    """Bytes a second this process reads from a buffer of nbytes (the best of repeats sums over it): the
    rate at which a decoding step could at best stream weights of that size."""
    buf = torch.ones(max(1, nbytes // 4))
    buf.sum()
    return nbytes / min(cpu_time(buf.sum)[1] for _ in range(repeats))


def lively_model(shape, seed):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=VOCAB, **SHAPES[shape]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # ~40x the init's 0.02 for a 128-wide input: every token depends on the context
                p.normal_(0, 1.5 / math.sqrt(p.size(1)))
    return model.eval().requires_grad_(False)


def hf_model(model, dtype, where):
    """AutoModelForCausalLM.from_pretrained (Llama, or Qwen3 with QK-norm) on what export.py writes for
    model (weights and config)."""
    import transformers
    export.save_safetensors(export.hf_state_dict(model, getattr(torch, dtype)),
                            os.path.join(where, 'model.safetensors'), metadata={'format': 'pt'})
    lumi.write_json(os.path.join(where, 'config.json'), export.hf_config(model.cfg, dtype))
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype))
    return hf.eval().requires_grad_(False)


def lumi_model(model, dtype):
    """model with its weights cast as checkpoint.load_model casts them (a tied head stays tied)."""
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    return out


def run_arm(arm, lumi_net, hf, prompts, n):
    """The greedy tokens of each prompt, from one whole generation by arm."""
    if arm == 'hf':
        ids = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]),
                                                                            dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return ids[:, len(prompts[0]):].tolist()
    greedy = engine.Sampling(max_new_tokens=n, temperature=0.0, top_p=1.0)
    real = engine.decode_weights
    if arm == 'forward':  # the engine without its decoding step: forward() for every new token
        engine.decode_weights = lambda model: None
    try:
        out = [[] for _ in prompts]
        for rows, tokens in engine.generate_ids(lumi_net, prompts, greedy):
            for r, t in zip(rows, tokens):
                out[r].append(t)
        return out
    finally:
        engine.decode_weights = real


def machine():
    info = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    fields = dict(line.split(':', 1) for line in info.splitlines() if ':' in line)
    flags = fields.get('Flags', '').split()
    wanted = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, flags {' '.join(wanted)}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"affinity {sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")


def main(argv=None):
    cfg = lumi.load_config(lumi.declared_keys(__file__), argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import transformers
    print(f"machine: {machine()}; transformers {transformers.__version__}")
    print(f"{'shape':>6} {'dtype':>9} {'B':>2} {'new':>4} | " + ' | '.join(f"{a:>16}" for a in cfg.arms)
          + f" | {'floor':>14} | same as HF")
    results = []
    for shape in cfg.shapes:
        base = lively_model(shape, cfg.seed)
        block = base.cfg.block_size
        n = min(cfg.max_new, block - cfg.prompt_tokens)
        g = torch.Generator().manual_seed(cfg.seed)
        all_prompts = torch.randint(8, VOCAB, (max(cfg.batches), cfg.prompt_tokens), generator=g).tolist()
        for dtype in cfg.dtypes:
            net = lumi_model(base, dtype)
            nbytes = sum(p.numel() * p.element_size() for p in net.parameters())
            with tempfile.TemporaryDirectory() as where:
                hf = hf_model(base, dtype, where)
            for batch in cfg.batches:
                prompts = all_prompts[:batch]
                for arm in cfg.arms:  # warm-up: allocators, MKL's buffers, the decode weights
                    run_arm(arm, net, hf, prompts, 8)
                tokens, seconds = {}, {a: [] for a in cfg.arms}
                for _ in range(cfg.rounds):
                    for arm in cfg.arms:
                        tokens[arm], s = cpu_time(lambda: run_arm(arm, net, hf, prompts, n))
                        seconds[arm].append(s)
                bandwidth = read_bandwidth(nbytes)
                floor = batch * bandwidth / nbytes  # tok/s if a step cost only reading the weights once
                rate = {a: statistics.median(batch * n / s for s in seconds[a]) for a in cfg.arms}
                ratio = {a: statistics.median(h / s for h, s in zip(seconds['hf'], seconds[a]))
                         for a in cfg.arms if 'hf' in cfg.arms}
                same = {a: sum(x == y for r, h in zip(tokens[a], tokens['hf']) for x, y in zip(r, h))
                        for a in cfg.arms if 'hf' in cfg.arms and a != 'hf'}
                row = dict(shape=shape, dtype=dtype, batch=batch, new_tokens=n, weight_bytes=nbytes,
                           bandwidth_gb_s=round(bandwidth / 1e9, 2), floor_tok_s=round(floor, 1),
                           tok_s={a: round(v, 1) for a, v in rate.items()},
                           x_hf={a: round(v, 2) for a, v in ratio.items()}, same_as_hf=same,
                           of=batch * n)
                results.append(row)
                cells = [f"{rate[a]:>7.1f}" + (f" {ratio[a]:>5.2f}x HF" if a in ratio and a != 'hf'
                                                 else ' ' * 9) for a in cfg.arms]
                print(f"{shape:>6} {dtype:>9} {batch:>2} {n:>4} | " + ' | '.join(cells)
                      + f" | {floor:>6.0f} ({bandwidth / 1e9:.1f} GB/s) | "
                      + ', '.join(f"{a} {v}/{batch * n}" for a, v in same.items()), flush=True)
    print(json.dumps(results))
    return results


if __name__ == '__main__':
    main()
