"""formats.py: the hand-written safetensors writer and reader (a file built byte by byte, the layout, round
trips, corrupt files refused), and the GGUF side's own pieces: llama.cpp's RoPE layout, and the one-line
errors of an unknown dtype and a missing gguf package. The GGUF files themselves are tested through
export.py, against transformers' GGUF loader (tests/test_export.py)."""
import json
import struct
import sys

import pytest
import torch

import formats
import lumi
from model import apply_rope, rope_cache, ModelConfig


# -----------------------------------------------------------------------------
# safetensors by hand

def test_reader_reads_a_file_built_byte_by_byte(tmp_path):
    header = {'b': {'dtype': 'I64', 'shape': [2], 'data_offsets': [0, 16]},
              'a': {'dtype': 'F32', 'shape': [1, 3], 'data_offsets': [16, 28]},
              '__metadata__': {'format': 'pt'}}
    blob = json.dumps(header).encode()
    data = struct.pack('<2q', 7, -3) + struct.pack('<3f', 1.5, -2.0, 0.25)
    (tmp_path / 'x.safetensors').write_bytes(struct.pack('<Q', len(blob)) + blob + data)
    tensors, meta = formats.load_safetensors(str(tmp_path / 'x.safetensors'))
    assert meta == {'format': 'pt'}
    assert tensors['b'].dtype == torch.int64 and tensors['b'].tolist() == [7, -3]
    assert tensors['a'].dtype == torch.float32 and tensors['a'].tolist() == [[1.5, -2.0, 0.25]]


def test_writer_layout_and_round_trip(tmp_path):
    tensors = {'w': torch.randn(3, 5), 'h': torch.randn(7).to(torch.bfloat16), 'i': torch.arange(5),
               'flag': torch.tensor([True, False, True]), 'empty': torch.zeros(0, 4), 's': torch.tensor(2.5)}
    path = str(tmp_path / 'm.safetensors')
    formats.save_safetensors(tensors, path, metadata={'format': 'pt'})
    raw = open(path, 'rb').read()
    n = struct.unpack('<Q', raw[:8])[0]
    assert n % 8 == 0  # the buffer starts 8-aligned
    header = json.loads(raw[8:8 + n])
    assert header.pop('__metadata__') == {'format': 'pt'}
    spans = sorted((h['data_offsets'], name) for name, h in header.items())
    pos = 0
    for (begin, end), name in spans:  # contiguous, each tensor aligned to its element size
        assert begin == pos and begin % tensors[name].element_size() == 0
        pos = end
    assert pos == len(raw) - 8 - n
    b, e = header['w']['data_offsets']
    assert raw[8 + n + b:8 + n + e] == struct.pack('<15f', *tensors['w'].flatten().tolist())
    back, meta = formats.load_safetensors(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


@pytest.mark.parametrize('corrupt, message', [
    (lambda raw, n: raw[:len(raw) - 4], 'offsets'),                         # truncated data
    (lambda raw, n: struct.pack('<Q', 1 << 40) + raw[8:], 'header length'),  # absurd header length
    (lambda raw, n: raw[:8] + b'[' + raw[9:], 'JSON'),                       # broken header
    (lambda raw, n: raw + b'\0' * 8, 'after the last tensor'),               # trailing bytes
])
def test_reader_refuses_corrupt_files(tmp_path, corrupt, message):
    path = str(tmp_path / 'm.safetensors')
    formats.save_safetensors({'a': torch.ones(4), 'b': torch.zeros(2, 2)}, path)
    raw = open(path, 'rb').read()
    (tmp_path / 'bad.safetensors').write_bytes(corrupt(raw, struct.unpack('<Q', raw[:8])[0]))
    with pytest.raises(ValueError, match=message):
        formats.load_safetensors(str(tmp_path / 'bad.safetensors'))


def test_reader_refuses_overlapping_tensors(tmp_path):
    header = {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
              'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}}
    blob = json.dumps(header).encode()
    (tmp_path / 'o.safetensors').write_bytes(struct.pack('<Q', len(blob)) + blob + bytes(12))
    with pytest.raises(ValueError, match='hole or overlap'):
        formats.load_safetensors(str(tmp_path / 'o.safetensors'))


# -----------------------------------------------------------------------------
# GGUF

def rope_adjacent_pairs(x, cos, sin):
    """llama.cpp's RoPE (GGML_ROPE_TYPE_NORM, the llama architecture's): dimensions 2i and 2i + 1 of a head
    turn together, by the frequency of i."""
    half = x.size(-1) // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


@pytest.mark.parametrize('n_head, n_kv_head', [(4, 4), (4, 2)])
def test_rope_interleave_turns_lumis_rope_into_llama_cpps(n_head, n_kv_head):
    cfg = ModelConfig(vocab_size=8, n_head=n_head, n_kv_head=n_kv_head, n_embd=64, block_size=16)
    cos, sin = rope_cache(cfg)
    x = torch.randn(5, cfg.n_embd)
    for heads in (n_head, n_kv_head):  # q has n_head heads, k n_kv_head
        w = torch.randn(heads * cfg.head_dim, cfg.n_embd)
        lumi_q = apply_rope((x @ w.T).view(5, heads, -1).transpose(0, 1)[None], cos[:5], sin[:5])
        cpp_q = rope_adjacent_pairs((x @ formats.rope_interleave(w, heads).T).view(5, heads, -1)
                                    .transpose(0, 1)[None], cos[:5], sin[:5])
        # the same rotation, each head's dimensions listed in llama.cpp's order: attention scores are equal
        assert torch.allclose(formats.rope_interleave(lumi_q[0].transpose(0, 1).reshape(5, -1).T, heads).T,
                              cpp_q[0].transpose(0, 1).reshape(5, -1), atol=1e-5)


def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, ffn_hidden=16, block_size=4)
    with pytest.raises(lumi.LumiError, match=r"^--dtype for --format=gguf must be one of float32, float16, "
                                             r"bfloat16, q8_0, got 'q4_0'$"):
        formats.write_gguf(str(tmp_path / 'm.gguf'), cfg, {}, {}, '', dtype='q4_0')
    monkeypatch.setitem(sys.modules, 'gguf', None)  # import fails: not installed
    with pytest.raises(lumi.LumiError, match=r"^--format=gguf needs the gguf package: pip install gguf$"):
        formats.write_gguf(str(tmp_path / 'm.gguf'), cfg, {}, {}, '')
    assert not (tmp_path / 'm.gguf').exists()
