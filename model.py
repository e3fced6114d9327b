"""
A compact LLaMA-style decoder: token embedding, N blocks of (RMSNorm -> causal self-attention with RoPE and
grouped-query heads -> residual, RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, LM head. No biases.

Also here: the KV cache and the decoding step (one token a row, on the matrices laid out for it), and the two
dispatch points where a Triton kernel replaces torch (attention; the LoRA linear, whose layers are lora.py's).

Deliberately left out: LoRA (lora.py), training, sampling policy and tokenization (training.py, engine.py,
tokenizer.py). This file imports nothing from the rest of Lumi except the optional Triton kernels.
"""
import functools
import importlib.machinery
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# the model's keys, which train.py takes (KEY_FILES) and a config file sets: these make the tiny model. No
# vocab_size: a model's is its tokenizer's, read from the bins' meta.json (a config file's vocab_size is
# data.py's, the size of the tokenizer it trains when the bins are missing).
n_layer = 6                 # [1, inf) transformer blocks
n_head = 4                  # [1, inf) attention heads (n_embd must divide by it)
n_kv_head = 4               # [1, inf) key/value heads; fewer than n_head is grouped-query
                            # attention: a smaller KV cache
n_embd = 256                # [1, inf) width of the residual stream
ffn_hidden = 1024           # [1, inf) SwiGLU hidden width
block_size = 1024           # [1, inf) context length in tokens
dropout = 0.0               # [0, 1) on attention and MLP outputs while training
tie_embeddings = True       # the LM head shares the token embedding's weights
rope_theta = 10000.0        # (0, inf) RoPE base frequency
norm_eps = 1e-5             # (0, inf) RMSNorm's epsilon
qk_norm = False             # RMSNorm (with weights) over each head's queries and keys before RoPE, as Qwen3
                            # does: attention logits stay bounded however large q_proj and k_proj grow; the
                            # Hugging Face export is then Qwen3ForCausalLM
zero_init_proj = False      # the projections into the residual stream (o_proj, down_proj) start at zero, so
                            # every block starts as the identity; an untied LM head starts at zero too
                            # (init only)
embed_norm = False          # RMSNorm (with weights) on the token embedding before the first block, as
                            # nanochat does: the stream starts at RMS 1 however far a fast-learning embedding
                            # grows; the export folds it into the embedding rows (Llama has no such norm)
logit_softcap = 0.0         # [0, inf) EXPERIMENT > 0: logits = cap * tanh(logits / cap) in training only


@dataclass
class ModelConfig:
    """A model's shape: the keys above, and its vocabulary."""
    vocab_size: int
    n_layer: int = n_layer
    n_head: int = n_head
    n_kv_head: int = n_kv_head
    n_embd: int = n_embd
    ffn_hidden: int = ffn_hidden
    block_size: int = block_size
    dropout: float = dropout
    tie_embeddings: bool = tie_embeddings
    rope_theta: float = rope_theta
    norm_eps: float = norm_eps
    qk_norm: bool = qk_norm
    zero_init_proj: bool = zero_init_proj
    embed_norm: bool = embed_norm
    logit_softcap: float = logit_softcap

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# the two dispatch points: attention and the LoRA linear take a Triton kernel on the GPUs the kernels support,
# torch elsewhere

KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels')


def kernel_module(name):
    """Lumi's kernels/NAME.py, imported by its path as the module `lumi_kernels.NAME` (ImportError without
    triton). kernels/ is no importable package on purpose: `kernels` is also a distribution on PyPI (which
    transformers 5.25 imports), and a package of that name at the repository root would shadow it for
    anyone running Python from here."""
    if 'lumi_kernels' not in sys.modules:
        spec = importlib.machinery.ModuleSpec('lumi_kernels', None, is_package=True)
        spec.submodule_search_locations.append(KERNELS_DIR)
        sys.modules['lumi_kernels'] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f'lumi_kernels.{name}')


@functools.lru_cache(maxsize=None)
def _kernel(name):
    try:
        module = kernel_module(name)
    except Exception:  # no triton, or an import error: the torch path is always correct
        return None
    return module.flash_attention if name == 'attention' else module.lora_linear


USE_KERNELS = True  # set False to force the torch path everywhere (tests, benchmarks)


