"""
model.py held against plain references: the KV-cache forward against the full forward (also for a
left-padded ragged batch), grouped-query attention against repeated key/value heads, RoPE against the
complex-rotation formula, parameter and FLOP counts against a hand count, and the loss against a manual
cross-entropy. LoRA is tested with sft.py (tests/test_sft.py).
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import GPT, KVCache, ModelConfig

PAD = 0  # the pad id; any id would do, since padded keys are masked


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def decode_step_by_step(model, idx, prefill, cache):
    """Logits of idx (B, T) from a prefill of its first `prefill` tokens, then one token at a time."""
    outs = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, idx.size(1)):
        outs.append(model(idx[:, t:t + 1], cache=cache)[0])
    return torch.cat(outs, dim=1)


# -----------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_logits_equal_full_forward(tiny_config, n_kv_head):
    cfg = replace(tiny_config, n_kv_head=n_kv_head)
    model = make(cfg)
    torch.manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(cfg, 3, cfg.block_size, 'cpu')
        inc = decode_step_by_step(model, idx, 17, cache)
    assert cache.pos == 40
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-5)


def test_kv_cache_left_padded_ragged_batch(tiny_config):
    """Rows of different prompt lengths share one cache; each row's logits equal its own unpadded run."""
    model = make(tiny_config)
    torch.manual_seed(2)
    lengths, new = [23, 9, 16], 6
    rows = [torch.randint(4, tiny_config.vocab_size, (n + new,)) for n in lengths]
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    prompt = torch.stack([F.pad(r[:n], (width - n, 0), value=PAD) for r, n in zip(rows, lengths)])
    continuation = torch.stack([r[n:] for r, n in zip(rows, lengths)])
    with torch.no_grad():
        cache = KVCache(tiny_config, 3, width + new, 'cpu', pad=pad)
        inc = decode_step_by_step(model, torch.cat([prompt, continuation], 1), width, cache)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            ref, _ = model(r[None])
            torch.testing.assert_close(inc[i, width - n:], ref[0], rtol=0, atol=1e-5)


def test_kv_cache_reorder_drops_finished_rows(tiny_config):
    model = make(tiny_config)
    torch.manual_seed(3)
    idx = torch.randint(0, tiny_config.vocab_size, (3, 12))
    with torch.no_grad():
        cache = KVCache(tiny_config, 3, 32, 'cpu')
        model(idx[:, :10], cache=cache)
        cache.reorder(torch.tensor([0, 2]))
        step, _ = model(idx[[0, 2], 10:11], cache=cache)
        full, _ = model(idx[[0, 2], :11])
    torch.testing.assert_close(step[:, 0], full[:, 10], rtol=0, atol=1e-5)


def test_cache_shape_follows_kv_heads(tiny_config):
    cache = KVCache(tiny_config, 5, 20, 'cpu')
    c = tiny_config
    assert cache.k.shape == (c.n_layer, 5, c.n_kv_head, 20, c.head_dim)


