"""
Speed of the Triton kernels against the torch baselines they replace, measured in the same run on one GPU.

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --seq_lens="(1024, 4096)" --head_dims="(128,)"

Attention: kernels.attention.flash_attention against F.scaled_dot_product_attention pinned to its
FlashAttention backend, causal, bf16, (batch, heads, seq, head_dim) with batch x seq = tokens_per_launch and
heads x head_dim = model_width, so every launch fills the GPU. Forward, and forward + backward.
LoRA: kernels.lora.lora_linear against the unfused x @ W.T + s * (x @ A.T) @ B.T, W frozen, bf16, for the
three projection shapes of each model width (attention d -> d, FFN up d -> 4d, FFN down 4d -> d).

Times are medians of triton.testing.do_bench (milliseconds). "speed" is baseline time / Triton time, so
above 1x the Triton kernel is faster. Attention FLOPs count the causal half of the score matrix only (the
FlashAttention convention: forward 2 matmuls, backward 2.5x the forward). Before timing, each kernel is
checked against its baseline on the first shape and the largest relative deviation printed.
Autotuning (a few configs per kernel and shape) happens on first use, outside the timed region; the whole
run takes a few minutes on an H100. Without a CUDA device it prints a message and exits 0.

Deliberately left out: end-to-end training speed (bench_train.py) and CPU timings
(the interpreter is no kernel).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import lumi  # noqa: E402
from model import kernel_module  # noqa: E402

seq_lens = (512, 1024, 2048, 4096, 8192)
head_dims = (64, 128)
tokens_per_launch = 16384  # batch = tokens_per_launch // seq
model_width = 2048  # heads = model_width // head_dim
lora_widths = (256, 512, 768)  # Lumi's tiny, small and base models; FFN hidden 4x
lora_ranks = (8, 16)
lora_tokens = (8192, 16384)
lora_scale = 2.0
warmup_ms = 25
rep_ms = 100
KEYS = lumi.declared_keys(__file__)


def bench(fn, cfg):
    """Median milliseconds of fn() after a first call that compiles and autotunes."""
    import triton
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median")


def tflops(flop, ms):
    return flop / (ms * 1e-3) / 1e12


def max_error(actual, expected):
    """Largest deviation of each tensor, relative to its largest baseline value; the worst one."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
               for a, b in zip(actual, expected))