def kernels_fit(x):
    """Whether the Triton kernels may replace torch for tensor x: on an NVIDIA GPU of compute capability 8.0
    or newer, the hardware Triton's README supports ("NVIDIA GPUs (Compute Capability 8.0+)"; the kernels
    were tuned for Ampere and Hopper tiles). A T4, a V100, AMD (ROCm), Apple GPUs and CPUs take SDPA and
    torch."""
    return (x.is_cuda and USE_KERNELS and torch.version.hip is None
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def attention(q, k, v, mask=None, dropout_p=0.0):
    """Causal attention over q (B, H, T, D) and k, v (B, Hkv, S, D).

    mask None means plain causal attention with T == S. Otherwise mask is a bool (B, 1, T, S) tensor of
    the keys each query may see (decoding with a cache, left-padded batches).
    """
    if mask is None and dropout_p == 0.0 and q.size(-1) in (64, 128) and kernels_fit(q):
        fn = _kernel('attention')
        if fn is not None:
            return fn(q, k, v)
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None, enable_gqa=gqa)


def low_rank_linear(x, weight, lora_a, lora_b, scale, dropout):
    """x W^T + scale * dropout(x) A^T B^T (lora.LoRALinear): the fused Triton kernel where kernels_fit and no
    dropout is active, torch elsewhere."""
    if (dropout.p == 0 or not dropout.training) and kernels_fit(x):
        fn = _kernel('lora')
        if fn is not None:
            return fn(x, weight, lora_a, lora_b, scale)
    # in place on the base output (its backward does not need it): two fewer (tokens x out) temporaries
    return F.linear(x, weight).add_(F.linear(F.linear(dropout(x), lora_a), lora_b), alpha=scale)


# -----------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        if torch.is_autocast_enabled(y.device.type):
            # cast once here, not once in each projection that reads y (q, k, v; gate, up): the same values,
            # and 2x fewer activation copies under bf16 autocast on CPU
            y = y.to(torch.get_autocast_dtype(y.device.type))
        return y


def rope_cache(cfg, device=None):
    """cos/sin tables (block_size, head_dim) in the rotate-half layout that Hugging Face Llama uses, so
    exported q/k weights need no permutation."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device).float() / half))
    t = torch.arange(cfg.block_size, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x (B, H, T, D); cos/sin (T, D) or (B, 1, T, D) for per-row positions. In x's dtype: under bf16
    # autocast, fp32 tables would promote q and k to fp32 and cost two full-size copies back
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        d, hd = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_head, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_head, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_head, hd).transpose(1, 2)
        if self.cfg.qk_norm:  # per head, before the rotation (Qwen3's order, which its export needs)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        p = self.cfg.dropout if self.training else 0.0
        y = attention(q, k, v, mask=mask, dropout_p=p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of every layer for a batch, filled by a prefill and then one token at a time.

    pos is how many positions are filled. pad (B,) counts the left padding of each row, so rows of
    different prompt lengths share one cache: their padded keys are masked and positions start at 0.
    """

    def __init__(self, cfg, batch_size, max_len, device, dtype=torch.float32, pad=None):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.pos = max_len, 0
        self.pad = pad.to(device) if pad is not None else None
        # the keys each padded row may see, made once: a decoding step takes a view, [..., :pos + 1]
        self.real = None if pad is None else \
            (torch.arange(max_len, device=device)[None] >= self.pad[:, None])[:, None, None]

    def update(self, layer, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        if layer == self.k.size(0) - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index):
        """Keep only the rows in index (a finished row can leave the batch)."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        if self.pad is not None:
            self.pad, self.real = self.pad[index], self.real[index]


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.embed_norm:
            self.emb_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # the training loop sets it (its activation_checkpointing key)
        cos, sin = rope_cache(cfg)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink the projections that write
        # into it by sqrt(2 * n_layer) to keep the residual variance flat with depth
        for name, p in self.named_parameters():
            if name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
        if cfg.zero_init_proj and not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if not embeddings:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def _positions(self, B, T, start, pad, device):
        """cos/sin for positions start..start+T, shifted left by each row's padding, and the attention
        mask."""
        if pad is None:
            if start + T > self.cfg.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            mask = None
            if start > 0:  # decoding with a cache: query i sees keys 0..start+i
                q = torch.arange(start, start + T, device=device)
                mask = (torch.arange(start + T, device=device)[None, :] <= q[:, None])[None, None]
            return cos, sin, mask
        pos = torch.arange(start, start + T, device=device)[None, :] - pad[:, None]  # (B, T)
        if int(pos.max()) >= self.cfg.block_size:
            raise ValueError(f"sequence exceeds block_size {self.cfg.block_size}")
        pos = pos.clamp(min=0)
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, D)
        keys = torch.arange(start + T, device=device)
        causal = keys[None, :] <= torch.arange(start, start + T, device=device)[:, None]  # (T, S)
        real = keys[None, :] >= pad[:, None]  # (B, S)
        mask = causal[None] & real[:, None, :]
        # a padding query sees no real key; let it see itself so softmax stays finite (its output is unused)
        mask = mask | torch.eye(start + T, device=device, dtype=torch.bool)[start:start + T][None]
        return cos, sin, mask[:, None]

    def forward(self, idx, targets=None, cache=None, loss_mask=None, return_hidden=False):
        """Logits for idx (B, T); with targets, also the mean cross-entropy over positions where targets
        != -1 (and loss_mask, if given, is nonzero).

        With a cache, idx continues the cached sequence (prefill, then one token at a time).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        cos, sin, mask = self._positions(B, T, start, pad, idx.device)
        x = self.tok_emb(idx)
        x = self.drop(self.emb_norm(x) if self.cfg.embed_norm else x)
        recompute = (self.activation_checkpointing and self.training and cache is None
                     and torch.is_grad_enabled())
        for layer in self.layers:
            if recompute:  # keep each block's input alone; its activations are recomputed in the backward
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        if targets is None:
            return logits, None
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -1)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's score and value
        matmuls over the full context (PaLM appendix B)."""
        c = self.cfg
        # the head is a matmul (tied or not); the input embedding is a lookup and costs no FLOPs
        n = self.num_params(embeddings=False) + c.vocab_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


@torch.no_grad()
def exported_embedding(model):
    """The embedding rows for a format with no norm after the lookup (Llama, Qwen3, GGUF): with embed_norm,
    every row normalised once by the model's norm; otherwise the rows as they are."""
    c, w = model.cfg, model.tok_emb.weight
    return F.rms_norm(w, (c.n_embd,), model.emb_norm.weight, c.norm_eps) if c.embed_norm else w


