"""
Export a Lumi checkpoint for the rest of the ecosystem.

`python lumi.py export CKPT OUT --format=hf` writes a directory that Hugging Face `transformers` loads as
`LlamaForCausalLM`: config.json, model.safetensors, the SentencePiece model with its tokenizer config, and a
generation config. `--format=pt` writes a plain state dict (Lumi's names, LoRA merged) for torch users.

The safetensors format is simple enough to write by hand, so Lumi does not take a dependency for it:
8 bytes (little-endian u64) giving the length N of a JSON header, N bytes of that header, then the raw
tensor bytes. The header maps each name to {dtype, shape, data_offsets: [begin, end)} relative to the start
of the byte buffer, plus an optional "__metadata__" dict of strings. The buffer must be covered exactly,
without holes or overlaps. A reader sits beside the writer so that an export can be checked bit for bit.

Deliberately left out: other architectures' layouts, GGUF, quantisation, sharding into several files
(Lumi's models are small), and the fast tokenizer.json (transformers converts tokenizer.model on load).
"""
import json
import os
import sys

import torch

# safetensors dtype names; the bytes are always little-endian
SAFETENSORS_DTYPES = {
    torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16',
    torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
    torch.bool: 'BOOL',
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
EXPORT_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
HEADER_LIMIT = 100 * 1024 * 1024  # a header larger than this is a corrupt or hostile file, not a model

if sys.byteorder != 'little':  # the raw bytes below are written and read as the machine holds them
    raise RuntimeError("export.py writes safetensors from native memory and needs a little-endian machine")


# -----------------------------------------------------------------------------
# safetensors, by hand

def _tensor_bytes(t):
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} to path in the safetensors format (atomically).

    Tensors are laid out largest element size first, then by name: every tensor then starts at a multiple
    of its own element size, and the header is padded with spaces to a multiple of 8 so that the buffer
    itself starts aligned. Tensors that share memory (a tied head) must be passed once.
    """
    import lumi
    for name, t in tensors.items():
        if not isinstance(name, str) or name == '__metadata__':
            raise ValueError(f"invalid tensor name {name!r}")
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {'dtype': SAFETENSORS_DTYPES[t.dtype], 'shape': list(t.shape),
                        'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(',', ':')).encode('utf-8')
    blob += b' ' * (-len(blob) % 8)

    def write(f):
        f.write(len(blob).to_bytes(8, 'little'))
        f.write(blob)
        for name in order:
            f.write(_tensor_bytes(tensors[name]))
    lumi.atomic_write(path, write)
    return path


def load_safetensors(path):
    """Read a safetensors file into ({name: tensor}, metadata), checking the header against the file."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        if size < 8:
            raise ValueError(f"{path}: {size} bytes is too short for a safetensors file")
        n = int.from_bytes(f.read(8), 'little')
        if n > HEADER_LIMIT or 8 + n > size:
            raise ValueError(f"{path}: header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n).decode('utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
        buf = bytearray(f.read())
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object")
    metadata = header.pop('__metadata__', None) or {}
    spans, tensors = [], {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype = TORCH_DTYPES[info['dtype']]
            shape = [int(s) for s in info['shape']]
            begin, end = (int(o) for o in info['data_offsets'])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad header entry {info!r} ({type(e).__name__}: {e})") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or end > len(buf):
            raise ValueError(f"{where}: offsets [{begin}, {end}) do not hold {shape} {info['dtype']} "
                             f"({nbytes} bytes) inside a buffer of {len(buf)}")
        spans.append((begin, end, name))
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=begin) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.clone().view(dtype).reshape(shape)  # clone: aligned memory of its own
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ValueError(f"{path}: tensor {name!r} starts at {begin}, expected {pos} (a hole or overlap)")
        pos = end
    if pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - pos} bytes after the last tensor")
    return tensors, metadata


# -----------------------------------------------------------------------------
# Lumi -> Hugging Face Llama

