"""
serve.py through engine.py's generation, as clients use it: plain and streamed completions and chat with
urllib (and the official openai client when it is installed), answers equal to engine.stream_text run alone,
several prompts and n in one request, concurrent clients, malformed requests answered 4xx with OpenAI's error
body while the server keeps serving, and `python sample.py --serve` (which runs serve.py) on its port.
"""
import contextlib
import http.client
import json
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import checkpoint
import engine
import sample as S
import serve
from serve import SERVER_KEYS, Server
from test_engine import complete
from test_sample import default_ctrl_c
from tokenizer import BOS_ID, render_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS='1')


def greedy(n, **kw):
    return engine.Sampling(max_new_tokens=n, temperature=0.0, top_p=1.0, **kw)



@pytest.fixture(scope='module')
def loaded(lively_checkpoint):
    return checkpoint.load_model(lively_checkpoint)


@pytest.fixture(scope='module')
def server(loaded):
    model, tok, _ = loaded
    generate = lambda prompts, params, chat, seed: engine.stream_text(model, tok, prompts, params, chat,
                                                                 engine.make_generator(seed, 'cpu'))
    # turn_seconds=0: requests that arrive together take turns every token, so each concurrent test
    # checks that interleaved generations keep apart
    srv = Server(generate, tok, model.cfg.block_size, greedy(16), 'lumi-pretrain', port=0,
                 max_tokens_limit=64, max_batch=4, max_body_bytes=4096, quiet=True, turn_seconds=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{srv.server_address[1]}', srv
    srv.shutdown()
    srv.server_close()


def call(url, path, body=None, raw=None, headers=None, method=None, timeout=60):
    """(status, parsed JSON or the SSE events or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers=headers or ({'Content-Type': 'application/json'} if data else {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
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
    ids = [BOS_ID] + tok.encode('Shall I compare')
    want, _, n = complete(model, tok, [ids], greedy(10))[0]
    body = {'model': 'lumi-pretrain', 'prompt': 'Shall I compare', 'max_tokens': 10, 'temperature': 0}
    status, r = call(url, '/v1/completions', body)
    assert status == 200 and r['object'] == 'text_completion' and r['model'] == 'lumi-pretrain'
    assert r['choices'][0]['text'] == want and r['choices'][0]['index'] == 0
    assert r['usage'] == {'prompt_tokens': len(ids), 'completion_tokens': n, 'total_tokens': len(ids) + n}
    status, events = call(url, '/v1/completions',
                          dict(body, stream=True, stream_options={'include_usage': True}))
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
    ids, _ = render_chat(tok, messages, add_generation_prompt=True)
    want, finish, _ = complete(model, tok, [ids], greedy(12), chat=True)[0]
    body = {'model': 'lumi-pretrain', 'messages': messages, 'max_tokens': 12}
    status, r = call(url, '/v1/chat/completions', body)
    assert status == 200 and r['object'] == 'chat.completion'
    assert r['choices'][0]['message'] == {'role': 'assistant', 'content': want}
    assert r['choices'][0]['finish_reason'] == finish and r['usage']['prompt_tokens'] == len(ids)
    status, events = call(url, '/v1/chat/completions', dict(body, stream=True))
    assert status == 200 and all(e['object'] == 'chat.completion.chunk' for e in events)
    assert events[0]['choices'][0]['delta'] == {'role': 'assistant', 'content': ''}
    assert streamed_text(events) == want and events[-1]['choices'][0]['finish_reason'] == finish
    parts = dict(body, messages=[{'role': 'user',
                                  'content': [{'type': 'text', 'text': 'How are you today?'}]}])
    assert call(url, '/v1/chat/completions', parts)[0] == 200


def test_server_concurrent_clients_never_mix(server):
    url, _ = server
    prompts = ['To be, or not', 'The quick brown', 'Hello, how are', 'In the beginning', 'A stitch in',
               'Shall I', 'Thou art more', 'What are you']
    bodies = [{'prompt': p, 'max_tokens': 12, 'temperature': 0, 'stream': i % 2 == 1}
              for i, p in enumerate(prompts)]
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
    chunks = client.completions.create(model='lumi-pretrain', prompt='To be', max_tokens=8, temperature=0,
                                       stream=True)
    assert ''.join(c.choices[0].text for c in chunks if c.choices) == plain
    messages = [{'role': 'user', 'content': 'Hello'}]
    r = client.chat.completions.create(model='lumi-pretrain', messages=messages, max_tokens=8, temperature=0)
    chunks = client.chat.completions.create(model='lumi-pretrain', messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    assert (''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
            == r.choices[0].message.content)
    assert [m.id for m in client.models.list()] == ['lumi-pretrain']
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model='nope', prompt='x', max_tokens=2)


def test_cli_serve_answers_on_its_port(lively_checkpoint):
    proc = subprocess.Popen([sys.executable, 'sample.py', '--serve', f'--ckpt={lively_checkpoint}',
                             '--port=0', '--temperature=0'],
                            cwd=REPO, env=CHILD_ENV, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_ctrl_c)  # the Ctrl-C below reaches it as from a shell
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


# -----------------------------------------------------------------------------
# hostile clients: one test per way a probe once got a 5xx, a traceback, a hang or a held thread. Each ends in
# seconds, and the server still answers a normal request at once afterwards.

NEXT_WITHIN = 2  # seconds the next normal request may take after a hostile one


@pytest.fixture(scope='module')
def tough(loaded):
    """A server with short deadlines, room for large bodies and long generations (EOS ignored, so each runs to
    max_tokens), and a small worker pool."""
    model, tok, _ = loaded
    generate = lambda prompts, params, chat, seed: engine.stream_text(model, tok, prompts, params, chat,
                                                                 engine.make_generator(seed, 'cpu'))
    srv = Server(generate, tok, model.cfg.block_size, greedy(4, ignore_eos=True), 'lumi-pretrain', port=0,
                 quiet=True, max_tokens_limit=4096, max_batch=8, max_body_bytes=1 << 20, header_timeout=1,
                 body_timeout=1, workers=4, queue_size=4, max_stop_chars=64)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1], srv
    srv.shutdown()
    srv.server_close()


def exchange(port, data, timeout=10, half_close=False):
    """Send raw bytes on a fresh connection; (status, headers, parsed JSON or raw body) of the answer."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        r = http.client.HTTPResponse(sock)
        r.begin()
        body = r.read()
        kind = r.getheader('Content-Type', '')
        return r.status, r, json.loads(body) if kind == 'application/json' else body


def post(path, body, port, headers=''):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f'POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}'
            f'Content-Length: {len(data)}\r\n\r\n').encode() + data


