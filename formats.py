"""
Other tools' file formats: safetensors, written and read by hand (the Hugging Face and PEFT exports, and PEFT
adapters read back), and GGUF, the one file that llama.cpp and Ollama run, written through the `gguf` package
(imported only when a GGUF is written).

The safetensors format is simple enough to write by hand, so Lumi does not take a dependency for it:
8 bytes (little-endian u64) giving the length N of a JSON header, N bytes of that header, then the raw
tensor bytes. The header maps each name to {dtype, shape, data_offsets: [begin, end)} relative to the start
of the byte buffer, plus an optional "__metadata__" dict of strings. The buffer must be covered exactly,
without holes or overlaps. A reader sits beside the writer so that an export can be checked bit for bit.

A GGUF file is typed key-value metadata (an architecture's hyperparameters under its name, the tokenizer's
pieces, scores and types, the chat template) and named tensors, each F32, F16, BF16 or a block quantisation:
Q8_0 stores blocks of 32 weights as one fp16 scale and 32 int8s, 8.5 bits a weight. Lumi's model is what
llama.cpp calls `llama` (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases), with one difference of
layout: llama.cpp rotates adjacent pairs of a head's dimensions, Lumi the two halves (rope_interleave).

Deliberately left out: reading GGUF (llama.cpp and transformers do; the tests read it with transformers),
quantisations other than Q8_0 (llama.cpp's llama-quantize makes them from a float16 GGUF), and sharding
either format into several files (Lumi's models are small).
"""
import json
import os
import sys

import numpy as np
import torch