def sdpa_flash(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def forward_backward(fn, inputs, grad_out):
    """A closure running fn forward and backward to the given inputs
    (torch.autograd.grad: no .grad to zero)."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def bench_attention(cfg):
    flash_attention = kernel_module('attention').flash_attention
    print(f"\nattention: causal, bf16, batch x seq = {cfg.tokens_per_launch}, "
          f"heads x head_dim = {cfg.model_width}")
    print(f"{'head_dim':>8} {'seq':>5} {'batch':>5} {'heads':>5} | {'forward ms':>10} {'TFLOP/s':>7} "
          f"{'sdpa ms':>8} {'TFLOP/s':>7} {'speed':>6} | {'fwd+bwd ms':>10} {'TFLOP/s':>7} {'sdpa ms':>8} "
          f"{'TFLOP/s':>7} {'speed':>6}")
    for head_dim in cfg.head_dims:
        heads = cfg.model_width // head_dim
        for i, seq in enumerate(cfg.seq_lens):
            batch = max(1, cfg.tokens_per_launch // seq)
            torch.manual_seed(0)
            q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            grad_out = torch.randn_like(q)
            if i == 0:
                ours = (flash_attention(q, k, v),
                        *torch.autograd.grad(flash_attention(q, k, v), (q, k, v), grad_out))
                ref = (sdpa_flash(q, k, v), *torch.autograd.grad(sdpa_flash(q, k, v), (q, k, v), grad_out))
                print(f"  check head_dim {head_dim}: max |triton - sdpa| / max |sdpa| over out, dq, dk, dv = "
                      f"{max_error(ours, ref):.3g} (bf16)")
            fwd_flop = 4 * batch * heads * seq * seq * head_dim / 2
            ms = [bench(lambda: flash_attention(q, k, v), cfg), bench(lambda: sdpa_flash(q, k, v), cfg),
                  bench(forward_backward(flash_attention, (q, k, v), grad_out), cfg),
                  bench(forward_backward(sdpa_flash, (q, k, v), grad_out), cfg)]
            flop = [fwd_flop, fwd_flop, 3.5 * fwd_flop, 3.5 * fwd_flop]
            tf = [tflops(f, t) for f, t in zip(flop, ms)]
            print(f"{head_dim:>8} {seq:>5} {batch:>5} {heads:>5} | "
                  f"{ms[0]:>10.3f} {tf[0]:>7.1f} {ms[1]:>8.3f} {tf[1]:>7.1f} {ms[1] / ms[0]:>5.2f}x | "
                  f"{ms[2]:>10.3f} {tf[2]:>7.1f} {ms[3]:>8.3f} {tf[3]:>7.1f} {ms[3] / ms[2]:>5.2f}x",
                  flush=True)
            del q, k, v, grad_out


def unfused_lora(x, weight, lora_a, lora_b, scale):
    return x @ weight.t() + scale * ((x @ lora_a.t()) @ lora_b.t())


def bench_lora(cfg):
    lora_linear = kernel_module('lora').lora_linear
    print(f"\nLoRA linear: bf16, W frozen, scale {cfg.lora_scale}; baseline x @ W.T + s * (x @ A.T) @ B.T")
    print(f"{'width':>5} {'layer':>6} {'in':>5} {'out':>5} {'rank':>4} {'tokens':>6} | {'forward ms':>10} "
          f"{'TFLOP/s':>7} {'torch ms':>8} {'speed':>6} | {'fwd+bwd ms':>10} {'TFLOP/s':>7} {'torch ms':>8} "
          f"{'speed':>6}")
    checked = False
    for width in cfg.lora_widths:
        layers = (("attn", width, width), ("up", width, 4 * width), ("down", 4 * width, width))
        for name, n_in, n_out in layers:
            for rank in cfg.lora_ranks:
                for tokens in cfg.lora_tokens:
                    torch.manual_seed(0)
                    dev = dict(device="cuda", dtype=torch.bfloat16)
                    x = torch.randn(tokens, n_in, **dev, requires_grad=True)
                    weight = torch.randn(n_out, n_in, **dev) / n_in ** 0.5
                    lora_a = (torch.randn(rank, n_in, **dev) / n_in ** 0.5).requires_grad_()
                    lora_b = torch.randn(n_out, rank, **dev).requires_grad_()
                    grad_out = torch.randn(tokens, n_out, **dev)
                    inputs = (x, lora_a, lora_b)
                    fused = lambda x, a, b: lora_linear(x, weight, a, b, cfg.lora_scale)
                    unfused = lambda x, a, b: unfused_lora(x, weight, a, b, cfg.lora_scale)
                    if not checked:
                        ours = (fused(*inputs), *torch.autograd.grad(fused(*inputs), inputs, grad_out))
                        ref = (unfused(*inputs), *torch.autograd.grad(unfused(*inputs), inputs, grad_out))
                        print(f"  check: max |triton - torch| / max |torch| over y, dx, dA, dB = "
                              f"{max_error(ours, ref):.3g} (bf16)")
                        checked = True
                    fwd_flop = 2 * tokens * (n_in * n_out + rank * (n_in + n_out))
                    # backward: dx = dy W + (dy B) A, dA = (dy B)^T x, dB = dy^T (x A^T)
                    total_flop = fwd_flop + 2 * tokens * (n_in * n_out + 2 * rank * (n_in + n_out))
                    ms = [bench(lambda: fused(*inputs), cfg), bench(lambda: unfused(*inputs), cfg),
                          bench(forward_backward(fused, inputs, grad_out), cfg),
                          bench(forward_backward(unfused, inputs, grad_out), cfg)]
                    print(f"{width:>5} {name:>6} {n_in:>5} {n_out:>5} {rank:>4} {tokens:>6} | "
                          f"{ms[0]:>10.3f} {tflops(fwd_flop, ms[0]):>7.1f} {ms[1]:>8.3f} "
                          f"{ms[1] / ms[0]:>5.2f}x | {ms[2]:>10.3f} {tflops(total_flop, ms[2]):>7.1f} "
                          f"{ms[3]:>8.3f} {ms[3] / ms[2]:>5.2f}x", flush=True)


def main():
    cfg = lumi.load_config(KEYS)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped")
        return
    import triton
    start = time.time()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    bench_attention(cfg)
    bench_lora(cfg)
    print(f"\ndone in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