def assert_refused(answer, status, param=None):
    got, _, r = answer
    assert got == status, r
    assert set(r['error']) == {'message', 'type', 'param', 'code'} and r['error']['param'] == param, r
    assert 'Traceback' not in r['error']['message'] and 'Error(' not in r['error']['message'], r


def assert_serving(port):
    status, r = call(f'http://127.0.0.1:{port}', '/v1/completions', {'prompt': 'To be', 'max_tokens': 2},
                     timeout=NEXT_WITHIN)
    assert status == 200 and r['usage']['completion_tokens'] >= 1


def nest(value, depth):
    return '[' * depth + json.dumps(value) + ']' * depth


@pytest.mark.parametrize('depth', [40, 1000, 400_000])
def test_deep_json_is_refused(tough, depth):
    port, _ = tough
    for field in ('prompt', 'stop', 'messages', 'surprise'):
        path = '/v1/chat/completions' if field == 'messages' else '/v1/completions'
        raw = f'{{"prompt": "hi", "{field}": {nest("x", depth)}}}'.encode()
        got, _, r = exchange(port, post(path, raw, port))
        assert got == 400 and r['error']['code'] == 'too_deep', r
    assert_serving(port)


def test_lone_surrogates_are_refused_naming_the_field(tough):
    port, _ = tough
    assert_refused(exchange(port, post('/v1/completions', b'{"prompt": "a\\ud800b"}', port)), 400, 'prompt')
    assert_refused(exchange(port, post('/v1/completions', b'{"prompt": "x", "stop": ["\\udfff"]}', port)),
                   400, 'stop[0]')
    chat = b'{"messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}'  # a surrogate as raw UTF-8 bytes
    assert_refused(exchange(port, post('/v1/chat/completions', chat, port)), 400, 'messages[0].content')
    assert_serving(port)


