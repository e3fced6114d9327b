"""dpo.py: the losses against values worked out by hand, the adapters-off reference, one forward for 2B rows,
the preference formats, truncation, SFT-built pairs, and short end-to-end runs on the tiny fixture model."""
import json
import math
from collections import Counter

import pytest
import torch

import dpo
import training
import checkpoint
import lumi
from lora import apply_lora
from tokenizer import BOS_ID, render_chat


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _grads(loss_type, beta, smoothing, pc, pr, rc, rr):
    """Losses and d loss / d policy log-probs through dpo_loss, on one pair."""
    pol_c = torch.tensor([pc], requires_grad=True)
    pol_r = torch.tensor([pr], requires_grad=True)
    losses, rew_c, rew_r = dpo.dpo_loss(pol_c, pol_r, torch.tensor([rc]), torch.tensor([rr]), beta, loss_type,
                                        smoothing)
    losses.sum().backward()
    return losses.item(), pol_c.grad.item(), pol_r.grad.item(), rew_c.item(), rew_r.item()


# -----------------------------------------------------------------------------
# losses, by hand: h = (pc - pr) - (rc - rr)

def test_sigmoid_loss_by_hand():
    # pc=-1, pr=-2, rc=-1.5, rr=-1.5: h = 1; beta 0.5: loss = -log sigmoid(0.5) = log(1 + e^-0.5)
    loss, gc, gr, rew_c, rew_r = _grads('sigmoid', 0.5, 0.0, -1.0, -2.0, -1.5, -1.5)
    assert loss == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    # d/dpc = -beta * sigmoid(-beta h): the chosen log-prob is pushed up, the rejected one down
    assert gc == pytest.approx(-0.5 * _sig(-0.5), abs=1e-6) and gc < 0
    assert gr == pytest.approx(0.5 * _sig(-0.5), abs=1e-6) and gr > 0
    assert rew_c == pytest.approx(0.5 * 0.5) and rew_r == pytest.approx(0.5 * -0.5)


def test_conservative_dpo_by_hand():
    # label smoothing 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5)
    loss, gc, gr, _, _ = _grads('sigmoid', 0.5, 0.1, -1.0, -2.0, -1.5, -1.5)
    assert loss == pytest.approx(0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)),
                                 abs=1e-6)
    expect = -0.5 * 0.9 * _sig(-0.5) + 0.5 * 0.1 * _sig(0.5)
    assert gc == pytest.approx(expect, abs=1e-6) and gc < 0 and gr == pytest.approx(-expect, abs=1e-6)
    # with a margin far past zero, cDPO pulls back: a flipped label is assumed possible
    _, gc_far, _, _, _ = _grads('sigmoid', 0.5, 0.1, 20.0, -20.0, 0.0, 0.0)
    assert gc_far > 0


def test_ipo_loss_by_hand():
    # h = 1, beta 0.1: target 1 / (2 beta) = 5, loss (1 - 5)^2 = 16, d/dpc = 2 (h - 5) = -8
    loss, gc, gr, _, _ = _grads('ipo', 0.1, 0.0, -1.0, -2.0, -1.5, -1.5)
    assert loss == pytest.approx(16.0, abs=1e-5)
    assert gc == pytest.approx(-8.0, abs=1e-5) and gr == pytest.approx(8.0, abs=1e-5)
    # past the target the square pushes back: h = 7 -> d/dpc = +4
    _, gc_past, _, _, _ = _grads('ipo', 0.1, 0.0, 5.0, -2.0, 0.0, 0.0)
    assert gc_past == pytest.approx(4.0, abs=1e-5)


def test_hinge_loss_by_hand():
    # h = 1, beta 0.5: loss max(0, 1 - 0.5) = 0.5, d/dpc = -beta
    loss, gc, gr, _, _ = _grads('hinge', 0.5, 0.0, -1.0, -2.0, -1.5, -1.5)
    assert loss == pytest.approx(0.5) and gc == pytest.approx(-0.5) and gr == pytest.approx(0.5)
    # beta h = 1.5 > 1: satisfied, no loss and no gradient
    loss, gc, gr, _, _ = _grads('hinge', 0.5, 0.0, 1.0, -2.0, 0.0, 0.0)
    assert loss == 0.0 and gc == 0.0 and gr == 0.0


def test_unknown_loss_type():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match='loss_type'):
        dpo.dpo_loss(z, z, z, z, 0.1, 'kto')


# -----------------------------------------------------------------------------
# the reference and the batched forward

PAIRS = [
    ([{'role': 'user', 'content': 'How are you today?'}], 'I am fine, thank you.', 'The quick brown fox.'),
    ([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'To be, or not to be?'}],
     'That is the question.', 'A stitch in time saves nine, and the earth was without form.'),
    ([{'role': 'user', 'content': 'Shall I compare thee to a summer day?'}], 'Thou art more lovely.',
     'Hello.'),
]


