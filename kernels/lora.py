"""
Fused LoRA linear in Triton, beside the plain torch reference it must match.

lora_linear(x, weight, lora_a, lora_b, scale) = x W^T + scale * (x A^T) B^T, with x (..., in), W (out, in)
frozen, A (rank, in), B (out, rank). The unfused expression reads x twice and writes the (tokens x rank)
product to memory between two launches; here one kernel streams x once per output tile, accumulating x W^T
and x A^T side by side, then adds the low-rank term before the single store.

Two kernels serve all four products, because dx = dy W + scale * (dy B) A has the same shape of computation
as the forward with the roles of W/A/B permuted:
  _lora_matmul_kernel:   out = X W' + scale * (X A') B',  also storing mid = X A'   (forward, and dx)
  _tokens_reduce_kernel: X^T Z summed over tokens, split into slices for parallelism  (dA and dB)
The forward keeps mid = x A^T (tokens x rank, small) for dB, and the dx pass keeps dy B for dA.

The weight is meant to be frozen. If it does require grad, dW = dy^T x is computed with a plain torch matmul
(correct, not fused). Inputs: fp16, bf16 or fp32 (fp32 accumulation throughout); W, A and B are cast to x's
dtype (or autocast's).

Deliberately left out: a bias (add it outside), dropout on the adapter's input (model.py applies it before the
call), and a fused dW for a weight that trains.
"""
import torch
import triton
import triton.language as tl

from .common import INTERPRET, TUNE, compute_dtype, kernel_flags

# (block_m, block_n, block_k, num_warps, num_stages): the usual Hopper/Ampere bf16 GEMM tiles; the
# interpreter gets one small config.
_MATMUL_TILES = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                 (64, 64, 64, 4, 3), (128, 256, 64, 8, 3)] if TUNE else [(32, 32, 32, 4, 1)]
_MATMUL_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in _MATMUL_TILES]
# (block_m = tokens per step, block_p = output rows per program, num_warps, num_stages)
_REDUCE_TILES = ([(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)] if TUNE
                 else [(16, 32, 4, 1)])
_REDUCE_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_P": p}, num_warps=w, num_stages=s)
                   for m, p, w, s in _REDUCE_TILES]
# dA and dB sum over every token; a single program per output tile would leave most of a GPU idle
# (768 / 64 = 12 programs for dA at d=768), so tokens are cut into slices summed afterwards in torch.
_ROWS_PER_SPLIT = 32 if INTERPRET else 1024


def lora_linear_reference(x, weight, lora_a, lora_b, scale):
    """Plain torch x W^T + scale * (x A^T) B^T, the expression the fused kernel must match."""
    return x @ weight.t() + scale * ((x @ lora_a.t()) @ lora_b.t())


