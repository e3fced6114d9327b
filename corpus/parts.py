"""
The data stage's work on disk in parts, so that no step holds the corpus: each file of a source cleaned,
filtered and signed in worker processes and written as a part (texts + a row of exact key, MinHash signature
and LSH band hashes per document); deduplication across all parts with one band's hashes in memory at a
time; the finished corpus read back (iter_corpus); each corpus shard encoded into a part of the bins.

Left out: which parts a run owns beyond `shard_index`, the corpus shards and the manifest (data.py).
"""
import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
from collections import Counter

import numpy as np

import lumi
from corpus.clean import band_keys, bucket_pairs, clean_batch, cluster_duplicates, similar, usable_rows
from corpus.sources import documents_of, parse_spec
from corpus.streams import iter_streams
from tokenizer import BOS_ID, EOS_ID

PART_BYTES = 32 << 20  # bytes of input files (as stored) per scanned part
BATCH_DOCS = 512  # documents a worker cleans at a time
# forkserver: workers start from a clean process, not a copy of this one; Windows has neither fork nor
# forkserver, and spawn gives the same bytes (tests/test_data.py), each worker importing its modules afresh
START_METHOD = 'forkserver' if 'forkserver' in mp.get_all_start_methods() else 'spawn'
CLEAN_KEYS = ('min_doc_chars', 'min_alpha_ratio', 'max_dup_line_frac', 'scrub_urls', 'scrub_emails',
              'num_perm', 'shingle_words')


def iter_corpus(data_dir, shards=None):
    """Yield the records {id, source, text} of a built corpus, in order (shards: only these names)."""
    manifest = lumi.read_json(os.path.join(data_dir, 'corpus', 'manifest.json'))
    for shard in manifest['shards']:
        if shards is None or shard['name'] in shards:
            with open(os.path.join(data_dir, 'corpus', shard['name']), encoding='utf-8') as f:
                for line in f:
                    yield json.loads(line)


def is_mine(cfg, k):
    """Whether this run works on item k of a list split across num_shards runs (shard_index -1: all)."""
    return cfg.shard_index < 0 or k % cfg.num_shards == cfg.shard_index


def part_name(si, g):
    return f"p{si:03d}-{g:06d}"


class Workers:
    """num_workers processes, started the first time a job has more than one batch (a small source stays in
    this process); results come back in order, with at most 2 batches per worker in flight, so reading
    never runs ahead of cleaning by more than that."""

    def __init__(self, n):
        self.n, self.pool = n, None

    def map(self, fn, items, *args):
        items = iter(items)
        head = list(itertools.islice(items, 2))
        if self.n <= 1 or len(head) < 2:
            yield from (fn(item, *args) for item in itertools.chain(head, items))
            return
        if self.pool is None:
            self.pool = mp.get_context(START_METHOD).Pool(self.n)
        pending = collections.deque()
        for item in itertools.chain(head, items):
            pending.append(self.pool.apply_async(fn, (item, *args)))
            if len(pending) >= 2 * self.n:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _batches(docs, n=None, chars=8 << 20):
    """Lists of at most n (BATCH_DOCS) documents or about `chars` characters, whichever comes first."""
    batch, size, n = [], 0, n or BATCH_DOCS
    for d in docs:
        batch.append(d)
        size += len(d)
        if len(batch) >= n or size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Grouping:
    """Consecutive files of a source joined into parts of about PART_BYTES (as stored), so that a folder of
    thousands of small files is a few parts; decided from sizes alone, the same in every shard."""

    def __init__(self):
        self.part, self.size, self.of = 0, 0, {}

    def place(self, fi, size):
        if fi not in self.of:
            if self.size >= PART_BYTES:
                self.part, self.size = self.part + 1, 0
            self.of[fi] = self.part
            self.size += size
        return self.of[fi]


def part_rows(num_perm, bands):
    """The row of a part's .rows file: exact key, usable flag, MinHash signature, LSH band hashes."""
    return np.dtype([('key', np.uint8, 16), ('usable', np.uint8), ('sig', np.uint32, num_perm),
                     ('bands', np.uint64, bands)])


def part_array(folder, part, dtype, docs):
    """A part's .rows as a read-only memmap (never read whole)."""
    if not docs:
        return np.zeros(0, dtype)
    return np.memmap(os.path.join(folder, f"{part}.rows"), dtype=dtype, mode='r', shape=(docs,))


