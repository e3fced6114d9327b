"""
Lumi's Triton kernels, each beside the plain torch reference it is tested against: attention.py's
flash_attention and lora.py's lora_linear. This file holds the few helpers both share.

kernels/ has no __init__.py on purpose: `kernels` is also a distribution on PyPI (transformers 5.25 imports
it), and a package of that name at the repository root would shadow it. model.kernel_module imports these
files by path, as the package `lumi_kernels`, so they import each other relatively (`from .common import`).

Deliberately left out: choosing a kernel or its reference (model.py does, at one dispatch point).
"""
import os

import torch

# Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton loads).
# It cannot time kernels, so autotuning over several tile shapes happens only on a real GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TUNE = torch.cuda.is_available() and not INTERPRET


def compute_dtype(x):
    """The dtype a kernel should compute in: autocast's when it is on (as F.linear and SDPA would), else x's.

    This matters: under autocast RMSNorm returns fp32, and an fp32 kernel runs without tensor cores.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def kernel_flags(x):
    """The UPCAST and PRECISION constexprs every kernel takes, for inputs like x."""
    # Under the interpreter numpy has no bf16 arithmetic, so bf16 is widened to fp32 right after loading.
    # fp32 inputs get exact fp32 dots (the tests compare them tightly) rather than TF32.
    upcast = (not x.is_cuda) and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return dict(UPCAST=upcast, PRECISION=precision)
