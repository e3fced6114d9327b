"""
Sampling and serving, stage 100: what users touch last and most.

    python sample.py                                      # newest checkpoint under out/, interactive prompt
    python sample.py --ckpt=out/sft --prompt="Hello"      # print one completion and exit
    python sample.py --serve --ckpt=out/sft --port=8000   # OpenAI-compatible HTTP API and chat page (serve.py)

Read top to bottom: loading (a checkpoint, or a base + LoRA adapter pair), the sampling filters as small
pure functions, the generation engine (one prefill of a left-padded batch into model.KVCache, then one token
at a time), text streaming with stop strings, the interactive prompt, main(). The HTTP server is serve.py,
which main() hands the generation to.

Deliberately left out: beam search, speculative decoding, logprobs, and continuous batching (requests that
arrive separately never share a batch; one request's prompts do).
"""
import glob
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

import lumi
from lumi import BOS_ID, EOS_ID, PAD_ID
from model import KVCache, merge_lora

# -----------------------------------------------------------------------------
# defaults: override with a config file and/or --key=value
ckpt = ''                  # checkpoint file or directory; '' = the newest .pt under out_root/*/
adapter = ''               # a LoRA adapter file (sft.py) applied on top of ckpt, or alone (its base_path)
tokenizer = ''             # a tokenizer.model or data dir: refuse a checkpoint built with another tokenizer
out_root = 'out'           # where ckpt='' looks for the newest checkpoint
device = 'auto'            # auto: cuda when present, else cpu
dtype = 'auto'             # the weights' dtype: auto is lumi.resolve_dtype's (bf16 on CUDA and native-bf16 CPUs); or bfloat16 | float32
seed = 1337                # sampling seed
mode = 'auto'              # auto: chat for sft/dpo checkpoints and adapters, completion otherwise
system = ''                # chat: the system message
prompt = ''                # print one completion of this prompt and exit
max_new_tokens = 256       # new tokens per reply at most
temperature = 0.8          # 0 is greedy
top_k = 0                  # 0 is off
top_p = 0.95               # 1 is off
repetition_penalty = 1.0   # 1 is off; 1.1-1.3 curbs the loops small models fall into
stop = ()                  # stop strings: --stop="['\n\n']"
ignore_eos = False         # generate past the end tokens (benchmarks)
serve = False              # serve the OpenAI-compatible HTTP API and chat page (serve.py)
host = '127.0.0.1'         # the address to serve on; 0.0.0.0 for every interface
port = 8000                # the port to serve on; 0 picks a free one
model_name = ''            # the id the server answers to; '' is lumi-<kind>
max_tokens_limit = 4096    # the most new tokens one request may ask for
max_batch = 8              # the most sequences (prompts x n) one request may ask for
max_body_bytes = 1 << 20   # a larger request body gets 413
max_json_depth = 32        # the deepest nesting of arrays and objects a request body may have
max_stop_chars = 256       # the longest stop string a request may give (at most 4 of them)
header_timeout = 10.0      # seconds for a request's line and headers, idle keep-alive included (then 408)
body_timeout = 30.0        # seconds to read a request's body, and for each write of the answer (then 408)
workers = 16               # threads serving connections: a connection holds one while it is open
queue_size = 32            # connections waiting for a worker; one more is answered 503
generation_wait = 120.0    # seconds a request waits for the generation in front of it (then 503)
cors_origin = ''           # a web origin besides the server's own that may call the API from a browser ('*': any)
DEFAULTS = lumi.config_defaults(globals())

CHAT_KINDS = ('sft', 'dpo')

# -----------------------------------------------------------------------------
# loading

def newest_checkpoint(root):
    """The most recently written .pt in root/ or root/*/: whatever was trained last, checkpoint or adapter."""
    found = glob.glob(os.path.join(root, '*.pt')) + glob.glob(os.path.join(root, '*', '*.pt'))
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root}/: train one (train.py, sft.py) or pass --ckpt=PATH")
    return max(found, key=os.path.getmtime)