def _model(tiny_checkpoint):
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tiny_checkpoint))
    model.eval()
    return model


def _rendered(tokenizer, pairs=PAIRS):
    return [dpo.render_pair(tokenizer, p, 64, 32) for p in pairs]


def test_adapters_off_reference_is_the_starting_policy_exactly(tiny_checkpoint, tokenizer):
    plain = _model(tiny_checkpoint)
    batch = dpo.collate_pairs(_rendered(tokenizer))
    with torch.no_grad():
        start = dpo.token_logps(plain, batch['idx'], batch['targets'])
    policy = apply_lora(_model(tiny_checkpoint), r=4, alpha=8.0, targets=('q', 'k', 'v', 'o', 'up'))
    with torch.no_grad():
        assert torch.equal(dpo.token_logps(policy, batch['idx'], batch['targets']), start)  # B = 0: no change
        ref_logits = dpo.reference_logits(policy, batch['idx'], batch['targets'])
        assert torch.equal(dpo.reply_logps(ref_logits, batch['targets']), start)
        for name, p in policy.named_parameters():  # as if trained: the adapters now change the outputs
            if 'lora_b' in name:
                p.normal_(0, 0.2)
        moved = dpo.token_logps(policy, batch['idx'], batch['targets'])
        mask = batch['targets'] != -1
        ref_logits = dpo.reference_logits(policy, batch['idx'], batch['targets'])
        ref = dpo.reply_logps(ref_logits, batch['targets'])
        kl = dpo.reply_kl(training.target_logits(policy, batch['idx'], batch['targets']), ref_logits,
                          batch['targets'])
    assert not torch.allclose(moved, start)
    assert torch.equal(ref, start)
    # the KL at each reply position, against torch's own KL divergence of the two distributions
    with torch.no_grad():
        log_p = torch.log_softmax(policy(batch['idx'])[0][mask], -1)
        log_q = torch.log_softmax(plain(batch['idx'])[0][mask], -1)
    expect = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction='none').sum(-1)
    assert torch.allclose(kl[mask], expect, atol=1e-6) and (kl[mask] > 0).all() and (kl[~mask] == 0).all()
    assert all(m.enabled for m in policy.modules() if hasattr(m, 'enabled'))  # switched back on


def test_one_forward_of_2b_rows_matches_separate_forwards(tiny_checkpoint, tokenizer):
    model = _model(tiny_checkpoint)
    rendered = _rendered(tokenizer)
    batch = dpo.collate_pairs(rendered)
    B = len(rendered)
    with torch.no_grad():
        together = dpo.token_logps(model, batch['idx'], batch['targets']).sum(-1)
        for i, p in enumerate(rendered):
            for row, reply in ((i, p['chosen']), (B + i, p['rejected'])):
                seq = torch.tensor([p['prompt'] + reply])
                targets = torch.full_like(seq, -1)
                targets[0, len(p['prompt']):] = seq[0, len(p['prompt']):]
                alone = dpo.token_logps(model, seq[:, :-1], targets[:, 1:]).sum()
                assert together[row].item() == pytest.approx(alone.item(), abs=1e-4)


def test_collate_targets_cover_exactly_the_reply(tokenizer):
    rendered = _rendered(tokenizer)
    batch = dpo.collate_pairs(rendered)
    B = len(rendered)
    for i, p in enumerate(rendered):
        for row, reply in ((i, p['chosen']), (B + i, p['rejected'])):
            t = batch['targets'][row]
            assert t[t != -1].tolist() == reply
            assert batch['idx'][row, :len(p['prompt'])].tolist() == p['prompt']
    assert rendered[0]['chosen'][-1] == tokenizer.end_id


# -----------------------------------------------------------------------------
# truncation and SFT-built pairs

def test_truncation_keeps_the_prompt_end_and_the_reply_start(tokenizer):
    long_user = 'The quick brown fox jumps over the lazy dog. ' * 10
    pair = ([{'role': 'user', 'content': long_user}], 'To be, or not to be, that is the question. ' * 5,
            'Hello.')
    full_prompt, _ = render_chat(tokenizer, pair[0], add_generation_prompt=True)
    stats = Counter()
    r = dpo.render_pair(tokenizer, pair, 48, 16, stats)
    assert len(r['prompt']) == 16 and r['prompt'][0] == BOS_ID
    assert r['prompt'][1:] == full_prompt[-15:] and r['prompt'][-1] == tokenizer.role_id['assistant']
    full_reply = tokenizer.encode(pair[1]) + [tokenizer.end_id]
    assert r['chosen'] == full_reply[:48 - 16]  # cut from the right, so it loses its <|end|>
    assert r['rejected'] == tokenizer.encode('Hello.') + [tokenizer.end_id]
    assert stats == Counter(prompt_truncated=1, reply_truncated=1)
    # replies that only differ past the cut teach nothing: dropped and counted
    same = ([{'role': 'user', 'content': 'Hi'}], 'Hello there friend ' * 30 + 'A',
            'Hello there friend ' * 30 + 'B')
    assert dpo.render_pair(tokenizer, same, 48, 16, stats) is None and stats['same_after_truncation'] == 1


