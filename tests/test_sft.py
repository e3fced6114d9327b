"""sft.py and the LoRA of model.py: adapters against the base model and their merge, the conversation formats
in the real shapes of the public datasets, the loss mask, the truncation rule, the cache, the batches, and
a short end-to-end run through training.fit."""
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

import optim
import lora
import checkpoint
import lumi
import sft
from corpus import conversations
from lora import LoRALinear, TokenRows, apply_lora, lora_state_dict, merge_lora, set_lora_enabled
from model import GPT
from tokenizer import PAD_ID, render_chat

ALL_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
CHAT_IDS = (4, 5, 6, 7)  # the tiny tokenizer's <|system|> <|user|> <|assistant|> <|end|>


def _model(tiny_config, seed=0):
    torch.manual_seed(seed)
    return GPT(tiny_config).eval()


def _randomize_b(model, seed=1):
    """What training does to a fresh adapter: B and the token rows move away from where they started."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_b.data = torch.randn(m.lora_b.shape, generator=g) * 0.05
        if isinstance(m, TokenRows):
            # tied: the same rows twice
            m.lora_rows.data += torch.randn(m.lora_rows.shape, generator=g) * 0.05


def _idx(tiny_config, B=2, T=24):
    return torch.randint(0, tiny_config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))


# -----------------------------------------------------------------------------
# LoRA (model.py)

def test_lora_layers_init_and_shapes(tiny_config):
    model = apply_lora(_model(tiny_config), r=4, alpha=8.0, targets=ALL_TARGETS)
    layer = model.layers[0]
    expect = {'q_proj': (64, 64), 'k_proj': (32, 64), 'v_proj': (32, 64),  # GQA: k, v narrow
              'o_proj': (64, 64), 'gate_proj': (128, 64), 'up_proj': (128, 64), 'down_proj': (64, 128)}
    for name, (out_f, in_f) in expect.items():
        m = getattr(layer.attn if name[0] in 'qkvo' else layer.mlp, name)
        assert isinstance(m, LoRALinear) and m.scale == 2.0
        assert m.lora_a.shape == (4, in_f) and m.lora_b.shape == (out_f, 4)
        assert torch.count_nonzero(m.lora_b) == 0
        # Kaiming-uniform with a=sqrt(5), as nn.Linear: U(-1/sqrt(in), 1/sqrt(in)), not all zero
        assert m.lora_a.abs().max() <= 1 / in_f ** 0.5 and m.lora_a.std() > 0.3 / in_f ** 0.5
    with pytest.raises(ValueError, match='unknown LoRA targets'):
        apply_lora(_model(tiny_config), targets=('q', 'ffn'))


def test_fresh_adapter_gives_the_base_output_exactly(tiny_config):
    base = _model(tiny_config)
    idx = _idx(tiny_config)
    with torch.no_grad():
        want = base(idx)[0]
        got = apply_lora(base, r=8, alpha=16.0, targets=ALL_TARGETS, tokens=CHAT_IDS)(idx)[0]
    assert torch.equal(got, want)


def test_merged_logits_equal_base_plus_adapter(tiny_config):
    model = apply_lora(_model(tiny_config), r=8, alpha=16.0, targets=ALL_TARGETS, tokens=CHAT_IDS)
    _randomize_b(model)
    idx = _idx(tiny_config)
    idx[:, ::3] = CHAT_IDS[0]  # the trained rows feed in as well as out
    with torch.no_grad():
        base_logits = _model(tiny_config)(idx)[0]
        with_adapter = model(idx)[0]
        set_lora_enabled(model, False)
        assert torch.equal(model(idx)[0], base_logits)  # adapters off: the base, as DPO's reference
        set_lora_enabled(model, True)
        merged = merge_lora(model)(idx)[0]
    assert (with_adapter - base_logits).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(merged, with_adapter, rtol=0, atol=1e-5)
    assert not any(isinstance(m, (LoRALinear, TokenRows)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and model.lm_head.weight is model.tok_emb.weight


def test_only_adapter_parameters_reach_the_optimizer(tiny_config):
    model = apply_lora(_model(tiny_config), r=4, alpha=8.0, targets=ALL_TARGETS, tokens=CHAT_IDS).train()
    cfg = lumi.Config(lumi.load_config(lumi.declared_keys('training.py'), []))
    opt = optim.make_optimizer(model, cfg, 'cpu')
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    lora = {id(p) for n, p in model.named_parameters() if '.lora_' in n}
    # + the tied token rows
    assert in_opt == lora and len(lora) == 2 * len(ALL_TARGETS) * tiny_config.n_layer + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = _idx(tiny_config)
    idx[:, 5] = CHAT_IDS[3]
    for _ in range(2):  # B moves on step 1, A on step 2 (its gradient is zero while B is)
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != ('.lora_' in k), k  # adapters moved, nothing else did
    merge_lora(model)
    changed = (model.tok_emb.weight != before['tok_emb.weight']).any(1).nonzero()[:, 0].tolist()
    assert changed == list(CHAT_IDS)  # of the embedding, the chat rows alone


def test_adapter_save_load_roundtrip_and_merge_command(tiny_checkpoint, tiny_config, tmp_path):
    base = checkpoint.load_checkpoint(tiny_checkpoint)
    tok = checkpoint.tokenizer_from_checkpoint(base)
    model = apply_lora(checkpoint.model_from_checkpoint(base), r=4, alpha=8.0, targets=('q', 'v', 'down'),
                       tokens=CHAT_IDS)
    _randomize_b(model)
    checkpoint.save_checkpoint(str(tmp_path / 'adapter.pt'), lora.adapter_state(model, tiny_checkpoint, tok))
    # the adapter alone
    assert os.path.getsize(tmp_path / 'adapter.pt') < os.path.getsize(tiny_checkpoint) / 4
    path = str(tmp_path / 'adapter.pt')
    adapter = lora.check_adapter(checkpoint.load_checkpoint(path), path, tiny_checkpoint, tok)
    loaded = lora.apply_adapter(checkpoint.model_from_checkpoint(base), adapter, path)
    want, got = lora_state_dict(model), lora_state_dict(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    idx = _idx(tiny_config)
    idx[:, 1] = CHAT_IDS[1]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx)[0], model.eval()(idx)[0])
    out = sft.main(['merge', tiny_checkpoint, str(tmp_path / 'adapter.pt'), str(tmp_path / 'merged.pt')])
    merged_ckpt = checkpoint.load_checkpoint(out)
    assert merged_ckpt['kind'] == 'sft' and merged_ckpt['lora'] == {}
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model_from_checkpoint(merged_ckpt).eval()(idx)[0],
                                   model(idx)[0], rtol=0, atol=1e-5)
    # an adapter refuses a base it was not trained on
    other = dict(base, model={k: v + 1e-3 for k, v in base['model'].items()})
    checkpoint.save_checkpoint(str(tmp_path / 'other.pt'), other)
    with pytest.raises(ValueError, match='was trained on base'):
        checkpoint.load_model(str(tmp_path / 'other.pt'), adapter=str(tmp_path / 'adapter.pt'))


# -----------------------------------------------------------------------------
# formats, in the shapes the public datasets ship

ALPACA = [  # tatsu-lab/alpaca, LLaMA-Factory's alpaca_en_demo.json (system and history are LLaMA-Factory's)
    {'instruction': 'Give three tips for staying healthy.', 'input': '',
     'output': 'Eat well, sleep and walk.'},
    {'instruction': 'Add the numbers.', 'input': '4 and 6', 'output': 'The sum is 10.',
     'system': 'You are terse.', 'history': [['Hi there', 'Hello! How can I help?']]},
]
DOLLY = [  # databricks-dolly-15k
    {'instruction': 'When did the fox jump?',
     'context': 'The quick brown fox jumps over the lazy dog at noon.',
     'response': 'At noon.', 'category': 'closed_qa'},
    {'instruction': 'Name a summer month.', 'context': '', 'response': 'July.', 'category': 'open_qa'},
]
MESSAGES = [  # chat-format datasets; LLaMA-Factory v1_sft_demo.jsonl writes content as typed parts
    {'messages': [{'role': 'system', 'content': 'Be kind.'},
                  {'role': 'user', 'content': 'How are you today?'},
                  {'role': 'assistant', 'content': 'I am fine, thank you.'}]},
    {'messages': [{'role': 'user', 'content': [{'type': 'text', 'value': 'Who are you?'}],
                   'loss_weight': 0.0},
                  {'role': 'assistant', 'content': [{'type': 'text', 'value': 'I am {{name}}.'}],
                   'loss_weight': 1.0}]},
]
SHAREGPT = [  # ShareGPT / LLaMA-Factory sharegpt
    {'conversations': [{'from': 'human', 'value': 'Hello'}, {'from': 'gpt', 'value': 'Hello, how are you?'},
                       {'from': 'human', 'value': 'Fine.'}, {'from': 'gpt', 'value': 'Good to hear.'}],
     'system': 'You chat.'},
]
CHITCHAT = {  # chitchat-dataset's dataset.json: {id: {messages: [[utterances of one sender]]}}
    'a07e': {'messages': [
        [{'text': 'Hello', 'timestamp': '2018-05-02T19:38:15Z', 'sender': 'u1'},
         {'text': 'How are you doing today?', 'timestamp': '2018-05-02T19:38:20Z', 'sender': 'u1'}],
        [{'text': 'im doing good', 'timestamp': '2018-05-02T19:38:33Z', 'sender': 'u2'}],
        [{'text': 'nice', 'timestamp': '2018-05-02T19:39:21Z', 'sender': 'u1'}]],
        'prompt': 'How are you?', 'start': '2018-05-02T19:38:15Z'},
}
OASST_ROWS = [  # OpenAssistant/oasst1 rows: a tree of prompter/assistant messages, siblings ranked (0 best)
    {'message_id': 'm1', 'parent_id': None, 'message_tree_id': 'm1', 'role': 'prompter',
     'text': 'What is a fox?', 'rank': None, 'deleted': False, 'lang': 'en'},
    {'message_id': 'm2', 'parent_id': 'm1', 'message_tree_id': 'm1', 'role': 'assistant',
     'text': 'A bad answer.', 'rank': 1, 'deleted': False, 'lang': 'en'},
    {'message_id': 'm5', 'parent_id': 'm3', 'message_tree_id': 'm1', 'role': 'prompter',
     'text': 'Is it quick?', 'rank': 0, 'deleted': False, 'lang': 'en'},  # rows need not come in tree order
    {'message_id': 'm3', 'parent_id': 'm1', 'message_tree_id': 'm1', 'role': 'assistant',
     'text': 'A small wild dog.', 'rank': 0, 'deleted': False, 'lang': 'en'},
    {'message_id': 'm4', 'parent_id': 'm1', 'message_tree_id': 'm1', 'role': 'assistant',
     'text': 'Deleted.', 'rank': None, 'deleted': True, 'lang': 'en'},
    {'message_id': 'm6', 'parent_id': 'm5', 'message_tree_id': 'm1', 'role': 'assistant',
     'text': 'Very quick.', 'rank': None, 'deleted': False, 'lang': 'en'},
    {'message_id': 'n1', 'parent_id': None, 'message_tree_id': 'n1', 'role': 'prompter',
     'text': 'Unanswered?', 'rank': None, 'deleted': False, 'lang': 'en'},
]
OASST_TREE = {'message_tree_id': 't1', 'tree_state': 'ready_for_export', 'prompt': {  # *.trees.jsonl
    'message_id': 't1', 'role': 'prompter', 'text': 'Say hello.', 'replies': [
        {'message_id': 't2', 'role': 'assistant', 'text': 'Hi!', 'rank': 1, 'replies': []},
        {'message_id': 't3', 'role': 'assistant', 'text': 'Hello!', 'rank': 0, 'replies': []}]}}

EXPECTED = {
    'alpaca': [[('user', 'Give three tips for staying healthy.'), ('assistant', 'Eat well, sleep and walk.')],
               [('system', 'You are terse.'), ('user', 'Hi there'), ('assistant', 'Hello! How can I help?'),
                ('user', 'Add the numbers.\n4 and 6'), ('assistant', 'The sum is 10.')]],
    'dolly': [[('user', 'When did the fox jump?\n\nThe quick brown fox jumps over the lazy dog at noon.'),
               ('assistant', 'At noon.')], [('user', 'Name a summer month.'), ('assistant', 'July.')]],
    'messages': [[('system', 'Be kind.'), ('user', 'How are you today?'),
                  ('assistant', 'I am fine, thank you.')],
                 [('user', 'Who are you?'), ('assistant', 'I am Lumi.')]],
    'sharegpt': [[('system', 'You chat.'), ('user', 'Hello'), ('assistant', 'Hello, how are you?'),
                  ('user', 'Fine.'), ('assistant', 'Good to hear.')]],
    'chitchat': [[('user', 'Hello\nHow are you doing today?'), ('assistant', 'im doing good')]],
    'oasst': [[('user', 'What is a fox?'), ('assistant', 'A small wild dog.'), ('user', 'Is it quick?'),
               ('assistant', 'Very quick.')]],
    'oasst_tree': [[('user', 'Say hello.'), ('assistant', 'Hello!')]],
}


def _write(path, records, jsonl):
    with open(path, 'w') as f:
        if jsonl:
            f.writelines(json.dumps(r) + '\n' for r in records)
        else:
            json.dump(records, f)
    return str(path)


@pytest.fixture(scope='module')
def format_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('formats')
    return {'alpaca': _write(d / 'alpaca.json', ALPACA, False),
            'dolly': _write(d / 'dolly.jsonl', DOLLY, True),
            'messages': _write(d / 'messages.jsonl', MESSAGES, True),
            'sharegpt': _write(d / 'sharegpt.json', SHAREGPT, False),
            'chitchat': _write(d / 'chitchat.json', CHITCHAT, False),
            'oasst': _write(d / 'oasst.jsonl', OASST_ROWS, True),
            'oasst_tree': _write(d / 'trees.jsonl', [OASST_TREE], True)}


def _assistant_spans(tok, ids):
    """The reference mask, read off the ids alone: from after each <|assistant|> to its <|end|>, inclusive."""
    mask, inside = [], False
    for i in ids:
        mask.append(int(inside))
        if i == tok.role_id['assistant']:
            inside = True
        elif i == tok.end_id:
            inside = False
    return mask


@pytest.mark.parametrize('fmt', list(EXPECTED))
def test_formats_render_with_the_mask_on_assistant_spans_only(fmt, format_files, tokenizer):
    stats = Counter()
    convs = list(conversations.load_conversations(format_files[fmt], stats=stats,
                                                  template_vars={'name': 'Lumi'}))
    assert [[(m['role'], m['content']) for m in c] for c in convs] == EXPECTED[fmt]
    assert stats['conversations'] == len(convs)
    for msgs in convs:
        ids, mask = sft.render_example(tokenizer, msgs, block_size=256)
        assert mask == _assistant_spans(tokenizer, ids)
        replies = [m['content'] for m in msgs if m['role'] == 'assistant']
        spans = ''.join(tokenizer.id_to_piece(i) if i == tokenizer.end_id else tokenizer.decode([i])
                        for i, k in zip(ids, mask) if k)
        assert spans.replace(' ', '') == ''.join(r + '<|end|>' for r in replies).replace(' ', '')


def test_truncation_rule(tokenizer):
    msgs = [{'role': 'user', 'content': 'Hello, how are you today?'},
            {'role': 'assistant', 'content': 'I am fine, thank you.'},
            {'role': 'user', 'content': 'What are you doing this weekend?'},
            {'role': 'assistant', 'content': 'To be, or not to be, that is the question.'}]
    full, full_mask = render_chat(tokenizer, msgs)
    first = render_chat(tokenizer, msgs[:2])[0]
    assert sft.render_example(tokenizer, msgs, len(full) - 1) == (full, full_mask)  # fits: untouched
    # too long by one token: keep up to the last whole reply that fits, with its <|end|>
    ids, mask = sft.render_example(tokenizer, msgs, len(full) - 2)
    assert ids == first and ids[-1] == tokenizer.end_id and mask == full_mask[:len(first)]
    # not even the first reply fits: cut at the limit, that reply learned in part
    prompt_len = len(render_chat(tokenizer, msgs[:1], add_generation_prompt=True)[0])
    ids, mask = sft.render_example(tokenizer, msgs, prompt_len + 2)
    assert ids == full[:prompt_len + 3] and sum(mask) == 3
    # the prompt alone fills the context: nothing to learn
    assert sft.render_example(tokenizer, msgs, prompt_len - 1) is None


# -----------------------------------------------------------------------------
# preparation, cache, batches

def _chat_file(tmp_path, n=40, name='chats.jsonl'):
    words = 'the quick brown fox jumps over the lazy dog and a stitch in time saves nine'.split()
    rng = np.random.default_rng(0)
    recs = [{'conversations': [{'from': 'human', 'value': ' '.join(rng.choice(words, 3 + i % 5))},
                               {'from': 'gpt', 'value': ' '.join(rng.choice(words, 2 + i % 7))}]}
            for i in range(n)]
    recs.append(recs[0])  # an exact duplicate
    return _write(tmp_path / name, recs, True)


def test_prepare_caches_by_tokenizer_sources_and_block_size(tokenizer, tmp_path):
    spec = _chat_file(tmp_path)
    prep = sft.prepare_sft_data(tokenizer, [spec], 48, str(tmp_path / 'cache'), val_frac=0.2)
    assert len(prep['lengths']) == 40 and prep['stats'][spec]['duplicates dropped'] == 1
    assert prep['tokenizer_sha256'] == tokenizer.sha256 and 0 < int(prep['val'].sum()) < 40
    again = sft.prepare_sft_data(tokenizer, [spec], 48, str(tmp_path / 'cache'), val_frac=0.2)
    assert torch.equal(again['ids'], prep['ids']) and len(os.listdir(tmp_path / 'cache')) == 1
    sft.prepare_sft_data(tokenizer, [spec], 40, str(tmp_path / 'cache'), val_frac=0.2)
    assert len(os.listdir(tmp_path / 'cache')) == 2  # another block size is another cache entry


def test_batches_mask_targets_weight_sources_and_resume_exactly(tokenizer, tmp_path):
    a, b = _chat_file(tmp_path, 30, 'a.jsonl'), _chat_file(tmp_path, 20, 'b.jsonl')
    prep = sft.prepare_sft_data(tokenizer, [a, b], 48, str(tmp_path / 'cache'), val_frac=0.0)
    n_a = int((prep['source'] == 0).sum())
    examples = np.arange(len(prep['lengths']))
    batches = sft.SFTBatches(prep, examples, [2.0, 0.0], batch_size=4, seed=0)
    seen = np.concatenate(batches.batches)
    assert len(seen) == 2 * n_a and set(seen) == set(range(n_a))  # weight 2: twice; weight 0: never
    x, y = batches.next_batch()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), prep['lengths'].cumsum(0)])
    for row, i in enumerate(batches.batches[0]):
        n = int(prep['lengths'][i])
        ids = prep['ids'][offsets[i]:offsets[i] + n].long()
        mask = prep['mask'][offsets[i]:offsets[i] + n]
        assert torch.equal(x[row, :n - 1], ids[:-1]) and (x[row, n - 1:] == PAD_ID).all()
        assert (torch.equal(y[row, :n - 1], torch.where(mask[1:], ids[1:], -1))
                and (y[row, n - 1:] == -1).all())
    for _ in range(len(batches) + 2):  # into the next epoch
        batches.next_batch()
    state = batches.state_dict()
    want = [batches.next_batch() for _ in range(3)]
    other = sft.SFTBatches(prep, examples, [2.0, 0.0], batch_size=4, seed=0)
    other.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, [other.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # two processes share an epoch without overlap
    r0, r1 = (sft.SFTBatches(prep, examples, [1.0, 1.0], 4, 0, rank, 2) for rank in (0, 1))
    assert len(r0) == len(r1) and not set(np.concatenate(r0.batches)) & set(np.concatenate(r1.batches))


def test_sft_loss_is_the_models_loss_on_assistant_tokens(tokenizer, tiny_config, tmp_path):
    prep = sft.prepare_sft_data(tokenizer, [_chat_file(tmp_path, 12)], 48, str(tmp_path / 'cache'),
                                val_frac=0.0)
    x, y = sft.SFTBatches(prep, np.arange(12), [1.0], batch_size=6, seed=0).next_batch()
    model = apply_lora(_model(tiny_config), r=4, alpha=8.0, targets=ALL_TARGETS)
    _randomize_b(model)
    loss, stats = sft.sft_loss(model, (x, y))
    want = model(x, y)[1]  # logits everywhere, targets -1 ignored
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss, [model.layers[0].attn.q_proj.lora_b])[0]
    torch.testing.assert_close(grads, torch.autograd.grad(want, [model.layers[0].attn.q_proj.lora_b])[0])
    assert stats['assistant_tokens'] == int((y != -1).sum()) and stats['tokens'] == int((x != 0).sum())
    # the held-out loss: token-weighted over every assistant token of the picked conversations
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), prep['lengths'].cumsum(0)])
    xs, ys = sft.collate_chats(prep, offsets, np.arange(12))
    with torch.no_grad():
        got = sft.make_sft_evaluate(prep, np.arange(12), 5, 3, ['chats'])(model)
        torch.testing.assert_close(got['val_loss'], float(model(xs, ys)[1]), rtol=1e-5, atol=1e-5)
    assert got['val_loss_chats'] == got['val_loss']


class _Says(torch.nn.Module):
    """An LM head that puts all the probability on some tokens, evenly: one token, or a coin between two."""
    def __init__(self, tokens, vocab):
        super().__init__()
        self.tokens, self.vocab = list(tokens), vocab

    def forward(self, h):
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        logits[..., self.tokens] = 100.0
        return logits


def test_format_check_counts_replies_that_end(tokenizer, tiny_config, tmp_path):
    prep = sft.prepare_sft_data(tokenizer, [_chat_file(tmp_path, 12)], 48, str(tmp_path / 'cache'),
                                val_frac=0.0)
    model = _model(tiny_config)
    args = (tokenizer, prep, np.arange(12), 5)
    model.lm_head = _Says([tokenizer.end_id], tiny_config.vocab_size)
    got = sft.format_check(model, *args, max_new_tokens=8, temperature=0.7, names=['chats'], batch_size=3)
    assert (got['format_prompts'] == 5 and got['format_end_rate'] == 1.0
            and got['format_end_rate_chats'] == 1.0)
    model.lm_head = _Says(tokenizer.encode('fox')[:1], tiny_config.vocab_size)
    got = sft.format_check(model, *args, max_new_tokens=2, temperature=0.7, names=['chats'], batch_size=3)
    assert got['format_end_rate'] == 0.0
    # the reference replies: a reply of n tokens ends within the limit when n + 1 (its <|end|>) <= 2
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), prep['lengths'].cumsum(0)])
    reply_len = [int(prep['mask'][offsets[i]:offsets[i + 1]].sum()) for i in range(5)]
    assert got['format_reference_end_rate'] == np.mean([n <= 2 for n in reply_len])


def test_format_check_seed_picks_the_draws(tokenizer, tiny_config, tmp_path):
    """Every reply is <|end|> or 'fox' at even odds: one seed gives the same count each time, and other seeds
    other draws (bench_format.py scores one model at several)."""
    prep = sft.prepare_sft_data(tokenizer, [_chat_file(tmp_path, 12)], 48, str(tmp_path / 'cache'),
                                val_frac=0.0)
    model = _model(tiny_config)
    end, fox = tokenizer.end_id, tokenizer.encode('fox')[0]
    model.lm_head = _Says((end, fox), tiny_config.vocab_size)
    rate = lambda seed: sft.format_check(model, tokenizer, prep, np.arange(12), 12, max_new_tokens=1,
                                         temperature=1.0, names=['chats'], greedy=0,
                                         seed=seed)['format_end_rate']
    assert rate(0) == rate(0)
    rates = [rate(1000 * k) for k in range(5)]
    assert len(set(rates)) > 1 and all(0 < r < 1 for r in rates)


# -----------------------------------------------------------------------------
# end to end through training.fit

def test_sft_end_to_end_writes_adapter_and_merged(tiny_checkpoint, tiny_config, tmp_path, capsys):
    spec = _chat_file(tmp_path, 60)
    out = tmp_path / 'out'
    args = [f'--init_from={tiny_checkpoint}', f'--out_dir={out}', f"--sources=['{spec}']", '--max_iters=6',
            '--batch_size=4', '--eval_interval=3', '--eval_iters=2', '--warmup_iters=2', '--lora_r=4',
            '--val_frac=0.2', f'--cache_dir={tmp_path / "cache"}', '--format_samples=4',
            '--format_max_new_tokens=8', '--device=cpu']
    merged_path = sft.main(args)
    printed = capsys.readouterr().out
    assert 'trainable' in printed and 'format check' in printed
    metrics = lumi.read_jsonl(out / 'metrics.jsonl')
    assert [m['step'] for m in metrics if 'val_loss' in m] == [0, 3, 6]
    assert sum('loss' in m and 'val_loss' not in m for m in metrics) == 6
    rate = metrics[-1]['format_end_rate']  # replies that ended, of 4
    assert metrics[-1]['format_prompts'] == 4 and rate * 4 == round(rate * 4)
    adapter = torch.load(out / 'adapter.pt', weights_only=True)
    assert adapter['kind'] == 'adapter' and adapter['lora']['r'] == 4
    assert adapter['base_sha256'] == lumi.sha256_file(tiny_checkpoint)
    merged = checkpoint.load_checkpoint(merged_path)
    assert merged['kind'] == 'sft' and merged['parent_sha256'] == adapter['base_sha256']
    idx = _idx(tiny_config)
    with torch.no_grad():
        base_model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tiny_checkpoint))
        path = str(out / 'adapter.pt')
        with_adapter = lora.apply_adapter(base_model, checkpoint.load_checkpoint(path), path).eval()(idx)[0]
        from_step_ckpt = checkpoint.model_from_checkpoint(
            checkpoint.load_checkpoint(checkpoint.latest_step(str(out)))).eval()(idx)[0]
        torch.testing.assert_close(checkpoint.model_from_checkpoint(merged).eval()(idx)[0], with_adapter,
                                   rtol=0, atol=1e-5)
    assert torch.equal(from_step_ckpt, with_adapter)
    base = checkpoint.load_checkpoint(tiny_checkpoint)['model']
    assert any(not torch.equal(base[k], v) for k, v in merged['model'].items())  # training moved something
    # killed after step 3: resuming from ckpt_3 redoes steps 4-6 exactly (sampler position, RNG, optimizer)
    os.remove(out / 'ckpt_0000006.pt')
    sft.main(args)
    resumed = torch.load(out / 'adapter.pt', weights_only=True)['lora_state']
    assert all(torch.equal(resumed[k], v) for k, v in adapter['lora_state'].items())


def test_format_check_prompts_are_the_chat_so_far_each_once(tokenizer, tiny_config, tmp_path):
    # a prompt is the conversation up to its last reply that leaves room for the new tokens; a prompt seen
    # before (the third chat is the first one up to its last reply) counts once
    turn = lambda who, text: {'from': who, 'value': text}
    chats = [[turn('human', 'hi'), turn('gpt', 'hello'), turn('human', f'the fox {w}'), turn('gpt', reply)]
             for w, reply in (('jumps', 'a dog'), ('sleeps', 'a dog'), ('jumps', 'a lazy dog'))]
    spec = _write(tmp_path / 'multi.jsonl', [{'conversations': c} for c in chats], True)
    prep = sft.prepare_sft_data(tokenizer, [spec], 64, str(tmp_path / 'cache'), val_frac=0.0)
    model = _model(tiny_config)
    model.lm_head = _Says([tokenizer.end_id], tiny_config.vocab_size)
    mask = prep['mask'][:int(prep['lengths'][0])].tolist()
    first, last = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
    check = lambda new: sft.format_check(model, tokenizer, prep, np.arange(3), 10, max_new_tokens=new,
                                         temperature=0.7, names=['chats'], batch_size=3, greedy=0)
    assert check(64 - last)['format_prompts'] == 2  # the chat so far: two different prompts
    # room for the first reply only: every chat's prompt is the same "hi"
    assert check(64 - first)['format_prompts'] == 1 and check(64 - first)['format_end_rate'] == 1.0
    assert check(64 - first + 1)['format_prompts'] == 0
