"""
serve.py through sample.py's generation, as clients use it: plain and streamed completions and chat with
urllib (and the official openai client when it is installed), answers equal to sample.complete run alone,
several prompts and n in one request, concurrent clients, malformed requests answered 4xx with OpenAI's error
body while the server keeps serving, and `python sample.py --serve` on its port.
"""
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import lumi
import sample as S
from serve import Server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS='1')


def greedy(n, **kw):
    return S.Sampling(max_new_tokens=n, temperature=0.0, top_p=1.0, **kw)



@pytest.fixture(scope='module')
def loaded(lively_checkpoint):
    return S.load_model(lively_checkpoint)


@pytest.fixture(scope='module')
def server(loaded):
    model, tok, _ = loaded
    generate = lambda prompts, params, chat, seed: S.stream_text(model, tok, prompts, params, chat,
                                                                 S.make_generator(seed, 'cpu'))
    srv = Server(generate, tok, model.cfg.block_size, greedy(16), 'lumi-pretrain', port=0, max_tokens_limit=64,
                 max_batch=4, max_body_bytes=4096, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{srv.server_address[1]}', srv
    srv.shutdown()
    srv.server_close()


def call(url, path, body=None, raw=None, headers=None, method=None):
    """(status, parsed JSON or the SSE events or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers=headers or ({'Content-Type': 'application/json'} if data else {}))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, kind, text = r.status, r.headers.get('Content-Type'), r.read().decode()
    except urllib.error.HTTPError as e:
        status, kind, text = e.code, e.headers.get('Content-Type'), e.read().decode()
    if kind == 'text/event-stream':
        events = [line[6:] for line in text.split('\n\n') if line.startswith('data: ')]
        assert events[-1] == '[DONE]'
        return status, [json.loads(e) for e in events[:-1]]
    return status, json.loads(text) if kind == 'application/json' else text


def streamed_text(events, index=0):
    parts = [c.get('text', c.get('delta', {}).get('content'))
             for e in events for c in e['choices'] if c['index'] == index]
    return ''.join(p for p in parts if p)


def test_server_health_models_and_page(server):
    url, srv = server
    assert call(url, '/health') == (200, {'status': 'ok', 'model': 'lumi-pretrain'})
    status, models = call(url, '/v1/models')
    assert status == 200 and [m['id'] for m in models['data']] == ['lumi-pretrain']
    status, page = call(url, '/')
    assert status == 200 and '/v1/chat/completions' in page and '"lumi-pretrain"' in page


def test_server_plain_and_streamed_completions(server, loaded):
    url, _ = server
    model, tok, _ = loaded
    ids = [lumi.BOS_ID] + tok.encode('Shall I compare')
    want, _, n = S.complete(model, tok, [ids], greedy(10))[0]
    body = {'model': 'lumi-pretrain', 'prompt': 'Shall I compare', 'max_tokens': 10, 'temperature': 0}
    status, r = call(url, '/v1/completions', body)
    assert status == 200 and r['object'] == 'text_completion' and r['model'] == 'lumi-pretrain'
    assert r['choices'][0]['text'] == want and r['choices'][0]['index'] == 0
    assert r['usage'] == {'prompt_tokens': len(ids), 'completion_tokens': n, 'total_tokens': len(ids) + n}
    status, events = call(url, '/v1/completions', dict(body, stream=True, stream_options={'include_usage': True}))
    assert status == 200 and streamed_text(events) == want
    assert [c['finish_reason'] for e in events for c in e['choices']][-1] == r['choices'][0]['finish_reason']
    assert events[-1]['usage'] == r['usage'] and events[-1]['choices'] == []
    # several prompts and n: one batch, each choice as if alone
    status, r = call(url, '/v1/completions', dict(body, prompt=['Shall I compare', 'To be'], n=2))
    assert status == 200 and [c['index'] for c in r['choices']] == [0, 1, 2, 3]
    assert r['choices'][0]['text'] == r['choices'][1]['text'] == want


def test_server_chat_plain_and_streamed(server, loaded):
    url, _ = server
    model, tok, _ = loaded
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'How are you today?'}]
    ids, _ = lumi.render_chat(tok, messages, add_generation_prompt=True)
    want, finish, _ = S.complete(model, tok, [ids], greedy(12), chat=True)[0]
    body = {'model': 'lumi-pretrain', 'messages': messages, 'max_tokens': 12}
    status, r = call(url, '/v1/chat/completions', body)
    assert status == 200 and r['object'] == 'chat.completion'
    assert r['choices'][0]['message'] == {'role': 'assistant', 'content': want}
    assert r['choices'][0]['finish_reason'] == finish and r['usage']['prompt_tokens'] == len(ids)
    status, events = call(url, '/v1/chat/completions', dict(body, stream=True))
    assert status == 200 and all(e['object'] == 'chat.completion.chunk' for e in events)
    assert events[0]['choices'][0]['delta'] == {'role': 'assistant', 'content': ''}
    assert streamed_text(events) == want and events[-1]['choices'][0]['finish_reason'] == finish
    parts = dict(body, messages=[{'role': 'user', 'content': [{'type': 'text', 'text': 'How are you today?'}]}])
    assert call(url, '/v1/chat/completions', parts)[0] == 200


def test_server_concurrent_clients_never_mix(server):
    url, _ = server
    prompts = ['To be, or not', 'The quick brown', 'Hello, how are', 'In the beginning', 'A stitch in',
               'Shall I', 'Thou art more', 'What are you']
    bodies = [{'prompt': p, 'max_tokens': 12, 'temperature': 0, 'stream': i % 2 == 1} for i, p in enumerate(prompts)]
    text = lambda b: (lambda s, r: streamed_text(r) if b['stream'] else r['choices'][0]['text'])(
        *call(url, '/v1/completions', b))
    alone = [text(b) for b in bodies]
    assert len(set(alone)) == len(alone)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(text, bodies))
    assert together == alone


def test_server_refuses_bad_requests_and_keeps_serving(server):
    url, _ = server
    ok = {'prompt': 'hi', 'max_tokens': 4}
    bad = [  # (path, body or raw bytes, status, param)
        ('/v1/completions', b'{not json', 400, None),
        ('/v1/completions', b'[1, 2]', 400, None),
        ('/v1/completions', b'\xff\xfe', 400, None),
        ('/v1/completions', dict(ok, max_tokens='ten'), 400, 'max_tokens'),
        ('/v1/completions', dict(ok, max_tokens=True), 400, 'max_tokens'),
        ('/v1/completions', dict(ok, temperature='hot'), 400, 'temperature'),
        ('/v1/completions', dict(ok, top_p=0), 400, 'top_p'),
        ('/v1/completions', dict(ok, prompt=5), 400, 'prompt'),
        ('/v1/completions', {'max_tokens': 4}, 400, 'prompt'),
        ('/v1/completions', dict(ok, stop=[1]), 400, 'stop'),
        ('/v1/completions', dict(ok, stream='yes'), 400, 'stream'),
        ('/v1/completions', dict(ok, model='gpt-4'), 404, 'model'),
        ('/v1/completions', dict(ok, model=7), 400, 'model'),
        ('/v1/completions', dict(ok, max_tokens=65), 400, 'max_tokens'),
        ('/v1/completions', dict(ok, n=3, prompt=['a', 'b']), 400, 'n'),
        ('/v1/completions', dict(ok, prompt='fox ' * 100), 400, 'prompt'),
        ('/v1/completions', dict(ok, logprobs=3), 400, 'logprobs'),
        ('/v1/completions', dict(ok, prompt='x' * 5000), 413, None),
        ('/v1/chat/completions', {'max_tokens': 4}, 400, 'messages'),
        ('/v1/chat/completions', {'messages': []}, 400, 'messages'),
        ('/v1/chat/completions', {'messages': 'hi'}, 400, 'messages'),
        ('/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'hi'}]}, 400, 'messages[0]'),
        ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 3}]}, 400, 'messages[0]'),
        ('/v1/nothing', ok, 404, None),
    ]
    for path, body, status, param in bad:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, r = call(url, path, raw=raw, headers={'Content-Type': 'application/json'})
        assert got == status, (path, body, r)
        assert set(r['error']) == {'message', 'type', 'param', 'code'} and r['error']['param'] == param, r
    assert call(url, '/health')[0] == 200
    assert call(url, '/v1/completions', ok)[0] == 200


def test_openai_client_plain_and_streamed(server):
    openai = pytest.importorskip('openai')
    url, _ = server
    client = openai.OpenAI(base_url=url + '/v1', api_key='unused')
    r = client.completions.create(model='lumi-pretrain', prompt='To be', max_tokens=8, temperature=0)
    plain = r.choices[0].text
    assert plain and r.usage.completion_tokens >= 1
    chunks = client.completions.create(model='lumi-pretrain', prompt='To be', max_tokens=8, temperature=0, stream=True)
    assert ''.join(c.choices[0].text for c in chunks if c.choices) == plain
    messages = [{'role': 'user', 'content': 'Hello'}]
    r = client.chat.completions.create(model='lumi-pretrain', messages=messages, max_tokens=8, temperature=0)
    chunks = client.chat.completions.create(model='lumi-pretrain', messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == r.choices[0].message.content
    assert [m.id for m in client.models.list()] == ['lumi-pretrain']
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model='nope', prompt='x', max_tokens=2)


def test_cli_serve_answers_on_its_port(lively_checkpoint):
    proc = subprocess.Popen([sys.executable, 'sample.py', '--serve', f'--ckpt={lively_checkpoint}', '--port=0',
                             '--temperature=0'], cwd=REPO, env=CHILD_ENV, stderr=subprocess.PIPE, text=True)
    try:
        line = ''
        while 'serving' not in line:
            line = proc.stderr.readline()
            assert line, 'the server exited before serving'
        url = line.split()[-4].rstrip('/')  # "serving 'NAME' at http://127.0.0.1:PORT/ (API under /v1)"
        assert url.startswith('http://127.0.0.1:')
        assert call(url, '/health')[0] == 200
        status, r = call(url, '/v1/completions', {'prompt': 'To be', 'max_tokens': 5})
        assert status == 200 and r['choices'][0]['finish_reason'] in ('stop', 'length')
        proc.send_signal(2)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stderr.close()
