"""
The export stage: a Lumi checkpoint for the rest of the ecosystem.

`python lumi.py export CKPT OUT --format=hf` writes a directory that Hugging Face `transformers` loads as
`LlamaForCausalLM` (`Qwen3ForCausalLM` for a model with QK-norm): config.json, model.safetensors, the
tokenizer twice (tokenizer.json, a fast tokenizer that transformers loads alone and that gives Lumi's ids, and
the SentencePiece tokenizer.model) with its config and chat template, and a generation config. `--format=pt`
writes a plain state dict (Lumi's names, LoRA merged) for torch users. `--format=gguf` writes one GGUF file
for llama.cpp and Ollama (the `llama` architecture, the SentencePiece tokenizer and the chat template;
`pip install gguf`), float32, float16, bfloat16 or q8_0. `--format=peft` writes a LoRA adapter (an adapter
file, or an SFT or DPO out_dir) as PEFT's adapter_config.json and adapter_model.safetensors, for the
`--format=hf` export of its base: what peft and vLLM's multi-LoRA serving load. The files themselves
(safetensors by hand, GGUF) are formats.py's.

Deliberately left out: other architectures' layouts, quantisations but GGUF's q8_0, and unigram tokenizers
(tokenizer.json's unigram model would match special pieces inside text, which SentencePiece never does, and
llama.cpp reads a SentencePiece vocabulary as BPE).
"""
import base64
import json
import os
import struct

import torch

import lumi
from checkpoint import checkpoint_of, is_adapter, load_checkpoint, load_model, tokenizer_from_checkpoint
from formats import GGUF_DTYPES, gguf_state_dict, import_gguf, save_safetensors, write_gguf
from lora import check_adapter, peft_adapter
from model import exported_embedding
from tokenizer import (BOS_ID, CHAT_TOKENS, EOS_ID, PAD_ID, PIECE_CONTROL, PIECE_NORMAL, PIECE_UNKNOWN,
                       PIECE_USER_DEFINED, UNK_ID, proto_fields)

# -----------------------------------------------------------------------------
# keys: --key=value
format = 'hf'       # hf: a Hugging Face Llama directory (safetensors); pt: a plain state dict for torch.load;
                    # gguf: one file for llama.cpp and Ollama; peft: a LoRA adapter in PEFT's format
dtype = 'float32'   # the exported weights' dtype: float32 | bfloat16 | float16, and q8_0 for gguf
KEYS = lumi.declared_keys(__file__)

EXPORT_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


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
        sd['tok_emb.weight'] = exported_embedding(model)
        del sd['emb_norm.weight']
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
        'tie_word_embeddings': cfg.tie_embeddings and not cfg.embed_norm, 'initializer_range': 0.02,
        'use_cache': True,
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


def bpe_pieces_and_specs(tok, what='tokenizer.json'):
    """_spm_pieces_and_specs of a SentencePiece BPE model; another model is refused in one line."""
    pieces, trainer, norm = _spm_pieces_and_specs(tok)
    if trainer.get(3, 1) != 2:  # proto default: unigram
        # a unigram tokenizer.json would match '<|end|>' or '<0x3C>' in text as those pieces, which
        # SentencePiece never does: it cannot encode as Lumi does
        raise ValueError(f"tokenizer {tok.sha256[:12]} is not BPE: only SentencePiece BPE models export to "
                         f"{what} (export with --format=pt, or train with tokenizer_type='bpe')")
    if trainer.get(24):
        raise ValueError(f"tokenizer {tok.sha256[:12]}: treat_whitespace_as_suffix "
                         f"has no {what} form")
    return pieces, trainer, norm


def bpe_merges(pieces):
    """Every (left, right) split of every text piece into two text pieces, best first: the merges of a BPE
    model that encodes as SentencePiece BPE does."""
    # text pieces only: a merge never builds a control, byte or marker piece from text
    rank = {p: (-s, i) for i, (p, s, t) in enumerate(pieces) if t == PIECE_NORMAL}
    return sorted(((p[:k], p[k:]) for p in rank for k in range(1, len(p)) if p[:k] in rank and p[k:] in rank),
                  key=lambda lr: (rank[lr[0] + lr[1]], rank[lr[0]]))


def tokenizer_json(tok):
    """The tokenizer.json of a fast tokenizer that encodes as tok does (tested against it)."""
    pieces, trainer, norm = bpe_pieces_and_specs(tok)
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
    merges = bpe_merges(pieces)
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


# -----------------------------------------------------------------------------
# GGUF, for llama.cpp and Ollama

