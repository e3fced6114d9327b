import os
import sys

# Kernels run under Triton's interpreter on machines without a GPU; this must be set before any
# @triton.jit function is defined, so it lives here, ahead of every test module's imports.
try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests import the stages as modules from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one torch thread: the tiny test models' ops are too small to split, and on a busy 2-core machine a second
# thread only waits on the first whenever it is descheduled (tests ran 3x slower with two)
torch.set_num_threads(1)

import pytest

import checkpoint  # noqa: E402  (after the path above)
from tokenizer import CHAT_TOKENS, Tokenizer


def pytest_configure(config):
    # `pytest -m "not slow"` runs the suite without the whole-pipeline, torchrun and every-entry-point
    # subprocess tests, in about a minute on 2 cores
    config.addinivalue_line("markers",
                            "slow: runs stages as subprocesses (pipeline, torchrun, every entry point)")

TINY_TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
In the beginning God created the heaven and the earth. And the earth was without form, and void.
Hello, how are you today? I am fine, thank you. What are you doing this weekend?
To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer.
"""


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small real SentencePiece model with Lumi's reserved ids (pad 0, unk 1, bos 2, eos 3, chat 4-7)."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(TINY_TEXT * 20)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(CHAT_TOKENS), minloglevel=2)
    return Tokenizer.load(str(d / "tokenizer.model"))


@pytest.fixture(scope="session")
def tiny_config():
    from model import ModelConfig
    return ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128,
                       block_size=64)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer, tiny_config):
    """A randomly initialised tiny model saved as a pretrain checkpoint (path to the .pt file)."""
    import torch
    from model import GPT
    torch.manual_seed(0)
    model = GPT(tiny_config)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_0000000.pt"
    checkpoint.save_checkpoint(str(path), dict(checkpoint.checkpoint_meta(model, tokenizer, 'pretrain'),
                                         model=model.state_dict(), step=0, tokens_seen=0, config={}))
    return str(path)


@pytest.fixture(scope="session")
def lively_checkpoint(tmp_path_factory, tiny_checkpoint, tokenizer):
    """tiny_checkpoint with weights ~100x the init scale (path to the .pt file). A freshly initialised model's
    residual stream is mostly the current token's embedding, so greedy decoding repeats one token whatever
    came before; with these weights every token depends on the whole context, so a
    wrong cache or mask shows."""
    import math
    import torch
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tiny_checkpoint))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 / math.sqrt(p.size(1)))
    path = tmp_path_factory.mktemp("lively") / "ckpt_0000000.pt"
    checkpoint.save_checkpoint(str(path), dict(checkpoint.checkpoint_meta(model, tokenizer, 'pretrain'),
                                         model=model.state_dict(), step=0, tokens_seen=0, config={}))
    return str(path)


@pytest.fixture(scope='module')
def loaded(lively_checkpoint):
    return checkpoint.load_model(lively_checkpoint)
