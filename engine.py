"""
The engine that runs a model over token ids. Generation: sampling filters as small pure functions (CTRL's
repetition penalty, OpenAI's frequency and presence penalties, temperature, top-k, nucleus), one left-padded
batch of prompts prefilled into model.KVCache and decoded one token at a time by model.decode_step (rows that
finish leave the batch; a full window slides), stop strings matched in streamed text, and the chat prompt that
fits a conversation into the window. sample.py (the interactive prompt), serve.py (the HTTP API), eval.py (the
smoke test) and sft.py (the format check) all generate through it, so each sees what users will. Scoring: the
summed log-probabilities of given targets, many requests per forward pass (eval.py's choice tasks and
perplexity). Also the sampling keys that sample.py and serve.py take, and the Sampling built from them.

Deliberately left out: loading a model (checkpoint.load_model), beam search, speculative decoding, logprobs
of generated tokens, CUDA graphs (no GPU was lent to measure them), and continuous batching (requests that
arrive separately never share a batch; one request's prompts do).
"""
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lumi import autocast
from model import KVCache, decode_step, decode_weights
from tokenizer import BOS_ID, EOS_ID, PAD_ID, render_chat

# -----------------------------------------------------------------------------
# sampling filters: each takes logits (B, V) and returns new ones

def apply_repetition_penalty(logits, counts, penalty):
    """CTRL's penalty (Keskar et al. 2019): a token already in the context (counts > 0) has its logit divided
    by penalty if positive, multiplied if negative, so it always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def apply_frequency_penalty(logits, made, frequency, presence):
    """OpenAI's frequency and presence penalties: a token's logit less `frequency` times the number of times
    this reply has made it so far, and less `presence` once it has made it at all. Only the reply's own tokens
    count, not the prompt's, so a long chat history does not weigh on common words. CTRL's penalty is the same
    for a token seen once or fifty times, so it let a run of one token through ('200000000000...', a greedy
    reply after SFT); this one grows with every repeat until another token wins."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    made = made.to(logits.dtype)
    return logits - frequency * made - presence * (made > 0).to(logits.dtype)


def unpenalized(counts, stop_ids):
    """The repetition penalty never falls on a stop token. A chat prompt holds <|end|> after every turn, and
    penalising it made ending a reply less likely with each turn of history: SFT's closing check saw 82 % of
    sampled replies end with <|end|> at penalty 1.3, and 100 % with the stop tokens left out of the counts
    (the same model and prompts). A stop token ends its row, so it needs no counting afterwards either."""
    ids = [t for t in stop_ids if 0 <= t < counts.size(-1)]
    if ids:
        counts[:, ids] = 0


def apply_temperature(logits, temperature):
    return logits / temperature


def apply_top_k(logits, k):
    """Keep each row's k largest logits (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float('-inf'))


def apply_top_p(logits, p):
    """Nucleus filtering (Holtzman et al. 2019): keep the fewest most likely tokens whose probabilities sum
    to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # the tokens ranked above this one already reach p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float('-inf'))


# Below this temperature a draw is the argmax in all but name (logits 1e-5 apart differ by e^10 in
# probability), and a far smaller one overflows logits / temperature to inf, whose softmax is NaN: sample
# those as greedy.
GREEDY_BELOW = 1e-6


