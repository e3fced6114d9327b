"""
BoolQ examples per second on CPU: the batched scorer (engine.target_logprobs, what eval.py runs) against
scoring one (passage, answer) pair per forward pass with the full vocabulary's logits at every position (how a
plain loop does it), on the same examples in the same run, with the log-likelihoods checked to agree.

    python benchmarks/bench_eval.py [--n=200] [--batch_tokens=2048] [--threads=1]

Model: the shape of configs/tiny.py (ModelConfig defaults when that file is missing), random init; what is
measured is the scoring, not the answers. Tokenizer: data/starter's if data.py has built it, else a BPE of
the same vocabulary trained here on the BoolQ passages themselves (the output says which).

Deliberately left out: accuracy (a random model's answers mean nothing) and GPU timings.
"""
import io
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import torch.nn.functional as F

import engine
import eval as ev
import lumi
from corpus import tasks
from model import GPT, ModelConfig
from tokenizer import CHAT_TOKENS, Tokenizer

n = 200                      # BoolQ examples (the first n of dev.jsonl)
batch_tokens = ev.BATCH_TOKENS['cpu']   # eval.py's CPU default
big_batch_tokens = 16384     # a GPU-sized batch, to show what it costs on a CPU
tokenizer = 'data/starter/tokenizer/tokenizer.model'
model_config = 'configs/tiny.py'
seed = 0
threads = 0                  # torch threads; 0 keeps torch's default (one per core). On a shared machine 1
                             # is steadier: two threads wait on each other whenever the other is descheduled


def make_tokenizer(path, vocab_size):
    if os.path.exists(path):
        return Tokenizer.load(path), path
    import sentencepiece as spm
    buf = io.BytesIO()
    text = [c for c, _, _ in tasks.load_examples('boolq', ev.boolq_source)[0]]
    spm.SentencePieceTrainer.train(  # data.py's settings; 2 MB of text may not fill the vocabulary
        sentence_iterator=iter(text), model_writer=buf, model_type='bpe', vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(CHAT_TOKENS), normalization_rule_name='identity',
        remove_extra_whitespaces=False, minloglevel=2)
    tok = Tokenizer(buf.getvalue())
    return tok, f'BPE of {tok.vocab_size} pieces trained here on the BoolQ dev passages ({path} missing)'


@torch.no_grad()
def score_plain(model, requests):
    """One request per forward pass, logits over the whole vocabulary at every position."""
    out = []
    for inp, pos, targets in requests:
        logits, _ = model(torch.tensor([list(inp)]))
        logp = F.log_softmax(logits[0].float(), dim=-1)
        out.append(float(logp[torch.arange(pos, pos + len(targets)), torch.tensor(list(targets))].sum()))
    return np.array(out)


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main(argv=None):
    cfg = lumi.load_config(lumi.declared_keys(__file__), argv)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    defaults = dict(vocab_size=32768, **{k: v.default for k, v in lumi.declared_keys('model.py').items()})
    shape_from = cfg.model_config if os.path.exists(cfg.model_config) else 'ModelConfig defaults'
    margs = lumi.load_config(defaults, [cfg.model_config] if os.path.exists(cfg.model_config) else [])
    margs.pop('config_file', None)
    examples, _ = tasks.load_examples('boolq', ev.boolq_source, cfg.n)
    tok, tok_from = make_tokenizer(cfg.tokenizer, margs['vocab_size'])
    margs['vocab_size'] = max(margs['vocab_size'], tok.vocab_size)
    model = GPT(ModelConfig(**margs)).eval()
    requests, truncated = ev.choice_requests(tok, examples, model.cfg.block_size)
    tokens = sum(len(r[0]) for r in requests)
    cpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    cpu = next((l.split(':', 1)[1].strip() for l in cpu.splitlines() if l.startswith('Model name')), '?')
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {shape_from} ({model.num_params():,} parameters, block {model.cfg.block_size}); "
          f"tokenizer: {tok_from}")
    print(f"BoolQ: {len(examples)} examples, {len(requests)} (passage, answer) pairs, {tokens:,} tokens, "
          f"{truncated} truncated to the block")

    engine.target_logprobs(model, requests[:4], batch_tokens=cfg.batch_tokens)  # warm-up
    plain, t_plain = timed(lambda: score_plain(model, requests))
    one_row, t_one = timed(lambda: engine.target_logprobs(model, requests, batch_tokens=1))
    batched, t_batched = timed(lambda: engine.target_logprobs(model, requests, batch_tokens=cfg.batch_tokens))
    big, t_big = timed(lambda: engine.target_logprobs(model, requests, batch_tokens=cfg.big_batch_tokens))
    bf16, t_bf16 = timed(lambda: engine.target_logprobs(model, requests, dtype='bfloat16',
                                                        batch_tokens=cfg.batch_tokens))
    for name, got in (('one row per pass', one_row), ('batched', batched), ('big batches', big)):
        diff = float(np.abs(got - plain).max())
        assert diff < 1e-2, f"{name} disagrees with the plain loop by {diff}"

    def answers(ll):  # the choice each example picks, by summed log-likelihood
        return np.array([int(np.argmax(ll[2 * i:2 * i + 2])) for i in range(len(examples))])
    rows = [('plain loop: one pair per pass, full logits', t_plain, plain),
            ('eval.score, one row per pass (deduplicated rows, LM head at answers only)', t_one, one_row),
            (f'eval.score, batched (batch_tokens={cfg.batch_tokens}, the CPU default)', t_batched, batched),
            (f'eval.score, batched (batch_tokens={cfg.big_batch_tokens})', t_big, big),
            ('eval.score, batched, bf16 autocast (--dtype=bfloat16)', t_bf16, bf16)]
    print("\n| scorer | seconds | examples/s | speed-up | max abs Δ log-lik | same answers |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, ll in rows:
        print(f"| {name} | {t:.2f} | {len(examples) / t:.1f} | {t_plain / t:.2f}x | "
              f"{float(np.abs(ll - plain).max()):.1e} | {np.mean(answers(ll) == answers(plain)):.1%} |")


if __name__ == '__main__':
    main()
