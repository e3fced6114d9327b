"""
The Triton kernels held against their plain torch references: forward and every gradient.

Without a GPU the kernels run under Triton's interpreter (about 400x slower than torch), so every case is
small; with a GPU the same tests run on it. References are computed in fp32 from the same rounded inputs,
and tolerances scale with the size of the reference values.
"""
import os

import torch

if not torch.cuda.is_available():  # tests/conftest.py does this too; it must happen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip('triton')  # a venv without triton (macOS, Windows, CI's second venv) has no kernels

from model import kernel_module  # noqa: E402  (kernels/ is imported by path: model.kernel_module says why)

attention_reference, flash_attention = (getattr(kernel_module('attention'), n)
                                        for n in ('attention_reference', 'flash_attention'))
lora_linear, lora_linear_reference = (getattr(kernel_module('lora'), n)
                                      for n in ('lora_linear', 'lora_linear_reference'))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to the largest reference value: fp32 is near exact, half types round every stored operand
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol,
                               atol=tol * expected.abs().max().item() + 1e-6)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


# -----------------------------------------------------------------------------
# attention

def check_attention(q, k, v, dtype):
    """flash_attention's output and dq, dk, dv against the fp32 reference on the same inputs."""
    q, k, v = leaves(q, k, v)
    out = flash_attention(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    rq, rk, rv = leaves(q.float(), k.float(), v.float())
    ref = attention_reference(rq, rk, rv)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), grad_out.float())

    assert out.shape == q.shape
    assert_close(out, ref, dtype)
    for grad, ref_grad, name in zip(grads, ref_grads, "qkv"):
        assert grad.shape == ref_grad.shape, f"d{name}"
        assert_close(grad, ref_grad, dtype)


# (batch, q heads, kv heads, seq, head_dim, dtype). The interpreter config uses 32x16 / 16x32 blocks, so
# these lengths cover one row, ragged tails, several off-diagonal blocks and an exact multiple.
ATTENTION_CASES = [
    (1, 2, 2, 1, 16, torch.float32),
    (2, 2, 2, 37, 16, torch.float32),
    (1, 4, 2, 100, 64, torch.float32),
    (1, 4, 1, 70, 32, torch.float16),
    (1, 2, 2, 64, 64, torch.float16),
    (1, 4, 2, 45, 32, torch.bfloat16),
    (1, 2, 1, 150, 128, torch.float16),
    (1, 2, 1, 256, 64, torch.bfloat16),
]


@pytest.mark.parametrize("batch,heads,kv_heads,seq,head_dim,dtype", ATTENTION_CASES)
def test_attention_matches_reference(batch, heads, kv_heads, seq, head_dim, dtype):
    torch.manual_seed(0)
    q = randn(batch, heads, seq, head_dim, dtype=dtype)
    k = randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    v = randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    check_attention(q, k, v, dtype)


def test_attention_non_contiguous_inputs():
    torch.manual_seed(0)
    batch, seq, heads, kv_heads, head_dim = 2, 40, 4, 2, 32
    # the layout a model makes: one fused projection, split and transposed to (B, H, T, D) views
    qkv = randn(batch, seq, heads + 2 * kv_heads, head_dim)
    q = qkv[:, :, :heads].transpose(1, 2)
    k = qkv[:, :, heads:heads + kv_heads].transpose(1, 2)
    # and a head_dim that is not the unit-stride dimension
    v = randn(batch, kv_heads, head_dim, seq).transpose(-2, -1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_attention(q, k, v, torch.float32)
    # the output keeps the (B, T, H, D) memory order of a dense q, so the model's transpose back is a view
    q = randn(batch, seq, heads, head_dim).transpose(1, 2)
    out = flash_attention(q, k, v)
    assert out.stride() == q.stride()
    out.transpose(1, 2).view(batch, seq, heads * head_dim)


def test_attention_non_contiguous_grad_output():
    torch.manual_seed(0)
    q, k, v = leaves(*(randn(1, 2, 33, 16) for _ in range(3)))
    out = flash_attention(q, k, v)
    grad_out = randn(1, 33, 2, 16).transpose(1, 2)  # what (B, T, H, D) -> (B, H, T, D) sends back
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(attention_reference(q, k, v), (q, k, v), grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad, torch.float32)


def test_attention_rejects_bad_shapes():
    q = randn(1, 3, 8, 16)
    with pytest.raises(AssertionError, match="multiple"):
        flash_attention(q, randn(1, 2, 8, 16), randn(1, 2, 8, 16))
    with pytest.raises(AssertionError, match="head_dim"):
        flash_attention(*(randn(1, 1, 8, 24) for _ in range(3)))


# -----------------------------------------------------------------------------
# LoRA

def check_lora(x, weight, lora_a, lora_b, scale, dtype, grads_for=(0, 2, 3)):
    """lora_linear's output and gradients (of the inputs listed) against the fp32 reference."""
    inputs = [x, weight, lora_a, lora_b]
    for i in grads_for:
        inputs[i] = inputs[i].detach().clone().requires_grad_()
    out = lora_linear(*inputs, scale)
    grad_out = torch.randn_like(out)
    wanted = [inputs[i] for i in grads_for]
    grads = torch.autograd.grad(out, wanted, grad_out)

    ref_inputs = [t.detach().float() for t in inputs]
    for i in grads_for:
        ref_inputs[i].requires_grad_()
    ref = lora_linear_reference(*ref_inputs, scale)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[i] for i in grads_for], grad_out.float())

    assert out.shape == (*x.shape[:-1], weight.shape[0])
    assert_close(out, ref, dtype)
    for grad, ref_grad, tensor in zip(grads, ref_grads, wanted):
        assert grad.shape == tensor.shape
        assert_close(grad, ref_grad, tensor.dtype)


