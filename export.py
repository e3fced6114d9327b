"""
The export stage: a Lumi checkpoint for the rest of the ecosystem.

`python lumi.py export CKPT OUT --format=hf` writes a directory that Hugging Face `transformers` loads as
`LlamaForCausalLM` (`Qwen3ForCausalLM` for a model with QK-norm): config.json, model.safetensors, the
tokenizer twice (tokenizer.json, a fast tokenizer that transformers loads alone and that gives Lumi's ids, and
the SentencePiece tokenizer.model) with its config and chat template, and a generation config. `--format=pt`
writes a plain state dict (Lumi's names, LoRA merged) for torch users.

The safetensors format is simple enough to write by hand, so Lumi does not take a dependency for it:
8 bytes (little-endian u64) giving the length N of a JSON header, N bytes of that header, then the raw
tensor bytes. The header maps each name to {dtype, shape, data_offsets: [begin, end)} relative to the start
of the byte buffer, plus an optional "__metadata__" dict of strings. The buffer must be covered exactly,
without holes or overlaps. A reader sits beside the writer so that an export can be checked bit for bit.

Deliberately left out: other architectures' layouts, GGUF, quantisation, sharding into several files
(Lumi's models are small), and unigram tokenizers (tokenizer.json's unigram model would match special pieces
inside text, which SentencePiece never does).
"""
import base64
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F

import lumi
from checkpoint import load_model
from tokenizer import (BOS_ID, CHAT_TOKENS, EOS_ID, PAD_ID, PIECE_CONTROL, PIECE_NORMAL, PIECE_UNKNOWN,
                       PIECE_USER_DEFINED, UNK_ID, proto_fields)

# -----------------------------------------------------------------------------
# keys: --key=value
format = 'hf'       # hf: a Hugging Face Llama directory (safetensors); pt: a plain state dict for torch.load
dtype = 'float32'   # the exported weights' dtype: float32 | bfloat16 | float16
KEYS = lumi.declared_keys(__file__)

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


def hf_state_dict(model, dtype=torch.float32):
    """Lumi's weights under transformers' Llama names. RoPE needs no permutation: Lumi rotates halves
    (x1, x2) -> (-x2, x1) exactly as LlamaAttention does, with the same inverse frequencies."""
    c = model.cfg
    sd = dict(model.state_dict())
    names = {'tok_emb.weight': 'model.embed_tokens.weight', 'norm.weight': 'model.norm.weight'}
    if not c.tie_embeddings:  # a tied head is the embedding; transformers re-ties it from the config
        names['lm_head.weight'] = 'lm_head.weight'
    if c.embed_norm:  # Llama has no norm after the lookup: every row normalised once here, the head untied
        names['lm_head.weight'] = 'lm_head.weight'  # the raw embedding, where Lumi ties them
        with torch.no_grad():
            sd['tok_emb.weight'] = F.rms_norm(sd['tok_emb.weight'], (c.n_embd,), sd.pop('emb_norm.weight'),
                                              c.norm_eps)
    for i in range(c.n_layer):
        src, dst = f'layers.{i}.', f'model.layers.{i}.'
        for p in ('q', 'k', 'v', 'o'):
            names[f'{src}attn.{p}_proj.weight'] = f'{dst}self_attn.{p}_proj.weight'
        for p in ('gate', 'up', 'down'):
            names[f'{src}mlp.{p}_proj.weight'] = f'{dst}mlp.{p}_proj.weight'
        names[f'{src}attn_norm.weight'] = f'{dst}input_layernorm.weight'
        if c.qk_norm:  # Qwen3's q_norm / k_norm: per head, before RoPE, as Lumi's
            names[f'{src}attn.q_norm.weight'] = f'{dst}self_attn.q_norm.weight'
            names[f'{src}attn.k_norm.weight'] = f'{dst}self_attn.k_norm.weight'
        names[f'{src}mlp_norm.weight'] = f'{dst}post_attention_layernorm.weight'
    unmapped = set(sd) - set(names) - ({'lm_head.weight'} if c.tie_embeddings else set())
    if unmapped:  # a weight Llama has no place for (unmerged adapters, a new layer type) must not vanish
        raise ValueError(f"no Llama name for {sorted(unmapped)[:5]}")
    # clone: each exported tensor owns its memory, so none aliases another in the file
    return {dst: sd[src].detach().to(dtype).clone() for src, dst in names.items()}


