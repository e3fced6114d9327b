"""
LoRA written by hand: y = x W^T + (alpha / r) * dropout(x) A^T B^T with W frozen, and B starting at zero, so a
fresh adapter leaves the model exactly as it was. The layers (LoRALinear; TokenRows for the chat tokens'
embedding rows), putting them into a model and folding them back out (apply_lora, merge_lora), and what an
adapter file holds: the LoRA tensors alone, with the hash of the base they were trained on, checked and
applied onto it. Also an adapter in PEFT's format, both ways: its config and tensors under transformers' Llama
names (peft_adapter, which export.py writes) and a PEFT adapter directory read back (load_peft_adapter).

Deliberately left out: the fused CUDA kernel (kernels/lora.py, chosen in model.low_rank_linear), training
(sft.py, dpo.py), merged checkpoints (checkpoint.save_merged), and PEFT's other methods (DoRA, IA3, ...).
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats import load_safetensors
from lumi import LumiError, sha256_file
from model import low_rank_linear
from tokenizer import check_tokenizer

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
        return low_rank_linear(x, self.weight, self.lora_a, self.lora_b, self.scale, self.dropout)


class TokenRows(nn.Module):
    """An embedding (int input) or LM head (float input) whose weight is frozen except a few rows, trained as
    lora_rows. For the chat tokens of a base pretrained on plain text: it never saw them, and every
    pretraining step lowered their logits (<|end|> starts near log p = -15), which a low-rank update of the
    layers alone takes many steps to undo. Tied embeddings share one TokenRows weight and rows."""

    def __init__(self, weight, ids, rows=None):
        super().__init__()
        self.weight = weight
        self.register_buffer('ids', torch.tensor(ids, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.lora_rows = rows if rows is not None else nn.Parameter(weight.detach()[self.ids].clone())
        self.enabled = True

    def full_weight(self):
        return (self.weight.index_put((self.ids,), self.lora_rows.to(self.weight.dtype)) if self.enabled
                else self.weight)

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
    model.lora_config = dict(r=r, alpha=float(alpha), dropout=float(dropout), targets=tuple(targets),
                             tokens=tokens)
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


# -----------------------------------------------------------------------------
# adapter files: the LoRA tensors alone, tied to the base they were trained on

def adapter_state(model, base_path, tok):
    """What an adapter file holds (checkpoint.save_checkpoint writes it): the LoRA tensors alone with their
    config, the base's path and SHA256, the tokenizer's."""
    return dict(kind='adapter', lora=dict(model.lora_config), lora_state=lora_state_dict(model),
                base_path=os.path.abspath(base_path), base_sha256=sha256_file(base_path),
                tokenizer_sha256=tok.sha256)


def check_adapter(adapter, where, base_path, tok):
    """The adapter file `where` (its loaded dict), when it is one made for the base checkpoint at base_path
    and its tokenizer tok; a file that is no adapter, or one trained on another base or tokenizer, is refused
    in one line."""
    if adapter.get('kind') != 'adapter':
        raise LumiError(f"{where} is not an adapter (kind {adapter.get('kind')!r})")
    lacking = [k for k in ('lora', 'lora_state', 'base_sha256', 'tokenizer_sha256') if k not in adapter]
    if lacking:
        raise LumiError(f"{where} is not a usable adapter: it has no {', '.join(lacking)}")
    sha = sha256_file(base_path)
    if sha != adapter['base_sha256']:
        raise ValueError(f"{where} was trained on base {adapter['base_sha256'][:12]}… "
                         f"({adapter.get('base_path')}), but {base_path} is {sha[:12]}…")
    check_tokenizer(adapter['tokenizer_sha256'], tok.sha256, where)
    return adapter


def apply_adapter(model, adapter, where):
    """Apply a checked adapter (check_adapter) to its base's model, whose own adapters, if any, become part of
    the base. Tensors that do not fit are refused in one line: their shapes are held against a copy of the
    model built on the meta device, so a crafted r=10**6 allocates nothing."""
    try:
        with torch.device('meta'):
            probe = apply_lora(type(model)(model.cfg), **adapter['lora'])
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise LumiError(f"{where}: its lora config {adapter['lora']!r} does not describe "
                        f"adapters: {e}") from e
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items() if '.lora_' in k}
    got = {k: tuple(v.shape) for k, v in adapter['lora_state'].items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} is {got[k]}, expected {s}" for k, s in expected.items() if k in got and got[k] != s]
    if missing or unexpected or wrong:
        said = (wrong[:3] + [f"missing {missing[:3]}"] * bool(missing)
                + [f"unexpected {unexpected[:3]}"] * bool(unexpected))
        raise LumiError(f"{where}: its weights do not fit its base {adapter.get('base_path')} with its "
                        f"lora config: {'; '.join(said)}")
    if getattr(model, 'lora_config', None):
        merge_lora(model)  # a base that itself carries adapters: they are part of the base
    apply_lora(model, **adapter['lora'])
    model.load_state_dict(adapter['lora_state'], strict=False)
    return model


# -----------------------------------------------------------------------------
# PEFT's format: adapter_config.json and adapter_model.safetensors, by transformers' Llama names, for the
# Hugging Face export of the adapter's base (export.py --format=hf). PEFT's LoRA is Lumi's: A (r, in) and B
# (out, r), scale alpha / r; Lumi's trained token rows are PEFT's trainable tokens, whose "delta" holds the
# rows' new values as lora_rows does (a tied head follows the embedding in both).

PEFT_PREFIX = 'base_model.model.'
PEFT_ROWS = 'token_adapter.trainable_tokens_delta'
PEFT_MODULES = {'tok_emb': 'model.embed_tokens', 'lm_head': 'lm_head'}  # trainable-token modules


def _peft_linear(name):
    """'layers.3.attn.q_proj' -> 'model.layers.3.self_attn.q_proj' (transformers' LlamaForCausalLM)."""
    layer, i, rest = name.split('.', 2)
    return f"model.{layer}.{i}.{rest.replace('attn.', 'self_attn.')}"


def peft_adapter(lora, lora_state, tie_embeddings):
    """(adapter_config.json as a dict, {name: tensor} for adapter_model.safetensors) of an adapter's lora
    config and tensors (adapter_state's), for a base whose head is tied to its embedding or not."""
    tokens = list(lora.get('tokens', ()))
    rows = ['tok_emb'] if tie_embeddings else ['tok_emb', 'lm_head']
    config = dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=None, r=lora['r'],
                  lora_alpha=lora['alpha'], lora_dropout=lora.get('dropout', 0.0), bias='none',
                  target_modules=sorted(LORA_TARGETS[t].split('.')[1] for t in lora['targets']),
                  fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, use_rslora=False,
                  use_dora=False, modules_to_save=None, layers_to_transform=None, rank_pattern={},
                  alpha_pattern={},
                  trainable_token_indices={PEFT_MODULES[m].split('.')[-1]: tokens for m in rows} if tokens
                  else None)
    tensors = {}
    for name, t in lora_state.items():
        module, _, kind = name.rpartition('.')
        if kind == 'lora_rows':
            if module in rows:
                tensors[f'{PEFT_PREFIX}{PEFT_MODULES[module]}.{PEFT_ROWS}'] = t
        else:
            tensors[f"{PEFT_PREFIX}{_peft_linear(module)}.lora_{kind[-1].upper()}.weight"] = t
    return config, {k: v.detach().float().contiguous() for k, v in tensors.items()}