def sample_next(logits, counts, made, params, generator=None):
    """The next token of each row: argmax at temperature 0, else a draw from the filtered distribution.
    counts: each token's uses in the context (prompt and reply, stop tokens left out); made: in the reply
    alone; either may be None while its penalty is off."""
    logits = apply_repetition_penalty(logits.float(), counts, params.repetition_penalty)
    logits = apply_frequency_penalty(logits, made, params.frequency_penalty, params.presence_penalty)
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = apply_top_p(apply_top_k(apply_temperature(logits, params.temperature), params.top_k),
                         params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# the sampling keys, which sample.py and serve.py take (KEY_FILES), and the Sampling built from them
max_new_tokens = 256        # [1, inf) new tokens per reply at most
temperature = 0.8           # [0, 100] 0 is greedy
top_k = 0                   # [0, inf) keep the k likeliest tokens; 0 is off
top_p = 0.95                # (0, 1] nucleus threshold; 1 is off
repetition_penalty = 1.0    # [0.01, 100] 1 is off; 1.1-1.3 curbs the loops small models fall into
                            # (CTRL's: once per token seen)
frequency_penalty = 0.0     # [-2, 2] 0 is off; OpenAI's: logit minus this x the token's uses so far
                            # in the reply
presence_penalty = 0.0      # [-2, 2] 0 is off; OpenAI's: logit minus this once the reply has used the token
stop = ()                   # stop strings: --stop="['\n\n']"
ignore_eos = False          # generate past the end tokens (benchmarks)
seed = 1337                 # [0, inf) sampling seed


@dataclass
class Sampling:
    """How one generation samples: the keys above but the seed (a request brings its own)."""
    max_new_tokens: int = max_new_tokens
    temperature: float = temperature
    top_k: int = top_k
    top_p: float = top_p
    repetition_penalty: float = repetition_penalty
    stop: tuple = stop
    ignore_eos: bool = ignore_eos
    frequency_penalty: float = frequency_penalty
    presence_penalty: float = presence_penalty

    @classmethod
    def from_config(cls, cfg):
        """The Sampling that a config holding every field by name asks for (sample.py's keys, which serve.py
        shares)."""
        return cls(**{f.name: tuple(getattr(cfg, f.name)) if f.name == 'stop' else getattr(cfg, f.name)
                      for f in fields(cls)})


def make_generator(seed, device):
    """A seeded torch.Generator for one generation; seed None draws a fresh one."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), 'little') >> 1 if seed is None else seed)
    return g


# -----------------------------------------------------------------------------
# the engine: token ids in, token ids out

def model_device(model):
    return next(model.parameters()).device


def _last_logits(model, idx, cache=None):
    # only the last position's logits are needed: skip the LM head over the rest of the prefill
    return model.lm_head(model(idx, cache=cache, return_hidden=True)[:, -1])


@torch.no_grad()
def generate_ids(model, prompts, params, stop_ids=(), generator=None, finished=None):
    """Continue each prompt (a list of token ids), yielding after every step (rows, tokens): the index of each
    row still generating and the token it just got.

    The prompts form one left-padded batch with one KV cache: a single forward pass over all prompt tokens
    (prefill), then one model.decode_step per step over the newest token alone (forward() where decode_step
    does not apply: LoRA layers, training mode). A row ends after a token in stop_ids, after
    params.max_new_tokens, or when the caller adds its index to `finished` (a stop string, found in text), and
    leaves the batch. A prompt longer than the window keeps its end; when the cache fills, the newest half of
    the window is prefilled again (a context shift), so generation runs on past block_size. The model runs in
    its weights' dtype (load_model casts them), and so does the cache. A step allocates no more than its
    activations, and waits on the device once: for the tokens it yields.
    """
    device, cfg, dtype = model_device(model), model.cfg, next(model.parameters()).dtype
    generator = generator if generator is not None else make_generator(None, device)
    finished = set() if finished is None else finished
    prompts = [list(p[-cfg.block_size:]) or [BOS_ID] for p in prompts]
    width = max(len(p) for p in prompts)
    # each row's context so far, left-padded: what a context shift prefills again
    seqs = [[PAD_ID] * (width - len(p)) + p for p in prompts]
    pads, rows = [width - len(p) for p in prompts], list(range(len(prompts)))
    # the penalties' counts are kept only when a penalty is on: two scatters a step saved otherwise
    penalized = (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                 or params.presence_penalty != 0.0)
    counts = made = None
    if penalized:
        seq, pad = torch.tensor(seqs, device=device), torch.tensor(pads, device=device)
        counts = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.int32, device=device)
        counts.scatter_add_(1, seq, (torch.arange(width, device=device)[None] >= pad[:, None]).int())
        unpenalized(counts, stop_ids)
        made = torch.zeros_like(counts)
        one = torch.ones(len(prompts), 1, dtype=torch.int32, device=device)
    weights = decode_weights(model)  # None: forward() decodes

    def prefill(seqs, pads, left):
        seq, pad = torch.tensor(seqs, device=device), torch.tensor(pads, device=device)
        cache = KVCache(cfg, seq.size(0), min(cfg.block_size, seq.size(1) + left), device, dtype,
                        pad=pad if any(pads) else None)
        return cache, _last_logits(model, seq, cache)

    cache, logits = prefill(seqs, pads, params.max_new_tokens)
    for step in range(params.max_new_tokens):
        token = sample_next(logits, counts, made, params, generator)
        if penalized:
            counts.scatter_add_(1, token[:, None], one)
            made.scatter_add_(1, token[:, None], one)
        tokens = token.tolist()
        yield list(rows), tokens
        left = params.max_new_tokens - step - 1
        keep = [i for i, (r, t) in enumerate(zip(rows, tokens)) if t not in stop_ids and r not in finished]
        if not keep or not left:
            return
        for s, t in zip(seqs, tokens):
            s.append(t)
        if len(keep) < len(rows):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            rows, seqs, pads = [rows[i] for i in keep], [seqs[i] for i in keep], [pads[i] for i in keep]
            token = token[index]
            if penalized:
                counts, made, one = counts[index], made[index], one[:len(keep)]
            cache.reorder(index)
        if cache.pos == cache.max_len:  # the window is full: slide it, keeping its newest half
            dropped = len(seqs[0]) - cfg.block_size // 2
            seqs, pads = [s[dropped:] for s in seqs], [max(0, p - dropped) for p in pads]
            cache, logits = prefill(seqs, pads, left)
        elif weights is not None:
            logits = decode_step(model, weights, token, cache)
        else:
            logits = _last_logits(model, token[:, None], cache)


# -----------------------------------------------------------------------------
# text: streaming deltas with stop strings

class StopMatcher:
    """Finds stop strings in text that arrives a piece at a time, in time linear in the text: one
    Knuth-Morris-Pratt automaton per stop string, each fed every character once. Its state is how much of each
    stop string the text so far ends with, which is also how much text must be held back."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fail = [self._failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)

    @staticmethod
    def _failure(s):
        # fail[k]: the longest proper prefix of s[:k + 1] that is also its suffix
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            k += s[i] == s[k]
            fail[i] = k
        return fail

    def feed(self, text, offset):
        """Advance over text, which starts at offset in the whole; the start of the earliest stop string that
        text completes, or None."""
        first = None
        for j, (s, fail) in enumerate(zip(self.stops, self.fail)):
            k = self.state[j]
            for i, c in enumerate(text):
                while k and c != s[k]:
                    k = fail[k - 1]
                if c == s[k]:
                    k += 1
                if k == len(s):
                    start = offset + i + 1 - k
                    first = start if first is None else min(first, start)
                    k = fail[k - 1]
            self.state[j] = k
        return first

    def held(self):
        """How many characters at the end of the text could still become a stop string."""
        return max(self.state, default=0)


class TextStream:
    """Turns one row's new tokens into text deltas as they arrive.

    SentencePiece drops the leading space of the first piece it decodes, and a byte-fallback token may hold
    part of a UTF-8 character, so a delta is the difference between decoding a short tail of tokens with and
    without the newest ones, taken only once it ends in a whole character (the offsets that Hugging Face's
    text-generation-inference uses). `context`, the prompt's last token, makes a completion's first piece keep
    its space. Text that could still grow into a stop string is held back until it cannot.
    """

    def __init__(self, tok, stop=(), context=()):
        self.tok, self.stops = tok, StopMatcher(stop)
        self.ids = list(context)
        self.prefix, self.read = 0, len(self.ids)
        self.text, self.sent = '', 0  # all text so far, and how much of it went out
        self.tokens, self.stopped = 0, False

    def push(self, token):
        """Add one token; returns the text that may now go out."""
        self.tokens += 1
        if self.stopped:
            return ''
        self.ids.append(token)
        if self._decode(final=False):
            return self._send(len(self.text))
        return self._send(len(self.text) - self.stops.held())

    def flush(self):
        """The rest of the text, held-back tail and any half character included (the row has ended)."""
        if not self.stopped:
            self._decode(final=True)
        return self._send(len(self.text))

    def _decode(self, final):
        """Move newly whole text from the tokens to self.text; True if it completed a stop string."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith('\ufffd') and not final):
            return False
        new, offset = after[len(before):], len(self.text)
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        cut = self.stops.feed(new, offset)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
        return self.stopped

    def _send(self, end):
        delta = self.text[self.sent:end] if end > self.sent else ''
        self.sent = max(self.sent, end)
        return delta


def stop_ids_for(tok, chat, ignore_eos=False):
    """The tokens that end a reply: EOS and BOS (a new document) always, in chat also <|end|> and any role
    marker (a reply never contains one)."""
    if ignore_eos:
        return set()
    return {EOS_ID, BOS_ID} | ({tok.end_id, *tok.role_id.values()} if chat else set())


def stream_text(model, tok, prompts, params, chat=False, generator=None):
    """Generate for a batch of prompts (token ids), yielding (row, delta, finish_reason, tokens) as text
    arrives; tokens counts the row's new tokens so far. finish_reason is None until a row's last event:
    'stop' (an end token or a stop string) or 'length'."""
    streams = [TextStream(tok, params.stop, context=() if chat else p[-1:]) for p in prompts]
    finished, stop_ids = set(), stop_ids_for(tok, chat, params.ignore_eos)
    for rows, tokens in generate_ids(model, prompts, params, stop_ids, generator, finished):
        for r, t in zip(rows, tokens):
            s = streams[r]
            if t in stop_ids:
                s.tokens += 1
                yield r, s.flush(), 'stop', s.tokens
                continue
            delta = s.push(t)
            if s.stopped:
                finished.add(r)
                yield r, delta, 'stop', s.tokens
            elif s.tokens == params.max_new_tokens:
                yield r, delta + s.flush(), 'length', s.tokens
            elif delta:
                yield r, delta, None, s.tokens


def fit_history(tok, messages, budget):
    """The chat prompt for messages in at most budget tokens: the oldest exchanges are dropped first, the
    system message stays. If the newest message alone is too long, its prompt keeps its last budget tokens."""
    return fit_turns(tok, messages, budget)[0]


def fit_turns(tok, messages, budget):
    """fit_history's prompt and how many messages (after the system message) it dropped."""
    system = messages[:1] if messages and messages[0]['role'] == 'system' else []
    turns = messages[len(system):]
    starts = [i for i, m in enumerate(turns) if m['role'] == 'user'] or [0]
    for start in starts:
        ids, _ = render_chat(tok, system + turns[start:], add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, start
    return ids[-budget:], start


def fit_conversation(tok, messages, window, max_new_tokens):
    """The one rule for a conversation longer than the model's context, which the terminal chat (sample.py)
    and the chat page (serve.py's truncation='auto') both follow: room for the reply (max_new_tokens, at most
    half the window), the rest for the newest turns that fit (fit_turns). Returns (prompt ids, messages
    dropped)."""
    room = min(max_new_tokens, window // 2)
    return fit_turns(tok, messages, window - room)


# -----------------------------------------------------------------------------
# what a reply looks like: loops and repetition

def distinct_ngrams(sequences, n):
    """Unique n-grams over all n-grams of some token sequences (none spans two of them): near 0 for a loop."""
    grams = [tuple(ids[i:i + n]) for ids in sequences for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def one_token_loop(ids):
    """A reply that is mostly one token repeated ('.......', 'the the the'): one id is at least half of 4+."""
    return len(ids) >= 4 and max(ids.count(i) for i in set(ids)) * 2 >= len(ids)


# -----------------------------------------------------------------------------
# scoring: sums of log-probabilities of target tokens, many requests per forward pass

@torch.no_grad()
def target_logprobs(model, requests, device='cpu', dtype='float32', batch_tokens=2048, dedupe=True,
                    desc='score'):
    """requests: (input_ids, pos, targets) triples; the log-probability of targets[j] as the token after
    input_ids[:pos + j + 1]. Returns a float64 array of the sum over each request's targets.

    Requests with identical inputs share one row (the one-token answers ' yes' and ' no' to the same
    passage cost one forward pass). Rows are sorted by length and right-padded, which a causal model
    never sees. The LM head runs only where a target is scored, so a 1,000-token passage costs 1-2
    vocab-sized rows of logits, not 1,000.
    """
    rows, members = [], []  # a row's input, and the requests it answers
    seen = {}
    for r, (inp, pos, tgt) in enumerate(requests):
        inp = np.asarray(inp, dtype=np.int64)
        if pos < 0 or pos + len(tgt) > len(inp) or len(inp) == 0:
            raise ValueError(f"request {r}: {len(tgt)} targets at {pos} do not fit {len(inp)} input tokens")
        key = inp.tobytes() if dedupe else r
        if key not in seen:
            seen[key] = len(rows)
            rows.append(inp)
            members.append([])
        members[seen[key]].append(r)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches, i = [], 0
    while i < len(order):  # as many rows as fit batch_tokens at the batch's (longest, first) length
        n = max(1, batch_tokens // len(rows[order[i]]))
        batches.append(order[i:i + n])
        i += n
    sums = torch.zeros(len(requests), dtype=torch.float64)
    model.eval()
    for batch in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=len(batches) < 4):
        T = len(rows[batch[0]])
        idx = np.full((len(batch), T), PAD_ID, dtype=np.int64)
        b_i, p_i, t_i, r_i = [], [], [], []
        for b, row in enumerate(batch):
            idx[b, :len(rows[row])] = rows[row]
            for r in members[row]:
                _, pos, tgt = requests[r]
                n = len(tgt)
                b_i.append(np.full(n, b))
                p_i.append(np.arange(pos, pos + n))
                t_i.append(np.asarray(tgt, dtype=np.int64))
                r_i.append(np.full(n, r))
        b_i, p_i, t_i, r_i = (torch.from_numpy(np.concatenate(a)).to(device) for a in (b_i, p_i, t_i, r_i))
        with autocast(device, dtype):
            hidden = model(torch.from_numpy(idx).to(device), return_hidden=True)
        for s in range(0, len(t_i), 1024):  # chunks keep the logits at 1024 x vocab
            sl = slice(s, s + 1024)
            with autocast(device, dtype):
                logits = model.lm_head(hidden[b_i[sl], p_i[sl]])
            logp = F.log_softmax(logits.float(), dim=-1).gather(1, t_i[sl, None]).squeeze(1)
            sums.index_add_(0, r_i[sl].cpu(), logp.cpu().double())  # MPS has no float64
    return sums.numpy()

