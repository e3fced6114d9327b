"""
Direct Preference Optimization, written by hand: tune a chat model so that it prefers the chosen reply of
each (prompt, chosen, rejected) pair over the rejected one, relative to a frozen reference model, with no
reward model and no sampling (Rafailov et al. 2023).

    python dpo.py configs/dpo_tiny.py --init_from=out/sft/merged.pt --out_dir=out/dpo --max_iters=200

What it does, top to bottom: read preference pairs in the formats people have (corpus/conversations.py:
HH-RLHF, orca_dpo_pairs, UltraFeedback binarized, llamafactory's dpo demo) and optionally build more from SFT
data; render them with the chat template; train with training.fit on one of three losses (sigmoid DPO with
label smoothing, IPO, hinge); save the result as LoRA adapters and as a merged standalone checkpoint (kind
'dpo').

The reference model costs nothing extra with LoRA: it is the policy itself with its adapters switched off.
With full fine-tuning (--lora_r=0) the reference log-probs are computed once before training and kept with
the pairs. Chosen and rejected replies go through the model together, as one batch of 2B rows.

Deliberately left out: online or sampled methods (PPO, online DPO), reward models, length-normalised
variants (SimPO, ORPO), and a copy of the reference model in memory.
"""
import json
import math
import os
import random
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import curves
import lumi
import training
from checkpoint import checkpoint_meta, load_model, save_checkpoint, save_merged
from corpus.conversations import load_conversations, load_pairs
from lora import adapter_state, apply_lora, set_lora_enabled
from tokenizer import PAD_ID, TEMPLATE_VARS, encode_turn, render_chat

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value; the training loop's keys are training.py's (KEY_FILES), and
# those set here are its keys with DPO's defaults
KEY_FILES = ('training.py',)
init_from = ''                # the SFT model to start from: a checkpoint file, or an SFT out_dir
                              # (its merged.pt)
out_dir = 'out/dpo'           # checkpoints, metrics.jsonl, data_stats.json, adapter.pt and merged.pt
# preference pairs: any data.py source (path, glob, dir, url:, hf:, pypi-sdist:NAME==VER:GLOB); '' for none
data = 'pypi-sdist:llamafactory==0.9.5:data/dpo_en_demo.json'
data_format = 'auto'          # auto | hh | orca | ultrafeedback | llamafactory
sft_data = []                 # SFT sources (sft.py's formats) to build pairs from: the reply is chosen,
                              # another prompt's reply rejected; e.g.
                              # ['pypi-sdist:llamafactory==0.9.5:data/alpaca_en_demo.json']
sft_format = 'auto'           # the format of sft_data, as sft.py's data_format
max_sft_pairs = 0             # [0, inf) 0: every usable SFT dialogue makes a pair
val_frac = 0.1                # [0, 1) held out from each source before anything is trained
max_length = 0                # [0, inf) prompt + reply tokens; 0: the model's block_size
max_prompt_length = 0         # [0, inf) a longer prompt keeps BOS and its last tokens; 0: max_length // 2
loss_type = 'sigmoid'         # sigmoid (DPO) | ipo | hinge
beta = 0.1                    # (0, inf) how far the policy may move from the reference: the KL
                              # penalty's weight
label_smoothing = 0.0         # [0, 0.5) sigmoid only: the assumed rate of flipped labels (conservative DPO)
lora_r = 16                   # [0, inf) 0: full fine-tuning, with reference log-probs cached before training
lora_alpha = 32.0             # (0, inf) LoRA scale alpha / r
lora_dropout = 0.0            # [0, 1) dropout on the LoRA path
lora_targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # the projections that get adapters
save = 'both'                 # adapter | merged | both (full fine-tuning saves merged only)
epochs = 1.0                  # (0, inf) when max_iters is 0: passes over the training pairs
                              # (max_minutes caps it)
batch_size = 4                # pairs per micro-step: 2 * batch_size rows go through the model
learning_rate = 2e-4  # a fifth of sft.py's LoRA rate: DPO sharpens a model, it does not teach a format
min_lr = 2e-5
warmup_iters = 10
weight_decay = 0.0
eval_interval = 50
eval_iters = 25               # [0, inf) held-out batches per evaluation (the same ones each time); 0: all
ckpt_interval = 100
KEYS = lumi.declared_keys(__file__)

