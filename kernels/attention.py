"""
Causal flash attention in Triton, beside the plain torch reference it must match.

flash_attention(q, k, v) takes (batch, heads, seq, head_dim) tensors; k and v may have fewer heads than q
(grouped-query attention: q head h reads k/v head h // (heads // kv_heads)). The forward pass never builds the
(seq x seq) score matrix: each program walks over key blocks with an online softmax in base 2 (log2(e) is
folded into the softmax scale, so the inner loop uses exp2) and saves one log-sum-exp per row. The backward
rebuilds the probabilities from that log-sum-exp and is split as in FlashAttention-2: a small kernel for
delta = rowsum(dO * O), one kernel for dK/dV that walks over query blocks (and over the q heads of a GQA
group, so dK/dV are summed without atomics), and one kernel for dQ that walks over key blocks.

Causality is used twice: key blocks entirely above the diagonal are never visited, and only the blocks that
touch the diagonal pay for the mask. Loads of the ragged last block are masked, so any sequence length works.

Inputs: fp16 or bf16 (fp32 accumulation), or fp32 for tests; head_dim a power of two from 16 to 128.
Deliberately left out: non-causal masks, dropout, attention bias, queries shorter than keys (KV-cache
decoding: use attention_reference or SDPA there).
"""
import math

import torch
import triton
import triton.language as tl

from .common import TUNE, compute_dtype, kernel_flags

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))


def _configs(gpu, interpret):
    """(block_m, block_n, num_warps, num_stages) tuples -> triton.Config list for the machine at hand.

    The interpreter gets one small config that still spans several blocks in short test sequences.
    """
    chosen = gpu if TUNE else [interpret]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen]


# The forward and dQ kernels need BLOCK_M % BLOCK_N == 0 (the diagonal spans whole key blocks); the dK/dV
# kernel needs BLOCK_N % BLOCK_M == 0 for the same reason seen from the key side.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                         (64, 32, 4, 4)], (32, 16, 4, 1))
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
                         (16, 32, 4, 1))
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
                       (32, 16, 4, 1))
# Tuned per power-of-two bucket of the sequence length, so generation with a growing prompt does not
# re-tune at every new length.
_TUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM"]