@pytest.mark.parametrize('length', ['\u00b2', '\u0661\u0662', '1' * 5000, '-1', '12, 13'])
def test_bad_content_length_is_refused(tough, length):
    port, _ = tough
    data = (f'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n'
            '{}').encode()
    got, r, body = exchange(port, data)
    assert got == 400 and body['error']['code'] == 'invalid_value' and r.getheader('Connection') == 'close'
    assert_serving(port)


def test_short_body_times_out_with_408(tough):
    port, _ = tough
    data = post('/v1/completions', {'prompt': 'hi'}, port)
    # 9 + the real length
    got, r, body = exchange(port, data.replace(b'Content-Length: ', b'Content-Length: 9'))
    assert got == 408 and body['error']['code'] == 'request_timeout' and r.getheader('Connection') == 'close'
    assert_serving(port)


@pytest.mark.parametrize('data', [b'GET /\r\n', b'\x16\x03\x01\x02\x00garbage with no line end',
                                  b'\r\n', b'GET / HTTP/2.0\r\n\r\n',
                                  b'GET / HTTP/1.1\r\n' + b'X: y\r\n' * 101])
def test_garbage_request_lines_get_400_or_408(tough, data):
    port, _ = tough
    got, r, body = exchange(port, data)
    assert got in (400, 408, 431) and set(body['error']) == {'message', 'type', 'param', 'code'}
    assert r.getheader('Connection') == 'close'
    assert_serving(port)


def test_empty_request_gets_an_answer(tough):
    port, _ = tough
    got, _, body = exchange(port, b'')  # connected, and sent nothing
    assert got == 408 and body['error']['code'] == 'request_timeout'


def test_trickling_client_is_cut_off_at_the_deadline(tough):
    port, _ = tough
    with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
        for byte in post('/v1/completions', {'prompt': 'hi'}, port)[:30]:  # 6 s of headers that never end
            sock.sendall(bytes([byte]))
            # a byte every 0.2 s is well within any per-read timeout; the whole is not
            if select.select([sock], [], [], 0.2)[0]:
                break
        assert b' 408 ' in sock.recv(1 << 16).split(b'\r\n')[0]
    assert_serving(port)


def test_keep_alive_survives_every_error(tough):
    port, _ = tough
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    for method, path, body, status in [('POST', '/v1/nothing', b'{"input":"hi"}', 404),
                                       ('POST', '/v1/completions', b'{"prompt": 5}', 400),
                                       ('POST', '/v1/completions', b'{nope', 400),
                                       ('GET', '/nowhere', None, 404),
                                       ('DELETE', '/health', None, 405), ('GET', '/health', None, 200)]:
        conn.request(method, path, body, {'Content-Type': 'application/json'})
        r = conn.getresponse()
        assert r.status == status and r.getheader('Content-Type') == 'application/json'
        json.loads(r.read())
        conn.request('GET', '/health')  # the same connection, next request
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())['status'] == 'ok'
    conn.close()


