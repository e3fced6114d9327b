"""
Cleaning and deduplication of documents: clean_text, the filters (reject_reason), exact-duplicate keys,
MinHash signatures of word n-grams and LSH near-duplicate matching.

Left out: reading sources (sources.py) and deciding what a corpus keeps across files (data.py).
"""
import hashlib
import re
import unicodedata
from collections import Counter
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm


_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\ufffd]')
_EMAIL = re.compile(r'\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b')
_URL = re.compile(r'\b(?:https?://|www\.)[^\s<>"\')\]]+')
_TRAILING_SPACE = re.compile(r'[ \t]+\n')
_RUN_OF_SPACES = re.compile(r' {2,}|\t')
_BLANK_LINES = re.compile(r'\n{3,}')
# byte classes for the letter ratio: 0 UTF-8 continuation byte, 1 space, 2 letter, 3 other. A non-ASCII
# character counts as a letter: one table lookup instead of a regex over every character (5x faster)
_BYTE_CLASS = np.full(256, 3, dtype=np.uint8)
_BYTE_CLASS[0x80:0xC0], _BYTE_CLASS[0xC0:] = 0, 2
_BYTE_CLASS[[ord(c) for c in ' \t\n\r\x0b\x0c']] = 1
_BYTE_CLASS[[ord(c) for c in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ']] = 2


def _one_space(m):  # runs of spaces become one, but indentation at the start of a line (verse) stays
    i = m.start()
    return m.group() if i == 0 or m.string[i - 1] == '\n' else ' '


def clean_text(text, urls=True, emails=True):
    """NFC, no control characters, optional URL/e-mail scrubbing, tidy whitespace."""
    text = _CONTROL.sub('', unicodedata.normalize('NFC', text))
    if emails and '@' in text:
        text = _EMAIL.sub('[email]', text)
    if urls and ('://' in text or 'www.' in text):
        text = _URL.sub('[url]', text)
    text = _RUN_OF_SPACES.sub(_one_space, _TRAILING_SPACE.sub('\n', text))
    return _BLANK_LINES.sub('\n\n', text).strip()


def reject_reason(text, cfg):
    """Why a cleaned document is dropped (None to keep it)."""
    if len(text) < cfg.min_doc_chars:
        return 'too_short'
    _, space, letters, other = np.bincount(_BYTE_CLASS[np.frombuffer(text.encode(), np.uint8)], minlength=4)
    if letters < cfg.min_alpha_ratio * (letters + other):
        return 'low_alpha'
    lines = [ln.strip() for ln in text.split('\n') if ln.strip()]
    repeated = sum((c - 1) * len(ln) for ln, c in Counter(lines).items() if c > 1)
    if repeated > cfg.max_dup_line_frac * sum(map(len, lines)):
        return 'repetitive'
    return None


def exact_key(text):
    """Exact duplicates: same words ignoring case and whitespace."""
    return hashlib.blake2b(' '.join(text.lower().split()).encode(), digest_size=16).digest()


# words for MinHash: runs of ASCII letters/digits or non-ASCII bytes, ASCII case folded, punctuation
# ignored (two editions that differ only in it still match)
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ']] = True
_WORD_BYTE[0x80:] = True
_FOLD = np.arange(256, dtype=np.uint64)
_FOLD[ord('A'):ord('Z') + 1] += 32
_P = 0x100000001B3  # odd: invertible mod 2^64
_P_INV = pow(_P, -1, 2**64)


def _word_hashes(data):
    """64-bit hash of every word in a byte string, in order, with numpy only (no Python loop per word).

    With prefix sums H[i] = sum_{k<i} c_k P^k (mod 2^64), the word [s, e) hashes to (H[e] - H[s]) P^-s, a
    polynomial in its own bytes that does not depend on where it stands.
    """
    raw = np.frombuffer(data, np.uint8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], _WORD_BYTE[raw].view(np.int8), [0]))))
    starts, ends = edges[::2], edges[1::2]
    powers = np.cumprod(np.full(len(raw), _P, dtype=np.uint64))  # P^1 .. P^n; products wrap mod 2^64
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(_FOLD[raw] * powers)))
    inv = np.concatenate(([np.uint64(1)], np.cumprod(np.full(len(raw), _P_INV, dtype=np.uint64))))
    return (prefix[ends] - prefix[starts]) * inv[starts], starts