def test_sequence_longer_than_block_size_is_refused(tiny_config):
    model = make(tiny_config)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))
    cache = KVCache(tiny_config, 1, 2 * tiny_config.block_size, 'cpu')
    model(torch.zeros(1, tiny_config.block_size, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# -----------------------------------------------------------------------------
# attention: grouped-query heads and the dispatch point

def reference_attention(q, k, v):
    """Causal softmax attention written out, with each key/value head repeated for its query group."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    T, S = q.size(2), k.size(2)
    scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float('-inf'))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_dispatch_matches_reference(n_kv_head):
    torch.manual_seed(4)
    q = torch.randn(2, 4, 13, 16)
    k, v = torch.randn(2, n_kv_head, 13, 16), torch.randn(2, n_kv_head, 13, 16)
    torch.testing.assert_close(M.attention(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_gqa_projection_shapes(tiny_config):
    cfg = replace(tiny_config, n_head=8, n_kv_head=2)
    attn = GPT(cfg).layers[0].attn
    hd = cfg.n_embd // 8
    assert attn.q_proj.weight.shape == (8 * hd, cfg.n_embd)
    assert attn.k_proj.weight.shape == (2 * hd, cfg.n_embd)
    assert attn.v_proj.weight.shape == (2 * hd, cfg.n_embd)
    assert attn.o_proj.weight.shape == (cfg.n_embd, 8 * hd)


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(vocab_size=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(vocab_size=64, n_embd=100, n_head=3)


# -----------------------------------------------------------------------------
# RoPE

def test_rope_matches_complex_rotation(tiny_config):
    """Rotate-half layout: dims (i, i + D/2) form a complex number turned by pos * theta^(-2i/D)."""
    cfg = tiny_config
    cos, sin = M.rope_cache(cfg)
    torch.manual_seed(5)
    x = torch.randn(1, 1, cfg.block_size, cfg.head_dim)
    out = M.apply_rope(x, cos, sin)
    half = cfg.head_dim // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angle = (torch.arange(cfg.block_size).double()[:, None]
             * cfg.rope_theta ** (-torch.arange(half).double() / half))
    ref = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(out, torch.cat([ref.real, ref.imag], -1).float(), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position(tiny_config):
    cos, sin = M.rope_cache(tiny_config)
    torch.manual_seed(6)
    q, k = torch.randn(tiny_config.head_dim), torch.randn(tiny_config.head_dim)

    def score(m, n):
        rq = M.apply_rope(q[None, None, None], cos[m], sin[m])
        rk = M.apply_rope(k[None, None, None], cos[n], sin[n])
        return (rq * rk).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)


def test_positions_restart_after_left_padding(tiny_config):
    """A padded row's first real token sits at position 0: the same logits as the row alone."""
    model = make(tiny_config)
    torch.manual_seed(7)
    row = torch.randint(4, tiny_config.vocab_size, (1, 10))
    padded = F.pad(row, (5, 0), value=PAD)
    with torch.no_grad():
        cache = KVCache(tiny_config, 1, 15, 'cpu', pad=torch.tensor([5]))
        out, _ = model(padded, cache=cache)
        ref, _ = model(row)
    torch.testing.assert_close(out[:, 5:], ref, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# parameters, FLOPs, init, loss

def hand_count(c, tied):
    hd = c.n_embd // c.n_head
    attn = c.n_embd * (c.n_head * hd) * 2 + c.n_embd * (c.n_kv_head * hd) * 2  # q, o; k, v
    mlp = 3 * c.n_embd * c.ffn_hidden
    per_layer = attn + mlp + 2 * c.n_embd  # two RMSNorm weights
    body = c.n_layer * per_layer + c.n_embd  # final norm
    emb = c.vocab_size * c.n_embd
    return body + emb * (1 if tied else 2), body


@pytest.mark.parametrize("tied", [True, False])
def test_param_counts_match_hand_count(tiny_config, tied):
    cfg = replace(tiny_config, tie_embeddings=tied)
    model = GPT(cfg)
    total, body = hand_count(cfg, tied)
    assert model.num_params() == total
    assert model.num_params(embeddings=False) == body
    assert (model.lm_head.weight is model.tok_emb.weight) == tied


def test_seed_design_tiny_model_size():
    """configs/tiny.py's model: 6 layers, d 256, vocab 32768, tied: 14.68M parameters."""
    model = GPT(ModelConfig(vocab_size=32768))
    assert model.num_params() == hand_count(model.cfg, True)[0] == 14_683_392


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token(tiny_config, tied):
    """6 FLOPs per weight and token (forward + backward; the head's matmul counts, the embedding lookup
    does not, tied or not) plus attention's scores and values, 12 * n_layer * n_embd * block_size."""
    cfg = replace(tiny_config, tie_embeddings=tied)
    model = GPT(cfg)
    _, body = hand_count(cfg, tied)
    expected = 6 * (body + cfg.vocab_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert model.flops_per_token() == expected


def test_no_biases_and_scaled_residual_init():
    cfg = ModelConfig(vocab_size=512, n_layer=8, n_embd=256, n_head=4, n_kv_head=4, ffn_hidden=1024)
    model = make(cfg)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    layer = model.layers[0]
    assert layer.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert layer.attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)


def test_loss_ignores_minus_one_and_masked_targets(tiny_config):
    model = make(tiny_config)
    torch.manual_seed(8)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 12))
    targets = torch.randint(0, tiny_config.vocab_size, (2, 12))
    targets[0, :4] = -1
    loss_mask = torch.ones(2, 12, dtype=torch.long)
    loss_mask[1, 6:] = 0
    with torch.no_grad():
        logits, loss = model(idx, targets, loss_mask=loss_mask)
    logp = logits.log_softmax(-1)
    keep = [(b, t) for b in range(2) for t in range(12) if targets[b, t] >= 0 and loss_mask[b, t]]
    ref = -sum(logp[b, t, targets[b, t]] for b, t in keep) / len(keep)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_dropout_only_in_training(tiny_config):
    cfg = replace(tiny_config, dropout=0.5)
    model = make(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = model(idx)[0], model(idx)[0]
        model.train()
        c = model(idx)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


# -----------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize('dropout, dtype', [(0.0, 'float32'), (0.1, 'float32'), (0.1, 'bfloat16')])
def test_activation_checkpointing_gives_bit_identical_losses_and_gradients(tiny_config, dropout, dtype):
    """The blocks recomputed in the backward pass (their dropout masks redrawn from the same RNG state, under
    the same autocast) give the very floats of the run that kept every activation."""
    import lumi
    cfg = replace(tiny_config, dropout=dropout)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for recompute in (False, True):
        model = make(cfg).train()
        model.activation_checkpointing = recompute
        torch.manual_seed(7)  # the dropout masks
        with lumi.autocast('cpu', dtype):
            loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_activation_checkpointing_keeps_only_block_inputs_for_the_backward(tiny_config):
    """What autograd saves for the backward pass: with checkpointing, the blocks' activations are not kept
    (only the inputs of each block and what lies outside the blocks: embedding, final norm, head, loss)."""
    saved = {}
    for recompute in (False, True):
        model = make(tiny_config).train()
        model.activation_checkpointing = recompute
        idx = torch.randint(0, tiny_config.vocab_size, (2, 48))
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx[:, :-1], idx[:, 1:])[1].backward()
        saved[recompute] = sum(sizes)
    assert saved[True] < 0.6 * saved[False], saved
    with torch.no_grad():  # no gradients, nothing to recompute: the plain path
        model.eval()
        torch.testing.assert_close(model(idx)[0], make(tiny_config)(idx)[0])


# -----------------------------------------------------------------------------
# architecture options (issue 25), each off by default

def test_qk_norm_normalises_each_heads_queries_and_keys_before_rope_and_decodes_with_the_cache(tiny_config):
    cfg = replace(tiny_config, qk_norm=True)
    model = make(cfg)
    attn = model.layers[0].attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.head_dim,)
    seen = []
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.append(o) and None)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        x = model.layers[0].attn_norm(model.tok_emb(idx))  # the first block's queries, by hand
        q = attn.q_proj(x).view(2, 12, cfg.n_head, cfg.head_dim).transpose(1, 2)
        torch.testing.assert_close(seen[0], F.rms_norm(q, (cfg.head_dim,), eps=cfg.norm_eps))
        inc = decode_step_by_step(model, idx, 5, KVCache(cfg, 2, cfg.block_size, 'cpu'))
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-5)