def test_options_and_head(tough):
    port, _ = tough
    origin = f'http://127.0.0.1:{port}'
    got, r, body = exchange(port, f'OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                                  f'Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\r\n'.encode())
    assert got == 204 and r.getheader('Access-Control-Allow-Origin') == origin and body == b''
    assert 'POST' in r.getheader('Access-Control-Allow-Methods')
    got, r, _ = exchange(port, b'OPTIONS / HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                               b'Origin: http://evil.example\r\n\r\n')
    assert got == 204 and r.getheader('Access-Control-Allow-Origin') is None
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    conn.request('GET', '/health')
    get = conn.getresponse()
    want = get.read()
    conn.request('HEAD', '/health')
    head = conn.getresponse()
    assert head.status == 200 and head.read() == b'' and int(head.getheader('Content-Length')) == len(want)
    conn.request('GET', '/health')  # nothing of a body was sent after the HEAD's headers
    assert conn.getresponse().read() == want
    conn.close()


@pytest.mark.parametrize('key, value', [('response_format', {'type': 'json_object'}), ('best_of', 2),
                                        ('tool_choice', 'auto'), ('echo', True), ('logit_bias', {'1': 5}),
                                        ('surprise', 1), ('messages', []),
                                        ('stream_options', {'bogus': True})])
def test_parameters_it_cannot_honour_are_refused(tough, key, value):
    port, _ = tough
    param = 'stream_options' if key == 'stream_options' else key
    assert_refused(exchange(port, post('/v1/completions', {'prompt': 'hi', key: value}, port)), 400, param)


def test_message_fields_it_cannot_honour_are_refused(tough):
    port, _ = tough
    body = {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'user', 'content': 'x', 'name': 'bob'}]}
    assert_refused(exchange(port, post('/v1/chat/completions', body, port)), 400, 'messages[1].name')


def test_neutral_values_of_unsupported_parameters_are_accepted(tough):
    port, _ = tough
    body = {'prompt': 'hi', 'max_tokens': 2, 'best_of': 1, 'echo': False, 'logprobs': None,
            'presence_penalty': 0, 'response_format': {'type': 'text'}, 'user': 'someone'}
    assert exchange(port, post('/v1/completions', body, port))[0] == 200


def test_abandoned_request_stops_generating(tough):
    port, _ = tough
    body = {'prompt': 'To be', 'n': 8, 'max_tokens': 4096}  # ~10 s of generation: the server ignores EOS
    with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
        sock.sendall(post('/v1/completions', body, port))
        time.sleep(0.2)  # the generation has started
    assert_serving(port)


@pytest.mark.parametrize('stop, param', [(['x'] * 5, 'stop'), ('y' * 65, 'stop'),
                                         (['a', 'z' * 250_000], 'stop'), ([['a']], 'stop')])
def test_stop_strings_are_bounded(tough, stop, param):
    port, _ = tough
    assert_refused(exchange(port, post('/v1/completions', {'prompt': 'hi', 'stop': stop}, port)), 400, param)
    assert_serving(port)


def test_stop_matcher_agrees_with_a_plain_search():
    rng = random.Random(0)
    for _ in range(300):
        stops = [''.join(rng.choice('ab') for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 4))]
        text = ''.join(rng.choice('abc') for _ in range(rng.randint(0, 40)))
        m, seen, cut = engine.StopMatcher(stops), '', None
        for piece in [text[i:i + 3] for i in range(0, len(text), 3)]:
            cut = m.feed(piece, len(seen))
            seen += piece
            if cut is not None:
                break
            held = max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0)
            assert m.held() == held, (stops, seen)
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        assert cut == (min(hits) if hits else None), (stops, text)


def test_long_stop_strings_cost_linear_time(tokenizer):
    # four stop strings of 50,000 characters that the text keeps almost matching: the old held-back check was
    # quadratic in them (seconds a token); the automaton is a few operations a character
    stops = ['ab' * 25_000 + c for c in 'wxyz']
    s = engine.TextStream(tokenizer, stop=stops)
    ids = tokenizer.encode('ab' * 300)
    out = ''.join(s.push(t) for t in ids)
    assert out == '' and not s.stopped  # all of it could still grow into a stop string
    assert s.flush() == 'ab' * 300


