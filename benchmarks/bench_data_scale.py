"""
The data stage at scale: the same `python data.py` on ~30 MB, 300 MB and 3 GB of distinct real-looking text,
reporting wall time, CPU time and peak RSS of the whole process tree (summed over its processes, sampled from
/proc every 0.2 s, so CPU time misses at most the last 0.2 s of each process), tokens out and packing
tokens/s; then, per size, whether num_workers=1 and num_workers=2, and a 2-shard split + merge, give
byte-identical corpus shards and bins.

    python benchmarks/bench_data_scale.py --sizes=30 [--sizes=30,300,3000] [--check=True]
                                          [--out=/tmp/lumi_scale]
    python benchmarks/bench_data_scale.py --sizes= --dedupe_docs=1000000     # dedupe memory per million
                                                                               documents

The text: every sentence of the starter corpus (plays, Milton, the King James Bible, chats; the sources of
data.py's defaults, read from the cache), ~0.5M sentences, shuffled into documents of 4-40 sentences by a
seeded RNG; each document draws its sentences independently, so two documents share a 5-word shingle only
where two sentences do, and near-dedupe keeps all but a few (reported). Written as JSON lines, a quarter of
the files gzipped, in files of ~16 MB. It is built once per size under --out (untimed) and reused.
Each run uses its own data_dir; the check runs reuse the first run's tokenizer (tokenizer_from), so their
bins compare byte for byte, and are deleted after comparing. Sizes are MB of text.
"""
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import lumi  # noqa: E402
from corpus import sources  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = '/tmp/lumi_scale'
sizes = '30'  # comma-separated MB of text
check = True  # also run num_workers=1 vs 2 and 2 shards + merge, and compare bytes
num_workers = 2  # of the main run (the check compares it with 1); 0: all cores
vocab_size = 32768
cache_dir = ''  # where the starter archives are ('' -> data.py's default)
dedupe_docs = 0  # > 0: also measure dedupe memory on this many documents of random signatures (parts on disk)
cfg = lumi.load_config(lumi.declared_keys(__file__), sys.argv[1:])


def sentences():
    """Every sentence of the starter corpus, in order, once."""
    seen, out_ = set(), []
    for spec, _ in data.sources:
        for doc in sources.iter_documents(spec, cfg.cache_dir or None):
            for s in re.split(r'(?<=[.!?])\s+', doc):
                s = ' '.join(s.split())
                if len(s) >= 20 and s not in seen:
                    seen.add(s)
                    out_.append(s)
    return out_


