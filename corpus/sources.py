"""
Sources: the records and text of a source's files -> documents, through the adapters. How a spec is written
and how its files are found and read is below this, in streams.py (bytes) and records.py (text blocks and
records); this module is what #ADAPTER and @FIELD do, and parse_spec checks that #ADAPTER names one.

Adapters turn a file into documents: text (strips a Project Gutenberg header/footer, splits at
<|endoftext|>), markdown (drops markup; a line that is all **BOLD** becomes 'BOLD:', as in plays),
lines (one document per line), json (a field of each record), chat ('messages' as chitchat turns
[[{text, sender}]] or [{role, content}] -> lines 'A: ...'), bible (verse records {book, chapter, text} -> one
document per chapter). Every document longer than max_chars is split at paragraph, then line, then
space boundaries.

Every count the loaders keep (LOADER_COUNTS, those of streams.py and records.py with missing_field: a record
without the adapter's field, and blank_docs: an adapter's piece that is only whitespace) is given to the
`stats` Counter of iter_documents, with docs (documents out).

Left out: fetching (fetch.py), byte streams, archives and budgets (streams.py), decoding text and reading
records (records.py), cleaning and deduplication (clean.py), and anything that writes a corpus (data.py,
parts.py).
"""
import os
import re
from collections import Counter

import lumi
from corpus.records import is_parquet, json_records, parquet_records, text_blocks, text_pieces
from corpus.streams import iter_streams, split_spec, warn

# a key data.py takes (its KEY_FILES)
max_doc_chars = 8000        # [1, inf) longer texts are split into documents of at most this many characters
WHOLE_TEXT_CHARS = 32 << 20  # a text file up to this long reaches its adapter whole
                             # (a Gutenberg header and footer)
LOADER_COUNTS = ('empty_files', 'bad_utf8_files', 'bad_utf8_chars', 'not_utf8_files', 'blank_lines',
                 'malformed_lines', 'bad_unicode_records', 'malformed_files', 'not_objects', 'missing_field',
                 'blank_docs', 'skipped_files', 'skipped_links', 'skipped_members')

_GUT_START = re.compile(r'^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$',
                        re.M | re.I)
_GUT_END = re.compile(r'^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG'
                      r'|^End of (?:the |this )?Project Gutenberg', re.M | re.I)


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
                warn(f"{name}: a record has no string field {field!r} "
                     f"(keys: {', '.join(list(rec)[:8])}); skipped")
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
                warn(f"{name}: a record has no list field {field!r}; skipped")
            continue
        speakers, lines = {}, []
        for turn in msgs:  # chitchat: a turn is a list of messages of one sender
            turn = turn if isinstance(turn, list) else [turn]
            parts = [m for m in turn if isinstance(m, dict)]
            text = ' '.join(str(m.get('text') or m.get('content') or m.get('value') or '').strip()
                            for m in parts)
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
                warn(f"{name}: a verse record lacks book, chapter or a string {field!r}; skipped")
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
    """Books as records (a parquet of Project Gutenberg): the json adapter,
    license header and footer stripped."""
    return (strip_gutenberg(t) for t in _json_docs(recs, field, name, stats))


RECORD_ADAPTERS = {'json': _json_docs, 'chat': _chat_docs, 'bible': _bible_docs, 'gutenberg': _gutenberg_docs}
ADAPTERS = {**TEXT_ADAPTERS, **RECORD_ADAPTERS}


def parse_spec(spec):
    """A source spec split into its parts (streams.split_spec; the syntax is in streams.py), its #ADAPTER
    one of ADAPTERS: a misspelt one is refused before anything is fetched."""
    s = split_spec(spec)
    if s.adapter and s.adapter not in ADAPTERS:
        raise ValueError(f"{s.raw}: unknown adapter '#{s.adapter}' (known: {', '.join(ADAPTERS)})")
    return s


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
    with open(path, encoding='utf-8') as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    specs = namespace['FILES'][:files]
    if files is not None and len(specs) < files:
        raise ValueError(f"configs/sources/{name}.py lists {len(specs)} files, "
                         f"fewer than the {files} asked for")
    return [(spec, float(weight)) for spec in specs]


def documents_of(f, spec, stats, max_chars=None):
    """The documents of one stream of a source (streams.iter_streams), after the spec's adapter,
    long ones split."""
    s, max_chars = parse_spec(spec), max_chars or max_doc_chars
    adapter = s.adapter or _default_adapter(f.name)
    if is_parquet(f.name):
        if adapter in TEXT_ADAPTERS:
            raise ValueError(f"{f.name}: a parquet file needs a record adapter (json, chat, bible), "
                             f"not #{adapter}")
        docs = RECORD_ADAPTERS[adapter](parquet_records(f, _record_columns(adapter, s.field), stats),
                                        s.field, f.name, stats)
    elif adapter in TEXT_ADAPTERS:
        docs = (doc for piece in text_pieces(text_blocks(f, stats), WHOLE_TEXT_CHARS)
                for doc in TEXT_ADAPTERS[adapter](piece))
    else:
        docs = RECORD_ADAPTERS[adapter](json_records(f.name, text_blocks(f, stats), stats),
                                        s.field, f.name, stats)
    for doc in docs:
        for piece in split_document(doc, max_chars):
            if piece.strip():
                stats['docs'] += 1
                yield piece
            else:  # a blank line of the lines adapter, the space after a text's last <|endoftext|>
                stats['blank_docs'] += 1


def iter_documents(spec, cache_dir=None, stats=None, max_chars=None, limits=None):
    """Yield the text documents of a source after its adapter, long ones split to max_chars (not cleaned).

    Files are read as streams: JSON lines and parquet row groups a batch at a time, a text file whole up to
    WHOLE_TEXT_CHARS and beyond that in pieces cut at blank lines.
    """
    spec = parse_spec(spec)  # a misspelt #ADAPTER is refused before anything is fetched
    stats = Counter() if stats is None else stats
    for f in iter_streams(spec, cache_dir, stats, limits):
        yield from documents_of(f, spec, stats, max_chars)