@pytest.mark.parametrize('key, value', [('repetition_penalty', 'Infinity'), ('repetition_penalty', '1e999'),
                                        ('repetition_penalty', '0'), ('temperature', 'NaN'),
                                        ('seed', str(2 ** 64)), ('seed', '-1'), ('top_p', '-Infinity'),
                                        ('temperature', '1e999'),
                                        ('frequency_penalty', '2.5'), ('presence_penalty', '-3'),
                                        ('frequency_penalty', '"high"')])
def test_sampling_numbers_are_validated(tough, key, value):
    port, _ = tough
    got, _, r = exchange(port, post('/v1/completions', f'{{"prompt": "hi", "{key}": {value}}}'.encode(),
                                    port))
    assert got == 400 and r['error']['param'] in (key, None), r  # None: a constant json itself refuses
    assert_serving(port)


def test_frequency_and_presence_penalties_are_honoured(tough, loaded):
    # the served text is the engine's with the same penalties, and they change what a greedy reply says
    port, _ = tough
    model, tok, _ = loaded
    body = {'prompt': 'To be', 'max_tokens': 24, 'temperature': 0}
    texts = {}
    for fp in (0, 2):
        got = exchange(port, post('/v1/completions',
                                  dict(body, frequency_penalty=fp, presence_penalty=fp / 4), port))
        assert got[0] == 200
        texts[fp] = got[2]['choices'][0]['text']
        ids = [BOS_ID] + tok.encode('To be')
        want = complete(model, tok, [ids], greedy(24, ignore_eos=True, frequency_penalty=fp,
                                                         presence_penalty=fp / 4))[0][0]
        assert texts[fp] == want
    assert texts[0] != texts[2]


def test_tiny_temperature_samples_as_greedy(tough):
    port, _ = tough
    body = {'prompt': 'Shall I compare', 'max_tokens': 6}
    greedy_text = exchange(port, post('/v1/completions', dict(body, temperature=0), port))[2]
    tiny = exchange(port, post('/v1/completions', dict(body, temperature=1e-300, seed=2 ** 63 - 1), port))
    assert tiny[0] == 200 and tiny[2]['choices'][0]['text'] == greedy_text['choices'][0]['text']