from lumi import LumiError, atomic_write
from model import exported_embedding
from tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# safetensors dtype names; the bytes are always little-endian
SAFETENSORS_DTYPES = {
    torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16',
    torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
    torch.bool: 'BOOL',
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
HEADER_LIMIT = 100 * 1024 * 1024  # a header larger than this is a corrupt or hostile file, not a model

if sys.byteorder != 'little':  # the raw bytes below are written and read as the machine holds them
    raise RuntimeError("formats.py writes safetensors from native memory and needs a little-endian machine")


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
    atomic_write(path, write)
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
# GGUF, through the gguf package

GGUF_DTYPES = ('float32', 'float16', 'bfloat16', 'q8_0')  # what the matrices are stored as; norms stay F32
Q8_BLOCK = 32  # weights per Q8_0 block: a row whose length is no multiple of it is stored as F16, as
               # llama.cpp's own converter does
# Lumi's names -> llama.cpp's, per block and for the rest
GGUF_BLOCK_NAMES = {'attn_norm.weight': 'attn_norm', 'attn.q_proj.weight': 'attn_q',
                    'attn.k_proj.weight': 'attn_k', 'attn.v_proj.weight': 'attn_v',
                    'attn.o_proj.weight': 'attn_output', 'mlp_norm.weight': 'ffn_norm',
                    'mlp.gate_proj.weight': 'ffn_gate', 'mlp.up_proj.weight': 'ffn_up',
                    'mlp.down_proj.weight': 'ffn_down'}
GGUF_NAMES = {'tok_emb.weight': 'token_embd', 'norm.weight': 'output_norm', 'lm_head.weight': 'output'}
QK_NORM_NAMES = {'attn.q_norm.weight': 'attn_q_norm', 'attn.k_norm.weight': 'attn_k_norm'}  # qwen3's


def gguf_architecture(cfg):
    """llama.cpp's architecture for a model shape: qwen3 (llama with QK-norm, and rotate-half RoPE as Lumi's)
    when cfg.qk_norm, else llama."""
    return 'qwen3' if cfg.qk_norm else 'llama'


def import_gguf():
    """The gguf package, or a one-line error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise LumiError("--format=gguf needs the gguf package: pip install gguf") from None
    return gguf


def rope_interleave(w, n_heads):
    """q or k projection rows reordered from rotate-half RoPE (Lumi's and transformers': dimension i of a head
    turns with i + head_dim/2) to llama.cpp's (2i with 2i + 1), as llama.cpp's convert_hf_to_gguf.py does."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(model):
    """A plain model's weights under llama.cpp's names, float32, q and k in its RoPE layout (llama's; qwen3
    rotates halves as Lumi does). A tied head is the embedding: llama.cpp and transformers both use
    token_embd for it when `output` is absent. An embedding norm (embed_norm) is folded into the embedding's
    rows, as the Hugging Face export does, and the head is then a tensor of its own."""
    c, sd = model.cfg, dict(model.state_dict())
    if c.embed_norm:
        sd['lm_head.weight'] = model.lm_head.weight
        sd['tok_emb.weight'] = exported_embedding(model)
        del sd['emb_norm.weight']
    block_names = {**GGUF_BLOCK_NAMES, **(QK_NORM_NAMES if c.qk_norm else {})}
    llama = gguf_architecture(c) == 'llama'
    out = {}
    for name, t in sd.items():
        if name == 'lm_head.weight' and c.tie_embeddings and not c.embed_norm:
            continue
        if name in GGUF_NAMES:
            out[GGUF_NAMES[name] + '.weight'] = t
            continue
        parts = name.split('.', 2)
        if parts[0] != 'layers' or parts[2] not in block_names:  # unmerged adapters, a new layer type
            raise ValueError(f"no GGUF name for {name}")
        if llama:
            t = (rope_interleave(t, c.n_head) if parts[2] == 'attn.q_proj.weight' else
                 rope_interleave(t, c.n_kv_head) if parts[2] == 'attn.k_proj.weight' else t)
        out[f'blk.{parts[1]}.{block_names[parts[2]]}.weight'] = t
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _gguf_tensor(gguf, t, dtype):
    """(data, raw type) for GGUFWriter.add_tensor: norms and other vectors F32, matrices as dtype asks."""
    a = t.cpu().numpy()
    if a.ndim < 2 or dtype == 'float32':
        return a, None
    Q = gguf.GGMLQuantizationType
    if dtype == 'q8_0' and a.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    if dtype == 'bfloat16':
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    return a.astype(np.float16), None


def write_gguf(path, cfg, tensors, vocab, chat_template, dtype='float32', name='lumi'):
    """Write a llama- or qwen3-architecture GGUF (gguf_architecture; atomically): the model shape cfg
    (model.ModelConfig), tensors from gguf_state_dict, and the tokenizer as vocab, a dict of pieces, scores
    and types (SentencePiece's, in id order), merges (pairs of pieces, best first: llama.cpp merges by score,
    transformers' GGUF loader reads them), add_space_prefix, remove_extra_whitespaces and end_id (the chat
    turn's end, where a chat reply stops). Returns path."""
    if dtype not in GGUF_DTYPES:
        raise LumiError(f"--dtype for --format=gguf must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    gguf = import_gguf()
    file_type = {'float32': gguf.LlamaFileType.ALL_F32, 'float16': gguf.LlamaFileType.MOSTLY_F16,
                 'bfloat16': gguf.LlamaFileType.MOSTLY_BF16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w = gguf.GGUFWriter(None, gguf_architecture(cfg))
    w.add_name(name)
    w.add_file_type(int(file_type))
    if dtype == 'q8_0':
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    # the tokenizer: SentencePiece ('llama' in llama.cpp's words), byte fallback through the <0xNN> pieces
    w.add_tokenizer_model('llama')
    w.add_tokenizer_pre('default')
    w.add_token_list([p for p, _, _ in vocab['pieces']])
    w.add_token_scores([s for _, s, _ in vocab['pieces']])
    w.add_token_types([t for _, _, t in vocab['pieces']])
    w.add_token_merges([f"{a} {b}" for a, b in vocab['merges']])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_eot_token_id(vocab['end_id'])
    w.add_add_bos_token(True)  # every Lumi document and chat starts with BOS
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab['add_space_prefix'])
    w.add_remove_extra_whitespaces(vocab['remove_extra_whitespaces'])
    w.add_chat_template(chat_template)
    for tname, t in tensors.items():
        data, raw = _gguf_tensor(gguf, t, dtype)
        w.add_tensor(tname, data, raw_dtype=raw)

    def write(f):  # GGUFWriter opens the file by name: atomic_write's temporary one, synced and renamed after
        w.write_header_to_file(path=f.name)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    atomic_write(path, write)
    return path
