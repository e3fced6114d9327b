"""
Byte streams -> text and records: a stream decoded as UTF-8 in blocks cut at line breaks (invalid bytes
replaced by U+FFFD and counted, line ends normalised), a long text in pieces cut at blank lines, and the
objects of .json (a list, or an object of objects), .jsonl and .parquet files (through pyarrow), read a block
or a row group batch at a time.

Nothing is dropped silently: the `stats` Counter given to these counts files, bytes, empty_files,
bad_utf8_files / bad_utf8_chars (invalid bytes decoded as U+FFFD), malformed_lines (JSONL), malformed_files
(JSON), not_objects and skipped_files (iter_records: not .json/.jsonl/.parquet), with a warning naming file
and line.

Left out: which files a spec names, fetching, archives and decompression (streams.py, fetch.py), and what a
record or a text means (sources.py: adapters into documents; conversations.py: chats and preference pairs).
"""
import io
import json
from collections import Counter

from corpus.streams import iter_streams, warn


def _normalise(text):
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    return text.replace('\u2028', '\n').replace('\u2029', '\n\n')


def text_blocks(f, stats, block=1 << 20):
    """The text of stream f in blocks that each end at a line break (so no UTF-8 sequence or CRLF is cut),
    decoded and normalised as the whole file would be at once;
    counts files, bytes, bad UTF-8 and empty files."""
    stats['files'] += 1
    bad, blank, first, rest = 0, True, True, []
    while True:
        chunk = f.read(block)
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
                warn(f"{name}:{lineno}: malformed JSON line skipped ({e.msg})")
            continue
        if isinstance(rec, dict):
            yield rec
        else:
            stats['not_objects'] += 1
            warn(f"{name}:{lineno}: a {type(rec).__name__}, not an object; skipped")
    return lineno


def json_records(name, blocks, stats):
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
                warn(f"{name}: malformed JSON file skipped (line {e.lineno}: {e.msg})")
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
                    warn(f"{name}: item {i} is a {type(rec).__name__}, not an object; skipped")
            return
    for block in blocks:
        lines = block.split('\n')
        if block.endswith('\n'):
            lines.pop()  # the block's closing line break, not an empty line of its own
        lineno = yield from _json_lines(name, lines, stats, lineno, warned)
    if warned[0] > 5:
        warn(f"{name}: {warned[0]} malformed JSON lines skipped in all")


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