def adapter_from_peft(config, tensors, model, where):
    """The lora config and lora_state (Lumi's names) of a PEFT LoRA adapter made for the Hugging Face export
    of `model`'s checkpoint. What Lumi's LoRA cannot hold is refused in one line: another PEFT method, DoRA,
    biases, per-layer ranks or layers, modules saved whole, targets other than Lumi's projections."""
    if config.get('peft_type') != 'LORA':
        raise LumiError(f"{where}: a PEFT {config.get('peft_type')!r} adapter; Lumi reads LoRA adapters only")
    unsupported = [k for k in ('use_dora', 'fan_in_fan_out', 'modules_to_save', 'layers_to_transform',
                               'rank_pattern', 'alpha_pattern', 'layer_replication') if config.get(k)]
    if config.get('bias', 'none') != 'none':
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise LumiError(f"{where}: Lumi's LoRA has no {', '.join(unsupported)}")
    names = {v.split('.')[1]: k for k, v in LORA_TARGETS.items()}  # 'q_proj' -> 'q'
    modules = config.get('target_modules')
    if not isinstance(modules, list) or not set(modules) <= set(names):
        raise LumiError(f"{where}: target_modules {modules!r} must be a list of {sorted(names)}")
    r, alpha = int(config['r']), float(config['lora_alpha'])
    if config.get('use_rslora'):  # rsLoRA scales by alpha / sqrt(r): the same scale as Lumi's alpha / r with
        alpha *= math.sqrt(r)     # alpha * sqrt(r)
    token_modules = config.get('trainable_token_indices') or {}
    if isinstance(token_modules, list):  # a plain list means the input embedding
        token_modules = {'embed_tokens': token_modules}
    tokens = tuple(int(t) for t in token_modules.get('embed_tokens', ()))
    if set(token_modules) - {'embed_tokens', 'lm_head'} or any(
            tuple(v) != tokens for v in token_modules.values()):
        raise LumiError(f"{where}: trainable_token_indices {token_modules} must be the same tokens of "
                        f"embed_tokens (and lm_head)")
    state = {}
    for module in ('tok_emb', 'lm_head') if tokens else ():
        key = f'{PEFT_PREFIX}{PEFT_MODULES[module]}.{PEFT_ROWS}'
        if key in tensors:
            state[f'{module}.lora_rows'] = tensors.pop(key)
    if tokens and 'lm_head.lora_rows' not in state:  # tied: the head's rows are the embedding's; untied and
        # not trained: its rows as they are
        state['lm_head.lora_rows'] = (state['tok_emb.lora_rows'] if model.cfg.tie_embeddings
                                      else model.lm_head.weight.detach()[list(tokens)].clone())
    for i in range(model.cfg.n_layer):
        for t in (names[m] for m in modules):
            lumi_name = f'layers.{i}.{LORA_TARGETS[t]}'
            for part in ('a', 'b'):
                key = f"{PEFT_PREFIX}{_peft_linear(lumi_name)}.lora_{part.upper()}.weight"
                if key in tensors:
                    state[f'{lumi_name}.lora_{part}'] = tensors.pop(key)
    if tensors:
        raise LumiError(f"{where}: tensors Lumi has no place for: {sorted(tensors)[:3]}")
    lora = dict(r=r, alpha=alpha, dropout=float(config.get('lora_dropout') or 0.0),
                targets=tuple(t for t in LORA_TARGETS if LORA_TARGETS[t].split('.')[1] in modules),
                tokens=tokens)
    return lora, state


def load_peft_adapter(path, model, base_path, tok):
    """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) as an adapter file's dict,
    for apply_adapter onto `model`, the model of the checkpoint at base_path with tokenizer tok. One that Lumi
    exported names its base's SHA256 and tokenizer in the safetensors metadata, and they must match
    (check_adapter); one made elsewhere is held to the shapes alone."""
    files = [os.path.join(path, n) for n in ('adapter_config.json', 'adapter_model.safetensors')]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{path}: no {' or '.join(missing)} (a PEFT adapter directory holds "
                                f"adapter_config.json and adapter_model.safetensors)")
    with open(files[0], encoding='utf-8') as f:
        config = json.load(f)
    tensors, meta = load_safetensors(files[1])
    lora, state = adapter_from_peft(config, tensors, model, path)
    adapter = dict(kind='adapter', lora=lora, lora_state=state,
                   base_path=meta.get('lumi_base_path', base_path))
    if 'lumi_base_sha256' in meta:
        adapter.update(base_sha256=meta['lumi_base_sha256'], tokenizer_sha256=meta['lumi_tokenizer_sha256'])
        check_adapter(adapter, path, base_path, tok)
    return adapter