# -----------------------------------------------------------------------------
# decoding: one new token a row through the KV cache, on the weights laid out for it
# A decoding step reads every weight once to do little arithmetic with it (1.6M parameters: 3 MFLOP a token),
# so its time is memory traffic and the cost of each torch call (3-8 us on a shared AVX2 core, as much as a
# 128 x 384 product). forward() spends ~50 calls a block; decode_step ~30: a block is 4 matrix products (q, k
# and v as one, gate and up as one, the residual adds folded into addmm), each RMSNorm's weight is folded into
# the matrix after it (3 calls, not F.rms_norm's ~10), and RoPE is one small product (not 5 calls).

# the ModelConfig fields the decoding step implements; a model that sets any other field away from its default
# decodes through forward() until decode_step learns what that field changes
DECODED_FIELDS = ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'block_size',
                  'dropout', 'tie_embeddings', 'rope_theta', 'norm_eps', 'qk_norm', 'zero_init_proj',
                  'embed_norm')


class DecodeWeights:
    """A model's matrices as decode_step multiplies them, each the right operand b of torch.mm(x, b): q, k and
    v stacked into one, gate and up into another, and every matrix that reads an RMSNorm's output scaled by
    that norm's weight (times sqrt(n_embd), so the norm is x / hypot(|x|, sqrt(n_embd * eps))).

    In float32 each matrix is a copy stored (in, out): for a single row MKL streams that layout 2x faster than
    nn.Linear's (out, in) on one AVX2 core (0.45 against 0.96 ms for the CPU profile's matrices,
    docs/BENCHMARKS.md "Sampling"). In bfloat16 the (out, in) layout is the fast one (a bf16 (in, out)
    product was 4-8x slower there), so b is a transposed view of the copy. Either way the copy costs the
    weights' memory once more, for as long as the model keeps it (decode_weights)."""

    def __init__(self, model):
        c, dtype = model.cfg, model.tok_emb.weight.dtype
        lay = (lambda m: m.t().contiguous()) if dtype == torch.float32 else (lambda m: m.contiguous().t())

        def normed(norm, *linears):  # W diag(g) sqrt(d), in float32, then in the weights' dtype
            m = torch.cat([lin.weight.detach().float() for lin in linears])
            return lay((m * (norm.weight.detach().float() * math.sqrt(c.n_embd))).to(dtype))
        self.blocks = [(normed(b.attn_norm, b.attn.q_proj, b.attn.k_proj, b.attn.v_proj),
                        lay(b.attn.o_proj.weight.detach()),
                        normed(b.mlp_norm, b.mlp.gate_proj, b.mlp.up_proj),
                        lay(b.mlp.down_proj.weight.detach())) for b in model.layers]
        self.head = normed(model.norm, model.lm_head)
        # QK-norm's weights, one row per query head then per key head (H + K, D), as qkv lays the heads out
        self.qk_norms = [torch.cat([b.attn.q_norm.weight.detach().expand(c.n_head, -1),
                                    b.attn.k_norm.weight.detach().expand(c.n_kv_head, -1)])
                         for b in model.layers] if c.qk_norm else None
        self.root_eps = torch.tensor(math.sqrt(c.n_embd * c.norm_eps), dtype=dtype, device=self.head.device)
        # RoPE at position p is x @ rotations[p], (D, D): x * cos + cat(x2, x1) * (sign * sin) in
        # rotate-half's layout, for every position at once (block_size x D x D: 16 MB at 1024 x 64)
        half, cos, sin = c.head_dim // 2, model.rope_cos.float(), model.rope_sin.float()
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin.device)
        eye = torch.eye(c.head_dim, device=sin.device)
        self.rotations = (eye * cos[:, None] + eye.roll(half, 0) * (sign * sin)[:, None]).to(dtype)


