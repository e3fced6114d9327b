"""
Byte streams -> text and records: a stream decoded as UTF-8 in blocks cut at line breaks (invalid bytes
replaced by U+FFFD and counted, line ends normalised), a long text in pieces cut at blank lines, and the
objects of .json (a list, or an object of objects), .jsonl and .parquet files (through pyarrow), read a block
or a row group batch at a time.

Nothing is dropped silently: the `stats` Counter given to these counts files, bytes, empty_files,
bad_utf8_files / bad_utf8_chars (invalid bytes decoded as U+FFFD), not_utf8_files (UTF-16 without a
byte-order mark: NUL bytes), blank_lines and malformed_lines (JSONL), bad_unicode_records (a lone UTF-16
surrogate, which JSON's \\uD800 escapes can say and no UTF-8 file or tokenizer can hold), malformed_files
(JSON), not_objects and skipped_files (iter_records: not .json/.jsonl/.parquet), with a warning naming the
file and line (the first five of a kind, then the total). A file that opens with a UTF-16 or UTF-32
byte-order mark is decoded as such.

Left out: which files a spec names, fetching, archives and decompression (streams.py, fetch.py), and what a
record or a text means (sources.py: adapters into documents; conversations.py: chats and preference pairs).
"""
import codecs
import io
import json
import re
from collections import Counter

from corpus.streams import iter_streams, warn


_BOMS = [(codecs.BOM_UTF32_LE, 'utf-32'), (codecs.BOM_UTF32_BE, 'utf-32'), (codecs.BOM_UTF16_LE, 'utf-16'),
         (codecs.BOM_UTF16_BE, 'utf-16')]  # UTF-32 LE's mark starts with UTF-16 LE's: it is tried first
_SURROGATE = re.compile(r'\\u[dD][89a-fA-F]')  # a JSON escape of a surrogate; a pair makes one character


def _normalise(text):
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    return text.replace('\u2028', '\n').replace('\u2029', '\n\n')


def text_blocks(f, stats, block=1 << 20):
    """The text of stream f in blocks that each end at a line break (so no UTF-8 sequence or CRLF is cut),
    decoded and normalised as the whole file would be at once (UTF-8, or UTF-16/32 after their byte-order
    mark); counts files, bytes, bad UTF-8, files that are not UTF-8 and empty files."""
    stats['files'] += 1
    bad, blank, first, rest, wide = 0, True, True, [], None
    while True:
        chunk = f.read(block)
        if first and chunk and wide is None:
            wide = next((enc for bom, enc in _BOMS if chunk.startswith(bom)), '')
            if wide:
                yield from _wide_blocks(f, chunk, wide, stats, block)
                return
            if chunk.count(0) * 8 > len(chunk[:4096]):  # text is never an eighth NULs; UTF-16 is half
                stats['not_utf8_files'] += 1
                warn(f"{f.name}: not UTF-8 (NUL bytes: UTF-16 without a byte-order mark?); skipped: "
                     "convert it with `iconv -f UTF-16 -t UTF-8`")
                return
        if chunk:
            rest.append(chunk)
            if b'\n' not in chunk:
                # a line longer than a block: keep reading (max_member_bytes bounds a compressed one)
                continue
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
        warn(f"{f.name}: {bad} invalid UTF-8 sequences replaced by U+FFFD")
    if blank:
        stats['empty_files'] += 1
        warn(f"{f.name}: empty file skipped")


def _wide_blocks(f, chunk, encoding, stats, block):
    """text_blocks of a UTF-16 or UTF-32 file (chunk: its first bytes, the byte-order mark first)."""
    decoder, held, blank = codecs.getincrementaldecoder(encoding)(errors='replace'), '', True
    while chunk:
        stats['bytes'] += len(chunk)
        held += decoder.decode(chunk)
        cut = held.rfind('\n') + 1
        if cut:
            blank = blank and not held[:cut].strip()
            yield _normalise(held[:cut])
            held = held[cut:]
        chunk = f.read(block)
    held += decoder.decode(b'', final=True)
    if held:
        blank = blank and not held.strip()
        yield _normalise(held)
    if blank:
        stats['empty_files'] += 1
        warn(f"{f.name}: empty file skipped")


def _valid_unicode(rec, escaped):
    """False for a record holding a lone surrogate (only a JSON escape can put one there: the text itself was
    decoded from UTF-8). escaped: whether the text the record was parsed from holds a surrogate escape at all,
    searched once per line or per .json file (searching a 40 MB file once per record took chitchat's 7,168
    records 3.5 minutes); only then is the record encoded to find out."""
    if not escaped:
        return True
    try:
        json.dumps(rec, ensure_ascii=False).encode('utf-8')
        return True
    except UnicodeEncodeError:
        return False


