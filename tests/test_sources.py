"""Tests for corpus/sources.py beyond what tests/test_data.py covers through data.py: documents read as
streams (pieces, bounded memory), parquet through pyarrow, gated hub sets (401/403 and HF_TOKEN), and the real
source specs of configs/sources/ and the data-budget configs, loaded from small local files of the same
formats served as the hub. The layers below have their own: tests/test_streams.py, tests/test_records.py."""
import gzip
import json
import os
import sys
import tracemalloc

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import lumi  # noqa: E402
from corpus import records, sources, streams  # noqa: E402
from test_data import FileServer, make_docs  # noqa: E402

pa = pytest.importorskip('pyarrow')
import pyarrow.parquet as pq  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_parquet(path, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=7)  # several row groups: read a batch at a time


@pytest.fixture
def hub(monkeypatch):
    """A local HTTP server standing in for the Hugging Face hub ($HF_ENDPOINT), recording request headers."""
    s = FileServer({})
    seen = []
    handler = s.httpd.RequestHandlerClass
    original = handler.do_GET

    def do_get(self):
        seen.append(dict(self.headers))
        if isinstance(s.files.get(self.path), str):  # a redirect to that URL
            self.send_response(302)
            self.send_header('Location', s.files[self.path])
            self.end_headers()
            return
        if s.files.get(self.path) == 401:
            self.send_error(401 if 'Authorization' not in self.headers else 403)
            return
        original(self)
    handler.do_GET = do_get
    s.headers = seen
    monkeypatch.setenv('HF_ENDPOINT', s.url)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    yield s
    s.close()


def test_long_text_comes_in_pieces_cut_at_blank_lines(tmp_path, monkeypatch):
    docs = make_docs(40, seed=3)
    (tmp_path / 'big.txt').write_text('\n\n'.join(docs))
    whole = [d.strip() for d in sources.iter_documents(str(tmp_path / 'big.txt'), max_chars=1 << 30)]
    monkeypatch.setattr(sources, 'WHOLE_TEXT_CHARS', 3000)  # a "large" file: ~10 pieces
    pieces = [d.strip() for d in sources.iter_documents(str(tmp_path / 'big.txt'), max_chars=1 << 30)]
    assert len(whole) == 1 and len(pieces) > 5 and all(len(p) <= 3000 for p in pieces)
    assert '\n\n'.join(pieces) == whole[0]  # nothing lost or doubled at the cuts