def load_for_export(ckpt_path):
    """The checkpoint's model with any LoRA adapters folded into the base weights, its tokenizer, and ckpt."""
    import lumi
    from model import merge_lora
    ckpt = lumi.load_checkpoint(ckpt_path)
    if ckpt.get('kind') == 'adapter' or 'model' not in ckpt:
        raise ValueError(f"{ckpt['path']} holds adapters only (kind {ckpt.get('kind')!r}); export the merged "
                         f"checkpoint beside it (merged.pt) or merge it onto its base first")
    model = lumi.model_from_checkpoint(ckpt)
    if ckpt.get('lora'):
        merge_lora(model)
    return model.eval(), lumi.tokenizer_from_checkpoint(ckpt), ckpt


def hf_state_dict(model, dtype=torch.float32):
    """Lumi's weights under transformers' Llama names. RoPE needs no permutation: Lumi rotates halves
    (x1, x2) -> (-x2, x1) exactly as LlamaAttention does, with the same inverse frequencies."""
    c = model.cfg
    sd = model.state_dict()
    names = {'tok_emb.weight': 'model.embed_tokens.weight', 'norm.weight': 'model.norm.weight'}
    if not c.tie_embeddings:  # a tied head is the embedding; transformers re-ties it from the config
        names['lm_head.weight'] = 'lm_head.weight'
    for i in range(c.n_layer):
        src, dst = f'layers.{i}.', f'model.layers.{i}.'
        for p in ('q', 'k', 'v', 'o'):
            names[f'{src}attn.{p}_proj.weight'] = f'{dst}self_attn.{p}_proj.weight'
        for p in ('gate', 'up', 'down'):
            names[f'{src}mlp.{p}_proj.weight'] = f'{dst}mlp.{p}_proj.weight'
        names[f'{src}attn_norm.weight'] = f'{dst}input_layernorm.weight'
        names[f'{src}mlp_norm.weight'] = f'{dst}post_attention_layernorm.weight'
    unmapped = set(sd) - set(names) - ({'lm_head.weight'} if c.tie_embeddings else set())
    if unmapped:  # a weight Llama has no place for (unmerged adapters, a new layer type) must not vanish
        raise ValueError(f"no Llama name for {sorted(unmapped)[:5]}")
    # clone: each exported tensor owns its memory, so none aliases another in the file
    return {dst: sd[src].detach().to(dtype).clone() for src, dst in names.items()}


def hf_config(cfg, dtype_name):
    import lumi
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': cfg.vocab_size, 'hidden_size': cfg.n_embd, 'intermediate_size': cfg.ffn_hidden,
        'num_hidden_layers': cfg.n_layer, 'num_attention_heads': cfg.n_head,
        'num_key_value_heads': cfg.n_kv_head, 'head_dim': cfg.head_dim, 'hidden_act': 'silu',
        'max_position_embeddings': cfg.block_size, 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
        'rope_scaling': None, 'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0,
        'tie_word_embeddings': cfg.tie_embeddings, 'initializer_range': 0.02, 'use_cache': True,
        'bos_token_id': lumi.BOS_ID, 'eos_token_id': lumi.EOS_ID, 'pad_token_id': lumi.PAD_ID,
        'torch_dtype': dtype_name,
    }


# The chat template of lumi.render_chat in Jinja: BOS, then <|role|> content <|end|> per message. Each
# content is encoded on its own there, so it starts with SentencePiece's word-boundary mark; the slow
# LlamaTokenizer in legacy mode does the same after a special token, so the ids agree.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
                 "{{ message['content'] }}{{ '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def tokenizer_files(tok, block_size):
    """tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer."""
    import lumi
    piece = tok.id_to_piece
    specials = {'bos_token': piece(lumi.BOS_ID), 'eos_token': piece(lumi.EOS_ID),
                'unk_token': piece(lumi.UNK_ID), 'pad_token': piece(lumi.PAD_ID)}
    ids = [lumi.PAD_ID, lumi.UNK_ID, lumi.BOS_ID, lumi.EOS_ID] + [tok.sp.piece_to_id(t) for t in lumi.CHAT_TOKENS]
    added = {str(i): {'content': piece(i), 'lstrip': False, 'normalized': False, 'rstrip': False,
                      'single_word': False, 'special': True} for i in ids}
    config = dict(specials, tokenizer_class='LlamaTokenizer', model_max_length=block_size,
                  add_bos_token=True, add_eos_token=False, legacy=True, clean_up_tokenization_spaces=False,
                  sp_model_kwargs={}, added_tokens_decoder=added,
                  additional_special_tokens=list(lumi.CHAT_TOKENS), chat_template=CHAT_TEMPLATE)
    special_map = dict(specials, additional_special_tokens=list(lumi.CHAT_TOKENS))
    return config, special_map