def test_pairs_from_sft_dialogues_never_reject_their_own_reply():
    dialogues = [[{'role': 'user', 'content': f'question {i}'},
                  {'role': 'assistant', 'content': f'answer {i}'}]
                 for i in range(7)]
    dialogues.append([{'role': 'user', 'content': 'no reply'}])
    stats = Counter()
    groups = dpo.pairs_from_conversations(dialogues, seed=1, stats=stats)
    assert sorted(len(g) for g in groups) == [2, 2, 3] and stats['sft_unusable'] == 1
    pairs = [p for g in groups for p in g]
    for prompt, chosen, rejected in pairs:
        i = prompt[0]['content'].split()[-1]
        assert chosen == f'answer {i}' and rejected != chosen and rejected.startswith('answer ')
    assert sorted(p[2] for p in pairs) == sorted(p[1] for p in pairs)  # each reply is rejected exactly once
    for g in groups:  # ... by a member of its own group: twins swap replies, a trio rotates them
        assert sorted(p[2] for p in g) == sorted(p[1] for p in g)
    assert groups == dpo.pairs_from_conversations(dialogues, seed=1)
    other = dpo.pairs_from_conversations(dialogues, seed=2)
    assert [p[2] for g in groups for p in g] != [p[2] for g in other for p in g]
    assert dpo.pairs_from_conversations(dialogues[:1], seed=1) == []