def test_jsonl_gz_streams_in_bounded_memory(tmp_path):
    line = json.dumps({'text': 'word ' * 200}) + '\n'
    n = (40 << 20) // len(line)  # 40 MB of JSON lines, ~100 KB gzipped
    with gzip.open(tmp_path / 'big.jsonl.gz', 'wt') as f:
        for _ in range(n):
            f.write(line)
    tracemalloc.start()
    try:
        count = sum(1 for _ in sources.iter_documents(str(tmp_path / 'big.jsonl.gz'),
                                                   limits={'max_expand_ratio': 10**4}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 24 << 20, peak  # blocks of 4 MB, never the 40 MB file


def test_truncated_gz_while_streaming_names_the_file(tmp_path):
    body = '\n'.join(json.dumps({'text': d}) for d in make_docs(200)).encode()
    (tmp_path / 'cut.jsonl.gz').write_bytes(gzip.compress(body)[:-200])
    with pytest.raises(ValueError, match=r'cut\.jsonl\.gz: not a valid gzip file'):
        list(sources.iter_documents(str(tmp_path / 'cut.jsonl.gz')))


def test_parquet_text_column_field_and_records(tmp_path):
    docs = make_docs(20, seed=4)
    write_parquet(str(tmp_path / 'a.parquet'), text=docs, id=list(range(20)))
    write_parquet(str(tmp_path / 'b.parquet'), body=docs[:5], title=['t'] * 5)
    assert [d for d in sources.iter_documents(str(tmp_path / 'a.parquet'), max_chars=1 << 20)] == docs
    assert list(sources.iter_documents(f"{tmp_path}/b.parquet@body", max_chars=1 << 20)) == docs[:5]
    recs = list(records.iter_records(str(tmp_path / 'a.parquet')))
    assert recs[3] == {'text': docs[3], 'id': 3}
    os.remove(tmp_path / 'b.parquet')
    # a folder yields its parquet files
    assert list(sources.iter_documents(str(tmp_path), max_chars=1 << 20)) == docs


def test_parquet_without_the_field_is_one_clear_error(tmp_path):
    write_parquet(str(tmp_path / 'b.parquet'), body=['some text here'], title=['t'])
    with pytest.raises(ValueError,
                       match=r"b\.parquet: parquet file has no column 'text' \(it has body, title\)"):
        list(sources.iter_documents(str(tmp_path / 'b.parquet')))
    (tmp_path / 'junk.parquet').write_bytes(b'not parquet at all')
    with pytest.raises(ValueError, match=r'junk\.parquet: not a valid parquet file'):
        list(sources.iter_documents(str(tmp_path / 'junk.parquet')))


def test_parquet_without_pyarrow_says_pip_install(tmp_path, monkeypatch):
    write_parquet(str(tmp_path / 'a.parquet'), text=['hello there'])
    monkeypatch.setitem(sys.modules, 'pyarrow', None)  # what `import pyarrow` meets when it is not installed
    monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
    with pytest.raises(ImportError, match=r'a\.parquet: reading parquet needs pyarrow: pip install pyarrow'):
        list(sources.iter_documents(str(tmp_path / 'a.parquet')))


def test_gated_set_401_names_hf_token_and_token_is_sent_not_shown(tmp_path, hub, monkeypatch):
    path = '/datasets/org/gated/resolve/main/train.jsonl'
    hub.files[path] = 401
    with pytest.raises(ConnectionError, match=r'HTTP 401: the data set is gated or private; set \$HF_TOKEN'):
        list(sources.iter_documents('hf:org/gated:train.jsonl', cache_dir=str(tmp_path)))
    assert 'Authorization' not in hub.headers[-1]
    monkeypatch.setenv('HF_TOKEN', 'hf_secret_value')
    with pytest.raises(ConnectionError, match=r'HTTP 403: .*the token in \$HF_TOKEN may not read it') as e:
        list(sources.iter_documents('hf:org/gated:train.jsonl', cache_dir=str(tmp_path)))
    assert 'hf_secret_value' not in str(e.value)
    assert hub.headers[-1]['Authorization'] == 'Bearer hf_secret_value'
    hub.files[path] = b'{"text": "a readable document"}\n'  # access granted: the same spec now loads
    assert (list(sources.iter_documents('hf:org/gated:train.jsonl', cache_dir=str(tmp_path)))
            == ['a readable document'])
    assert hub.headers[-1]['Authorization'] == 'Bearer hf_secret_value'
    # a redirect to another host (the hub's CDN) does not carry the token; one on the same host does
    port = hub.url.rsplit(':', 1)[1]
    hub.files['/datasets/org/big/resolve/main/x.txt'] = f'http://localhost:{port}/cdn/x.txt?signed=1'
    hub.files['/cdn/x.txt?signed=1'] = b'from the cdn'
    assert (list(streams.iter_files('hf:org/big:x.txt', cache_dir=str(tmp_path)))
            == [('org/big/x.txt', b'from the cdn')])
    assert 'Authorization' in hub.headers[-2] and 'Authorization' not in hub.headers[-1]
    # a url: source never sends the hub's token
    hub.files['/plain.txt'] = b'plain text'
    list(streams.iter_files(f'url:{hub.url}/plain.txt', cache_dir=str(tmp_path)))
    assert 'Authorization' not in hub.headers[-1]


# -----------------------------------------------------------------------------
# configs/sources and the data-budget configs


SETS = {  # the first file of each set, in its real format, with the columns / fields the real one has
    'c4_en': lambda docs, path: open(path, 'wb').write(gzip.compress(''.join(
        json.dumps({'text': d, 'timestamp': '2019-04-25T12:57:54Z', 'url': f'https://x.org/{i}'}) + '\n'
        for i, d in enumerate(docs)).encode())),
    'fineweb_edu': lambda docs, path: write_parquet(path, text=docs,
                                                    id=[f'<urn:{i}>' for i in range(len(docs))],
                                                    score=[3.1] * len(docs)),
    'wikipedia_en': lambda docs, path: write_parquet(path, id=[str(i) for i in range(len(docs))],
                                                     url=['u'] * len(docs), title=['T'] * len(docs),
                                                     text=docs),
    'openwebtext': lambda docs, path: write_parquet(path, text=docs),
    'gutenberg_en': lambda docs, path: write_parquet(
        path, id=['1'] * len(docs), text=[f"header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n{d}\n"
                                          f"*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense"
                                          for d in docs]),
}


def test_every_source_set_parses_and_its_first_file_loads(tmp_path, hub):
    assert sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, 'configs', 'sources'))) == sorted(SETS)
    for name, write in SETS.items():
        pairs = sources.source_set(name)
        assert len(pairs) > 10 and all(sources.parse_spec(s).kind == 'hf' for s, _ in pairs), name
        cfg = lumi.load_config(data.KEYS, [os.path.join(ROOT, 'configs', 'sources', f'{name}.py')])
        assert cfg.sources == pairs[:1]
        s = sources.parse_spec(pairs[0][0])
        repo, _, rev = s.where.partition('==')
        local = tmp_path / os.path.basename(s.inner)
        docs = make_docs(9, seed=len(name))
        write(docs, str(local))
        # a revision is one path segment: refs/convert/parquet travels as refs%2Fconvert%2Fparquet
        hub.files[f"/datasets/{repo}/resolve/"
                  f"{(rev or 'main').replace('/', '%2F')}/{s.inner}"] = local.read_bytes()
        got = [d.strip() for d in sources.iter_documents(pairs[0][0], cache_dir=str(tmp_path / 'cache'),
                                                      max_chars=1 << 20)]
        assert got == docs, name  # gutenberg: header and footer stripped
    with pytest.raises(FileNotFoundError, match="no source set 'c5'.*known: c4_en"):
        sources.source_set('c5')
    with pytest.raises(ValueError, match='fewer than the 99 asked for'):
        sources.source_set('fineweb_edu', 99)