def test_too_many_connections_answer_503_with_openais_body(loaded):
    # idle connections cost no worker now (tests/test_httpd.py); what bounds them is a cap per client address
    model, tok, _ = loaded
    srv = Server(None, tok, model.cfg.block_size, greedy(4), port=0, quiet=True, max_client_connections=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        held = [socket.create_connection(('127.0.0.1', port), timeout=10) for _ in range(2)]
        for _ in range(100):
            if len(srv.connections) == 2:
                break
            time.sleep(0.05)
        got, r, body = exchange(port, b'')
        assert got == 503 and r.getheader('Connection') == 'close' and r.getheader('Retry-After') == '1'
        assert body['error']['code'] == 'overloaded' and body['error']['type'] == 'server_error'
        for sock in held:
            sock.close()
        for _ in range(100):
            if not srv.connections:
                break
            time.sleep(0.05)
        assert call(f'http://127.0.0.1:{port}', '/health', timeout=NEXT_WITHIN)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_waiting_for_the_generation_is_bounded_with_503(loaded):
    _, tok, _ = loaded
    release = threading.Event()

    def generate(prompts, params, chat, seed):  # holds the generation lock until released
        release.wait(20)
        yield 0, 'x', 'length', 1
    srv = Server(generate, tok, 64, greedy(4), port=0, quiet=True, generation_wait=0.3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{srv.server_address[1]}'
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, url, '/v1/completions', {'prompt': 'hi'})
            for _ in range(200):
                if srv.turns.busy():
                    break
                time.sleep(0.01)
            status, r = call(url, '/v1/completions', {'prompt': 'hi'})
            assert status == 503 and r['error']['code'] == 'overloaded'
            release.set()
            assert first.result(timeout=20)[0] == 200
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()


def test_port_in_use_is_one_line(loaded, lively_checkpoint, tough):
    port, _ = tough
    _, tok, _ = loaded
    with pytest.raises(ValueError, match=f'cannot listen on 127.0.0.1:{port}'):
        Server(None, tok, 64, greedy(4), port=port)
    proc = subprocess.run([sys.executable, 'sample.py', '--serve', f'--ckpt={lively_checkpoint}',
                           f'--port={port}'],
                          cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f'error: cannot listen on 127.0.0.1:{port}')


def test_serve_help_lists_its_options():
    proc = subprocess.run([sys.executable, 'serve.py', '--help'], cwd=REPO, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for key in SERVER_KEYS + ('ckpt', 'temperature', 'host'):
        assert f'--{key}=' in proc.stdout


def test_serve_keys_are_the_server_options_and_the_sampling_and_model_keys():
    # serve.py's --key=value reaches Server through SERVER_KEYS, and chooses the model and its sampling with
    # the keys sample.py takes too (checkpoint.py's and engine.py's)
    import serve
    assert set(SERVER_KEYS) <= set(serve.KEYS)
    shared = {k: v for k, v in S.KEYS.items() if k not in ('mode', 'system', 'prompt', 'serve')}
    assert {k: serve.KEYS[k] for k in shared} == shared
    server = Server(lambda *a: iter(()), None, 8, engine.Sampling(), port=0, quiet=True, workers=1)
    try:
        assert server.workers == 1 and server.max_batch == serve.KEYS['max_batch'].default == 8
    finally:
        server.server_close()


# -----------------------------------------------------------------------------
# who may call (issue 28, finding 3), fair turns (finding 7), a chat past the context and the page's assets
# (issue 29)


@contextlib.contextmanager
def fake_server(tok, generate=None, **options):
    """A Server whose generation is `generate` (default: two events) and counts its calls."""
    calls = []

    def counted(prompts, params, chat, seed):
        calls.append(prompts)
        return (generate or (lambda *a: iter([(0, 'x', None, 1), (0, 'y', 'stop', 2)])))(prompts, params,
                                                                                       chat, seed)
    srv = Server(counted, tok, 64, greedy(4), 'lumi', port=0, quiet=True, **options)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv, srv.server_address[1], calls
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_api_key_is_required_when_set(tokenizer):
    with fake_server(tokenizer, api_key='s3cret') as (srv, port, calls):
        url, body = f'http://127.0.0.1:{port}', {'prompt': 'hi'}
        for auth in (None, 'Bearer wrong', 's3cret', 'Basic s3cret'):
            headers = {'Content-Type': 'application/json', **({'Authorization': auth} if auth else {})}
            status, r = call(url, '/v1/completions', raw=json.dumps(body).encode(), headers=headers)
            assert status == 401 and r['error']['code'] == 'invalid_api_key', (auth, r)
        assert call(url, '/v1/models')[0] == 401 and calls == []
        ok = {'Content-Type': 'application/json', 'Authorization': 'Bearer s3cret'}
        assert call(url, '/v1/completions', raw=json.dumps(body).encode(), headers=ok)[0] == 200
        assert call(url, '/v1/models', headers={'Authorization': 'Bearer s3cret'})[0] == 200
        assert call(url, '/health')[0] == 200 and call(url, '/')[0] == 200  # the page asks for the key itself
    openai = pytest.importorskip('openai')
    with fake_server(tokenizer, api_key='s3cret') as (srv, port, calls):
        client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='s3cret')
        assert client.completions.create(model='lumi', prompt='hi', max_tokens=2).choices[0].text == 'xy'
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='nope').models.list()


