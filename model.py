"""
A compact LLaMA-style decoder: token embedding, N blocks of (RMSNorm -> causal self-attention with RoPE and
grouped-query heads -> residual, RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, LM head. No biases.

Also here: the KV cache used for decoding, and LoRA written by hand (a frozen base weight plus a low-rank
update A, B), because both change how the model's own layers run.

Deliberately left out: training, sampling policy and tokenization (lumi.py, sample.py). This file imports
nothing from the rest of Lumi except the optional Triton kernels, chosen at one dispatch point each.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int = 4          # < n_head gives grouped-query attention: smaller KV cache, same quality
    n_embd: int = 256
    ffn_hidden: int = 1024      # SwiGLU width; 4*n_embd, as configs/tiny.py has it
    block_size: int = 1024
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# the two dispatch points: attention and the LoRA linear take a Triton kernel on CUDA, torch elsewhere

def _kernel(name):
    try:
        if name == 'attention':
            from kernels.attention import flash_attention
            return flash_attention
        from kernels.lora import lora_linear
        return lora_linear
    except Exception:  # no triton, or an import error: the torch path is always correct
        return None


USE_KERNELS = True  # set False to force the torch path everywhere (tests, benchmarks)


def attention(q, k, v, mask=None, dropout_p=0.0):
    """Causal attention over q (B, H, T, D) and k, v (B, Hkv, S, D).

    mask None means plain causal attention with T == S. Otherwise mask is a bool (B, 1, T, S) tensor of
    the keys each query may see (decoding with a cache, left-padded batches).
    """
    if mask is None and q.is_cuda and USE_KERNELS and dropout_p == 0.0 and q.size(-1) in (64, 128):
        fn = _kernel('attention')
        if fn is not None:
            return fn(q, k, v)
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None, enable_gqa=gqa)


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

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_head, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_head, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_head, hd).transpose(1, 2)
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
            self.pad = self.pad[index]


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(cfg)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink the projections that write
        # into it by sqrt(2 * n_layer) to keep the residual variance flat with depth
        for name, p in self.named_parameters():
            if name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

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
        """cos/sin for positions start..start+T, shifted left by each row's padding, and the attention mask."""
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
        x = self.drop(self.tok_emb(idx))
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
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

    def estimate_mfu(self, tokens_per_sec, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
        return self.flops_per_token() * tokens_per_sec / peak_flops


# -----------------------------------------------------------------------------
# LoRA, by hand: y = x W^T + (alpha / r) * dropout(x) A^T B^T, W frozen. B starts at zero, so a fresh
# adapter leaves the model exactly as it was.

LORA_TARGETS = {'q': 'attn.q_proj', 'k': 'attn.k_proj', 'v': 'attn.v_proj', 'o': 'attn.o_proj',
                'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj'}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.weight = base.weight  # shared with nothing else, frozen below
        self.weight.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # off: the base model, which DPO uses as its reference at no extra memory

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight)
        if x.is_cuda and USE_KERNELS and (self.dropout.p == 0 or not self.training):
            fn = _kernel('lora')
            if fn is not None:
                return fn(x, self.weight, self.lora_a, self.lora_b, self.scale)
        # in place on the base output (its backward does not need it): two fewer (tokens x out) temporaries
        return F.linear(x, self.weight).add_(F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b),
                                             alpha=self.scale)


class TokenRows(nn.Module):
    """An embedding (int input) or LM head (float input) whose weight is frozen except a few rows, trained as
    lora_rows. For the chat tokens of a base pretrained on plain text: it never saw them, and every
    pretraining step lowered their logits (<|end|> starts near log p = -15), which a low-rank update of the
    layers alone takes many steps to undo. Tied embeddings share one TokenRows weight and rows."""

    def __init__(self, weight, ids, rows=None):
        super().__init__()
        self.weight = weight
        self.register_buffer('ids', torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.lora_rows = rows if rows is not None else nn.Parameter(weight.detach()[self.ids].clone())
        self.enabled = True

    def full_weight(self):
        return self.weight.index_put((self.ids,), self.lora_rows.to(self.weight.dtype)) if self.enabled else self.weight

    def forward(self, x):
        w = self.full_weight()
        return F.linear(x, w) if x.is_floating_point() else F.embedding(x, w)


def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, TokenRows))]


def apply_lora(model, r=8, alpha=16.0, dropout=0.0, targets=('q', 'v'), tokens=()):
    """Replace the target projections of every block by LoRA linears, make the embedding rows of `tokens`
    trainable (TokenRows), and freeze everything else."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {list(LORA_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for t in targets:
            parent_name, attr = LORA_TARGETS[t].split('.')
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr)
            if not isinstance(base, LoRALinear):
                setattr(parent, attr, LoRALinear(base, r, alpha, dropout))
    tokens = tuple(int(t) for t in tokens)
    if tokens and not isinstance(model.tok_emb, TokenRows):
        model.tok_emb = TokenRows(model.tok_emb.weight, tokens)
        tied = model.cfg.tie_embeddings
        model.lm_head = TokenRows(model.lm_head.weight, tokens, model.tok_emb.lora_rows if tied else None)
    model.lora_config = dict(r=r, alpha=float(alpha), dropout=float(dropout), targets=tuple(targets), tokens=tokens)
    return model


def lora_state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if '.lora_' in k}


def set_lora_enabled(model, enabled):
    for _, m in _lora_modules(model):
        m.enabled = enabled


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W += scale * B A, trained token rows written in) and put
    plain modules back."""
    for name, m in [(n, m) for n, m in _lora_modules(model) if isinstance(m, LoRALinear)]:
        parent = model.get_submodule(name.rsplit('.', 1)[0])
        merged = nn.Linear(m.weight.size(1), m.weight.size(0), bias=False,
                           device=m.weight.device, dtype=m.weight.dtype)
        merged.weight.copy_(m.weight + m.scale * (m.lora_b.float() @ m.lora_a.float()).to(m.weight.dtype))
        setattr(parent, name.rsplit('.', 1)[1], merged)
    if isinstance(model.tok_emb, TokenRows):  # plain modules again, the trained rows written in, still tied
        emb, head = model.tok_emb, model.lm_head
        model.tok_emb = nn.Embedding(*emb.weight.shape, device=emb.weight.device, dtype=emb.weight.dtype)
        model.tok_emb.weight.copy_(emb.full_weight())
        model.lm_head = nn.Linear(head.weight.size(1), head.weight.size(0), bias=False,
                                  device=head.weight.device, dtype=head.weight.dtype)
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        else:
            model.lm_head.weight.copy_(head.full_weight())
    if hasattr(model, 'lora_config'):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model
