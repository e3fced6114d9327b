"""
The serving stage: OpenAI's completions and chat completions APIs, plain and streamed as server-sent
events, with /v1/models, /health and a small chat page at / (assets/chat.html), on the standard library's HTTP
server. `python serve.py --ckpt=...` (or `python sample.py --serve ...`) loads the model with sample.py's keys
(checkpoint.load_model) and serves engine.stream_text; the Server itself is handed its generation, so it knows
HTTP and OpenAI's shapes and nothing of models. The connections, worker threads and deadlines are
httpd.py's.

Hostile clients are expected: every request the server cannot or will not honour is answered 4xx with
OpenAI's error body, a fixed pool of worker threads serves connections (a full queue is answered 503), and
each request has deadlines for its headers and its body, so a slow client only ever holds a worker for those.

Deliberately left out: batching across requests (one generation runs at a time behind a lock; one request
may carry several prompts, which share a batch), logprobs, tools, authentication, TLS, chunked bodies.
"""
import io
import json
import math
import os
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

import lumi
from httpd import DeadlineReader, PooledHTTPServer
from checkpoint import load_model, newest_checkpoint
from engine import Sampling, make_generator, stream_text
from tokenizer import BOS_ID, ROLES, render_chat

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value. Which model is served and how it samples by default are
# checkpoint.py's and engine.py's keys (as in sample.py); these say where it is served and bound what a
# request may ask, and how long (the Server takes the SERVER_KEYS)
KEY_FILES = ('checkpoint.py', 'engine.py')
host = '127.0.0.1'          # the address to serve on; 0.0.0.0 for every interface
port = 8000                 # [0, 65535] the port to serve on; 0 picks a free one
model_name = ''             # the id the server answers to; '' is lumi-<kind>
max_tokens_limit = 4096     # [1, inf) the most new tokens one request may ask for
max_batch = 8               # [1, inf) the most sequences (prompts x n) one request may ask for
max_body_bytes = 1 << 20    # [1, inf) a larger request body gets 413
max_json_depth = 32         # [1, inf) the deepest nesting of arrays and objects a request body may have
max_stop_chars = 256        # [1, inf) the longest stop string a request may give (at most 4 of them)
header_timeout = 10.0       # (0, inf) seconds for a request's line and headers, idle keep-alive
                            # included (then 408)
body_timeout = 30.0         # (0, inf) seconds to read a request's body, and for each write of the
                            # answer (then 408)
workers = 16                # [1, inf) threads serving connections: a connection holds one while it is open
queue_size = 32             # [0, inf) connections waiting for a worker; one more is answered 503
generation_wait = 120.0     # (0, inf) seconds a request waits for the generation in front of it (then 503)
cors_origin = ''            # a web origin besides the server's own that may call the API from a
                            # browser ('*': any)
KEYS = lumi.declared_keys(__file__)
SERVER_KEYS = ('max_tokens_limit', 'max_batch', 'max_body_bytes', 'max_json_depth', 'max_stop_chars',
               'header_timeout', 'body_timeout', 'workers', 'queue_size', 'generation_wait', 'cors_origin')

ALLOWED_METHODS = 'GET, HEAD, POST, OPTIONS'
# parameters OpenAI's APIs have and this server cannot honour: accepted only with a value that
# asks for nothing
NEUTRAL = {'logprobs': (False, 0), 'top_logprobs': (0,), 'echo': (False,), 'suffix': ('',),
           'logit_bias': ({},), 'tools': ([],), 'functions': ([],), 'tool_choice': ('none',),
           'function_call': ('none',), 'parallel_tool_calls': (False,), 'best_of': (1,),
           'response_format': ({'type': 'text'},)}
KNOWN = {'model', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_k', 'top_p',
         'repetition_penalty', 'frequency_penalty', 'presence_penalty', 'stop', 'n', 'seed', 'stream',
         'stream_options', 'user'}