@pytest.mark.parametrize('host, allowed, status', [
    ('evil.example', '', 421), ('evil.example:8000', '', 421), ('localhost:8000', '', 200),
    ('127.0.0.1', '', 200), ('[::1]:8000', '', 200), ('192.168.1.7:8000', '', 200),
    ('app.localhost', '', 200),
    ('lumi.example.org', 'lumi.example.org', 200), ('a.example.org', '.example.org', 200),
    ('example.org.evil.example', '.example.org', 421), ('anything', '*', 200)])
def test_a_foreign_host_is_refused(tokenizer, host, allowed, status):
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 still sends its own Host
    with fake_server(tokenizer, allowed_hosts=allowed) as (srv, port, calls):
        got, _, r = exchange(port, post('/v1/completions', {'prompt': 'hi'}, port).replace(
            b'Host: 127.0.0.1', b'Host: ' + host.encode()))
        assert got == status, r
        if status == 421:
            assert r['error']['code'] == 'misdirected_request' and calls == []


@pytest.mark.parametrize('kind', ['text/plain', 'application/x-www-form-urlencoded',
                                  'multipart/form-data; b=x', None])
def test_a_cross_site_simple_post_is_refused(tokenizer, kind):
    # a form or a text/plain fetch from any web page needs no preflight: only JSON bodies are taken
    with fake_server(tokenizer) as (srv, port, calls):
        data = post('/v1/completions', {'prompt': 'hi'}, port, 'Origin: http://evil.example\r\n')
        data = data.replace(b'Content-Type: application/json\r\n', b'' if kind is None else
                            f'Content-Type: {kind}\r\n'.encode())
        got, r, body = exchange(port, data)
        assert got in (403, 415) and calls == [] and r.getheader('Access-Control-Allow-Origin') is None
        got, _, body = exchange(port, data.replace(b'Origin: http://evil.example\r\n', b''))
        assert got == 415 and body['error']['code'] == 'unsupported_media_type' and calls == []
        got, _, body = exchange(port, post('/v1/completions', {'prompt': 'hi'}, port,
                                           'Origin: http://evil.example\r\n'))
        assert got == 403 and body['error']['code'] == 'forbidden_origin' and calls == []
        own = post('/v1/completions', {'prompt': 'hi'}, port, f'Origin: http://127.0.0.1:{port}\r\n')
        assert exchange(port, own)[0] == 200 and len(calls) == 1


def test_binding_beyond_loopback_without_a_key_warns():
    assert serve.exposure_warning('0.0.0.0', '').startswith('warning: serving on 0.0.0.0 without an API key')
    assert serve.exposure_warning('192.168.1.7', '') and serve.exposure_warning('lumi.example.org', '')
    assert not serve.exposure_warning('0.0.0.0', 'k') and not serve.exposure_warning('127.0.0.1', '')
    assert not serve.exposure_warning('localhost', '') and not serve.exposure_warning('::1', '')


def test_a_long_request_gives_the_model_up_in_turns(tokenizer):
    # finding 7: n=8 x 4096 tokens held the model 18 s while short requests waited. Here a long generation
    # (10,000 steps) is running when a short one (3 steps) arrives: the short one ends long before the long
    # one has made many more steps.
    steps, started = {'long': 0}, threading.Event()

    def generate(prompts, params, chat, seed):
        if params.max_new_tokens == 3:
            for i in range(3):
                yield 0, 's', 'length' if i == 2 else None, i + 1
            return
        for i in range(10_000):
            steps['long'] = i
            started.set()
            time.sleep(0.001)
            yield 0, 'l', 'length' if i == 9_999 else None, i + 1
    with fake_server(tokenizer, generate, turn_seconds=0.05, max_tokens_limit=10_000) as (srv, port, calls):
        url = f'http://127.0.0.1:{port}'
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(call, url, '/v1/completions', {'prompt': 'a', 'max_tokens': 10_000},
                               timeout=120)
            started.wait(10)
            at = steps['long']
            status, r = call(url, '/v1/completions', {'prompt': 'b', 'max_tokens': 3})
            waited = steps['long'] - at
            assert status == 200 and r['choices'][0]['text'] == 'sss'
            assert long.result()[1]['choices'][0]['text'] == 'l' * 10_000
    assert waited < 1000, waited  # about one turn: 0.05 s of the long one's steps, not the rest of 10,000