LOGP_CHUNK = 64  # reply positions per softmax: 8 MB of float32 at a 32768 vocabulary


def pairs_from_conversations(conversations, seed, stats=None):
    """SFT dialogues -> groups of pairs: the dialogue's own last reply is chosen, the reply of another
    dialogue rejected. Dialogues are taken in seeded twos that swap replies (three in a cycle when the count
    is odd), and training.fit sees a group in one batch: what a reply gains under its own prompt it loses
    under its twin's, so the step teaches which reply fits which prompt, not which replies are likely.
    Dialogues that do not end in a user turn and an assistant reply are skipped and counted."""
    stats = Counter() if stats is None else stats
    usable = [m for m in conversations
              if len(m) >= 2 and m[-1]['role'] == 'assistant' and m[-2]['role'] == 'user']
    stats['sft_unusable'] += len(conversations) - len(usable)
    if len(usable) < 2:
        return []
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    cuts = list(range(0, len(order) - 3, 2)) + [len(order) - 3 if len(order) % 2 else len(order) - 2]
    groups = []
    for a, b in zip(cuts, cuts[1:] + [len(order)]):
        members = order[a:b]
        group = []
        for k, i in enumerate(members):  # each rejects the next one's reply in the cycle: never its own
            chosen, rejected = (usable[i][-1]['content'],
                                usable[members[(k + 1) % len(members)]][-1]['content'])
            if chosen == rejected:
                stats['sft_same_reply'] += 1
                continue
            group.append((usable[i][:-1], chosen, rejected))
        if group:
            groups.append(group)
    return groups


# -----------------------------------------------------------------------------
# rendering: prompt tokens end in <|assistant|>; a reply is its tokens and <|end|>

def render_pair(tok, pair, max_length, max_prompt_length, stats=None):
    """Token ids of one pair, truncated by Lumi's rule:
    1. a prompt longer than max_prompt_length keeps BOS and its LAST max_prompt_length - 1 tokens (the latest
       turn and the <|assistant|> marker matter most);
    2. a reply longer than the room left (max_length - prompt) keeps its FIRST tokens and loses its <|end|>.
    Both are counted in stats. A pair whose replies are equal after truncation teaches nothing: None."""
    stats = Counter() if stats is None else stats
    prompt_messages, chosen, rejected = pair
    prompt, _ = render_chat(tok, prompt_messages, add_generation_prompt=True)
    if len(prompt) > max_prompt_length:
        prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1):]
        stats['prompt_truncated'] += 1
    room = max_length - len(prompt)
    replies = []
    for text in (chosen, rejected):
        ids = encode_turn(tok, text)  # as render_chat encodes an assistant turn
        if len(ids) > room:
            ids = ids[:room]
            stats['reply_truncated'] += 1
        replies.append(ids)
    if replies[0] == replies[1]:
        stats['same_after_truncation'] += 1
        return None
    return {'prompt': prompt, 'chosen': replies[0], 'rejected': replies[1]}