class APIError(Exception):
    """A refused request, answered with OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, kind='invalid_request_error'):
        super().__init__(message)
        self.status, self.body = status, {'error': dict(message=message, type=kind, param=param, code=code)}


def _body_field(body, key, types, default, valid=None, rule=''):
    """body[key] if it has one of types (a bool is never a number, a float is finite) and passes valid; absent
    or null: default."""
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) != (bool in types) or not isinstance(value, types)
            or (isinstance(value, float) and not math.isfinite(value)) or (valid and not valid(value))):
        raise APIError(400, f"'{key}' must be {rule}, got {json.dumps(value)[:100]}", key, 'invalid_value')
    return value


def parse_json(data, max_depth):
    """The JSON object in data, refused (400) if it is not one, nests deeper than max_depth, or holds text
    that is not Unicode (a lone UTF-16 surrogate, which json lets through and no tokenizer can encode)."""
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except RecursionError:  # deeper than Python can parse, far deeper than max_depth
        raise APIError(400, f"the body nests deeper than {max_depth} levels", code='too_deep') from None
    except ValueError as e:  # json's errors and UnicodeDecodeError both are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}", code='invalid_json') from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code='invalid_json')
    todo = [(body, None, 1)]  # a stack, not recursion: the depth is what is being checked
    while todo:
        value, path, depth = todo.pop()
        if depth > max_depth:
            raise APIError(400, f"'{path}' nests deeper than {max_depth} levels", path, 'too_deep')
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"a key in '{path}'" if path else 'a key of the body', path)
                todo.append((item, f'{path}.{key}' if path else key, depth + 1))
        elif isinstance(value, list):
            todo.extend((item, f'{path}[{i}]', depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, f"'{path}'", path)
    return body


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _check_text(text, where, param):
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where} is not valid Unicode: a lone surrogate {text[e.start]!a} at character "
                            f"{e.start}", param, 'invalid_unicode') from None


def parse_request(body, server, chat):
    """What a request asks for: the token ids of each sequence (prompts x n), the Sampling, the seed, whether
    to stream. Refuses what Lumi cannot honour rather than ignore it."""
    for key, value in body.items():
        if key in NEUTRAL:
            if value is not None and value not in NEUTRAL[key]:
                raise APIError(400, f"'{key}' is not supported by this server", key, 'unsupported_parameter')
        elif key not in KNOWN and key != ('messages' if chat else 'prompt'):
            raise APIError(400, f"unknown parameter '{key[:100]}'", key[:100], 'unknown_parameter')
    name = _body_field(body, 'model', (str,), server.model_name, rule='a string')
    if name != server.model_name:
        raise APIError(404, f"The model '{name[:100]}' does not exist; this server serves "
                            f"'{server.model_name}'", 'model', 'model_not_found')
    d = server.defaults
    key = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
    max_tokens = _body_field(body, key, (int,), d.max_new_tokens, lambda v: v >= 1, 'an integer >= 1')
    if max_tokens > server.max_tokens_limit:
        raise APIError(400, f"'{key}' is {max_tokens}, over this server's limit of {server.max_tokens_limit}",
                       key, 'max_tokens_exceeded')
    longest = server.max_stop_chars
    stop = _body_field(body, 'stop', (str, list), [], lambda v: (isinstance(v, str) and len(v) <= longest)
        or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and len(s) <= longest for s in v)),
        f'a string or a list of at most 4 strings, each at most {longest} characters')
    params = replace(
        d, max_new_tokens=max_tokens,
        temperature=_body_field(body, 'temperature', (int, float), d.temperature, lambda v: 0 <= v <= 2,
                                'in [0, 2]'),
        top_k=max(0, _body_field(body, 'top_k', (int,), d.top_k, lambda v: v >= -1, 'an integer >= -1')),
        top_p=_body_field(body, 'top_p', (int, float), d.top_p, lambda v: 0 < v <= 1, 'in (0, 1]'),
        repetition_penalty=_body_field(body, 'repetition_penalty', (int, float), d.repetition_penalty,
                                  lambda v: 0.01 <= v <= 100, 'in [0.01, 100]'),
        **{k: _body_field(body, k, (int, float), getattr(d, k), lambda v: -2 <= v <= 2, 'in [-2, 2]')
           for k in ('frequency_penalty', 'presence_penalty')},
        stop=(stop,) if isinstance(stop, str) else tuple(stop))
    n = _body_field(body, 'n', (int,), 1, lambda v: 1 <= v <= server.max_batch, f'in [1, {server.max_batch}]')
    seed = _body_field(body, 'seed', (int,), None, lambda v: 0 <= v < 2 ** 63, 'an integer in [0, 2**63)')
    stream = _body_field(body, 'stream', (bool,), False, rule='a boolean')
    _body_field(body, 'user', (str,), '', rule='a string')
    options = _body_field(body, 'stream_options', (dict,), {}, lambda v: set(v) <= {'include_usage'},
                     "an object with only 'include_usage'")
    include_usage = _body_field(options, 'include_usage', (bool,), False, rule='a boolean')

    tok = server.tok
    if chat:
        prompts = [render_messages(tok, body.get('messages'))]
    else:
        texts = _body_field(body, 'prompt', (str, list), None, lambda v: isinstance(v, str) or (
            0 < len(v) <= server.max_batch and all(isinstance(t, str) for t in v)),
            'a string or a list of strings')
        if texts is None:
            raise APIError(400, "'prompt' is required", 'prompt', 'missing_required_parameter')
        prompts = [[BOS_ID] + ids for ids in tok.encode_batch([texts] if isinstance(texts, str) else texts)]
    window = server.window
    for ids in prompts:
        if len(ids) > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens; the prompt has "
                                f"{len(ids)}", 'messages' if chat else 'prompt', 'context_length_exceeded')
    if len(prompts) * n > server.max_batch:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is over this server's batch limit of "
                            f"{server.max_batch}", 'n', 'invalid_value')
    return dict(prompts=[p for p in prompts for _ in range(n)], prompt_tokens=sum(map(len, prompts)),
                params=params, seed=seed, stream=stream, include_usage=include_usage)


def render_messages(tok, messages):
    """OpenAI chat messages to the chat template's ids; content may be a string or a list of text parts."""
    if messages is None:
        raise APIError(400, "'messages' is required", 'messages', 'missing_required_parameter')
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", 'messages', 'invalid_value')
    plain = []
    for i, m in enumerate(messages):
        role = m.get('role') if isinstance(m, dict) else None
        content = m.get('content') if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text'
                                             and isinstance(p.get('text'), str) for p in content):
            content = ''.join(p['text'] for p in content)
        extra = ([k for k in m if k not in ('role', 'content') and m[k] is not None] if isinstance(m, dict)
                 else [])
        if extra:  # name, tool_calls, ...: the chat template has no place for them
            raise APIError(400, f"messages[{i}].{extra[0][:100]} is not supported by this server",
                           f'messages[{i}].{extra[0][:100]}', 'unsupported_parameter')
        role = 'system' if role == 'developer' else role
        if role not in ROLES or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': text}}, "
                                f"got {json.dumps(m)[:100]}", f'messages[{i}]', 'invalid_value')
        plain.append({'role': role, 'content': content})
    return render_chat(tok, plain, add_generation_prompt=True)[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive for JSON answers; a stream ends by closing the connection
    server_version = 'lumi'
    default_request_version = 'HTTP/1.0'  # not 0.9, whose answers have no status line: requests without
                                          # one are refused

    def setup(self):
        super().setup()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def finish(self):
        # a lingering close: closing a socket with unread request bytes resets the connection, and the
        # reset can destroy the answer before the client reads it, so take what the client still sends,
        # briefly, first
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.reader.until, self.reader.got = time.monotonic() + 1, 0
            while self.reader.got < 1 << 20 and self.reader.readinto(bytearray(1 << 16)):
                pass
        except OSError:
            pass
        super().finish()

    def handle_one_request(self):
        """The standard library's, with deadlines, no HTTP/0.9 (whose requests have no headers to wait for),
        and every answer JSON; a request's body is read before its answer, or the connection closes after
        it."""
        s = self.server
        self.reader.until, self.reader.got = time.monotonic() + s.header_timeout, 0
        self.head_only = self.streaming = self.answered = self.body_pending = False
        self.command, self.request_version, self.requestline, self.headers = None, 'HTTP/1.1', '', None
        self.requests = getattr(self, 'requests', 0) + 1
        try:
            line = self.raw_requestline = self.rfile.readline(65537)
            if not line:
                self.close_connection = True
                return
            self.requestline = line.decode('iso-8859-1').rstrip('\r\n')[:200]
            if len(line) > 65536:
                return self.send_error(414, "the request line is over 65536 bytes")
            if len(line.split()) != 3:
                return self.send_error(400, f"a request line is 'METHOD PATH HTTP/1.1', "
                                            f"got {self.requestline!r}")
            if not self.parse_request():  # it answered already
                return
            self.body_pending = (self.headers.get('Content-Length', '0') != '0'
                                 or 'Transfer-Encoding' in self.headers)
            method = getattr(self, 'do_' + self.command, None)
            if method is None:
                return self.send_error(405, f"method {self.command!r} is not allowed: use {ALLOWED_METHODS}")
            self.reader.until = time.monotonic() + s.body_timeout
            self.connection.settimeout(s.body_timeout)  # for the answer's writes: a client that never reads
            method()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            # an idle keep-alive connection just closes: a 408 there could be read as the answer to the
            # request the client is about to send
            if not self.answered and (self.reader.got or self.requests == 1):
                try:
                    self.send_error(408, "the request was not received in time")
                except OSError:
                    pass
        except OSError:  # the client reset or left
            self.close_connection = True

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def send_error(self, code, message=None, explain=None):
        """Errors the standard library finds (bad request line, headers, version) as OpenAI's JSON: never 5xx,
        which would blame the server for a client's request."""
        code = 400 if code >= 500 else code
        self.close_connection = True
        phrase = HTTPStatus(code).phrase
        headers = {'Allow': ALLOWED_METHODS} if code == 405 else {}
        self.send_json(code, APIError(code, message or phrase, code=phrase.lower().replace(' ', '_')).body,
                       **headers)

    def cors_headers(self):
        origin, s = self.headers and self.headers.get('Origin'), self.server
        if origin and (origin in s.origins or s.cors_origin == '*'):
            self.send_header('Access-Control-Allow-Origin', origin)
            self.send_header('Vary', 'Origin')

    def send_body(self, status, data, content_type='application/json', **headers):
        self.answered = True
        self.send_response(status)
        if content_type:
            self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        for key, value in headers.items():
            self.send_header(key.replace('_', '-'), value)
        self.cors_headers()
        if self.body_pending or self.close_connection:  # unread bytes would be taken for the next request
            self.send_header('Connection', 'close')
        self.end_headers()
        if not self.head_only:
            self.wfile.write(data)

    def send_json(self, status, obj, **headers):
        self.send_body(status, json.dumps(obj).encode(), **headers)

    def do_OPTIONS(self):  # a browser's CORS preflight
        self.send_body(204, b'', None, Allow=ALLOWED_METHODS, Access_Control_Allow_Methods=ALLOWED_METHODS,
                       Access_Control_Allow_Headers='Content-Type, Authorization',
                       Access_Control_Max_Age='600')

    def do_HEAD(self):
        self.head_only = True
        self.do_GET()

    def do_GET(self):
        s, path = self.server, self.path.split('?')[0]
        if path == '/health':
            self.send_json(200, {'status': 'ok', 'model': s.model_name})
        elif path == '/v1/models':
            self.send_json(200, {'object': 'list', 'data': [s.model_card()]})
        elif path == f'/v1/models/{s.model_name}':
            self.send_json(200, s.model_card())
        elif path in ('/', '/index.html'):
            page = CHAT_PAGE.replace('MODEL_NAME', json.dumps(s.model_name))
            self.send_body(200, page.encode(), 'text/html; charset=utf-8')
        else:
            self.send_json(404, APIError(404, f"no such endpoint: GET {path[:200]}", code='not_found').body)

    def do_POST(self):
        path = self.path.split('?')[0]
        try:
            data = self.read_body()  # first, so that even a refused request leaves the connection clean
            if path not in ('/v1/completions', '/v1/chat/completions'):
                raise APIError(404, f"no such endpoint: POST {path[:200]}", code='not_found')
            chat = path == '/v1/chat/completions'
            self.generate(parse_request(parse_json(data, self.server.max_json_depth), self.server, chat),
                          chat)
        except APIError as e:
            self.send_json(e.status, e.body)
        except TimeoutError:  # answered 408 by handle_one_request if nothing went out yet
            raise
        except OSError:  # the client left; its generation stopped with it
            self.close_connection = True
        except Exception as e:  # a bug must not take the server down; the client learns what happened
            self.log_error('%s', repr(e))
            self.close_connection = True
            error = APIError(500, "internal error (the server's log has it)", kind='server_error').body
            if self.streaming:  # the 200 went out already: end the stream with an error event, as OpenAI does
                self.sse(error)
            elif not self.answered:
                self.send_json(500, error)

    def read_body(self):
        if 'Transfer-Encoding' in self.headers:
            raise APIError(411, "chunked bodies are not supported: send a Content-Length",
                           code='length_required')
        lengths = self.headers.get_all('Content-Length') or []
        if not lengths:
            raise APIError(411, "a Content-Length header is required", code='length_required')
        length = lengths[0].strip()
        # isdigit alone passes '²' and other digits int() refuses; 18 digits is far past any limit
        if len(set(lengths)) > 1 or not (length.isascii() and length.isdigit() and len(length) <= 18):
            raise APIError(400, f"bad Content-Length {', '.join(lengths)[:40]!r}", code='invalid_value')
        length, limit = int(length), self.server.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread unless small enough to drain
            while 0 < length <= 16 * limit:  # so the client, still sending, gets to read the answer
                chunk = self.rfile.read(min(length, 1 << 16))
                length = length - len(chunk) if chunk else 0
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes",
                           code='too_large')
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("the client closed the connection before sending its whole body")
        self.body_pending = False
        return data

    def client_gone(self):
        """True once the client has closed its side of the connection (a pipelined request does not count). A
        client that half-closes after sending and still reads counts as gone too: without writing to it, the
        two look the same."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            return True

    def sse(self, obj):
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def generate(self, job, chat):
        s, rid, created = (self.server, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                           int(time.time()))
        head = dict(id=rid, object='chat.completion' if chat else 'text_completion', created=created,
                    model=s.model_name)
        rows = len(job['prompts'])
        texts, finish, tokens = [''] * rows, [None] * rows, [0] * rows

        def usage():
            return dict(prompt_tokens=job['prompt_tokens'], completion_tokens=sum(tokens),
                        total_tokens=job['prompt_tokens'] + sum(tokens))

        def choice(r, text, reason):
            if chat:
                return dict(index=r, delta=text, logprobs=None, finish_reason=reason)
            return dict(index=r, text=text, logprobs=None, finish_reason=reason)

        # one generation at a time: bounded memory, and each request runs at full speed
        if not s.lock.acquire(timeout=s.generation_wait):
            raise APIError(503, f"the server is busy: no generation slot within {s.generation_wait:g} s",
                           code='overloaded', kind='server_error')
        events = None
        try:
            events = s.generate(job['prompts'], job['params'], chat, job['seed'])
            if not job['stream']:
                for r, delta, reason, n in events:
                    texts[r], finish[r], tokens[r] = texts[r] + delta, reason, n
                    if self.client_gone():  # nobody will read the answer: free the model for the next request
                        raise ConnectionAbortedError("the client left")
                choices = [dict(index=r, message=dict(role='assistant', content=texts[r]), logprobs=None,
                                finish_reason=finish[r]) if chat else choice(r, texts[r], finish[r])
                           for r in range(rows)]
                return self.send_json(200, dict(head, choices=choices, usage=usage()))
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.send_header('Connection', 'close')
            self.cors_headers()
            self.end_headers()
            self.close_connection, self.streaming, self.answered = True, True, True
            chunk = dict(head, object='chat.completion.chunk') if chat else head
            if chat:
                for r in range(rows):
                    self.sse(dict(chunk, choices=[choice(r, {'role': 'assistant', 'content': ''}, None)]))
            for r, delta, reason, n in events:
                tokens[r] = n
                if not chat:
                    self.sse(dict(chunk, choices=[choice(r, delta, reason)]))
                    continue
                if delta:
                    self.sse(dict(chunk, choices=[choice(r, {'content': delta}, None)]))
                if reason:  # a chat stream ends each choice with an empty delta that carries the reason
                    self.sse(dict(chunk, choices=[choice(r, {}, reason)]))
            if job['include_usage']:
                self.sse(dict(chunk, choices=[], usage=usage()))
            self.wfile.write(b'data: [DONE]\n\n')
        finally:
            if events is not None:
                events.close()  # stops the generation, if it is still running, before the next one starts
            s.lock.release()


class Server(PooledHTTPServer):
    """OpenAI's API on host:port (port 0 picks a free one) for one model.

    generate(prompts, params, chat, seed) runs a batch of token-id prompts with an engine.Sampling and yields
    (row, text delta, finish_reason, tokens so far), as engine.stream_text does; defaults is the Sampling a
    request starts from; window is the model's context length. The keyword options are SERVER_KEYS, each
    defaulting to its key's default."""

    def __init__(self, generate, tok, window, defaults, model_name='lumi', host='127.0.0.1', port=8000,
                 created=0, quiet=False, **options):
        unknown = set(options) - set(SERVER_KEYS)
        if unknown:
            raise TypeError(f"unknown server options {sorted(unknown)}")
        for key in SERVER_KEYS:
            setattr(self, key, options.get(key, KEYS[key].default))
        body = json.dumps(APIError(503, "the server is busy: too many connections", code='overloaded',
                                   kind='server_error').body).encode()
        busy = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n'
                b'Connection: close\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
        try:
            super().__init__((host, port), Handler, self.workers, self.queue_size, busy)
        except OSError as e:  # a user's error (port taken, no such address): one line, not a traceback
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.generate, self.tok, self.window, self.defaults = generate, tok, window, defaults
        self.model_name, self.created, self.quiet = model_name, created, quiet
        port = self.server_address[1]
        self.origins = {f'http://{host}:{port}', f'http://localhost:{port}', f'http://127.0.0.1:{port}',
                        self.cors_origin}
        self.lock = threading.Lock()

    def model_card(self):
        return dict(id=self.model_name, object='model', created=self.created, owned_by='lumi')