def test_pair_batches_keep_groups_together(tokenizer):
    rendered = [dict(r, group=k // 2) for k, r in enumerate(_rendered(tokenizer) * 4)]  # 6 twins
    for seed in range(3):
        for batch in dpo.PairBatches(rendered, 4, seed=seed).batches:
            groups = [rendered[i]['group'] for i in batch]
            assert all(groups.count(g) == 2 for g in groups)
    shards = [dpo.PairBatches(rendered, 2, seed=3, rank=r, world_size=2).batches for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert not set(sum(shards[0], [])) & set(sum(shards[1], []))  # ranks see different pairs


def test_pair_batches_resume_exactly(tokenizer):
    rendered = _rendered(tokenizer) * 3
    a = dpo.PairBatches(rendered, 2, seed=0)
    for _ in range(5):  # across an epoch boundary
        a.next_batch()
    b = dpo.PairBatches(rendered, 2, seed=0)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert torch.equal(a.next_batch()['idx'], b.next_batch()['idx'])


# -----------------------------------------------------------------------------
# end to end through training.fit

def _write_pairs(path, n=16):
    """Local llamafactory-shaped pairs: chosen a polite reply, rejected a curt one."""
    recs = []
    for i in range(n):
        q = ['How are you today?', 'What are you doing this weekend?', 'Shall I compare thee?',
             'Hello?'][i % 4]
        recs.append({'conversations': [{'from': 'human', 'value': f'{q} ({i})'}],
                     'chosen': {'from': 'gpt', 'value': 'I am fine, thank you. Hello, how are you?'},
                     'rejected': {'from': 'gpt', 'value': 'The earth was without form, and void.'}})
    path.write_text(json.dumps(recs))
    return str(path)


def test_dpo_run_with_lora_end_to_end(tmp_path, tiny_checkpoint, tokenizer):
    out = tmp_path / 'dpo'
    pairs = _write_pairs(tmp_path / 'pairs.json')
    alpaca = tmp_path / 'alpaca.json'  # SFT data in its own format: pairs are built from it
    alpaca.write_text(json.dumps([{'instruction': f'Say {w}.', 'input': '', 'output': f'{w}, {w}!'}
                                  for w in ('hello', 'thanks', 'goodbye', 'yes', 'no', 'fine', 'never',
                                            'always')]))
    dpo.main(['--init_from=' + tiny_checkpoint, f'--data={pairs}', f'--sft_data={[str(alpaca)]}',
              f'--out_dir={out}', '--max_iters=8',
              '--batch_size=4', '--learning_rate=0.01', '--min_lr=0.01', '--warmup_iters=1',
              '--eval_interval=4', '--val_frac=0.25', '--lora_r=4', '--beta=0.5', '--device=cpu',
              '--resume=never'])
    rows = lumi.read_jsonl(out / 'metrics.jsonl')
    steps = [r for r in rows if 'loss' in r]
    evals = [r for r in rows if 'val_loss' in r]
    assert len(steps) == 8 and [r['step'] for r in evals] == [0, 4, 8]
    for key in ('loss', 'reward_margin', 'reward_accuracy', 'rewards_chosen', 'rewards_rejected',
                'logps_chosen', 'logps_rejected', 'kl'):
        assert all(math.isfinite(r[key]) for r in steps)
        assert math.isfinite(evals[-1]['val_' + key])
    # the adapters start at zero: no preference yet, loss log 2, accuracy a coin flip; then they learn
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]['val_reward_accuracy'] == 0.5 and evals[0]['val_kl'] == pytest.approx(0.0, abs=1e-7)
    assert evals[-1]['val_reward_margin'] > 0 and evals[-1]['val_reward_accuracy'] > 0.5
    assert evals[-1]['val_kl'] > 0
    assert {'val_reward_accuracy_pref', 'val_reward_accuracy_sft', 'val_reward_margin_sft'} <= set(evals[-1])
    counts = lumi.read_json(out / 'data_stats.json')
    assert (counts['train_pairs'], counts['val_pairs'], counts['conversations']) == (12 + 6, 4 + 2, 8)

    adapter = checkpoint.load_checkpoint(str(out / 'adapter.pt'))
    assert adapter['kind'] == 'adapter' and adapter['lora']['r'] == 4
    assert adapter['base_sha256'] == lumi.sha256_file(tiny_checkpoint)
    merged_ckpt = checkpoint.load_checkpoint(str(out / 'merged.pt'))
    assert merged_ckpt['kind'] == 'dpo' and not merged_ckpt['lora']
    merged = checkpoint.model_from_checkpoint(merged_ckpt).eval()
    # the adapters on their base answer as the merged model does
    policy = apply_lora(_model(tiny_checkpoint), **adapter['lora'])
    policy.load_state_dict(adapter['lora_state'], strict=False)
    batch = dpo.collate_pairs(_rendered(tokenizer))
    with torch.no_grad():
        a = dpo.token_logps(policy.eval(), batch['idx'], batch['targets'])
        b = dpo.token_logps(merged, batch['idx'], batch['targets'])
    assert torch.allclose(a, b, atol=1e-4)


def test_full_fine_tuning_caches_the_reference(tmp_path, tiny_checkpoint, tokenizer):
    model = _model(tiny_checkpoint)
    rendered = _rendered(tokenizer)
    dpo.cache_reference(model, rendered, 2, 'cpu', 'float32')
    assert all(len(p['ref_chosen']) == len(p['chosen']) for p in rendered)
    cfg = lumi.Config(beta=0.1, loss_type='sigmoid', label_smoothing=0.0)
    with torch.no_grad():
        scores = dpo.score_batch(model, dpo.collate_pairs(rendered), cfg)
    assert torch.allclose(scores['rewards_chosen'], torch.zeros(3), atol=1e-5)
    assert torch.allclose(scores['loss'], torch.full((3,), math.log(2)), atol=1e-5)

    out = tmp_path / 'full'
    dpo.main(['--init_from=' + tiny_checkpoint, f'--data={_write_pairs(tmp_path / "p.json", 8)}',
              f'--out_dir={out}', '--max_iters=2', '--batch_size=2', '--lora_r=0', '--eval_interval=2',
              '--device=cpu', '--resume=never'])
    assert (out / 'merged.pt').exists() and not (out / 'adapter.pt').exists()
    assert checkpoint.load_checkpoint(str(out / 'merged.pt'))['kind'] == 'dpo'
    last = lumi.read_jsonl(out / 'metrics.jsonl')[-1]
    assert 'val_reward_accuracy' in last and last['val_kl_chosen_k3'] >= 0 and 'val_kl' not in last


def test_start_from_an_sft_out_dir_and_refuse_an_adapter(tmp_path, tiny_checkpoint):
    import shutil
    shutil.copy(tiny_checkpoint, tmp_path / 'merged.pt')
    shutil.copy(tiny_checkpoint, tmp_path / 'ckpt_0000005.pt')
    model, tok, path = dpo.load_start(str(tmp_path), 'cpu')
    assert path == str(tmp_path / 'merged.pt') and tok.vocab_size == model.cfg.vocab_size
    checkpoint.save_checkpoint(str(tmp_path / 'adapter.pt'),
                               {'kind': 'adapter', 'lora': {}, 'lora_state': {}})
    with pytest.raises(ValueError, match='merged.pt'):
        dpo.load_start(str(tmp_path / 'adapter.pt'), 'cpu')
    with pytest.raises(ValueError, match='init_from is required'):
        dpo.load_start('', 'cpu')