def part_column(folder, part, dtype, docs, name, ix=slice(None)):
    """part_array(...)[name][ix], copied out so the mapping goes with this call: a column's few bytes sit in
    every ~600-byte row, so reading one touches every page, and a mapping's pages stay in the resident set
    while it lives (3 GB of text: 2.0 GB peak RSS with every part mapped for the whole dedupe step,
    measured)."""
    return np.array(part_array(folder, part, dtype, docs)[name][ix])


def scan(cfg, specs, rows, folder):
    """Read this shard's files of specs, clean and filter their documents in worker processes, and write them
    as parts (part g of source si goes to shard (si + g) % num_shards): NAME.jsonl (the texts that survive),
    NAME.rows (a _part_rows row per text) and NAME.json (counts; written last: the part's "done" marker). A
    part already done is skipped, so a killed scan redoes only what it had not finished. Returns this shard's
    part names. rows: LSH rows per band (clean.lsh_rows)."""
    opts = {k: cfg[k] for k in CLEAN_KEYS}
    dtype, mine = part_rows(cfg.num_perm, cfg.num_perm // rows), set()
    workers = Workers(cfg.num_workers or os.cpu_count() or 1)
    try:
        for si, spec in enumerate(specs):
            _scan_source(cfg, folder, si, spec, opts, rows, dtype, workers, mine)
    finally:
        workers.close()
    return sorted(mine)


def _scan_source(cfg, folder, si, spec, opts, rows, dtype, workers, mine):
    stats, prev, grouping, part = Counter(), Counter(), _Grouping(), None

    def pick(fi, size):
        name = part_name(si, grouping.place(fi, size))
        if not is_mine(cfg, si + grouping.of[fi]):
            return False
        mine.add(name)
        return not os.path.exists(os.path.join(folder, name + '.json'))

    def finish(part):
        nonlocal prev
        path, outs, n = part
        for kind, o in outs.items():
            o.close()
            os.replace(f"{path}.{kind}.tmp", f"{path}.{kind}")
        # what a folder left out is counted before its file 0 (read by one shard, once), so it lands here
        counts = {k: v - prev.get(k, 0) for k, v in stats.items() if v != prev.get(k, 0)}
        prev = Counter(stats)
        # plain writes and a rename: parts are many, fsync is slow
        with open(f"{path}.json.tmp", 'w', encoding='utf-8') as f:
            json.dump({'source': si, 'docs': n[0], 'counts': counts}, f)
        os.replace(f"{path}.json.tmp", f"{path}.json")
    for f in iter_streams(spec, cfg.cache_dir or None, stats, cfg, pick):
        path = os.path.join(folder, part_name(si, grouping.of[f.index]))
        if part and part[0] != path:
            finish(part)
            part = None
        if part is None:
            part = (path, {'jsonl': open(f"{path}.jsonl.tmp", 'w', encoding='utf-8'),
                           'rows': open(f"{path}.rows.tmp", 'wb')}, [0])
        outs, n = part[1], part[2]
        docs = documents_of(f, parse_spec(spec), stats, cfg.max_doc_chars)
        for reasons, kept, key, sig in workers.map(clean_batch, _batches(docs), opts):
            for r in filter(None, reasons):
                stats['rejected_' + r] += 1
            outs['jsonl'].writelines(json.dumps({'text': t}, ensure_ascii=False) + '\n' for t in kept)
            rec = np.zeros(len(kept), dtype)
            rec['key'], rec['usable'], rec['sig'] = key, usable_rows(sig), sig
            rec['bands'] = band_keys(sig, rows).T
            outs['rows'].write(rec.tobytes())
            n[0] += len(kept)
    if part:
        finish(part)


def exact_first(keys):
    """Mask of the documents whose 16-byte exact key (n, 16) uint8 is the first of its kind: a stable sort
    puts the first copy first in its run. ~60 bytes a document at the peak."""
    halves = np.ascontiguousarray(keys).view('>u8')
    order = np.lexsort((halves[:, 1], halves[:, 0]))
    hs = halves[order]
    first = np.ones(len(order), bool)
    first[1:] = (hs[1:] != hs[:-1]).any(1)
    unique = np.zeros(len(order), bool)
    unique[order[first]] = True
    return unique


def near_duplicates_on_disk(folder, parts, offsets, idx, dtype, threshold, pair_batch=1 << 16):
    """clean.near_duplicates over the signatures of parts kept on disk: one band's hashes of every document
    in memory at a time (8 bytes a document, plus its sort), candidate pairs confirmed pair_batch at a time
    on signature rows read from the parts (part_column: no part stays mapped). idx: the documents to consider
    (global numbers, ascending)."""
    sizes = np.diff(offsets)
    column = lambda p, name, ix: part_column(folder, parts[p], dtype, sizes[p], name, ix)
    pairs = []
    for b in range(dtype['bands'].shape[0]):  # only band b copied out of each part
        key = np.concatenate([column(p, 'bands', (slice(None), b)) for p in range(len(parts))])[idx]
        pairs.append(bucket_pairs(key, idx))
        del key
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)

    def rows(ix):  # signature rows of global document numbers
        part = np.searchsorted(offsets, ix, side='right') - 1
        out = np.empty((len(ix), dtype['sig'].shape[0]), np.uint32)
        for p in np.unique(part):
            sel = part == p
            out[sel] = column(p, 'sig', ix[sel] - offsets[p])
        return out
    keep = [pairs[lo:lo + pair_batch][similar(rows(pairs[lo:lo + pair_batch, 0]),
                                              rows(pairs[lo:lo + pair_batch, 1]), threshold)]
            for lo in range(0, len(pairs), pair_batch)]
    return cluster_duplicates(int(offsets[-1]), np.concatenate(keep) if keep else pairs)