def hf_architecture(cfg):
    """(architecture, model_type) of the transformers class that computes what cfg's model computes: Llama,
    or Qwen3 (Llama with QK-norm) when cfg.qk_norm. Refuses what neither computes."""
    if cfg.logit_softcap:
        raise ValueError(f"logit_softcap={cfg.logit_softcap} has no Llama or Qwen3 form (Gemma 2's also adds "
                         f"norms after each block): export with --format=pt")
    return ('Qwen3ForCausalLM', 'qwen3') if cfg.qk_norm else ('LlamaForCausalLM', 'llama')


def hf_config(cfg, dtype_name):
    arch, model_type = hf_architecture(cfg)
    return {
        'architectures': [arch], 'model_type': model_type,
        'vocab_size': cfg.vocab_size, 'hidden_size': cfg.n_embd, 'intermediate_size': cfg.ffn_hidden,
        'num_hidden_layers': cfg.n_layer, 'num_attention_heads': cfg.n_head,
        'num_key_value_heads': cfg.n_kv_head, 'head_dim': cfg.head_dim, 'hidden_act': 'silu',
        'max_position_embeddings': cfg.block_size, 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
        'rope_scaling': None, 'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0,
        'tie_word_embeddings': cfg.tie_embeddings and not cfg.embed_norm, 'initializer_range': 0.02, 'use_cache': True,
        'bos_token_id': BOS_ID, 'eos_token_id': EOS_ID, 'pad_token_id': PAD_ID,
        'torch_dtype': dtype_name,
        **({'use_sliding_window': False, 'sliding_window': None} if cfg.qk_norm else {}),
    }


# -----------------------------------------------------------------------------
# tokenizer.json: the SentencePiece model as a Hugging Face fast tokenizer, written by hand, so that
# transformers alone loads it (no sentencepiece, no protobuf) and gives Lumi's ids.
#
# SentencePiece BPE merges, again and again, the adjacent pair whose union is the piece with the highest
# score; a BPE model whose merges are every (left, right) split of every piece, ranked by that piece's score,
# does the same. The text is one "word" (no pre-tokenizer): SentencePiece never splits at spaces when it
# encodes, and its pieces may hold runs of spaces. The dummy prefix and the space -> U+2581 escape are
# normalizer steps, so they apply to the whole text as they do in SentencePiece (a Metaspace pre-tokenizer
# would not add the prefix before a leading space).