@triton.autotune(configs=_MATMUL_CONFIGS, key=["N", "K", "R_PAD"])
@triton.jit
def _lora_matmul_kernel(X, W, A, B, OUT, MID, M, N, K, R, scale,
                        stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar,
                        stride_br, stride_bn, stride_om, stride_on, stride_mm, stride_mr,
                        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """OUT (M, N) = X (M, K) W (K, N) + scale * MID B (R, N), with MID = X A (K, R) stored by column 0.

    W, A, B are addressed through strides, so a transposed view costs nothing.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)  # rank padded up to tl.dot's minimum of 16; the padding loads as zeros
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    mid = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(W + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        a = tl.load(A + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
                    mask=(ks[:, None] < K) & (ranks[None, :] < R), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        # Recomputed by every column tile: rank/BLOCK_N extra work (~6-12%) buys one launch and no round trip.
        mid = tl.dot(x, a, mid, input_precision=PRECISION)
    b = tl.load(B + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
                mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    acc = tl.dot((mid * scale).to(b.dtype), b, acc, input_precision=PRECISION)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
    if pid_n == 0:
        tl.store(MID + rows[:, None] * stride_mm + ranks[None, :] * stride_mr, mid.to(MID.dtype.element_ty),
                 mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.autotune(configs=_REDUCE_CONFIGS, key=["P", "R_PAD"])
@triton.jit
def _tokens_reduce_kernel(X, Z, PART, M, P, R, rows_per_split, stride_xm, stride_xp, stride_zm, stride_zr,
                          R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """PART[s] (P, R_PAD) = X[slice s]^T Z[slice s] for X (M, P), Z (M, R), in fp32."""
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ranks = tl.arange(0, R_PAD)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, M)
    acc = tl.zeros([BLOCK_P, R_PAD], tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x_t = tl.load(X + rows[None, :] * stride_xm + cols[:, None] * stride_xp,
                      mask=(rows[None, :] < hi) & (cols[:, None] < P), other=0.0)
        z = tl.load(Z + rows[:, None] * stride_zm + ranks[None, :] * stride_zr,
                    mask=(rows[:, None] < hi) & (ranks[None, :] < R), other=0.0)
        if UPCAST:
            x_t = x_t.to(tl.float32)
            z = z.to(tl.float32)
        acc = tl.dot(x_t, z, acc, input_precision=PRECISION)
    PART += split.to(tl.int64) * P * R_PAD
    tl.store(PART + cols[:, None] * R_PAD + ranks[None, :], acc, mask=cols[:, None] < P)


def _rank_pad(rank):
    return max(16, triton.next_power_of_2(rank))


def _lora_matmul(x, w_t, a_t, b_t, scale):
    """x (M, K) @ w_t (K, N) + scale * (x @ a_t (K, R)) @ b_t (R, N); returns (out, x @ a_t)."""
    M, K = x.shape
    N, R = w_t.shape[1], a_t.shape[1]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mid = torch.empty((M, R), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _lora_matmul_kernel[grid](x, w_t, a_t, b_t, out, mid, M, N, K, R, scale,
                              x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1),
                              a_t.stride(0), a_t.stride(1), b_t.stride(0), b_t.stride(1),
                              out.stride(0), out.stride(1), mid.stride(0), mid.stride(1),
                              R_PAD=_rank_pad(R), **kernel_flags(x))
    return out, mid


def _tokens_reduce(x, z):
    """x (M, P)^T @ z (M, R) -> (P, R) in fp32."""
    M, P = x.shape
    R = z.shape[1]
    r_pad = _rank_pad(R)
    splits = triton.cdiv(M, _ROWS_PER_SPLIT)
    part = torch.empty((splits, P, r_pad), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), splits)
    _tokens_reduce_kernel[grid](x, z, part, M, P, R, _ROWS_PER_SPLIT, x.stride(0), x.stride(1),
                                z.stride(0), z.stride(1), R_PAD=r_pad, **kernel_flags(x))
    return part.sum(0)[:, :R]


class LoRAFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale):
        out_features, in_features = weight.shape
        rank = lora_a.shape[0]
        assert x.shape[-1] == in_features, f"x has {x.shape[-1]} features, weight expects {in_features}"
        assert lora_a.shape == (rank, in_features) and lora_b.shape == (out_features, rank), \
            "A (r, in), B (out, r)"
        assert x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype, \
            "cast to one dtype before the Function"
        x2 = x.reshape(-1, in_features)  # a view when it can be; strides are passed to the kernel either way
        out, mid = _lora_matmul(x2, weight.t(), lora_a.t(), lora_b.t(), scale)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, mid)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, mid = ctx.saved_tensors
        scale = ctx.scale
        dy2 = dy.reshape(-1, weight.shape[0])
        need_dx, need_dw, need_da, need_db = ctx.needs_input_grad[:4]
        dx = dw = da = db = None
        dy_b = None  # dy B, shared by dx and dA
        if need_dx:
            # dx = dy W + scale * (dy B) A: the forward kernel with W' = W, A' = B, B' = A
            dx, dy_b = _lora_matmul(dy2, weight, lora_b, lora_a, scale)
            dx = dx.view(ctx.x_shape)
        if need_da:
            if dy_b is None:  # x needs no grad (e.g. frozen embeddings below): dy B alone is a thin matmul
                dy_b = dy2 @ lora_b
            da = (scale * _tokens_reduce(x2, dy_b)).t().to(lora_a.dtype)
        if need_db:
            db = (scale * _tokens_reduce(dy2, mid)).to(lora_b.dtype)
        if need_dw:
            dw = dy2.t() @ x2  # the frozen-weight case never comes here; kept correct, not fast
        return dx, dw, da, db, None


def lora_linear(x, weight, lora_a, lora_b, scale):
    """x W^T + scale * (x A^T) B^T for x (..., in), W (out, in), A (rank, in), B (out, rank); differentiable.

    All four are cast to one dtype first: autocast's when it is on (as F.linear would), else x's; so fp32
    adapters work with bf16 activations. The gradients come back in each input's own dtype.
    """
    dtype = compute_dtype(x)
    return LoRAFunction.apply(x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype), float(scale))