def build_text(folder, mb, pool, file_mb=16):
    """~mb MB of documents drawn from pool, as JSON lines (every 4th file gzipped);
    returns the bytes written."""
    done = os.path.join(folder, 'DONE')
    if os.path.exists(done):
        return int(open(done).read())
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng, total, k = random.Random(mb), 0, 0
    while total < mb << 20:
        name = os.path.join(folder, f"part{k:05d}.jsonl" + ('.gz' if k % 4 == 3 else ''))
        lines, size = [], 0
        while size < file_mb << 20 and total + size < mb << 20:
            n = rng.randint(4, 40)
            paras = [' '.join(rng.choices(pool, k=rng.randint(1, 6))) for _ in range(max(1, n // 6))]
            line = json.dumps({'text': '\n\n'.join(paras)}, ensure_ascii=False) + '\n'
            lines.append(line)
            size += len(line.encode())
        body = ''.join(lines).encode()
        with (gzip.open(name, 'wb', compresslevel=1) if name.endswith('.gz') else open(name, 'wb')) as f:
            f.write(body)
        total, k = total + len(body), k + 1
    open(done, 'w').write(str(total))
    return total


def tree_usage(pid, cpu):
    """Resident bytes of pid and all its descendants, from /proc; cpu {pid: CPU seconds} is updated with
    each one's user + system time (worker processes are reaped by the forkserver, not by data.py, so
    os.times() of this process would miss them)."""
    children, rss, ticks = {}, {}, {}
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                with open(f'/proc/{p}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(p))
                rss[int(p)] = int(fields[21]) * os.sysconf('SC_PAGE_SIZE')
                ticks[int(p)] = (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
            except (OSError, IndexError, ValueError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        cpu[p] = max(cpu.get(p, 0), ticks.get(p, 0))
        stack += children.get(p, [])
    return total


def run(args):
    """One `python data.py ARGS` in a subprocess: wall s, CPU s of the tree, peak tree RSS bytes."""
    t0, cpu = time.time(), {}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'data.py'), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_usage(proc.pid, cpu))
            time.sleep(0.2)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log = proc.communicate()[0]
    th.join()
    if proc.returncode:
        sys.exit(f"data.py {' '.join(args)} failed:\n{log[-3000:]}")
    return time.time() - t0, sum(cpu.values()), peak[0]


def fingerprint(d):
    man = lumi.read_json(os.path.join(d, 'corpus', 'manifest.json'))
    return [lumi.sha256_file(os.path.join(d, f)) for f in
            ['train.bin', 'val.bin'] + [f"corpus/{s['name']}" for s in man['shards']]]


def dedupe_memory(n, num_perm=128, threshold=0.8, k=4):
    """Peak memory (tracemalloc: numpy allocations; memmapped pages not counted) of exact + near dedupe over
    n documents in k parts on disk, with random signatures and one near-duplicate in 1000."""
    import tracemalloc
    import numpy as np
    from corpus import clean, parts
    rows_ = clean.lsh_rows(num_perm, threshold)
    dt = parts.part_rows(num_perm, num_perm // rows_)
    folder = os.path.join(cfg.out, 'dedupe_memory')
    os.makedirs(folder, exist_ok=True)
    rng, per, names = np.random.default_rng(0), n // k, []
    for j in range(k):
        rec = np.zeros(per, dt)
        rec['key'], rec['usable'] = rng.integers(0, 256, (per, 16), dtype=np.uint8), 1
        sig = rng.integers(0, 2**32, (per, num_perm), dtype=np.uint32)
        sig[::1000] = sig[1::1000][:len(sig[::1000])]
        rec['sig'], rec['bands'] = sig, clean.band_keys(sig, rows_).T
        rec.tofile(os.path.join(folder, f'x{j}.rows'))
        names.append(f'x{j}')
    tracemalloc.start()
    t0 = time.time()
    keys = np.concatenate([parts.part_array(folder, p, dt, per)['key'] for p in names])
    unique = parts.exact_first(keys)
    near = parts.near_duplicates_on_disk(folder, names, np.arange(k + 1) * per, np.flatnonzero(unique),
                                         dt, threshold)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    shutil.rmtree(folder)
    return {'docs': n, 'peak_MB': round(peak / 2**20, 1),
            'MB_per_million_docs': round(peak / 2**20 / (n / 1e6), 1),
            'near_duplicates': int(near.sum()), 'seconds': round(time.time() - t0, 1)}


if cfg.dedupe_docs:
    print(json.dumps(dedupe_memory(cfg.dedupe_docs)), flush=True)
pool = None
rows = []
for mb in [int(s) for s in str(cfg.sizes).split(',') if s]:
    text_dir = os.path.join(cfg.out, f'text_{mb}mb')
    if not os.path.exists(os.path.join(text_dir, 'DONE')):
        pool = pool or sentences()
        print(f"building {mb} MB of text from {len(pool):,} starter sentences ...", flush=True)
    nbytes = build_text(text_dir, mb, pool)
    base = [f"--sources=[({text_dir!r}, 1.0)]", f'--vocab_size={cfg.vocab_size}',
            f'--num_workers={cfg.num_workers}']
    if cfg.cache_dir:
        base.append(f'--cache_dir={cfg.cache_dir}')
    d = os.path.join(cfg.out, f'run_{mb}mb')
    shutil.rmtree(d, ignore_errors=True)
    wall, cpu, peak = run([f'--data_dir={d}', *base])
    meta = lumi.read_json(os.path.join(d, 'meta.json'))
    man = lumi.read_json(os.path.join(d, 'corpus', 'manifest.json'))
    tokens = meta['train_tokens'] + meta['val_tokens']
    src = man['sources'][0]
    row = {'MB': round(nbytes / 2**20), 'docs': src.get('docs', 0),
           'near_dups': src.get('rejected_near_duplicate', 0),
           'wall_s': round(wall, 1), 'cpu_s': round(cpu, 1), 'peak_rss_MB': round(peak / 2**20),
           'tokens': tokens, 'pack_tok_per_s': round(tokens / max(meta['pack_seconds'], 1e-9)),
           'corpus_s': man['seconds'], 'dedupe_s': man['dedupe_seconds'], 'pack_s': meta['pack_seconds']}
    if cfg.check:
        ref, tok = fingerprint(d), os.path.join(d, 'tokenizer', 'tokenizer.model')
        same = {}
        for name, variants in [(f'workers_1_vs_{cfg.num_workers}', [['--num_workers=1']]),
                               ('shards_2_merge', [['--num_shards=2', '--shard_index=1'],
                                                   ['--num_shards=2', '--shard_index=0'],
                                                   ['--num_shards=2']])]:
            other = os.path.join(cfg.out, f'check_{mb}mb')
            shutil.rmtree(other, ignore_errors=True)
            for extra in variants:
                run([f'--data_dir={other}', *base, f'--tokenizer_from={tok}', *extra])
            same[name] = fingerprint(other) == ref
            shutil.rmtree(other)
        row.update(same)
    rows.append(row)
    print(json.dumps(row), flush=True)

if not rows:
    sys.exit(0)
print(f"\n{os.cpu_count()} cores; sizes {cfg.sizes} MB")
keys = list(rows[0])
print('| ' + ' | '.join(keys) + ' |')
print('|' + '---|' * len(keys))
for r in rows:
    print('| ' + ' | '.join(str(r[k]) for k in keys) + ' |')
if len(rows) > 1:
    a, b = rows[0], rows[-1]
    print(f"\n{b['MB']} MB vs {a['MB']} MB: peak RSS x{b['peak_rss_MB'] / max(1, a['peak_rss_MB']):.2f}, "
          f"wall per MB x{(b['wall_s'] / b['MB']) / (a['wall_s'] / a['MB']):.2f} (1.0: linear)")