def collate_pairs(pairs):
    """B rendered pairs -> one right-padded batch of 2B rows, chosen first, then rejected.

    idx holds the inputs, targets the next tokens with -1 everywhere but the reply, so that the sum of the
    per-token log-probs over a row is the log-prob of its reply given its prompt. Cached reference log-probs
    (full fine-tuning) come along as 'ref', aligned with targets."""
    rows = [(p['prompt'], p['chosen'], p.get('ref_chosen')) for p in pairs] + \
           [(p['prompt'], p['rejected'], p.get('ref_rejected')) for p in pairs]
    T = max(len(prompt) + len(reply) for prompt, reply, _ in rows) - 1
    idx = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    cached = rows[0][2] is not None
    ref = torch.zeros((len(rows), T), dtype=torch.float32) if cached else None
    for i, (prompt, reply, ref_logps) in enumerate(rows):
        seq = prompt + reply
        idx[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        targets[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(reply)
        if cached:
            ref[i, len(prompt) - 1:len(seq) - 1] = ref_logps
    batch = {'idx': idx, 'targets': targets}
    if cached:
        batch['ref'] = ref
    return batch


class PairBatches(training.EpochBatches):
    """Shuffled passes over the training pairs, one seeded permutation of their groups per epoch (a pair
    alone is a group; SFT-built twins stay together), cut into batches that the ranks take in turn."""

    def __init__(self, pairs, batch_size, seed, rank=0, world_size=1):
        if len(pairs) < batch_size * world_size:
            raise ValueError(f"{len(pairs)} training pairs cannot fill a batch of {batch_size} pairs on "
                             f"{world_size} process(es); lower batch_size or add data")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        groups = {}
        for i, p in enumerate(pairs):
            groups.setdefault(p.get('group', ('pair', i)), []).append(i)
        self.groups = list(groups.values())
        super().__init__(rank, world_size)

    def plan(self, epoch):
        rng = np.random.default_rng(self.seed + epoch)
        order = [i for g in rng.permutation(len(self.groups)) for i in self.groups[g]]
        return [order[b:b + self.batch_size]
                for b in range(0, len(order) - self.batch_size + 1, self.batch_size)]

    def collate(self, index):
        return collate_pairs([self.pairs[i] for i in index])


# -----------------------------------------------------------------------------
# the method

def reply_logps(logits, targets):
    """log p(target | prefix) from training.target_logits, put back at the reply positions: float32 (B, T), 0
    elsewhere.

    The softmax runs LOGP_CHUNK positions at a time: the reference pass, which holds no graph, then never
    makes an (N, V) temporary, and policy and reference go through the very same arithmetic. (split, not
    slicing: a slice's backward writes its gradient into a zero tensor of the whole input, once per chunk.)"""
    mask = targets != -1
    nll = [F.cross_entropy(x.float(), y, reduction='none')
           for x, y in zip(logits.split(LOGP_CHUNK), targets[mask].split(LOGP_CHUNK))]
    flat = -torch.cat(nll) if nll else logits.new_zeros(0, dtype=torch.float32)
    return torch.zeros(targets.shape, dtype=torch.float32, device=logits.device).masked_scatter(mask, flat)


def token_logps(model, idx, targets):
    return reply_logps(training.target_logits(model, idx, targets), targets)


@torch.no_grad()
def reference_logits(model, idx, targets):
    """The reference under LoRA: the same weights with the adapters off, in eval mode, without a graph."""
    raw = training.unwrap(model)
    was_training = raw.training
    raw.eval()
    set_lora_enabled(raw, False)
    try:
        return training.target_logits(raw, idx, targets)
    finally:
        set_lora_enabled(raw, True)
        raw.train(was_training)


@torch.no_grad()
def reply_kl(policy_logits, ref_logits, targets):
    """The exact KL(policy || reference) of the two next-token distributions at each reply position,
    (B, T) with 0 elsewhere: the policy's drift on the data's contexts, summed over the whole vocabulary,
    rather than a one-sample estimate at the data's own tokens (which DPO pushes down on purpose in the
    rejected replies)."""
    kl = []
    for p, q in zip(policy_logits.split(LOGP_CHUNK), ref_logits.split(LOGP_CHUNK)):
        log_p, log_q = F.log_softmax(p.float(), -1), F.log_softmax(q.float(), -1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
    flat = torch.cat(kl) if kl else ref_logits.new_zeros(0, dtype=torch.float32)
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=flat.device)
    return zeros.masked_scatter(targets != -1, flat)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type='sigmoid',
             label_smoothing=0.0):
    """Per-pair losses and implicit rewards from sequence log-probs (each a (B,) tensor).

    h = (log pi(yc) - log pi(yr)) - (log ref(yc) - log ref(yr)), the policy's preference beyond the
    reference's. sigmoid: -log sigmoid(beta h), with label_smoothing e the expected loss when a fraction e
    of labels is flipped (cDPO); ipo: (h - 1 / (2 beta))^2, a squared target that stops pushing once the
    margin is reached; hinge: max(0, 1 - beta h) (SLiC). The reward of a reply is beta * (log pi - log ref).
    Log-probs are sums over the reply's tokens for every loss (TRL averages them per token for IPO; here
    IPO's target margin 1 / (2 beta) is in nats over the whole reply).
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == 'sigmoid':
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == 'ipo':
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == 'hinge':
        losses = F.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be sigmoid, ipo or hinge, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def score_batch(model, batch, cfg):
    """Everything a step and an evaluation need, per pair: the losses (with their graph), and detached
    rewards, sequence log-probs and the sums behind the KL figure.

    kl: with LoRA, the exact per-token KL(policy || reference) over the reply positions (reply_kl).
    With full fine-tuning only the reference's log-probs of the data's tokens are kept, so the figure is
    kl_chosen_k3, Schulman's k3 = r - 1 - log r (r = ref / policy) at the chosen replies' tokens: >= 0, 0
    when nothing moved, but a drift gauge rather than a KL (the tokens are the data's, not the policy's)."""
    idx, targets = batch['idx'], batch['targets']
    B = idx.size(0) // 2
    out, ref_logits = {}, None
    if 'ref' in batch:
        ref = batch['ref']
    else:  # the reference first: its logits wait through the policy's forward, not through its backward
        ref_logits = reference_logits(model, idx, targets)
        ref = reply_logps(ref_logits, targets)
    logits = training.target_logits(model, idx, targets)  # chosen and rejected in one forward pass
    policy = reply_logps(logits, targets)
    n = (targets != -1).float().sum(-1)
    if ref_logits is not None:
        kl = reply_kl(logits.detach(), ref_logits, targets).sum(-1)
        out['kl_sum'], out['kl_tokens'] = kl[:B] + kl[B:], n[:B] + n[B:]
    else:
        mask = (targets[:B] != -1).float()
        log_r = (ref[:B] - policy[:B].detach()) * mask
        k3 = ((log_r.exp() - 1 - log_r) * mask).sum(-1)
        out['kl_chosen_k3_sum'], out['kl_chosen_k3_tokens'] = k3, n[:B]
    pol_seq, ref_seq = policy.sum(-1), ref.sum(-1)
    losses, rc, rr = dpo_loss(pol_seq[:B], pol_seq[B:], ref_seq[:B], ref_seq[B:], cfg.beta, cfg.loss_type,
                              cfg.label_smoothing)
    return dict(out, loss=losses, rewards_chosen=rc, rewards_rejected=rr,
                logps_chosen=pol_seq[:B].detach(), logps_rejected=pol_seq[B:].detach())


def summarize(scores, prefix=''):
    """Means over pairs (the KL figure per reply token); a tie in reward counts half toward accuracy (no
    preference is a coin flip), so an untouched policy scores 50%, not 0%."""
    rc, rr = scores['rewards_chosen'], scores['rewards_rejected']
    out = {'loss': scores['loss'].detach().mean(), 'rewards_chosen': rc.mean(), 'rewards_rejected': rr.mean(),
           'reward_margin': (rc - rr).mean(),
           'reward_accuracy': ((rc > rr).float() + 0.5 * (rc == rr).float()).mean(),
           'logps_chosen': scores['logps_chosen'].mean(), 'logps_rejected': scores['logps_rejected'].mean()}
    for name in ('kl', 'kl_chosen_k3'):
        if name + '_sum' in scores:
            out[name] = scores[name + '_sum'].sum() / scores[name + '_tokens'].sum().clamp(min=1)
    return {prefix + k: float(v) for k, v in out.items()}


@torch.no_grad()
def cache_reference(model, pairs, batch_size, device, dtype):
    """Full fine-tuning: the starting model's per-token log-probs of every reply, computed once."""
    model.eval()
    for i in tqdm(range(0, len(pairs), batch_size), desc='reference log-probs',
                  disable=len(pairs) <= batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate_pairs(chunk)
        with lumi.autocast(device, dtype):
            logps = token_logps(model, batch['idx'].to(device), batch['targets'].to(device)).float().cpu()
        for j, p in enumerate(chunk):
            start = len(p['prompt']) - 1
            p['ref_chosen'] = logps[j, start:start + len(p['chosen'])].clone()
            p['ref_rejected'] = logps[len(chunk) + j, start:start + len(p['rejected'])].clone()
    model.train()


# -----------------------------------------------------------------------------
# the starting model

def load_start(path, device):
    """(model, tokenizer, checkpoint path) from an SFT checkpoint file or an SFT out_dir (its merged.pt),
    with any adapters folded in, so that DPO's own adapters sit on the SFT model exactly as it answers."""
    if not path:
        raise ValueError("init_from is required: the SFT checkpoint to start from "
                         "(a .pt file or an SFT out_dir)")
    model, tok, info = load_model(path, device, adapters=False, train=True)
    if info['kind'] not in ('sft', 'dpo'):
        lumi.log(f"note: {info['path']} is a '{info['kind']}' checkpoint, not an SFT model; DPO works best "
                 f"on one that already follows the chat template")
    return model, tok, info['path']


# -----------------------------------------------------------------------------
# data: pairs from every source, split before training, rendered

def prepare_pairs(cfg, tok):
    """(train, val) rendered pairs, each tagged with its source, held-out split made per source."""
    stats, sources = Counter(), []
    if cfg.data:
        sources.append(('pref', load_pairs(cfg.data, cfg.data_format, stats), True))
    if cfg.sft_data:
        specs = [cfg.sft_data] if isinstance(cfg.sft_data, str) else list(cfg.sft_data)
        dialogues = [m for spec in specs for m in load_conversations(spec, cfg.sft_format, stats,
                                                                                  TEMPLATE_VARS)]
        unique = list({json.dumps(m, sort_keys=True): m for m in dialogues}.values())  # a repeat would leak
        stats['sft_duplicates'] += len(dialogues) - len(unique)                          # across the split
        dialogues = unique
        random.Random(cfg.seed).shuffle(dialogues)
        if cfg.max_sft_pairs:
            dialogues = dialogues[:cfg.max_sft_pairs]
        sources.append(('sft', dialogues, False))
    if not sources:
        raise ValueError("no preference data: set data (pairs) and/or sft_data "
                         "(SFT sources to build pairs from)")
    train, val, n_groups = [], [], 0
    for name, items, are_pairs in sources:
        items = list(items)
        if are_pairs:
            random.Random(cfg.seed).shuffle(items)
        n_val = min(len(items) - 1, max(1, round(cfg.val_frac * len(items)))) if cfg.val_frac > 0 else 0
        held, kept = items[:n_val], items[n_val:]
        if are_pairs:
            held, kept = [[p] for p in held], [[p] for p in kept]
        else:  # split the dialogues first, so no held-out reply is ever a training pair's rejected one
            held, kept = (pairs_from_conversations(held, cfg.seed, stats),
                          pairs_from_conversations(kept, cfg.seed, stats))
        n_train, n_val = len(train), len(val)
        for split, out in ((kept, train), (held, val)):
            for group in split:
                n_groups += 1
                for pair in group:
                    r = render_pair(tok, pair, cfg.max_length, cfg.max_prompt_length, stats)
                    if r is not None:
                        out.append(dict(r, source=name, group=n_groups))
        lumi.log(f"{name}: {len(train) - n_train} training and {len(val) - n_val} held-out pairs")
    lumi.log("data: " + ', '.join(f"{k} {v}" for k, v in sorted(stats.items())
                                  if isinstance(v, (int, float))))
    if not train:
        raise ValueError("no training pairs left after parsing and truncation")
    return train, val, stats


def val_batches(val, cfg):
    """Fixed held-out batches, one source per batch so that each source can be scored on its own."""
    batches = []
    for name in sorted({p['source'] for p in val}):
        group = [p for p in val if p['source'] == name]
        batches += [(name, collate_pairs(group[i:i + cfg.batch_size]))
                    for i in range(0, len(group), cfg.batch_size)]
    return batches[:cfg.eval_iters] if cfg.eval_iters else batches


# -----------------------------------------------------------------------------



def main(argv=None):
    cfg = lumi.load_config(KEYS, argv, shares_with=())
    curves.check_trackers(cfg.log)
    device, rank, _, world = lumi.setup_distributed(cfg.device)
    dtype = lumi.resolve_dtype(cfg.dtype, device)
    lumi.seed_everything(cfg.seed)
    t0 = time.time()

    model, tok, init_path = load_start(cfg.init_from, device)
    cfg.max_length = cfg.max_length or model.cfg.block_size
    cfg.max_prompt_length = cfg.max_prompt_length or cfg.max_length // 2
    if cfg.max_length > model.cfg.block_size:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's block_size {model.cfg.block_size}")
    if not 1 < cfg.max_prompt_length < cfg.max_length:
        raise ValueError(f"max_prompt_length must be in 2..max_length-1, got {cfg.max_prompt_length}")
    if cfg.save not in ('adapter', 'merged', 'both'):
        raise ValueError(f"save must be adapter, merged or both, got {cfg.save!r}")
    # fail early
    dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), cfg.beta, cfg.loss_type)

    train, val, data_stats = prepare_pairs(cfg, tok)
    if rank == 0:  # what was read, skipped and cut, next to the metrics
        lumi.write_json(os.path.join(cfg.out_dir, 'data_stats.json'),
                        dict(data_stats, train_pairs=len(train), val_pairs=len(val)))
    if cfg.lora_r > 0:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
    else:
        cache_reference(model, train + val, cfg.batch_size, device, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    how = 'LoRA r=%d, reference = adapters off' % cfg.lora_r if cfg.lora_r else 'full, reference cached'
    lumi.log(f"policy: {model.num_params() / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable ({how})")

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    if not cfg.max_iters:  # epochs set the length; max_minutes, if given, can only shorten it
        cfg.max_iters = max(1, math.ceil(cfg.epochs * len(train) / per_step))
    passes = training.passes_warning(cfg.max_iters * per_step, len(train), 'pairs', 'the DPO set',
                                     "lower max_iters or epochs, or add pairs")
    if passes:
        lumi.log(f"warning: {passes}" + (" at most (max_minutes may stop it sooner)" if cfg.max_minutes
                                         else ''))
    held_out = val_batches(val, cfg)

    def loss_fn(m, batch):
        scores = score_batch(m, batch, cfg)
        stats = summarize(scores)
        del stats['loss']  # fit logs the loss itself
        stats['tokens'] = int((batch['idx'] != PAD_ID).sum())
        return scores['loss'].mean(), stats

    def evaluate(m):
        if not held_out:
            return {}
        per_source = {}
        for name, batch in held_out:
            s = score_batch(m, {k: v.to(device) for k, v in batch.items()}, cfg)
            per_source.setdefault(name, []).append(s)
        cat = lambda groups: {k: torch.cat([g[k] for g in groups]) for k in groups[0]}
        out = summarize(cat(sum(per_source.values(), [])), 'val_')
        if len(per_source) > 1:
            for name, groups in per_source.items():
                s = summarize(cat(groups))
                out[f'val_reward_accuracy_{name}'] = s['reward_accuracy']
                out[f'val_reward_margin_{name}'] = s['reward_margin']
        return out

    meta = checkpoint_meta(model, tok, 'dpo', parent=init_path)
    batches = PairBatches(train, cfg.batch_size, cfg.seed, rank, world)
    training.fit(cfg, model, batches, loss_fn, evaluate, meta=meta)

    if rank == 0:
        save_result(cfg, model, tok, init_path)
        report(cfg, time.time() - t0)
    return cfg.out_dir


def save_result(cfg, model, tok, init_path):
    """adapter.pt (sft.py's format: the adapters, their config, the base's path and SHA256) and merged.pt,
    a standalone checkpoint of kind 'dpo' for sample.py and eval.py."""
    if cfg.lora_r > 0 and cfg.save in ('adapter', 'both'):
        save_checkpoint(os.path.join(cfg.out_dir, 'adapter.pt'), adapter_state(model, init_path, tok))
    if cfg.save in ('merged', 'both') or cfg.lora_r == 0:
        save_merged(os.path.join(cfg.out_dir, 'merged.pt'), model, tok, 'dpo', parent=init_path,
                    parent_sha256=lumi.sha256_file(init_path),
                    dpo=dict(loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing))
    saved = [n for n in ('adapter.pt', 'merged.pt') if os.path.exists(os.path.join(cfg.out_dir, n))]
    lumi.log(f"wrote {' and '.join(saved)} in {cfg.out_dir}")


def report(cfg, seconds):
    """The held-out figures at the first and the last evaluation, and the time taken."""
    path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    evals = [r for r in lumi.read_jsonl(path) if 'val_reward_accuracy' in r] if os.path.exists(path) else []
    if not evals:
        lumi.log(f"done in {seconds / 60:.1f} min (no held-out evaluation)")
        return
    first, last = evals[0], evals[-1]
    keys = [k for k in last
            if k.startswith(('val_reward_accuracy', 'val_reward_margin', 'val_kl', 'val_loss'))]
    for k in keys:
        lumi.log(f"{k:32s} step {first['step']}: {first.get(k, float('nan')):8.4f}   "
                 f"step {last['step']}: {last[k]:8.4f}")
    lumi.log(f"done in {seconds / 60:.1f} min")


if __name__ == '__main__':
    lumi.cli(main, KEYS)