# -----------------------------------------------------------------------------
# the packing step's parts


def doc_unit(doc_id, salt):
    """A uniform number in [0, 1) fixed by a document id: the same split and subsample on every run."""
    return int.from_bytes(hashlib.blake2b(f"{salt}:{doc_id}".encode(), digest_size=8).digest(),
                          'little') / 2**64


def encode_shard(cfg, tok, manifest, j, folder, weights, batch_docs=BATCH_DOCS):
    """Corpus shard j -> NAME.train.bin, NAME.val.bin (BOS text EOS per document, uint16), NAME.repeats.npy
    ((offset, length, extra copies) of train documents of weight > 1) and NAME.json (counts per source,
    written last: the part's "done" marker). Encoding runs on num_threads SentencePiece threads; weights:
    {spec: weight}."""
    name = os.path.join(folder, f"s{j:05d}")
    per_source = {spec: Counter() for spec in weights}
    repeats, offset = [], 0
    files = {s: open(f"{name}.{s}.bin.tmp", 'wb') for s in ('train', 'val')}
    corpus = iter_corpus(cfg.data_dir, {manifest['shards'][j]['name']})
    while recs := list(itertools.islice(corpus, batch_docs)):
        ids = tok.encode_batch([r['text'] for r in recs], num_threads=cfg.num_threads or -1)
        for rec, doc in zip(recs, ids):
            w, stats = weights[rec['source']], per_source[rec['source']]
            split = 'val' if doc_unit(rec['id'], 'split') < cfg.val_fraction else 'train'
            copies = int(w) + (doc_unit(rec['id'], 'weight') < w - int(w))
            if split == 'val':
                copies = min(copies, 1)
            if copies == 0:
                stats['dropped_by_weight'] += 1
                continue
            arr = np.array([BOS_ID, *doc, EOS_ID], dtype=np.uint16)
            files[split].write(arr.tobytes())
            stats[f'{split}_docs'] += 1
            stats[f'{split}_tokens'] += len(arr) * copies
            stats[f'{split}_chars'] += len(rec['text'])
            stats['encoded_tokens'] += len(doc)
            if split == 'train':
                if copies > 1:
                    repeats.append((offset, len(arr), copies - 1))
                offset += len(arr)
    for s, f in files.items():
        f.close()
        os.replace(f"{name}.{s}.bin.tmp", f"{name}.{s}.bin")
    np.save(f"{name}.repeats.npy", np.array(repeats, np.int64).reshape(-1, 3))
    lumi.write_json(f"{name}.json", {'per_source': per_source, 'train_tokens': offset})


def copy_into(dst, path, chunk=64 << 20):
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            dst.write(block)