with open(os.path.join(lumi.ROOT, 'assets', 'chat.html'), encoding='utf-8') as _f:
    CHAT_PAGE = _f.read()
# -----------------------------------------------------------------------------
# the stage

USAGE = """usage: python serve.py [--ckpt=PATH] [--host=127.0.0.1] [--port=8000] [--key=value ...] \
  (or sample.py --serve)
Serves a model over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models), /health and a \
chat page at /."""


def main(argv):
    cfg = lumi.load_config(KEYS, argv, shares_with=('sample.py',))
    dev = lumi.pick_device(cfg.device)
    dt = lumi.resolve_dtype(cfg.dtype, dev)
    lumi.seed_everything(cfg.seed)
    source = cfg.ckpt or cfg.adapter or newest_checkpoint(cfg.out_root)
    model, tok, info = load_model(source, dev, dt, adapter=cfg.adapter if cfg.ckpt else '',
                                  tokenizer=cfg.tokenizer)
    params = Sampling.from_config(cfg)
    what = info['path'] + (f" + adapter {info['adapter']}" if info['adapter'] else '')
    print(f"{what}: {info['kind']} model, {model.num_params() / 1e6:.1f}M parameters, {dev} {dt}",
          file=sys.stderr)

    def generate(prompts, p, chat, seed):
        return stream_text(model, tok, prompts, p, chat, make_generator(seed, dev))
    server = Server(generate, tok, model.cfg.block_size, params, cfg.model_name or f"lumi-{info['kind']}",
                    cfg.host, cfg.port, info['created'], **{key: cfg[key] for key in SERVER_KEYS})
    host, port = server.server_address[:2]
    print(f"serving '{server.model_name}' at http://{host}:{port}/ (API under /v1)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == '__main__':
    lumi.cli(main, KEYS, USAGE)