def test_a_stream_the_client_leaves_stops_generating(tokenizer):
    # the chat page's Stop button closes the stream; the generation behind it ends with it
    made = []

    def generate(prompts, params, chat, seed):
        for i in range(100_000):
            made.append(i)
            time.sleep(0.001)
            yield 0, 'x', None, i + 1
    with fake_server(tokenizer, generate, max_tokens_limit=100_000) as (srv, port, calls):
        body = {'messages': [{'role': 'user', 'content': 'hi'}], 'stream': True, 'max_tokens': 100_000}
        with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
            sock.sendall(post('/v1/chat/completions', body, port))
            assert sock.recv(1 << 16).startswith(b'HTTP/1.1 200 ')
        for _ in range(200):
            if not srv.turns.busy():
                break
            time.sleep(0.05)
        assert not srv.turns.busy() and len(made) < 100_000


def test_truncation_auto_keeps_a_chat_going_past_the_context(server, loaded, tokenizer):
    # the chat page sends its whole history with truncation='auto': the server drops the oldest turns by
    # engine.fit_conversation, the terminal chat's rule, and says how many it dropped
    url, srv = server
    model, tok, _ = loaded
    messages = [{'role': 'system', 'content': 'Be brief.'}]
    for i in range(8):
        messages += [{'role': 'user', 'content': f'question {i} about the fox'},
                     {'role': 'assistant', 'content': f'answer {i} about the dog'}]
    messages.append({'role': 'user', 'content': 'last question'})
    body = {'messages': messages, 'max_tokens': 8}
    status, r = call(url, '/v1/chat/completions', body)
    assert status == 400 and r['error']['code'] == 'context_length_exceeded'
    ids, dropped = engine.fit_conversation(tok, messages, model.cfg.block_size, 8)
    # the newest turns that fit, the system message kept: the prompt is theirs exactly
    assert ids == render_chat(tok, messages[:1] + messages[1 + dropped:], add_generation_prompt=True)[0]
    assert len(ids) <= model.cfg.block_size - 8
    want, _, _ = complete(model, tok, [ids], greedy(8), chat=True)[0]
    status, r = call(url, '/v1/chat/completions', dict(body, truncation='auto'))
    assert status == 200 and r['dropped_messages'] == dropped > 0 and r['usage']['prompt_tokens'] == len(ids)
    assert r['choices'][0]['message']['content'] == want
    status, events = call(url, '/v1/chat/completions', dict(body, truncation='auto', stream=True))
    assert events[0]['dropped_messages'] == dropped and 'dropped_messages' not in events[-1]
    assert streamed_text(events) == want
    status, r = call(url, '/v1/chat/completions', dict(body, messages=messages[-1:], truncation='auto'))
    assert status == 200 and r['dropped_messages'] == 0
    assert call(url, '/v1/completions', {'prompt': 'x', 'truncation': 'auto'})[0] == 400  # chat only
    assert call(url, '/v1/chat/completions', dict(body, truncation='middle'))[0] == 400


def test_the_page_and_its_favicon_are_served(server):
    url, _ = server
    with urllib.request.urlopen(url + '/favicon.ico', timeout=10) as r:
        assert r.status == 200 and r.headers['Content-Type'] == 'image/x-icon'
        assert r.read()[:4] == b'\x00\x00\x01\x00'  # an ICO file's header
    status, page = call(url, '/')
    assert "truncation: 'auto'" in page and 'AbortController' in page and 'Authorization' in page