def decode_weights(model):
    """The DecodeWeights of model, or None where decode_step does not apply and forward() must decode: not a
    GPT, in training mode, with LoRA or other layers in place of plain nn.Linear, or with a config field
    decode_step does not implement. A frozen model (checkpoint.load_model's, for inference) keeps them until
    its parameters are replaced or moved (weights changed in place are not noticed: a frozen model's never
    are); any other model gets a fresh copy per call, as training changes its weights between generations."""
    if not isinstance(model, GPT):
        return None
    linears = [m for b in model.layers for m in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.o_proj,
                                                 b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)]
    unknown = [f.name for f in fields(model.cfg)
               if f.name not in DECODED_FIELDS and getattr(model.cfg, f.name) != f.default]
    if model.training or unknown or any(type(m) is not nn.Linear for m in linears + [model.lm_head]):
        return None
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        return DecodeWeights(model)
    key = tuple((p.data_ptr(), p.dtype) for p in params)
    kept = model.__dict__.get('_decode_weights')
    if kept is None or kept[0] != key:
        kept = model.__dict__['_decode_weights'] = (key, DecodeWeights(model))
    return kept[1]


def decode_step(model, weights, token, cache):
    """The logits (B, vocab) of what follows token (B,), one new token a row that continues the cached
    sequence: forward() for one position, on weights (decode_weights(model)). It writes the token's keys and
    values into the cache at cache.pos and advances it; it allocates only activations and never waits on the
    device (the position is a Python int, the padded rows' mask a view of the cache's)."""
    c, w, p = model.cfg, weights, cache.pos
    if p >= min(cache.max_len, c.block_size):
        raise ValueError(f"position {p} is past the cache ({cache.max_len}) or block_size {c.block_size}")
    B, H, K, D, f = token.size(0), c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden
    if cache.pad is None:  # every row at position p
        rotation, mask = w.rotations[p], None
    else:  # a row's position is p less its padding, and it sees its real keys alone
        rotation, mask = w.rotations[(p - cache.pad).clamp(min=0)], cache.real[..., :p + 1]

    def normed_mm(x, m):  # RMSNorm(x) @ m, the norm's weight being m's: x @ m / sqrt(x.x + eps)
        return torch.mm(x, m).div_(torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), w.root_eps))
    x = F.embedding(token, model.tok_emb.weight)
    if c.embed_norm:
        x = model.emb_norm(x)
    keys, values = cache.k.unbind(0), cache.v.unbind(0)
    for i, (qkv_w, o_w, gate_up_w, down_w) in enumerate(w.blocks):
        qkv = normed_mm(x, qkv_w)
        qk = qkv[:, :(H + K) * D].view(B, H + K, D)
        if w.qk_norms is not None:
            qk = F.rms_norm(qk, (D,), eps=c.norm_eps).mul_(w.qk_norms[i])
        qk = torch.matmul(qk, rotation)
        keys[i].select(2, p).copy_(qk[:, H:])
        values[i].select(2, p).copy_(qkv[:, (H + K) * D:].view(B, K, D))
        y = F.scaled_dot_product_attention(qk[:, :H, None], keys[i].narrow(2, 0, p + 1),
                                           values[i].narrow(2, 0, p + 1), attn_mask=mask, enable_gqa=H != K)
        x = torch.addmm(x, y.reshape(B, H * D), o_w)
        gate_up = normed_mm(x, gate_up_w)
        x = torch.addmm(x, F.silu(gate_up[:, :f], inplace=True).mul_(gate_up[:, f:]), down_w)
    cache.pos = p + 1
    return normed_mm(x, w.head)
