"""
Data stage throughput on the starter corpus: cleaning + dedupe MB/s, packing tokens/s against a
one-document-at-a-time encode loop measured in the same run, and sources-to-bins wall time (fetch excluded:
the archives are fetched into the cache first, untimed).

    python benchmarks/bench_data.py [--vocab_size=32768] [--num_threads=0] [--out=/tmp/lumi_bench_data]

num_threads is data.py's key (0: all cores) and sizes the data stage and the batched encode alike.
"""
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import lumi  # noqa: E402
from corpus import bins, clean, parts, sources, streams  # noqa: E402
from tokenizer import BOS_ID, EOS_ID, Tokenizer  # noqa: E402

out = '/tmp/lumi_bench_data'
vocab_size = 32768
num_threads = 0
cfg = lumi.load_config(lumi.declared_keys(__file__), sys.argv[1:])
D = os.path.join(cfg.out, 'starter')
shutil.rmtree(D, ignore_errors=True)
args = [f'--data_dir={D}', f'--vocab_size={cfg.vocab_size}', f'--num_threads={cfg.num_threads}']
settings = lumi.load_config(data.KEYS, args)

# fetch (untimed): every archive into the cache
for spec, _ in data.sources:
    for _ in streams.iter_files(spec):
        pass

# 1. sources to bins, the real command
t0, c0 = time.time(), time.process_time()
data.main(args)
total, total_cpu = time.time() - t0, time.process_time() - c0
man = lumi.read_json(os.path.join(D, 'corpus', 'manifest.json'))
meta = bins.load_meta(D)
tok_card = lumi.read_json(os.path.join(D, 'tokenizer', 'tokenizer.json'))

# 2. cleaning + dedupe alone, on documents already read from the archives
t0 = time.time()
raw = [d for spec, _ in data.sources for d in sources.iter_documents(spec, stats=Counter())]
t_read = time.time() - t0
mb = sum(len(d.encode()) for d in raw) / 1e6
t0, c0 = time.time(), time.process_time()
kept, seen = [], set()
for d in raw:
    text = clean.clean_text(d)
    if clean.reject_reason(text, settings) is None and (k := clean.exact_key(text)) not in seen:
        seen.add(k)
        kept.append(text)
t_clean, c_clean = time.time() - t0, time.process_time() - c0
t0, c0 = time.time(), time.process_time()
sig = clean.minhash_signatures(kept, settings.num_perm, settings.shingle_words)
dup = clean.near_duplicates(sig, settings.near_dup_threshold)
t_near, c_near = time.time() - t0, time.process_time() - c0

# 3. packing: data.pack end to end, then its encode step (batched, multi-threaded) against a
# one-document-at-a-time loop, in lockstep chunk by chunk so that other work on the machine falls on both
# alike
tok = Tokenizer.load(os.path.join(D, 'tokenizer', 'tokenizer.model'))
docs = [r['text'] for r in parts.iter_corpus(D)]
threads = settings.num_threads or os.cpu_count()  # data.py's rule for 0
t0, c0 = time.time(), time.process_time()
meta2 = data.pack(settings, tok, tok_card, man)
t_pack, c_pack = time.time() - t0, time.process_time() - c0
n_pack = meta2['train_tokens'] + meta2['val_tokens']  # the starter weights are all 1: each document once
wall, cpu, n_tok = Counter(), Counter(), 0
for i in range(0, len(docs), 512):
    chunk = docs[i:i + 512]
    for arm in ('batch', 'loop'):
        t0, c0 = time.time(), time.process_time()
        ids = (tok.encode_batch(chunk, num_threads=threads) if arm == 'batch'
               else [tok.encode(d) for d in chunk])
        arrays = [np.array([BOS_ID, *x, EOS_ID], dtype=np.uint16) for x in ids]
        wall[arm] += time.time() - t0
        cpu[arm] += time.process_time() - c0
    n_tok += sum(map(len, arrays))

load = os.getloadavg()[0]  # other work on the machine slows every wall-clock figure
print(f"\n## bench_data ({time.strftime('%Y-%m-%d %H:%M')}, {threads} cores, load average {load:.1f}, "
      f"vocab {cfg.vocab_size})")
print(f"sources to bins (data.main, fetch excluded): {total:.1f}s wall, {total_cpu:.1f}s CPU, for "
      f"{man['bytes_in'] / 1e6:.1f} MB of files, "
      f"{meta['docs']:,} docs, {meta['train_tokens'] + meta['val_tokens']:,} tokens "
      f"(corpus {man['seconds']:.1f}s, tokenizer {tok_card['train_seconds']:.1f}s, "
      f"packing {meta['pack_seconds']:.1f}s)")
print(f"read + adapters: {mb:.1f} MB of documents in {t_read:.1f}s ({mb / t_read:.1f} MB/s)")
print(f"cleaning + filters + exact dedupe: {mb / t_clean:.1f} MB/s ({t_clean:.1f}s); MinHash + LSH on "
      f"{len(kept):,} docs: {t_near:.1f}s ({mb / t_near:.1f} MB/s), {int(dup.sum())} near-duplicates; "
      f"cleaning + dedupe together {mb / (t_clean + t_near):.1f} MB/s wall, "
      f"{mb / (c_clean + c_near):.1f} MB per CPU-second")
print(f"packing: data.pack {n_pack / t_pack / 1e6:.2f}M tokens/s ({t_pack:.1f}s wall, {c_pack:.1f}s CPU, "
      f"shards read to bins written)")
print(f"encode, lockstep: batched with {threads} threads {n_tok / wall['batch'] / 1e6:.2f}M tokens/s "
      f"({wall['batch']:.1f}s wall, {cpu['batch']:.1f}s CPU) vs one document at a time "
      f"{n_tok / wall['loop'] / 1e6:.2f}M tokens/s ({wall['loop']:.1f}s wall, {cpu['loop']:.1f}s CPU): "
      f"{wall['loop'] / wall['batch']:.2f}x; per CPU-second {n_tok / cpu['batch'] / 1e6:.2f}M vs "
      f"{n_tok / cpu['loop'] / 1e6:.2f}M tokens")
print(f"chars/token {meta['chars_per_token']:.3f}, "
      f"byte fallback {tok_card['held_out']['byte_fallback_rate']:.2e}, "
      f"round trip {tok_card['held_out']['roundtrip_exact']:.1%}")