def lora_inputs(tokens_shape, in_features, out_features, rank, dtype):
    x = randn(*tokens_shape, in_features, dtype=dtype)
    weight = (randn(out_features, in_features) / in_features ** 0.5).to(dtype)
    lora_a = (randn(rank, in_features) / in_features ** 0.5).to(dtype)
    lora_b = randn(out_features, rank, dtype=dtype)  # nonzero (not the usual zero init) so dA is tested
    return x, weight, lora_a, lora_b


# (token shape, in, out, rank, dtype): 74 tokens span several token slices in the dA/dB reduction
LORA_CASES = [
    ((2, 37), 64, 48, 8, torch.float32),
    ((1,), 32, 16, 8, torch.float32),
    ((70,), 40, 96, 4, torch.float16),
    ((3, 20), 64, 64, 16, torch.bfloat16),
]


@pytest.mark.parametrize("tokens_shape,in_features,out_features,rank,dtype", LORA_CASES)
def test_lora_matches_reference(tokens_shape, in_features, out_features, rank, dtype):
    torch.manual_seed(0)
    check_lora(*lora_inputs(tokens_shape, in_features, out_features, rank, dtype), 0.5, dtype)


def test_lora_trainable_weight_gets_its_gradient():
    torch.manual_seed(0)
    check_lora(*lora_inputs((2, 9), 32, 48, 8, torch.float32), 2.0, torch.float32, grads_for=(0, 1, 2, 3))


def test_lora_input_without_grad():
    # the first adapted layer of a fine-tune whose embeddings are frozen: only dA and dB are asked for
    torch.manual_seed(0)
    check_lora(*lora_inputs((40,), 32, 32, 8, torch.float32), 1.0, torch.float32, grads_for=(2, 3))


def test_lora_non_contiguous_inputs():
    torch.manual_seed(0)
    x, weight, lora_a, lora_b = lora_inputs((2, 21), 48, 32, 8, torch.float32)
    x = x.transpose(0, 1)                      # (21, 2, 48): tokens not in memory order
    weight = weight.t().contiguous().t()       # column-major weight
    lora_b = lora_b.t().contiguous().t()
    assert not (x.is_contiguous() or weight.is_contiguous() or lora_b.is_contiguous())
    check_lora(x, weight, lora_a, lora_b, 0.5, torch.float32)


def test_lora_casts_fp32_adapters_to_activation_dtype():
    torch.manual_seed(0)
    x, weight, lora_a, lora_b = lora_inputs((24,), 32, 32, 8, torch.float32)
    x = x.half().requires_grad_()
    lora_a, lora_b = leaves(lora_a, lora_b)
    out = lora_linear(x, weight, lora_a, lora_b, 0.5)
    out.float().sum().backward()
    assert out.dtype == torch.float16
    assert lora_a.grad.dtype == lora_b.grad.dtype == torch.float32
    ref_a, ref_b = leaves(lora_a, lora_b)
    lora_linear_reference(x.detach().float(), weight, ref_a, ref_b, 0.5).sum().backward()
    # fp32 grads that went through fp16 arithmetic: held to the fp16 tolerance
    for grad, ref_grad in ((lora_a.grad, ref_a.grad), (lora_b.grad, ref_b.grad)):
        tol = TOLERANCE[torch.float16]
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_kernels_compute_in_autocast_dtype():
    # under autocast RMSNorm hands back fp32: the kernels must still run in bf16, as F.linear and SDPA do
    torch.manual_seed(0)
    x, weight, lora_a, lora_b = lora_inputs((24,), 32, 32, 8, torch.float32)
    x, lora_a = leaves(x, lora_a)
    q, k, v = leaves(*(randn(1, 2, 24, 16) for _ in range(3)))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lora_linear(x, weight, lora_a, lora_b, 0.5)
        out = flash_attention(q, k, v)
    assert y.dtype == out.dtype == torch.bfloat16
    (y.float().sum() + out.float().sum()).backward()
    assert x.grad.dtype == lora_a.grad.dtype == q.grad.dtype == torch.float32
    assert_close(y, lora_linear_reference(x.detach(), weight, lora_a.detach(), lora_b, 0.5), torch.bfloat16)
    assert_close(out, attention_reference(q.detach(), k.detach(), v.detach()), torch.bfloat16)


# -----------------------------------------------------------------------------
# the contract other files rely on

def test_contract_signatures():
    torch.manual_seed(0)
    attention_entry = kernel_module('attention').flash_attention
    lora_entry = kernel_module('lora').lora_linear

    q = randn(2, 4, 20, 64, dtype=torch.float16).requires_grad_()
    k = randn(2, 2, 20, 64, dtype=torch.float16).requires_grad_()
    v = randn(2, 2, 20, 64, dtype=torch.float16).requires_grad_()
    out = attention_entry(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    out.float().sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape

    x = randn(2, 5, 32).requires_grad_()
    weight = randn(64, 32)
    lora_a = randn(8, 32).requires_grad_()
    lora_b = randn(64, 8).requires_grad_()
    y = lora_entry(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=2.0)
    assert y.shape == (2, 5, 64)
    y.sum().backward()
    assert weight.grad is None and x.grad is not None and lora_a.grad is not None and lora_b.grad is not None
