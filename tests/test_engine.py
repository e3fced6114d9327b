"""engine.py against references: the sampling filters on hand-made logits, KV-cache generation against
recomputing the whole context (greedy and seeded sampling, a ragged batch, rows ending early, the context
shift), streamed text against plain decoding, stop strings, history trimming, and target scoring."""
from dataclasses import dataclass, replace

import pytest
import torch

import checkpoint
import engine
from lora import apply_lora
from model import GPT, KVCache, ModelConfig, decode_step, decode_weights
from tokenizer import BOS_ID, render_chat

NEG = float('-inf')


def greedy(n, **kw):
    return engine.Sampling(max_new_tokens=n, temperature=0.0, top_p=1.0, **kw)


# -----------------------------------------------------------------------------
# the references the engine is held against

@torch.no_grad()
def generate_ids_recompute(model, prompt, params, stop_ids=(), generator=None):
    """No cache: the whole context (its last block_size tokens) run again for every new token, as nanoGPT's
    sample.py does. One prompt; yields its tokens."""
    device, cfg = engine.model_device(model), model.cfg
    generator = generator if generator is not None else engine.make_generator(None, device)
    seq = list(prompt) or [BOS_ID]
    counts = torch.bincount(torch.tensor(seq[-cfg.block_size:]), minlength=cfg.vocab_size)[None].to(device)
    engine.unpenalized(counts, stop_ids)
    made = torch.zeros_like(counts)
    for _ in range(params.max_new_tokens):
        idx = torch.tensor([seq[-cfg.block_size:]], device=device)
        logits = model.lm_head(model(idx, return_hidden=True)[:, -1])
        token = int(engine.sample_next(logits, counts, made, params, generator))
        counts[0, token] += 1
        made[0, token] += 1
        yield token
        seq.append(token)
        if token in stop_ids:
            return


def complete(model, tok, prompts, params, chat=False, generator=None):
    """Generate without streaming, through engine.stream_text: one (text,
    finish_reason, tokens) per prompt."""
    out = [['', None, 0] for _ in prompts]
    for r, delta, finish, n in engine.stream_text(model, tok, prompts, params, chat, generator):
        out[r] = [out[r][0] + delta, finish, n]
    return [tuple(o) for o in out]


# -----------------------------------------------------------------------------
# sampling filters on hand-made logits


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0], [0.0, 0.0, 1.0, -1.0]])
    out = engine.apply_top_k(logits, 2)
    assert out.tolist() == [[NEG, 3.0, NEG, 5.0], [0.0, 0.0, 1.0, NEG]]  # a tie at the k-th value stays
    assert (torch.equal(engine.apply_top_k(logits, 0), logits)
            and torch.equal(engine.apply_top_k(logits, 4), logits))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.2, 0.25, 0.05]]).log()
    kept = lambda p: torch.isfinite(engine.apply_top_p(logits, p))[0].tolist()
    assert kept(0.7) == [True, False, True, False]   # 0.5 + 0.25 reaches 0.7
    assert kept(0.5) == [True, False, False, False]  # the top token alone reaches 0.5
    assert kept(0.76) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # never empty
    assert kept(1.0) == [True] * 4


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1, 3, 0, 0]])
    assert engine.apply_repetition_penalty(logits, counts, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert torch.equal(engine.apply_repetition_penalty(logits, counts, 1.0), logits)
    # greedy picks the unseen runner-up once the penalty pushes the seen favourite below it
    logits, counts = torch.tensor([[3.0, 2.5]]), torch.tensor([[1, 0]])
    pick = lambda rp: engine.sample_next(logits, counts, counts, greedy(1, repetition_penalty=rp))
    assert pick(1.0).item() == 0 and pick(1.5).item() == 1


def test_frequency_and_presence_penalties_subtract_per_use_and_once():
    logits, made = torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([[3, 1, 0]])
    assert engine.apply_frequency_penalty(logits, made, 0.5, 0.25).tolist() == [[0.25, 0.25, 0.5]]
    assert torch.equal(engine.apply_frequency_penalty(logits, made, 0.0, 0.0), logits)


def test_the_frequency_penalty_ends_a_run_that_ctrls_penalty_lets_through():
    # a favourite 2 nats ahead: CTRL's penalty (one division, however often it was used) never catches up,
    # the frequency penalty does after a few repeats
    logits = torch.tensor([[5.0, 3.0, 0.0]])

    def run(**kw):
        counts, made, out = torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32), []
        for _ in range(12):
            t = engine.sample_next(logits, counts, made, greedy(1, **kw))
            counts[0, t] += 1
            made[0, t] += 1
            out.append(t.item())
        return out
    assert run(repetition_penalty=1.3) == [0] * 12
    # by hand: 5 / 1.3 - 0.5 k against 3 / 1.3 - 0.5 j, k and j the times 0 and 1 were made so far
    assert run(repetition_penalty=1.3, frequency_penalty=0.5) == [0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0]


