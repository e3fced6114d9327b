"""Tests for corpus/streams.py, a spec -> byte streams, beyond what tests/test_data.py covers through data.py
(local files, globs, archives, budgets): a spec's #ADAPTER is carried up, not judged here, and a shard's
`pick` keeps the files it does not own from ever being downloaded."""
import io
import json
import os
import sys
import tarfile
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from corpus import streams  # noqa: E402
from test_data import FileServer  # noqa: E402


@pytest.fixture
def hub(monkeypatch):
    """A local HTTP server standing in for the Hugging Face hub ($HF_ENDPOINT)."""
    s = FileServer({})
    monkeypatch.setenv('HF_ENDPOINT', s.url)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    yield s
    s.close()


def test_split_spec_carries_the_adapter_unjudged():
    # the adapters are sources.py's, above this layer: sources.parse_spec refuses an
    # unknown one (test_sources.py)
    s = streams.split_spec('corpus/**/*.jsonl@body#nosuchadapter')
    assert (s.kind, s.where, s.field, s.adapter) == ('local', 'corpus/**/*.jsonl', 'body', 'nosuchadapter')


def test_a_shard_downloads_only_its_own_files(tmp_path, hub):
    for i in range(4):
        hub.files[f'/datasets/org/web/resolve/main/f{i}.jsonl'] = json.dumps(
            {'text': f'document {i}'}).encode()
    specs = [f'hf:org/web:f{i}.jsonl' for i in range(4)]
    fetched = []
    # shard 1 of 2 owns part 0 of sources 1 and 3 (data.py: (si + part) % 2)
    for si, spec in enumerate(specs):
        for f in streams.iter_streams(spec, str(tmp_path / 'c'),
                                      pick=lambda i, size, si=si: (si + i) % 2 == 1):
            fetched.append(f.name)
    assert fetched == ['org/web/f1.jsonl', 'org/web/f3.jsonl']
    assert len(os.listdir(tmp_path / 'c' / 'url')) == 2  # the other shard's files were never downloaded


def test_archive_members_that_are_not_files_are_counted(tmp_path):
    # issue 28: links and devices inside an archive were dropped without a count in the data card
    folder = tmp_path / 'cache' / 'pypi' / 'odd-1.0-sdist'
    folder.mkdir(parents=True)
    with tarfile.open(folder / 'odd-1.0.tar.gz', 'w:gz') as t:
        raw = b'{"text": "a real file"}\n'
        info = tarfile.TarInfo('odd-1.0/data/a.jsonl')
        info.size = len(raw)
        t.addfile(info, io.BytesIO(raw))
        for name, kind in (('link.jsonl', tarfile.SYMTYPE), ('hard.jsonl', tarfile.LNKTYPE),
                           ('dev.jsonl', tarfile.CHRTYPE), ('fifo.jsonl', tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(f'odd-1.0/data/{name}')
            info.type, info.linkname = kind, 'odd-1.0/data/a.jsonl' if kind in (tarfile.SYMTYPE,
                                                                                 tarfile.LNKTYPE) else ''
            t.addfile(info)
        info = tarfile.TarInfo('odd-1.0/other/elsewhere')  # not named by the spec: not counted
        info.type, info.linkname = tarfile.SYMTYPE, 'x'
        t.addfile(info)
    stats = Counter()
    with pytest.warns(UserWarning, match='skipped 4 members that are links, devices or pipes'):
        got = [f.name for f in streams.iter_streams('pypi-sdist:odd==1.0:data/*.jsonl',
                                                    str(tmp_path / 'cache'), stats)]
    assert got == ['odd==1.0:odd-1.0/data/a.jsonl'] and stats['skipped_members'] == 4
