"""Tests for corpus/records.py, byte streams -> text and records, beyond what tests/test_sources.py and
tests/test_data.py cover through documents: a text decoded in blocks is the text decoded whole."""
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
