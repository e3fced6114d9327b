"""Tests for corpus/records.py, byte streams -> text and records, beyond what tests/test_sources.py and
tests/test_data.py cover through documents: a text decoded in blocks is the text decoded whole."""
import codecs
import json
import os
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from corpus import records, streams  # noqa: E402


def test_text_blocks_match_whole_decode_at_any_block_size(tmp_path):
    raw = ('caf\u00e9 \u2028line\r\nnext\rthird\n\ufeffmid\n'.encode() + b'bad \xff byte\n'
           + 'x\u2029y'.encode())
    (tmp_path / 'a.txt').write_bytes(b'\xef\xbb\xbf' + raw)
    whole = None
    for block in (1, 3, 7, 1 << 20):
        stats = Counter()
        with pytest.warns(UserWarning, match='1 invalid UTF-8'):
            # held: a stream lives as long as its generator
            files = streams.iter_streams(str(tmp_path / 'a.txt'))
            text = ''.join(records.text_blocks(next(files), stats, block))
        whole = whole or text
        assert text == whole and stats['bad_utf8_chars'] == 1 and stats['bytes'] == len(raw) + 3
    assert whole.startswith('caf\u00e9 \nline\nnext\nthird\n\ufeffmid\n') and whole.endswith('x\n\ny')


def records_of(tmp_path, name, raw):
    (tmp_path / name).write_bytes(raw)
    stats = Counter()
    return list(records.iter_records(str(tmp_path / name), stats=stats)), stats


def test_a_lone_surrogate_skips_its_record_only_naming_file_and_line(tmp_path):
    # issue 28: '\ud800' stopped data.py with a UnicodeEncodeError that named neither the file nor the line
    lines = [json.dumps({'text': f'record {i}'}) for i in range(8)]
    lines[2] = '{"text": "lone \\ud800 here"}'
    lines[5] = '{"text": "\\udfff"}'
    lines.insert(6, '{"text": "a pair \\ud83d\\ude00 is one character"}')
    with pytest.warns(UserWarning) as said:
        got, stats = records_of(tmp_path, 'a.jsonl', ('\n'.join(lines) + '\n').encode())
    assert [r['text'] for r in got] == ['record 0', 'record 1', 'record 3', 'record 4',
                                        'a pair \U0001f600 is one character', 'record 6', 'record 7']
    assert stats['bad_unicode_records'] == 2
    messages = [str(w.message) for w in said]
    assert any(m.startswith(f"{tmp_path / 'a.jsonl'}:3: a lone UTF-16 surrogate") for m in messages)
    assert any(':6: a lone UTF-16 surrogate' in m for m in messages)
    with pytest.warns(UserWarning, match=r'b\.json: item 1: a lone UTF-16 surrogate'):
        got, stats = records_of(tmp_path, 'b.json', b'[{"text": "ok"}, {"text": "bad \\udc00"}]')
    assert got == [{'text': 'ok'}] and stats['bad_unicode_records'] == 1


def test_a_json_file_is_searched_for_surrogate_escapes_once_not_once_per_record(tmp_path, monkeypatch):
    # the search ran over the whole file for every record: chitchat's 40 MB and 7,168 records took minutes
    searched = []

    class Counting:
        def search(self, text):
            searched.append(len(text))
            return real.search(text)
    real = records._SURROGATE
    monkeypatch.setattr(records, '_SURROGATE', Counting())
    items = [{'text': f'record {i} \U0001f600'} for i in range(200)] + [{'text': 'lone \ud800'}]
    raw = json.dumps(items).encode()  # ensure_ascii: every emoji is a surrogate pair escape
    with pytest.warns(UserWarning, match=r'item 200: a lone UTF-16 surrogate'):
        got, stats = records_of(tmp_path, 'c.json', raw)
    assert len(got) == 200 and stats['bad_unicode_records'] == 1
    assert searched == [len(raw)]


def test_blank_lines_are_counted(tmp_path):
    got, stats = records_of(tmp_path, 'a.jsonl', b'{"text": "a"}\n   \n\t\n\n{"text": "b"}\n')
    assert [r['text'] for r in got] == ['a', 'b'] and stats['blank_lines'] == 3


@pytest.mark.parametrize('encoding', ['utf-16', 'utf-16-be', 'utf-32'])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    # issue 28: a UTF-16 JSONL file ended in an error that did not name it
    text = '\n'.join(json.dumps({'text': f'caf\u00e9 {i} \U0001f600'}, ensure_ascii=False)
                     for i in range(500))
    raw = text.encode(encoding)
    if encoding == 'utf-16-be':
        raw = codecs.BOM_UTF16_BE + raw
    for block in (7, 1 << 20):  # blocks cut anywhere, even inside a code unit
        (tmp_path / 'w.jsonl').write_bytes(raw)
        stats = Counter()
        files = streams.iter_streams(str(tmp_path / 'w.jsonl'))  # held: a stream lives as long as it
        blocks = list(records.text_blocks(next(files), stats, block))
        assert ''.join(blocks) == text and stats['bytes'] == len(raw)
    got, stats = records_of(tmp_path, 'w.jsonl', raw)
    assert len(got) == 500 and got[0]['text'] == 'caf\u00e9 0 \U0001f600' and not stats['malformed_lines']


def test_utf16_without_a_byte_order_mark_is_skipped_naming_the_file(tmp_path):
    raw = '\n'.join(json.dumps({'text': f'record {i}'}) for i in range(5)).encode('utf-16-le')
    with pytest.warns(UserWarning, match=r'u\.jsonl: not UTF-8 \(NUL bytes'):
        got, stats = records_of(tmp_path, 'u.jsonl', raw)
    assert got == [] and stats['not_utf8_files'] == 1