def test_zero_init_proj_starts_every_block_as_the_identity(tiny_config):
    cfg = replace(tiny_config, zero_init_proj=True)
    model = make(cfg)
    for layer in model.layers:
        assert not layer.attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    # the other weights are drawn as without the option: the same random stream
    assert torch.equal(model.layers[1].attn.q_proj.weight, make(tiny_config).layers[1].attn.q_proj.weight)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model.lm_head(model.norm(model.tok_emb(idx))))


def test_embed_norm_normalises_the_stream_before_the_first_block_and_an_untied_head_can_start_at_zero(
        tiny_config):
    model = make(replace(tiny_config, embed_norm=True, zero_init_proj=True, tie_embeddings=False))
    assert not model.lm_head.weight.any()  # uniform predictions at step 0
    with torch.no_grad():
        model.emb_norm.weight.uniform_(0.5, 1.5)
        model.tok_emb.weight.mul_(50)  # a grown embedding: the stream starts at the norm's scale all the same
        idx = torch.randint(0, tiny_config.vocab_size, (2, 9))
        x = F.rms_norm(model.tok_emb(idx), (tiny_config.n_embd,), model.emb_norm.weight, tiny_config.norm_eps)
        torch.testing.assert_close(model(idx, return_hidden=True), model.norm(x))  # the blocks are identities