def resolve_checkpoint(path):
    """A file as is. A directory gives merged.pt if it has one (the standalone model sft.py and dpo.py leave
    for sampling), else its newest step checkpoint ckpt_<step>.pt (where training ended), else its newest .pt.
    best.pt is one --ckpt=DIR/best.pt away."""
    if not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, 'merged.pt')):
        return os.path.join(path, 'merged.pt')
    found = lumi.find_checkpoint(path) or max(glob.glob(os.path.join(path, '*.pt')), key=os.path.getmtime,
                                              default=None)
    if found is None:
        raise FileNotFoundError(f"no checkpoint (*.pt) in {path}")
    return found


def is_adapter(ckpt):
    return ckpt.get('kind') == 'adapter' or ('lora_state' in ckpt and 'model' not in ckpt)


def load_model(ckpt_path, adapter_path='', tokenizer_path='', device='cpu', dtype='float32'):
    """The model in eval mode on device, its tokenizer, and what it is: info has kind, path, adapter.

    ckpt_path may also be an adapter alone (its base is the one it names). LoRA adapters, in the checkpoint or
    in an adapter file, are merged into the base weights: the same outputs at the cost of a plain model. The
    weights are cast to dtype once (autocast would cast every matrix again at every decoding step, which costs
    more than it saves when each step reads each weight once); the RoPE tables stay float32.
    Refuses a --tokenizer whose SHA256 differs from the checkpoint's (and, through sft.load_adapter, an adapter
    made for another base or tokenizer)."""
    if dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    ckpt_path = resolve_checkpoint(ckpt_path)
    ckpt = lumi.load_checkpoint(ckpt_path)
    if is_adapter(ckpt):
        if adapter_path:
            raise ValueError(f"{ckpt_path} is a LoRA adapter; pass its base as --ckpt")
        if not ckpt.get('base_path'):
            raise ValueError(f"adapter {ckpt_path} does not name its base; pass the base as --ckpt")
        ckpt_path, adapter_path = ckpt['base_path'], ckpt_path
        ckpt = lumi.load_checkpoint(resolve_checkpoint(ckpt_path))
    for key in ('model', 'model_args', 'tokenizer', 'tokenizer_sha256'):
        if key not in ckpt:
            raise lumi.LumiError(f"{ckpt_path} is not a Lumi checkpoint: it has no '{key}'")
    tok = lumi.tokenizer_from_checkpoint(ckpt)  # refuses bytes that do not match the stored hash
    if tokenizer_path:
        if os.path.isdir(tokenizer_path):  # a data dir from data.py
            tokenizer_path = os.path.join(tokenizer_path, 'tokenizer', 'tokenizer.model')
        lumi.check_tokenizer(lumi.Tokenizer.load(tokenizer_path).sha256, tok.sha256, f"--tokenizer {tokenizer_path}")
    kind = ckpt.get('kind', 'pretrain')
    if adapter_path:
        import sft  # the adapter format is sft.py's: one loader, there
        model, _, _ = sft.load_adapter(ckpt['path'], adapter_path)
        kind = 'sft'  # an adapter pair is a fine-tuned model: chat
    else:
        model = lumi.model_from_checkpoint(ckpt)
    if getattr(model, 'lora_config', None):
        merge_lora(model)
    model.requires_grad_(False)
    for p in model.parameters():  # a tied LM head is the embedding's Parameter: cast once, still tied
        p.data = p.data.to(getattr(torch, dtype))
    info = dict(kind=kind, path=ckpt['path'], adapter=adapter_path, created=int(os.path.getmtime(ckpt['path'])))
    return model.eval().to(device), tok, info


# -----------------------------------------------------------------------------
# sampling filters: each takes logits (B, V) and returns new ones