def minhash_signatures(texts, num_perm=128, ngram=5, seed=0, batch=512, progress=True):
    """(len(texts), num_perm) uint32 MinHash signatures of word n-gram sets, vectorised over a batch.

    Words are hashed with numpy (_word_hashes), n-grams combined over the whole batch at once, and the
    num_perm hash functions (multiply-add on 64 bits, min, top 32 bits) run as numpy passes over all n-grams.
    A document with fewer than ngram words gets an all-0xFFFFFFFF signature (near-dedupe skips it).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    sig = np.full((len(texts), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    for lo in tqdm(range(0, len(texts), batch), desc='minhash', unit='batch', leave=False,
                   disable=not progress):
        chunk = [t.encode() for t in texts[lo:lo + batch]]
        h, word_starts = _word_hashes(b'\n'.join(chunk))  # a newline between documents ends their words
        doc_starts = np.cumsum([0] + [len(c) + 1 for c in chunk[:-1]])
        doc = np.searchsorted(doc_starts, word_starts, side='right') - 1  # the document of each word
        n = len(h) - ngram + 1
        if n <= 0:
            continue
        shingle = h[:n].copy()
        for j in range(1, ngram):
            shingle = shingle * np.uint64(0x9E3779B97F4A7C15) + h[j:j + n]
        valid = doc[:n] == doc[ngram - 1:]  # the n-gram lies inside one document
        shingle, doc = shingle[valid], doc[:n][valid]
        if not len(doc):
            continue
        docs, starts = np.unique(doc, return_index=True)
        v = np.empty_like(shingle)
        for p in range(num_perm):  # in place, no allocation; the min of the 64-bit hash, then its top 32 bits
            np.multiply(shingle, a[p], out=v)
            np.add(v, b[p], out=v)
            sig[lo + docs, p] = np.minimum.reduceat(v, starts) >> np.uint64(32)
    return sig


def lsh_rows(num_perm, threshold):
    """Rows per LSH band: the most whose collision threshold (1/bands)^(1/rows) stays below `threshold`."""
    return max([r for r in range(1, num_perm + 1)
                if num_perm % r == 0 and (r / num_perm) ** (1 / r) <= threshold] or [1])


def band_keys(sig, rows):
    """(num_perm // rows, len(sig)) uint64: a hash of each band of rows of every signature."""
    mult = np.random.Generator(np.random.PCG64(1)).integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    return (np.stack([(sig[:, lo:lo + rows].astype(np.uint64) * mult).sum(1)  # wraps mod 2^64
                      for lo in range(0, sig.shape[1], rows)]) if len(sig)
            else np.zeros((sig.shape[1] // rows, 0), np.uint64))


def usable_rows(sig):
    """Signatures near-dedupe can use: not all 0xFFFFFFFF (a document shorter than one shingle)."""
    return ~(sig == 0xFFFFFFFF).all(1)


def bucket_pairs(key, idx):
    """Candidate pairs (first, other) of documents idx whose band hash `key` (one per idx) is equal: each
    document paired with the earliest one of its bucket."""
    local = np.argsort(key, kind='stable')
    order, k = idx[local], key[local]
    same = np.concatenate([[False], k[1:] == k[:-1]])
    first = order[np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))]
    return np.stack([first[same], order[same]], 1)


def similar(sig_a, sig_b, threshold):
    """Which row pairs of two signature arrays have estimated Jaccard >= threshold."""
    return (sig_a == sig_b).mean(1) >= threshold


def cluster_duplicates(n, pairs):
    """Boolean mask of the n documents that share a cluster (pairs joined transitively) with an earlier one:
    the earliest document of each cluster is kept. Only documents in pairs are held."""
    parent = {}

    def root(i):
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i
    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        parent[max(ri, rj)] = min(ri, rj)
    dup = np.zeros(n, dtype=bool)
    dup[[i for i in parent if root(i) != i]] = True
    return dup


def near_duplicates(sig, threshold=0.8):
    """Boolean mask of documents that are near-duplicates of an earlier one (estimated Jaccard >= threshold).

    LSH: bands of lsh_rows rows; each candidate pair from a shared bucket is confirmed on the full signature.
    (data.py runs the same steps band by band over signatures kept on disk.)
    """
    idx = np.flatnonzero(usable_rows(sig))
    keys = band_keys(sig, lsh_rows(sig.shape[1], threshold))
    pairs = [bucket_pairs(k[idx], idx) for k in keys]
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), int)
    if len(pairs):
        pairs = pairs[similar(sig[pairs[:, 0]], sig[pairs[:, 1]], threshold)]
    return cluster_duplicates(len(sig), pairs)


def clean_batch(raw, opts):
    """Clean and filter a batch of raw documents: (reasons, texts, keys, sigs) where reasons has one entry
    per raw document (None: kept), and texts, keys (n, 16) uint8 and MinHash sigs belong to the kept ones.

    opts: the data stage's settings (min_doc_chars, ..., num_perm, shingle_words) as a dict. What data.py's
    worker processes run; the result does not depend on how documents are batched.
    """
    cfg = SimpleNamespace(**opts)
    reasons, texts = [], []
    for doc in raw:
        text = clean_text(doc, cfg.scrub_urls, cfg.scrub_emails)
        reasons.append(reject_reason(text, cfg))
        if reasons[-1] is None:
            texts.append(text)
    keys = np.frombuffer(b''.join(map(exact_key, texts)), np.uint8).reshape(-1, 16)
    return reasons, texts, keys, minhash_signatures(texts, cfg.num_perm, cfg.shingle_words, progress=False)