def attention_reference(q, k, v):
    """Plain torch causal attention in fp32, returned in q's dtype; GQA by repeating each k/v head."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    seq = q.shape[2]
    scores = (q.float() @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


# -----------------------------------------------------------------------------
# forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, row sum l_i, row max m_i) of one query block."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if DIAGONAL:  # the only blocks that can reach past the sequence end
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # scores in log2 units
        if DIAGONAL:
            s = tl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
        # Key 0 is always visible and visited first, so m_new is finite and no row ever sees exp2(-inf + inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                H, GROUP, T, SEQ_BUCKET, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Late query blocks see the most keys: launch them first so the short ones fill the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * T

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # keys strictly before this block need no mask; keys in [start_m, start_m + BLOCK_M) straddle the diagonal
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, 0, start_m, T, qk_scale,
                               HEAD_DIM, BLOCK_N, False, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, start_m,
                               tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                               HEAD_DIM, BLOCK_N, True, UPCAST, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=rows < T)  # base-2 log-sum-exp of the scaled scores
    tl.store(O + rows[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=rows[:, None] < T)


# -----------------------------------------------------------------------------
# backward

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                      H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the term every dS = P * (dP - delta) of a row shares."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    mask = rows[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, cols, lo, hi, T, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contribution of query blocks [lo, hi) of one q head to one key block's dK and dV."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        # Rows past the end load as zeros (lse = delta = 0, dO = 0), which makes their dS and P*dO zero.
        q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Work transposed, (keys x queries), so the sums over queries are plain dots into dk and dv.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if DIAGONAL:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                     H, H_KV, GROUP, T, SEQ_BUCKET, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // H_KV).to(tl.int64)
    hk = bhk % H_KV
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = cols[:, None] < T
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Every q head of the GQA group reads this k/v head: sum their gradients here instead of with atomics.
    for g in range(GROUP):
        h = hk * GROUP + g
        q_h = Q + b * stride_qb + h * stride_qh
        do_h = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * T
        # queries in [start_n, start_n + BLOCK_N) straddle the diagonal; later ones see every key here
        dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, LSE + row_base, DELTA + row_base, stride_qt, stride_dot,
                             cols, start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale,
                             HEAD_DIM, BLOCK_M, True, UPCAST, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, LSE + row_base, DELTA + row_base, stride_qt, stride_dot,
                             cols, start_n + BLOCK_N, T, T, qk_scale,
                             HEAD_DIM, BLOCK_M, False, UPCAST, PRECISION)
    dk *= sm_scale  # dS was taken w.r.t. the unscaled q.k; the chain rule brings back the softmax scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, lo, hi, T, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contribution of key blocks [lo, hi) to one query block's dQ."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if DIAGONAL:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if DIAGONAL:
            p = tl.where(rows[:, None] >= cols[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dqb, stride_dqh, stride_dqt,
                   H, GROUP, T, SEQ_BUCKET, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first, as in the forward
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = rows[:, None] < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=row_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, 0, start_m, T, qk_scale,
                   HEAD_DIM, BLOCK_N, False, UPCAST, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, start_m,
                   tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_N, True, UPCAST, PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_mask)


# -----------------------------------------------------------------------------
# autograd glue

def _strides(x):
    """(batch, head, seq) strides; the kernels assume the head_dim stride is 1."""
    return x.stride(0), x.stride(1), x.stride(2)


def _rows_contiguous(x):
    # Any (batch, head, seq) layout works, e.g. the (B, T, H, D) -> (B, H, T, D) transpose a model makes;
    # only a strided head_dim is copied, since it would break vector loads.
    return x if x.stride(-1) == 1 else x.contiguous()


class FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v):
        batch, heads, seq, head_dim = q.shape
        kv_heads = k.shape[1]
        assert k.shape == v.shape == (batch, kv_heads, seq, head_dim), \
            "k and v must be (B, H_kv, T, D), T as q"
        assert heads % kv_heads == 0, f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads})"
        assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
        assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
        assert head_dim in (16, 32, 64, 128), f"head_dim must be 16, 32, 64 or 128, got {head_dim}"
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        sm_scale = 1.0 / math.sqrt(head_dim)
        # Laid out like q: for the usual (B, T, H, D) -> (B, H, T, D) transposed view, the caller's transpose
        # back to (B, T, H * D) is then free instead of a copy.
        o = torch.empty_like(q)
        lse = torch.empty((batch * heads, seq), dtype=torch.float32, device=q.device)
        grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)
        _fwd_kernel[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                          heads, heads // kv_heads, seq, triton.next_power_of_2(seq), sm_scale * LOG2E,
                          HEAD_DIM=head_dim, **kernel_flags(q))
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        batch, heads, seq, head_dim = q.shape
        kv_heads = k.shape[1]
        do = _rows_contiguous(do)
        sm_scale = 1.0 / math.sqrt(head_dim)
        flags = kernel_flags(q)

        delta = torch.empty_like(lse)
        delta_block = 64
        _bwd_delta_kernel[(triton.cdiv(seq, delta_block), batch * heads)](
            o, do, delta, *_strides(o), *_strides(do), heads, seq, HEAD_DIM=head_dim, BLOCK_M=delta_block)

        # gradients laid out as inputs
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        seq_bucket = triton.next_power_of_2(seq)
        grid_kv = lambda meta: (triton.cdiv(seq, meta["BLOCK_N"]), batch * kv_heads)
        _bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv,
                                  *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                                  *_strides(dv), heads, kv_heads, heads // kv_heads, seq, seq_bucket,
                                  sm_scale * LOG2E, sm_scale, HEAD_DIM=head_dim, **flags)
        grid_q = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)
        _bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq,
                               *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                               heads, heads // kv_heads, seq, seq_bucket, sm_scale * LOG2E, sm_scale,
                               HEAD_DIM=head_dim, **flags)
        return dq, dk, dv


def flash_attention(q, k, v):
    """Causal softmax(q k^T / sqrt(head_dim)) v for (batch, heads, seq, head_dim) tensors, differentiable.

    k and v may have fewer heads than q (GQA; heads must be a multiple of kv_heads). Under autocast the
    inputs are cast to its dtype first, as SDPA would. Returns a tensor shaped, and when q is dense laid out,
    like q.
    """
    dtype = compute_dtype(q)
    return FlashAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype))