def apply_repetition_penalty(logits, counts, penalty):
    """CTRL's penalty (Keskar et al. 2019): a token already in the context (counts > 0) has its logit divided
    by penalty if positive, multiplied if negative, so it always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


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


# Below this temperature a draw is the argmax in all but name (logits 1e-5 apart differ by e^10 in probability),
# and a far smaller one overflows logits / temperature to inf, whose softmax is NaN: sample those as greedy.
GREEDY_BELOW = 1e-6


def sample_next(logits, counts, params, generator=None):
    """The next token of each row: argmax at temperature 0, else a draw from the filtered distribution."""
    logits = apply_repetition_penalty(logits.float(), counts, params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = apply_top_p(apply_top_k(apply_temperature(logits, params.temperature), params.top_k), params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    stop: tuple = ()            # stop strings
    ignore_eos: bool = False


def make_generator(seed, device):
    """A seeded torch.Generator for one generation; seed None draws a fresh one."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), 'little') >> 1 if seed is None else seed)
    return g


# -----------------------------------------------------------------------------
# the engine: token ids in, token ids out

def _device(model):
    return next(model.parameters()).device


def _last_logits(model, idx, cache=None):
    # only the last position's logits are needed: skip the LM head over the rest of the prefill
    return model.lm_head(model(idx, cache=cache, return_hidden=True)[:, -1])


@torch.no_grad()
def generate_ids(model, prompts, params, stop_ids=(), generator=None, finished=None):
    """Continue each prompt (a list of token ids), yielding after every step (rows, tokens): the index of each
    row still generating and the token it just got.

    The prompts form one left-padded batch with one KV cache: a single forward pass over all prompt tokens
    (prefill), then one pass per step over the newest token alone. A row ends after a token in stop_ids, after
    params.max_new_tokens, or when the caller adds its index to `finished` (a stop string, found in text), and
    leaves the batch. A prompt longer than the window keeps its end; when the cache fills, the newest half of
    the window is prefilled again (a context shift), so generation runs on past block_size. The model runs in
    its weights' dtype (load_model casts them), and so does the cache.
    """
    device, cfg, dtype = _device(model), model.cfg, next(model.parameters()).dtype
    generator = generator if generator is not None else make_generator(None, device)
    finished = set() if finished is None else finished
    prompts = [list(p[-cfg.block_size:]) or [BOS_ID] for p in prompts]
    width = max(len(p) for p in prompts)
    seq = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts], device=device)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    counts = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.int32, device=device)
    counts.scatter_add_(1, seq, (torch.arange(width, device=device)[None] >= pad[:, None]).int())
    rows = torch.arange(len(prompts), device=device)

    def prefill(seq, pad, left):
        cache = KVCache(cfg, seq.size(0), min(cfg.block_size, seq.size(1) + left), device, dtype,
                        pad=pad if bool(pad.any()) else None)
        return cache, _last_logits(model, seq, cache)

    cache, logits = prefill(seq, pad, params.max_new_tokens)
    for step in range(params.max_new_tokens):
        token = sample_next(logits, counts, params, generator)
        counts[torch.arange(len(rows), device=device), token] += 1
        row_list, token_list = rows.tolist(), token.tolist()
        yield row_list, token_list
        left = params.max_new_tokens - step - 1
        keep = [i for i, (r, t) in enumerate(zip(row_list, token_list)) if t not in stop_ids and r not in finished]
        if not keep or not left:
            return
        seq = torch.cat([seq, token[:, None]], dim=1)
        if len(keep) < len(row_list):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            rows, seq, pad, counts, token = rows[index], seq[index], pad[index], counts[index], token[index]
            cache.reorder(index)
        if cache.pos == cache.max_len:  # the window is full: slide it, keeping its newest half
            dropped = seq.size(1) - cfg.block_size // 2
            seq, pad = seq[:, dropped:], (pad - dropped).clamp(min=0)
            cache, logits = prefill(seq, pad, left)
        else:
            logits = _last_logits(model, token[:, None], cache)