# Lumi's Tokenizer.encode treats marker text inside text as text; the chat template must let transformers tell
# a message's '<|end|>' from its own. It writes every '<' of a message as '<' + ESCAPE, which matches no added
# token, and the normalizer's first step turns the pair back into '<'. ESCAPE is a Unicode noncharacter
# (reserved for a program's internal use): text holding '<' + U+FDD0 itself is the one input the plain
# tokenizer reads differently from Lumi. A role other than Lumi's three is an error there too, as in
# render_chat. (transformers' own apply_chat_template(..., sanitize_control_tokens=True) is then not needed;
# it would also keep markers out, but encodes the text on each side of one apart, so its ids can differ from
# Lumi's.)
ESCAPE = '\ufdd0'
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception("
                 "'unknown role ' + message['role'] + ' (expected system, user or assistant)') }}{% endif %}"
                 "{{ '<|' + message['role'] + '|>' }}"
                 "{{ message['content'] | replace('<', '<" + ESCAPE + "') }}{{ '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _spm_pieces_and_specs(tok):
    """[(piece, score, type)] in id order, and the trainer and normalizer specs as {field number: value}."""
    pieces, specs = [], {2: {}, 3: {}}
    for number, value, _ in proto_fields(tok.proto):
        if number == 1:
            f = {n: v for n, v, _ in proto_fields(value)}
            pieces.append((f[1].decode('utf-8'), struct.unpack('<f', f.get(2, bytes(4)))[0],
                           f.get(3, PIECE_NORMAL)))
        elif number in specs:
            specs[number] = {n: v for n, v, _ in proto_fields(value)}
    return pieces, specs[2], specs[3]


def _replace(pattern, content, regex=False):
    return {'type': 'Replace', 'pattern': {'Regex' if regex else 'String': pattern}, 'content': content}


def tokenizer_json(tok):
    """The tokenizer.json of a fast tokenizer that encodes as tok does (tested against it)."""
    pieces, trainer, norm = _spm_pieces_and_specs(tok)
    if trainer.get(3, 1) != 2:  # proto default: unigram
        # a unigram tokenizer.json would match '<|end|>' or '<0x3C>' in text as those pieces, which
        # SentencePiece never does: it cannot encode as Lumi does
        raise ValueError(f"tokenizer {tok.sha256[:12]} is not BPE: only SentencePiece BPE models export to "
                         f"tokenizer.json (export with --format=pt, or train with tokenizer_type='bpe')")
    if trainer.get(24):
        raise ValueError(f"tokenizer {tok.sha256[:12]}: treat_whitespace_as_suffix "
                         f"has no tokenizer.json form")
    steps = [_replace('<' + ESCAPE, '<')]
    if norm.get(2):
        steps.append({'type': 'Precompiled', 'precompiled_charsmap': base64.b64encode(norm[2]).decode()})
    if norm.get(4, 1):  # remove_extra_whitespaces: no leading or trailing space, none doubled
        steps += [_replace('^ +| +$', '', regex=True), _replace(' {2,}', ' ', regex=True)]
    if norm.get(5, 1):
        steps.append(_replace(' ', '\u2581'))
    if norm.get(3, 1):
        steps.append({'type': 'Prepend', 'prepend': '\u2581'})
    # markers and pad/unk/bos/eos are special; other user-defined symbols stay whole as SentencePiece
    # keeps them
    whole = (PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED)
    added = [{'id': i, 'content': p, 'single_word': False, 'lstrip': False, 'rstrip': False,
              'normalized': False, 'special': t != PIECE_USER_DEFINED or p in CHAT_TOKENS}
             for i, (p, _, t) in enumerate(pieces) if t in whole]
    # text pieces only: a merge never builds a control, byte or marker piece from text
    rank = {p: (-s, i) for i, (p, s, t) in enumerate(pieces) if t == PIECE_NORMAL}
    merges = sorted(((p[:k], p[k:]) for p in rank for k in range(1, len(p))
                     if p[:k] in rank and p[k:] in rank),
                    key=lambda lr: (rank[lr[0] + lr[1]], rank[lr[0]]))
    model = {'type': 'BPE', 'dropout': None, 'unk_token': pieces[UNK_ID][0],
             'continuing_subword_prefix': None, 'end_of_word_suffix': None, 'fuse_unk': True,
             'byte_fallback': bool(trainer.get(35, 0)), 'ignore_merges': False,
             'vocab': {p: i for i, (p, _, _) in enumerate(pieces)},
             'merges': [list(m) for m in merges]}
    bos = pieces[BOS_ID][0]
    decoder = [_replace('\u2581', ' '), {'type': 'ByteFallback'}, {'type': 'Fuse'}]
    if norm.get(3, 1):  # the dummy prefix's space goes again
        decoder.append({'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0})
    return {
        'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
        'normalizer': {'type': 'Sequence', 'normalizers': steps}, 'pre_tokenizer': None,
        'post_processor': {  # BOS first, as Lumi's documents and chats start
            'type': 'TemplateProcessing',
            'single': [{'SpecialToken': {'id': bos, 'type_id': 0}}, {'Sequence': {'id': 'A', 'type_id': 0}}],
            'pair': [{'SpecialToken': {'id': bos, 'type_id': 0}}, {'Sequence': {'id': 'A', 'type_id': 0}},
                     {'SpecialToken': {'id': bos, 'type_id': 0}}, {'Sequence': {'id': 'B', 'type_id': 0}}],
            'special_tokens': {bos: {'id': bos, 'ids': [BOS_ID], 'tokens': [bos]}}},
        'decoder': {'type': 'Sequence', 'decoders': decoder},
        'model': model,
    }


def tokenizer_files(tok, block_size):
    """tokenizer_config.json and special_tokens_map.json for transformers' fast tokenizer."""
    piece = tok.id_to_piece
    specials = {'bos_token': piece(BOS_ID), 'eos_token': piece(EOS_ID),
                'unk_token': piece(UNK_ID), 'pad_token': piece(PAD_ID)}
    ids = [PAD_ID, UNK_ID, BOS_ID, EOS_ID] + [tok.sp.piece_to_id(t) for t in CHAT_TOKENS]
    added = {str(i): {'content': piece(i), 'lstrip': False, 'normalized': False, 'rstrip': False,
                      'single_word': False, 'special': True} for i in ids}
    config = dict(specials, tokenizer_class='PreTrainedTokenizerFast', model_max_length=block_size,
                  add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
                  added_tokens_decoder=added, additional_special_tokens=list(CHAT_TOKENS),
                  chat_template=CHAT_TEMPLATE)
    special_map = dict(specials, additional_special_tokens=list(CHAT_TOKENS))
    return config, special_map


def write_hf_tokenizer(tok, out_dir, block_size):
    """tokenizer.json, tokenizer.model, tokenizer_config.json (with the chat template) and
    special_tokens_map.json: what AutoTokenizer.from_pretrained(out_dir) reads."""
    tok_json = json.dumps(tokenizer_json(tok), ensure_ascii=False).encode('utf-8')
    os.makedirs(out_dir, exist_ok=True)
    lumi.atomic_write(os.path.join(out_dir, 'tokenizer.json'), lambda f: f.write(tok_json))
    lumi.atomic_write(os.path.join(out_dir, 'tokenizer.model'), lambda f: f.write(tok.proto))
    tok_config, special_map = tokenizer_files(tok, block_size)
    lumi.write_json(os.path.join(out_dir, 'tokenizer_config.json'), tok_config)
    lumi.write_json(os.path.join(out_dir, 'special_tokens_map.json'), special_map)


def export_hf(ckpt_path, out_dir, dtype='float32'):
    """Write a transformers-loadable Llama directory; returns out_dir."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    model, tok, ckpt = load_model(ckpt_path, adapters=False)
    cfg = model.cfg
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{ckpt['path']}: tokenizer has {tok.vocab_size} pieces but the model "
                         f"{cfg.vocab_size} rows")
    hf_architecture(cfg)  # first, with the tokenizer: each refuses what it cannot write before anything is
    write_hf_tokenizer(tok, out_dir, cfg.block_size)
    weights = hf_state_dict(model, EXPORT_DTYPES[dtype])
    save_safetensors(weights, os.path.join(out_dir, 'model.safetensors'),
                     metadata={'format': 'pt', 'lumi_kind': ckpt.get('kind', ''),
                               'lumi_tokenizer_sha256': tok.sha256,
                               'lumi_source': os.path.basename(ckpt['path'])})
    lumi.write_json(os.path.join(out_dir, 'config.json'), hf_config(cfg, dtype))
    # chat models stop at <|end|>; base models at EOS; listing both serves either
    lumi.write_json(os.path.join(out_dir, 'generation_config.json'), {
        'bos_token_id': BOS_ID, 'eos_token_id': [EOS_ID, tok.end_id], 'pad_token_id': PAD_ID,
        'max_length': cfg.block_size, 'do_sample': True, 'temperature': 0.8, 'top_p': 0.95})
    return out_dir


def export_pt(ckpt_path, out_path):
    """A plain state dict (Lumi's parameter names, adapters merged, no optimizer), for torch.load."""
    model, _, _ = load_model(ckpt_path, adapters=False)
    if os.path.isdir(out_path) or not out_path.endswith('.pt'):
        out_path = os.path.join(out_path, 'model.pt')
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lumi.atomic_write(out_path, lambda f: torch.save(state, f))  # as is: no checksums beside the weights
    return out_path


USAGE = "usage: python lumi.py export CKPT OUT [--format=hf|pt] [--dtype=float32|bfloat16|float16]"


def main(argv):
    """`lumi.py export CKPT OUT [--format=hf|pt] [--dtype=float32|bfloat16|float16]`."""
    pos, flags = lumi.split_args(argv, KEYS)
    if len(pos) != 2:
        raise lumi.LumiError(USAGE)
    cfg = lumi.load_config(KEYS, flags, shares_with=())
    if cfg.format not in ('hf', 'pt'):
        raise lumi.LumiError(f"--format must be hf or pt, got {cfg.format!r}")
    ckpt_path, out = pos
    if cfg.format == 'hf':
        export_hf(ckpt_path, out, cfg.dtype)
        arch = lumi.read_json(os.path.join(out, 'config.json'))['architectures'][0]
        lumi.log(f"wrote a Hugging Face {arch} directory to {out}: load it with "
                 f"transformers.AutoModelForCausalLM.from_pretrained({out!r})")
    elif cfg.format == 'pt':
        path = export_pt(ckpt_path, out)
        lumi.log(f"wrote a plain state dict to {path}")
    return out


if __name__ == '__main__':
    lumi.cli(main, KEYS, USAGE)