@pytest.mark.parametrize('budget, tokens', [('tiny', 500e6), ('small', 2e9), ('base', 7e9)])
def test_budget_configs_name_the_sets_and_add_up(budget, tokens):
    cfg = lumi.load_config(data.KEYS, [os.path.join(ROOT, 'configs', f'data_{budget}.py')])
    assert cfg.data_dir == f'data/web_{budget}' and cfg.vocab_size == 32768
    per_file = {}
    for name in SETS:
        ns = {}
        exec(open(os.path.join(ROOT, 'configs', 'sources', f'{name}.py')).read(), ns)
        per_file.update({spec: ns['TOKENS_PER_FILE'] for spec in ns['FILES']})
    specs = [s for s, _ in cfg.sources]
    assert len(set(specs)) == len(specs) and all(s in per_file for s in specs)
    assert 0.95 * tokens <= sum(per_file[s] for s in specs) <= 1.1 * tokens


def test_an_unknown_adapter_is_refused_before_anything_is_fetched(tmp_path, hub):
    hub.files['/datasets/org/web/resolve/main/f.jsonl'] = b'{"text": "a document"}\n'
    with pytest.raises(ValueError, match=r"unknown adapter '#jsn' \(known: text, markdown"):
        list(sources.iter_documents('hf:org/web:f.jsonl#jsn', cache_dir=str(tmp_path)))
    assert not hub.headers and not os.path.exists(tmp_path / 'url')  # no request was made