def text_pieces(blocks, whole_chars):
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
                # no blank line: cut mid-paragraph, as split_document
                cut = cut + 2 if cut > 0 else whole_chars
                yield text[:cut]
                text = text[cut:]
            held, size = [text], len(text)
    if text := ''.join(held):
        yield text


def _json_lines(name, lines, stats, lineno=0, warned=None):
    """Objects of JSON lines; returns the next line number. warned: {reason: warnings given} for the file."""
    warned = Counter() if warned is None else warned
    for line in lines:
        lineno += 1
        if not line.strip():
            stats['blank_lines'] += 1
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _skip_line(f"{name}:{lineno}", 'malformed_lines', f"malformed JSON line skipped ({e.msg})", stats,
                       warned)
            continue
        if not isinstance(rec, dict):
            stats['not_objects'] += 1
            warn(f"{name}:{lineno}: a {type(rec).__name__}, not an object; skipped")
        elif not _valid_unicode(rec, _SURROGATE.search(line)):
            _skip_line(f"{name}:{lineno}", 'bad_unicode_records', "a lone UTF-16 surrogate (\\uD800-\\uDFFF "
                       "unpaired); record skipped", stats, warned)
        else:
            yield rec
    return lineno


def _skip_line(where, reason, message, stats, warned):
    """Count a skipped line by reason; warn naming where it is for the first five of a file, and the total at
    the end (_said_skips)."""
    stats[reason] += 1
    warned[reason] += 1
    if warned[reason] <= 5:
        warn(f"{where}: {message}")


def _said_skips(name, warned):
    for reason, n in warned.items():
        if n > 5:
            warn(f"{name}: {n} lines skipped in all ({reason})")


def json_records(name, blocks, stats):
    """Records of a .json file (held whole: one JSON value) or of JSON lines (a block at a time)."""
    warned, lineno = Counter(), 0
    if name.endswith('.json'):
        text = ''.join(blocks)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not text.strip():
                return
            if e.msg != 'Extra data':  # 'Extra data': JSON lines in a .json file, read them as such
                stats['malformed_files'] += 1
                warn(f"{name}: malformed JSON file skipped (line {e.lineno}: {e.msg})")
                return
            blocks = [text]
        else:
            if isinstance(obj, dict):  # an object of objects ({id: record}) or a single record
                obj = list(obj.values()) if obj and all(isinstance(v, dict) for v in obj.values()) else [obj]
            escaped = _SURROGATE.search(text) is not None
            for i, rec in enumerate(obj if isinstance(obj, list) else [obj]):
                if not isinstance(rec, dict):
                    stats['not_objects'] += 1
                    warn(f"{name}: item {i} is a {type(rec).__name__}, not an object; skipped")
                elif not _valid_unicode(rec, escaped):
                    _skip_line(f"{name}: item {i}", 'bad_unicode_records', "a lone UTF-16 surrogate; record "
                               "skipped", stats, warned)
                else:
                    yield rec
            _said_skips(name, warned)
            return
    for block in blocks:
        lines = block.split('\n')
        if block.endswith('\n'):
            lines.pop()  # the block's closing line break, not an empty line of its own
        lineno = yield from _json_lines(name, lines, stats, lineno, warned)
    _said_skips(name, warned)


def parquet_records(f, columns, stats, batch_rows=4096):
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
        raise ValueError(f"{f.name}: parquet file has no column {missing[0]!r} "
                         f"(it has {', '.join(have[:12])}); "
                         f"name the text column with @FIELD")
    stats['bytes'] += pf.metadata.serialized_size + sum(pf.metadata.row_group(i).total_byte_size
                                                        for i in range(pf.metadata.num_row_groups))
    if not pf.metadata.num_rows:
        stats['empty_files'] += 1
        warn(f"{f.name}: empty file skipped")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        yield from batch.to_pylist()


def is_parquet(name):
    return name.lower().endswith('.parquet')


def iter_records(spec, cache_dir=None, stats=None, limits=None, columns=None):
    """Yield the objects of every .json (a list, or an object of objects), .jsonl and .parquet file a spec
    names, each read as a stream (a .json file is one value, so it is held whole)."""
    stats = Counter() if stats is None else stats
    for f in iter_streams(spec, cache_dir, stats, limits):
        if is_parquet(f.name):
            yield from parquet_records(f, columns, stats)
        elif not f.name.lower().endswith(('.json', '.jsonl', '.ndjson')):
            stats['skipped_files'] += 1
            warn(f"{f.name}: not a .json/.jsonl/.parquet file; skipped")
        else:
            yield from json_records(f.name, text_blocks(f, stats), stats)