def export_hf(ckpt_path, out_dir, dtype='float32'):
    """Write a transformers-loadable Llama directory; returns out_dir."""
    import lumi
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    model, tok, ckpt = load_for_export(ckpt_path)
    cfg = model.cfg
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{ckpt['path']}: tokenizer has {tok.vocab_size} pieces but the model {cfg.vocab_size} rows")
    os.makedirs(out_dir, exist_ok=True)
    weights = hf_state_dict(model, EXPORT_DTYPES[dtype])
    save_safetensors(weights, os.path.join(out_dir, 'model.safetensors'),
                     metadata={'format': 'pt', 'lumi_kind': ckpt.get('kind', ''),
                               'lumi_tokenizer_sha256': tok.sha256, 'lumi_source': os.path.basename(ckpt['path'])})
    lumi.write_json(os.path.join(out_dir, 'config.json'), hf_config(cfg, dtype))
    lumi.atomic_write(os.path.join(out_dir, 'tokenizer.model'), lambda f: f.write(tok.proto))
    tok_config, special_map = tokenizer_files(tok, cfg.block_size)
    lumi.write_json(os.path.join(out_dir, 'tokenizer_config.json'), tok_config)
    lumi.write_json(os.path.join(out_dir, 'special_tokens_map.json'), special_map)
    # chat models stop at <|end|>; base models at EOS; listing both serves either
    lumi.write_json(os.path.join(out_dir, 'generation_config.json'), {
        'bos_token_id': lumi.BOS_ID, 'eos_token_id': [lumi.EOS_ID, tok.end_id], 'pad_token_id': lumi.PAD_ID,
        'max_length': cfg.block_size, 'do_sample': True, 'temperature': 0.8, 'top_p': 0.95})
    return out_dir


def export_pt(ckpt_path, out_path):
    """A plain state dict (Lumi's parameter names, adapters merged, no optimizer), for torch.load."""
    import lumi
    model, _, _ = load_for_export(ckpt_path)
    if os.path.isdir(out_path) or not out_path.endswith('.pt'):
        out_path = os.path.join(out_path, 'model.pt')
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lumi.atomic_write(out_path, lambda f: torch.save(state, f))  # as is: no checksums beside the weights
    return out_path


DEFAULTS = dict(
    format='hf',      # hf: a Hugging Face Llama directory (safetensors); pt: a plain state dict for torch.load
    dtype='float32',  # the exported weights' dtype: float32 | bfloat16 | float16
)
USAGE = "usage: python lumi.py export CKPT OUT [--format=hf|pt] [--dtype=float32|bfloat16|float16]"


def main(argv):
    """`lumi.py export CKPT OUT [--format=hf|pt] [--dtype=float32|bfloat16|float16]`."""
    import lumi
    pos, flags = lumi.split_args(argv, DEFAULTS)
    if len(pos) != 2:
        raise lumi.LumiError(USAGE)
    cfg = lumi.load_config(DEFAULTS, flags)
    if cfg.format not in ('hf', 'pt'):
        raise lumi.LumiError(f"--format must be hf or pt, got {cfg.format!r}")
    ckpt_path, out = pos
    if cfg.format == 'hf':
        export_hf(ckpt_path, out, cfg.dtype)
        lumi.log(f"wrote a Hugging Face Llama directory to {out}: load it with "
                 f"transformers.LlamaForCausalLM.from_pretrained({out!r})")
    elif cfg.format == 'pt':
        path = export_pt(ckpt_path, out)
        lumi.log(f"wrote a plain state dict to {path}")
    return out