# llama.cpp has no normalizer to turn the '<' + ESCAPE of CHAT_TEMPLATE back into '<', so the GGUF's template
# writes messages as they are; its chat markers are control tokens, which llama.cpp reads from text only where
# a chat template put them (parse_special), so '<|end|>' typed into a plain prompt stays text as in Lumi.
GGUF_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                      "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def export_gguf(ckpt_path, out_path, dtype='float32'):
    """One GGUF file (formats.write_gguf) of a checkpoint, LoRA merged first; returns its path (out_path, or
    OUT/model.gguf when out_path is a directory or does not end in .gguf). llama.cpp's SentencePiece tokenizer
    escapes spaces and adds the dummy prefix (after every control token, as render_chat's per-message encoding
    does) but normalises nothing else: data.py's tokenizers (identity rule, whitespace kept) need nothing
    else, and one trained with NFKC or whitespace folding differs from Lumi where those change the text."""
    if dtype not in GGUF_DTYPES:  # both before the model is loaded
        raise lumi.LumiError(f"--dtype for --format=gguf must be one of {', '.join(GGUF_DTYPES)}, "
                             f"got {dtype!r}")
    import_gguf()
    model, tok, ckpt = load_model(ckpt_path, adapters=False)
    if tok.vocab_size != model.cfg.vocab_size:  # llama.cpp sizes the embedding by the tokenizer
        raise ValueError(f"{ckpt['path']}: tokenizer has {tok.vocab_size} pieces but the model "
                         f"{model.cfg.vocab_size} rows")
    pieces, _, norm = bpe_pieces_and_specs(tok, 'GGUF')
    types = [PIECE_CONTROL if p in CHAT_TOKENS else t for p, _, t in pieces]
    vocab = dict(pieces=[(p, s, t) for (p, s, _), t in zip(pieces, types)], merges=bpe_merges(pieces),
                 add_space_prefix=bool(norm.get(3, 1)), remove_extra_whitespaces=bool(norm.get(4, 1)),
                 end_id=tok.end_id)
    if os.path.isdir(out_path) or not out_path.endswith('.gguf'):
        out_path = os.path.join(out_path, 'model.gguf')
    name = f"lumi-{ckpt.get('kind', 'model')}"
    return write_gguf(out_path, model.cfg, gguf_state_dict(model), vocab, GGUF_CHAT_TEMPLATE, dtype, name)


# -----------------------------------------------------------------------------
# PEFT adapters, for peft and vLLM

def export_peft(path, out_dir):
    """A LoRA adapter as PEFT's adapter_config.json and adapter_model.safetensors (lora.peft_adapter), for the
    --format=hf export of its base; returns out_dir. path: an adapter file, a checkpoint that carries adapters
    (an SFT or DPO step checkpoint), or a run directory (its adapter.pt). The safetensors metadata names the
    base and its SHA256, which sft.py's --init_adapter checks."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'adapter.pt')):
        path = os.path.join(path, 'adapter.pt')
    ckpt = load_checkpoint(checkpoint_of(path))
    where = ckpt['path']
    if is_adapter(ckpt):
        if not ckpt.get('base_path'):
            raise lumi.LumiError(f"adapter {where} does not name its base")
        base = load_checkpoint(ckpt['base_path'])
        check_adapter(ckpt, where, base['path'], tokenizer_from_checkpoint(base))
        lora, state, model_args = ckpt['lora'], ckpt['lora_state'], base['model_args']
        base_path, base_sha, tok_sha = base['path'], ckpt['base_sha256'], ckpt['tokenizer_sha256']
    elif ckpt.get('lora') and isinstance(ckpt.get('model'), dict):
        lora, model_args = ckpt['lora'], ckpt['model_args']
        state = {k: v for k, v in ckpt['model'].items() if '.lora_' in k}
        base_path, base_sha = ckpt.get('parent', ''), ckpt.get('parent_sha256')
        tok_sha = ckpt['tokenizer_sha256']
    else:
        raise lumi.LumiError(f"{where} has no LoRA adapters (kind {ckpt.get('kind', '?')!r}): --format=peft "
                             f"exports the adapter.pt of an SFT or DPO run")
    config, tensors = peft_adapter(lora, state, model_args.get('tie_embeddings', True))
    meta = {'format': 'pt', 'lumi_base_path': base_path, 'lumi_tokenizer_sha256': tok_sha}
    if base_sha:
        meta['lumi_base_sha256'] = base_sha
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(tensors, os.path.join(out_dir, 'adapter_model.safetensors'), metadata=meta)
    lumi.write_json(os.path.join(out_dir, 'adapter_config.json'), config)
    return out_dir


FORMATS = ('hf', 'pt', 'gguf', 'peft')
USAGE = ("usage: python lumi.py export CKPT OUT [--format=hf|pt|gguf|peft] "
         "[--dtype=float32|bfloat16|float16|q8_0]")


def main(argv):
    """`lumi.py export CKPT OUT [--format=hf|pt|gguf|peft] [--dtype=...]`."""
    pos, flags = lumi.split_args(argv, KEYS)
    if len(pos) != 2:
        raise lumi.LumiError(USAGE)
    cfg = lumi.load_config(KEYS, flags, shares_with=())
    if cfg.format not in FORMATS:
        raise lumi.LumiError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    ckpt_path, out = pos
    if cfg.format == 'hf':
        export_hf(ckpt_path, out, cfg.dtype)
        arch = lumi.read_json(os.path.join(out, 'config.json'))['architectures'][0]
        lumi.log(f"wrote a Hugging Face {arch} directory to {out}: load it with "
                 f"transformers.AutoModelForCausalLM.from_pretrained({out!r})")
    elif cfg.format == 'pt':
        path = export_pt(ckpt_path, out)
        lumi.log(f"wrote a plain state dict to {path}")
    elif cfg.format == 'gguf':
        path = export_gguf(ckpt_path, out, cfg.dtype)
        lumi.log(f"wrote {path} ({cfg.dtype}): run it with llama.cpp (llama-cli -m {path} --jinja) or "
                 f"Ollama (README.md, 'Using Lumi with other tools')")
    else:
        export_peft(ckpt_path, out)
        lumi.log(f"wrote a PEFT adapter to {out}: load it with peft.PeftModel.from_pretrained(model, "
                 f"{out!r}) onto the --format=hf export of its base")
    return out


if __name__ == '__main__':
    lumi.cli(main, KEYS, USAGE)