@torch.no_grad()
def generate_ids_recompute(model, prompt, params, stop_ids=(), generator=None):
    """The reference the engine is held against: no cache, the whole context (its last block_size tokens)
    run again for every new token, as nanoGPT's sample.py does. One prompt; yields its tokens."""
    device, cfg = _device(model), model.cfg
    generator = generator if generator is not None else make_generator(None, device)
    seq = list(prompt) or [BOS_ID]
    counts = torch.bincount(torch.tensor(seq[-cfg.block_size:]), minlength=cfg.vocab_size)[None].to(device)
    for _ in range(params.max_new_tokens):
        logits = _last_logits(model, torch.tensor([seq[-cfg.block_size:]], device=device))
        token = int(sample_next(logits, counts, params, generator))
        counts[0, token] += 1
        yield token
        seq.append(token)
        if token in stop_ids:
            return


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


def complete(model, tok, prompts, params, chat=False, generator=None):
    """Generate without streaming: one (text, finish_reason, tokens) per prompt."""
    out = [['', None, 0] for _ in prompts]
    for r, delta, finish, n in stream_text(model, tok, prompts, params, chat, generator):
        out[r] = [out[r][0] + delta, finish, n]
    return [tuple(o) for o in out]


def fit_history(tok, messages, budget):
    """The chat prompt for messages in at most budget tokens: the oldest exchanges are dropped first, the system
    message stays. If the newest message alone is too long, its prompt keeps its last budget tokens."""
    system = messages[:1] if messages and messages[0]['role'] == 'system' else []
    turns = messages[len(system):]
    starts = [i for i, m in enumerate(turns) if m['role'] == 'user'] or [0]
    for start in starts:
        ids, _ = lumi.render_chat(tok, system + turns[start:], add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
    return ids[-budget:]


# -----------------------------------------------------------------------------
# the interactive prompt

HELP = """/temp X        temperature (0 is greedy)      /top_p X   nucleus threshold (1 is off)
/top_k N       keep the N likeliest tokens    /max N     new tokens per reply
/rep X         repetition penalty (1 is off)  /seed N    restart sampling from seed N
/system TEXT   set the system message and start a new chat
/chat, /completion   switch mode              /reset     forget the conversation
/settings      show settings                  /quit      leave (or Ctrl-D); Ctrl-C stops a reply"""

# the ranges serve.py also holds requests to: a repetition penalty beyond them turns logits into inf and NaN
SETTINGS = {'temp': ('temperature', float, lambda v: 0 <= v <= 100), 'top_p': ('top_p', float, lambda v: 0 < v <= 1),
            'top_k': ('top_k', int, lambda v: v >= 0), 'max': ('max_new_tokens', int, lambda v: v >= 1),
            'rep': ('repetition_penalty', float, lambda v: 0.01 <= v <= 100)}


class Prompt:
    """The state of an interactive session: settings, mode, and the chat so far."""

    def __init__(self, model, tok, params, chat, system='', seed=1337):
        self.model, self.tok, self.params, self.chat = model, tok, params, chat
        self.system, self.messages = system, []
        self.generator = make_generator(seed, _device(model))

    def reset(self):
        self.messages = [{'role': 'system', 'content': self.system}] if self.system else []

    def command(self, line):
        """Apply a slash command; returns what to print, or None to quit."""
        name, _, arg = line[1:].strip().partition(' ')
        arg = arg.strip()
        if name in ('quit', 'exit', 'q'):
            return None
        if name in SETTINGS:
            field, kind, valid = SETTINGS[name]
            try:
                value = kind(arg)
            except ValueError:
                value = None
            if value is None or not valid(value):
                return f"/{name} needs a valid {kind.__name__}, got {arg!r}"
            self.params = replace(self.params, **{field: value})
            return f"{field} = {value}"
        if name == 'seed':
            if not arg.isdigit():
                return f"/seed needs a non-negative integer, got {arg!r}"
            self.generator = make_generator(int(arg), _device(self.model))
            return f"seed = {arg}"
        if name in ('chat', 'completion'):
            self.chat = name == 'chat'
            self.reset()
            return f"{name} mode"
        if name == 'system':
            self.system = arg
            self.reset()
            return f"system message {'set' if arg else 'cleared'}; new chat"
        if name == 'reset':
            self.reset()
            return "new chat" if self.chat else "ok"
        if name == 'settings':
            p = self.params
            return (f"mode {'chat' if self.chat else 'completion'}, temperature {p.temperature}, top_k {p.top_k}, "
                    f"top_p {p.top_p}, max_new_tokens {p.max_new_tokens}, repetition_penalty "
                    f"{p.repetition_penalty}, stop {list(p.stop)}")
        return HELP if name == 'help' else f"unknown command /{name}\n{HELP}"

    def reply(self, text, out=sys.stdout):
        """Stream the model's answer to text (a chat turn, or a text to continue) to out; Ctrl-C stops it."""
        if self.chat:
            self.messages.append({'role': 'user', 'content': text})
            room = min(self.params.max_new_tokens, self.model.cfg.block_size // 2)
            ids = fit_history(self.tok, self.messages, self.model.cfg.block_size - room)
        else:
            ids = [BOS_ID] + self.tok.encode(text)
        answer, n, t0 = '', 0, time.time()
        try:
            for _, delta, _, n in stream_text(self.model, self.tok, [ids], self.params, self.chat, self.generator):
                out.write(delta)
                out.flush()
                answer += delta
        except KeyboardInterrupt:
            out.write(' [stopped]')
        out.write('\n')
        out.flush()
        if self.chat:  # a stopped reply stays in the history as far as it got
            self.messages.append({'role': 'assistant', 'content': answer})
        print(f"[{n} tokens, {n / max(time.time() - t0, 1e-9):.1f} tokens/s]", file=sys.stderr, flush=True)
        return answer

    def loop(self):
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.reset()
        print(f"{'chat' if self.chat else 'completion'} mode; /help for commands, /quit to leave", flush=True)
        while True:
            try:
                line = input('you> ' if self.chat else '> ')
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print('\n(Ctrl-D or /quit to leave)')
                continue
            if line.startswith('/'):
                said = self.command(line)
                if said is None:
                    return
                print(said, flush=True)
            elif line.strip():
                self.reply(line)


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = lumi.load_config(DEFAULTS, argv)
    if cfg.mode not in ('auto', 'chat', 'completion'):
        raise ValueError(f"mode must be auto, chat or completion, got {cfg.mode!r}")
    dev = lumi.pick_device(cfg.device)
    dt = lumi.resolve_dtype(cfg.dtype, dev)
    lumi.seed_everything(cfg.seed)
    source = cfg.ckpt or cfg.adapter or newest_checkpoint(cfg.out_root)
    model, tok, info = load_model(source, cfg.adapter if cfg.ckpt else '', cfg.tokenizer, dev, dt)
    chat = (info['kind'] in CHAT_KINDS or bool(info['adapter'])) if cfg.mode == 'auto' else cfg.mode == 'chat'
    params = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty,
                      tuple(cfg.stop), cfg.ignore_eos)
    what = info['path'] + (f" + adapter {info['adapter']}" if info['adapter'] else '')
    print(f"{what}: {info['kind']} model, {model.num_params() / 1e6:.1f}M parameters, {dev} {dt}", file=sys.stderr)
    if cfg.serve:
        from serve import OPTIONS, Server  # the HTTP side lives in serve.py; it is handed the generation

        def generate(prompts, p, chat, seed):
            return stream_text(model, tok, prompts, p, chat, make_generator(seed, dev))
        server = Server(generate, tok, model.cfg.block_size, params, cfg.model_name or f"lumi-{info['kind']}",
                        cfg.host, cfg.port, info['created'], **{key: cfg[key] for key in OPTIONS})
        host, port = server.server_address[:2]
        print(f"serving '{server.model_name}' at http://{host}:{port}/ (API under /v1)", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    session = Prompt(model, tok, params, chat, cfg.system, cfg.seed)
    if cfg.prompt:
        session.reset()
        session.reply(cfg.prompt)
    else:
        session.loop()
    return 0


if __name__ == '__main__':
    lumi.cli(main, DEFAULTS)