def test_temperature_and_sampling_distribution():
    logits = torch.tensor([[0.5, 0.2, 0.25, 0.05]]).log()
    torch.testing.assert_close(engine.apply_temperature(logits, 0.5).softmax(-1),
                               torch.tensor([[0.25, 0.04, 0.0625, 0.0025]]) / 0.355)
    g = torch.Generator().manual_seed(0)
    params = engine.Sampling(temperature=1.0, top_p=0.7)
    draws = torch.stack([engine.sample_next(logits, torch.zeros(1, 4), torch.zeros(1, 4), params, g)
                         for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 3000
    assert freq[1] == 0 and freq[3] == 0  # outside the nucleus: never drawn
    assert abs(freq[0] - 2 / 3) < 0.04 and abs(freq[2] - 1 / 3) < 0.04  # renormalised inside it
    top1 = engine.Sampling(temperature=1.5, top_k=1, top_p=1.0)
    assert all(engine.sample_next(logits, torch.zeros(1, 4), torch.zeros(1, 4), top1, g).item() == 0
               for _ in range(50))


# -----------------------------------------------------------------------------
# the engine against recomputing the context


def run_cached(model, prompts, params, stop_ids=(), seed=0):
    out = [[] for _ in prompts]
    for rows, tokens in engine.generate_ids(model, prompts, params, stop_ids,
                                            torch.Generator().manual_seed(seed)):
        for r, t in zip(rows, tokens):
            out[r].append(t)
    return out


def run_recompute(model, prompt, params, stop_ids=(), seed=0):
    return list(generate_ids_recompute(model, prompt, params, stop_ids, torch.Generator().manual_seed(seed)))


def prompts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[BOS_ID] + torch.randint(8, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def test_greedy_kv_cache_equals_recompute_on_a_ragged_batch(loaded):
    model, _, _ = loaded
    prompts = prompts_of([5, 17, 30], model.cfg.vocab_size)
    cached = run_cached(model, prompts, greedy(25))
    for row, prompt in zip(cached, prompts):
        assert row == run_recompute(model, prompt, greedy(25))
    assert cached[0] != cached[1]  # rows really are different sequences


def test_sampled_kv_cache_equals_recompute_with_the_same_seed(loaded):
    model, _, _ = loaded
    prompt = prompts_of([9], model.cfg.vocab_size)[0]
    params = engine.Sampling(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2)
    assert run_cached(model, [prompt], params, seed=3)[0] == run_recompute(model, prompt, params, seed=3)
    assert run_cached(model, [prompt], params, seed=3) != run_cached(model, [prompt], params, seed=4)


@pytest.mark.parametrize('which', ['lively', 'fresh'])
@pytest.mark.parametrize('penalty', [dict(repetition_penalty=3.0),
                                     dict(frequency_penalty=1.5, presence_penalty=0.5)])
def test_rows_that_stop_leave_the_batch_without_disturbing_the_rest(which, penalty, loaded, tiny_checkpoint):
    # a fresh model repeats its last token unless a penalty steers it, so there the penalty's counts decide
    # every token, and they must follow the rows that stay
    model = loaded[0] if which == 'lively' else checkpoint.load_model(tiny_checkpoint)[0]
    prompts = prompts_of([6, 20, 11, 14], model.cfg.vocab_size, seed=2)
    params = greedy(16, **penalty)
    free = run_cached(model, prompts, params)
    stop = {free[0][3], free[2][6]}  # two rows hit a stop token early
    cached = run_cached(model, prompts, params, stop_ids=stop)
    for row, prompt in zip(cached, prompts):
        assert row == run_recompute(model, prompt, params, stop_ids=stop)
    assert len(cached[0]) <= 4 and len(cached[2]) <= 7


def test_the_repetition_penalty_spares_stop_tokens(loaded, monkeypatch):
    # a chat prompt holds <|end|> after every turn: counting it would make ending each reply less likely
    model, _, _ = loaded
    prompt = prompts_of([12], model.cfg.vocab_size, seed=4)[0]
    stop, seen = prompt[5], []
    real = engine.sample_next
    monkeypatch.setattr(engine, 'sample_next',
                        lambda logits, counts, *a: seen.append(counts.clone()) or real(logits, counts, *a))
    for run in (lambda: run_cached(model, [prompt], greedy(3, repetition_penalty=2.0), stop_ids=(stop,)),
                lambda: run_recompute(model, prompt, greedy(3, repetition_penalty=2.0), stop_ids=(stop,))):
        seen.clear()
        run()
        # a stop token is not counted, the rest are
        assert int(seen[0][0, stop]) == 0 and int(seen[0][0, prompt[6]]) >= 1
    # so the stop token's logit is what the model says, penalty or not, while a counted token's is lowered
    logits = engine._last_logits(model, torch.tensor([prompt])).float()
    spared = engine.apply_repetition_penalty(logits, seen[0], 2.0)
    assert spared[0, stop] == logits[0, stop] and spared[0, prompt[6]] < logits[0, prompt[6]]


def test_the_frequency_penalty_counts_the_reply_alone(loaded, monkeypatch):
    # a long chat history must not weigh on common words: only what this reply made counts
    model, _, _ = loaded
    prompt = prompts_of([12], model.cfg.vocab_size, seed=4)[0]
    made_seen, real = [], engine.sample_next
    monkeypatch.setattr(engine, 'sample_next', lambda logits, counts, made, *a: made_seen.append(made.clone())
                        or real(logits, counts, made, *a))
    params = greedy(6, frequency_penalty=0.7, presence_penalty=0.2)
    for run in (lambda: run_cached(model, [prompt], params)[0], lambda: run_recompute(model, prompt, params)):
        made_seen.clear()
        tokens = run()
        for k, made in enumerate(made_seen):
            assert made[0].tolist() == torch.bincount(torch.tensor(tokens[:k], dtype=torch.long),
                                                      minlength=made.size(1)).tolist()


def test_generation_runs_past_the_window_by_sliding_it(loaded):
    model, _, _ = loaded
    block = model.cfg.block_size
    prompt = prompts_of([10], model.cfg.vocab_size)[0]
    tokens = run_cached(model, [prompt], greedy(2 * block))[0]
    assert len(tokens) == 2 * block
    fits = block - len(prompt) + 1  # tokens whose context still fits the window
    assert tokens[:fits] == run_recompute(model, prompt, greedy(fits))
    # once the window is full, generation goes on from its newest half, prefilled again, until it fills again
    half = (prompt + tokens[:fits])[-(block // 2):]
    assert tokens[fits:fits + block // 2 + 1] == run_recompute(model, half, greedy(block // 2 + 1))


def test_bfloat16_weights_decode_with_a_bfloat16_cache(lively_checkpoint, loaded):
    half, _, _ = checkpoint.load_model(lively_checkpoint, dtype='bfloat16')
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.rope_cos.dtype == torch.float32 and half.lm_head.weight is half.tok_emb.weight
    prompts = prompts_of([5, 17, 30], half.cfg.vocab_size)
    got = run_cached(half, prompts, greedy(12))
    want = run_cached(loaded[0], prompts, greedy(12))
    assert [len(r) for r in got] == [12] * 3
    assert sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) >= 30  # bf16 rounding flips a few
    with pytest.raises(ValueError, match='dtype'):
        checkpoint.load_model(lively_checkpoint, dtype='float64')  # float16 loads (T4s decode in it)


@pytest.mark.parametrize('n_kv_head', [4, 2])
@pytest.mark.parametrize('padded', [False, True])
@pytest.mark.parametrize('options', [{}, {'qk_norm': True, 'embed_norm': True, 'tie_embeddings': False}],
                         ids=['llama', 'qk_norm+embed_norm+untied'])
def test_decode_step_equals_forward_and_fills_the_cache_alike(tiny_config, n_kv_head, padded, options):
    # decode_step is forward() for one position on the stacked, transposed, norm-folded matrices: the same
    # numbers up to float32 rounding (relative to the largest)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    model = GPT(replace(tiny_config, n_kv_head=n_kv_head, **options)).eval().requires_grad_(False)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.size(-1) ** -0.5) if p.dim() == 2 else p.uniform_(0.5, 1.5)  # norms' too
    weights = decode_weights(model)
    assert weights is not None
    idx = torch.randint(8, tiny_config.vocab_size, (3, 20))
    pad = torch.tensor([0, 5, 2]) if padded else None
    caches = [KVCache(model.cfg, 3, 32, 'cpu', pad=pad) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(idx[:, :12], cache=cache)
        for t in range(12, 20):
            want = model.lm_head(model(idx[:, t:t + 1], cache=caches[0], return_hidden=True)[:, -1])
            got = decode_step(model, weights, idx[:, t], caches[1])
            close(got, want)
    assert caches[1].pos == caches[0].pos == 20
    close(caches[1].k, caches[0].k)
    close(caches[1].v, caches[0].v)
    full = KVCache(model.cfg, 3, 20, 'cpu')
    full.pos = 20
    with pytest.raises(ValueError, match='past the cache'):
        decode_step(model, weights, idx[:, 0], full)


def test_decode_weights_only_where_decode_step_applies(tiny_config, loaded):
    model = loaded[0]
    assert decode_weights(model) is decode_weights(model)  # a frozen model keeps them
    half = GPT(tiny_config).eval().requires_grad_(False)
    kept = decode_weights(half)
    half.to(torch.bfloat16)  # new parameters: built again, in the new dtype
    assert decode_weights(half) is not kept and decode_weights(half).head.dtype == torch.bfloat16
    trained = GPT(tiny_config)
    assert decode_weights(trained) is None  # training mode: forward() decodes
    trained.eval()
    assert decode_weights(trained) is not decode_weights(trained)  # not frozen: a fresh copy each time
    assert decode_weights(apply_lora(GPT(tiny_config), r=2).eval()) is None  # LoRA layers

    @dataclass
    class Grown(ModelConfig):  # a config key decode_step does not know yet
        value_embeddings: bool = False
    grown = GPT(tiny_config).eval()
    grown.cfg = Grown(**vars(tiny_config))
    assert decode_weights(grown) is not None  # at its default the architecture is the same
    grown.cfg.value_embeddings = True
    assert decode_weights(grown) is None


def test_the_forward_path_generates_what_decode_step_does(loaded, monkeypatch):
    model, _, _ = loaded
    prompts = prompts_of([5, 17, 30], model.cfg.vocab_size)
    params = greedy(40, repetition_penalty=1.3, frequency_penalty=0.2)
    fast = run_cached(model, prompts, params)
    monkeypatch.setattr(engine, 'decode_weights', lambda model: None)
    assert run_cached(model, prompts, params) == fast


# -----------------------------------------------------------------------------
# text


def test_streamed_deltas_rebuild_the_decoded_text(tokenizer):
    text = "The cat sat on the mat. héllo ✓ wörld! Thou art"
    ids = tokenizer.encode(text)
    assert any(tokenizer.id_to_piece(i).startswith('<0x') for i in ids)  # byte fallback: split characters
    s = engine.TextStream(tokenizer)
    deltas = [s.push(t) for t in ids] + [s.flush()]
    assert ''.join(deltas) == text and '\ufffd' not in ''.join(deltas)
    # a completion's first piece keeps its space when the prompt's last token is the context
    head = tokenizer.encode("Shall I")
    rest = tokenizer.encode("Shall I compare thee")[len(head):]
    s = engine.TextStream(tokenizer, context=head[-1:])
    assert ''.join(s.push(t) for t in rest) == " compare thee"


def test_stop_strings_are_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("The cat sat on the mat. To be, or not to be")
    s = engine.TextStream(tokenizer, stop=('mat', 'xyz'))
    out = ''.join(s.push(t) for t in ids) + s.flush()
    assert out == "The cat sat on the " and s.stopped
    s = engine.TextStream(tokenizer, stop=('not to',))
    sent = ''
    for t in ids:
        sent += s.push(t)
        assert 'not' not in sent  # a possible start of the stop string never goes out early
    assert sent + s.flush() == "The cat sat on the mat. To be, or "
    # a held-back tail that never completes comes out at the end
    s = engine.TextStream(tokenizer, stop=('zzz',))
    assert ''.join(s.push(t) for t in tokenizer.encode("buzz")) + s.flush() == "buzz"


def test_stream_text_finish_reasons_and_counts(loaded):
    model, tok, _ = loaded
    prompts = [[BOS_ID] + tok.encode("To be"), [BOS_ID] + tok.encode("The quick brown fox")]
    out = complete(model, tok, prompts, greedy(12, ignore_eos=True))
    assert [(f, n) for _, f, n in out] == [('length', 12), ('length', 12)]
    for (text, _, _), p in zip(out, prompts):  # the text is the decoded tokens, space included
        ids = run_cached(model, [p], greedy(12))[0]
        assert text == tok.decode(p[-1:] + ids)[len(tok.decode(p[-1:])):]
    stop = out[1][0][3:8]
    text, finish, n = complete(model, tok, prompts[1:], greedy(12, ignore_eos=True, stop=(stop,)))[0]
    assert finish == 'stop' and text == out[1][0][:out[1][0].index(stop)] and n < 12


def test_history_drops_oldest_exchanges_first_and_keeps_the_system(tokenizer):
    msgs = [{'role': 'system', 'content': 'Be brief.'}]
    for i in range(6):
        msgs += [{'role': 'user', 'content': f'question {i} about the fox'},
                 {'role': 'assistant', 'content': f'answer {i} about the dog'}]
    msgs.append({'role': 'user', 'content': 'last question'})
    full, _ = render_chat(tokenizer, msgs, add_generation_prompt=True)
    assert engine.fit_history(tokenizer, msgs, len(full)) == full
    ids = engine.fit_history(tokenizer, msgs, len(full) - 1)
    want, _ = render_chat(tokenizer, msgs[:1] + msgs[3:], add_generation_prompt=True)
    assert ids == want  # exactly the first exchange went
    small = engine.fit_history(tokenizer, msgs, 40)
    kept = [m for m in msgs if tokenizer.decode(small).find(m['content']) >= 0]
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and len(small) <= 40
    assert engine.fit_history(tokenizer, [{'role': 'user', 'content': 'fox ' * 50}], 10) == \
        render_chat(tokenizer, [{'role': 'user', 'content': 'fox ' * 50}], True)[0][-10:]

