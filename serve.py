"""
The serving stage: OpenAI's completions and chat completions APIs, plain and streamed as server-sent
events, with /v1/models, /health and a small chat page at / (assets/chat.html, which keeps a conversation
going past the model's context through truncation='auto'). `python serve.py --ckpt=...` (or `python sample.py
--serve ...`) loads the model with sample.py's keys (checkpoint.load_model) and serves engine.stream_text; the
Server itself is handed its generation, so it knows OpenAI's shapes and nothing of models. Connections,
parsing, deadlines and caps are httpd.py's: a request reaches Server.handle only complete and valid.

Hostile clients are expected: every request the server cannot or will not honour is answered 4xx with
OpenAI's error body. Who may call: a Host header that names this server (421 otherwise: DNS rebinding),
`Authorization: Bearer KEY` on /v1/* when api_key is set (401), JSON bodies only (415: a cross-site form or
text/plain post needs no preflight), and no foreign Origin (403). The model is shared in fair turns
(Turns): a long request gives it up every turn_seconds to the next one in line.

Deliberately left out: batching across requests (one generation runs at a time; one request may carry several
prompts, which share a batch), logprobs, tools, TLS.
"""
import collections
import contextlib
import hmac
import ipaddress
import json
import math
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import replace

import lumi
from checkpoint import load_model, newest_checkpoint
from engine import Sampling, fit_conversation, make_generator, stream_text
from httpd import HTTP_KEYS, HTTPServer
from tokenizer import BOS_ID, ROLES, render_chat

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value. Which model is served and how it samples by default are
# checkpoint.py's and engine.py's keys (as in sample.py), the connections' deadlines and caps httpd.py's;
# these say where it is served, who may call and what a request may ask (the Server takes the SERVER_KEYS)
KEY_FILES = ('checkpoint.py', 'engine.py', 'httpd.py')
host = '127.0.0.1'          # the address to serve on; 0.0.0.0 for every interface (then set api_key)
port = 8000                 # [0, 65535] the port to serve on; 0 picks a free one
model_name = ''             # the id the server answers to; '' is lumi-<kind>
api_key = ''                # requests to /v1/* must carry 'Authorization: Bearer KEY' ('': no key needed;
                            # LUMI_API_KEY in the environment sets it too, out of sight of ps)
allowed_hosts = ''          # host names a request's Host may give besides IP addresses, localhost and
                            # *.localhost, comma-separated ('.example.org' takes its subdomains; '*' any)
cors_origin = ''            # a web origin besides the server's own that may call the API from a
                            # browser ('*': any)
max_tokens_limit = 4096     # [1, inf) the most new tokens one request may ask for
max_batch = 8               # [1, inf) the most sequences (prompts x n) one request may ask for
max_json_depth = 32         # [1, inf) the deepest nesting of arrays and objects a request body may have
max_stop_chars = 256        # [1, inf) the longest stop string a request may give (at most 4 of them)
generation_wait = 120.0     # (0, inf) seconds a request waits for its first turn on the model (then 503)
turn_seconds = 0.25         # [0, inf) seconds a request generates before the next one in line gets a turn
KEYS = lumi.declared_keys(__file__)
API_KEYS = ('api_key', 'allowed_hosts', 'cors_origin', 'max_tokens_limit', 'max_batch', 'max_json_depth',
            'max_stop_chars', 'generation_wait', 'turn_seconds')
SERVER_KEYS = API_KEYS + HTTP_KEYS

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

    def __init__(self, status, message, param=None, code=None, kind='invalid_request_error', headers=()):
        super().__init__(message)
        self.status, self.body = status, {'error': dict(message=message, type=kind, param=param, code=code)}
        self.headers = tuple(headers)


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
        elif key not in KNOWN and key not in (('messages', 'truncation') if chat else ('prompt',)):
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

    tok, dropped = server.tok, None
    if chat:
        truncation = _body_field(body, 'truncation', (str,), 'disabled', lambda v: v in ('auto', 'disabled'),
                                 "'auto' or 'disabled'")
        if truncation == 'auto':  # the oldest turns that do not fit go, as in the terminal chat
            messages = chat_messages(body.get('messages'))
            ids, dropped = fit_conversation(tok, messages, server.window, max_tokens)
        else:
            ids = render_messages(tok, body.get('messages'))
        prompts = [ids]
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
                params=params, seed=seed, stream=stream, include_usage=include_usage, dropped=dropped)


def render_messages(tok, messages):
    """OpenAI chat messages to the chat template's ids."""
    return render_chat(tok, chat_messages(messages), add_generation_prompt=True)[0]


def chat_messages(messages):
    """OpenAI chat messages as the chat template's {role, content}; content may be a string or a list of text
    parts, and 'developer' is the system."""
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
    return plain


class Turns:
    """The model's time, shared in fair turns: requests take it in the order they asked, and one that has
    run for `seconds` gives it to the next in line, so a long request (n=8 x 4,096 tokens held the model for
    18 s) delays a short one by a turn, not by all of itself. Each request's generation keeps its own KV cache
    between its turns, and at most `workers` requests (httpd.py) hold one."""

    def __init__(self, seconds):
        self.seconds, self.cond, self.line = seconds, threading.Condition(), collections.deque()
        self.holder, self.since = None, 0.0

    def take(self, timeout=None):
        """Wait for the model, at most timeout seconds (None: as long as it takes); whether it was had."""
        me = object()
        with self.cond:
            self.line.append(me)
            if not self.cond.wait_for(lambda: self.holder is None and self.line[0] is me, timeout):
                self.line.remove(me)
                self.cond.notify_all()
                return False
            self.line.popleft()
            self.holder, self.since = me, time.monotonic()
            return True

    def give(self):
        with self.cond:
            self.holder = None
            self.cond.notify_all()

    def share(self):
        """Between two steps of the holder's generation: the next request in line gets the model if this
        one's turn is over; this one then waits at the back of the line."""
        if self.line and time.monotonic() - self.since >= self.seconds:
            self.give()
            self.take()

    def busy(self):
        return self.holder is not None


def exposure_warning(host, api_key):
    """What to tell someone who serves beyond this machine without a key ('' when bound to loopback or
    keyed)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == 'localhost'
    if loopback or api_key:
        return ''
    return (f"warning: serving on {host} without an API key: anyone who can reach this machine can use the "
            f"model and its compute; set LUMI_API_KEY (or --api_key) to require 'Authorization: Bearer KEY'")


class Server(HTTPServer):
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
        for key in API_KEYS:
            setattr(self, key, options.pop(key, KEYS[key].default))
        try:
            super().__init__((host, port), quiet, **options)
        except OSError as e:  # a user's error (port taken, no such address): one line, not a traceback
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.generate, self.tok, self.window, self.defaults = generate, tok, window, defaults
        self.model_name, self.created, self.turns = model_name, created, Turns(self.turn_seconds)
        port = self.server_address[1]
        self.origins = {f'http://{host}:{port}', f'http://localhost:{port}', f'http://127.0.0.1:{port}',
                        self.cors_origin}
        names = {h.strip().lower().rstrip('.') for h in self.allowed_hosts.split(',') if h.strip()}
        self.host_names = names | {host.lower(), 'localhost'}

    def model_card(self):
        return dict(id=self.model_name, object='model', created=self.created, owned_by='lumi')

    def error_body(self, status, message, code):
        kind = 'server_error' if status >= 500 else 'invalid_request_error'
        return json.dumps(APIError(status, message, code=code, kind=kind).body).encode()

    # who may call

    def host_allowed(self, authority):
        """Whether a Host names this server: an IP address (a DNS-rebinding page's Host is its own domain,
        never an address), localhost and *.localhost, the bound host and allowed_hosts."""
        name = authority.rpartition(']')[0][1:] if authority.startswith('[') else authority.partition(':')[0]
        name = name.lower().rstrip('.')
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        return (not authority or '*' in self.host_names or name in self.host_names
                or name.endswith('.localhost')
                or any(n.startswith('.') and (name.endswith(n) or name == n[1:]) for n in self.host_names))

    def origin_allowed(self, request, origin):
        return (origin in self.origins or self.cors_origin == '*'
                or origin in (f'http://{request.host}', f'https://{request.host}'))  # the page's own

    def check_caller(self, request):
        """Refuse a request to /v1/* that lacks the key, sends no JSON, or comes from a foreign web page."""
        if self.api_key:
            scheme, _, given = (request.header('authorization') or '').partition(' ')
            given = given.strip().encode()
            if scheme.lower() != 'bearer' or not hmac.compare_digest(given, self.api_key.encode()):
                raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with this "
                                    "server's key" if given else "You didn't provide an API key: send "
                                    "'Authorization: Bearer KEY'", code='invalid_api_key',
                               headers=[('WWW-Authenticate', 'Bearer')])
        origin = request.header('origin')
        if origin and not self.origin_allowed(request, origin):
            raise APIError(403, f"requests from the web page at {origin[:100]!r} are not allowed: start the "
                                f"server with --cors_origin=ORIGIN to allow one", code='forbidden_origin')
        if request.method == 'POST':
            kind = (request.header('content-type') or '').partition(';')[0].strip().lower()
            if kind != 'application/json':
                raise APIError(415, f"the body must be JSON, sent with 'Content-Type: application/json', "
                                    f"not {kind[:60] or 'no Content-Type'!r}", code='unsupported_media_type')

    # answers

    def send(self, request, reply, status, data, content_type='application/json', headers=()):
        headers = list(headers) + ([('Content-Type', content_type)] if content_type else [])
        origin = request.header('origin')
        if origin and self.origin_allowed(request, origin):
            headers += [('Access-Control-Allow-Origin', origin), ('Vary', 'Origin')]
        reply.send(status, data, headers)

    def send_json(self, request, reply, status, obj, headers=()):
        self.send(request, reply, status, json.dumps(obj).encode(), headers=headers)

    def handle(self, request, reply):
        """Answer one complete request (httpd.py calls it on a worker thread)."""
        try:
            self.route(request, reply)
        except APIError as e:
            if not reply.answered:
                self.send_json(request, reply, e.status, e.body, e.headers)
        except ConnectionError:  # the client left or stopped reading; its generation stopped with it
            reply.close = True
        except Exception:  # a bug must not take the server down; the client learns what happened
            traceback.print_exc()
            reply.close = True
            error = APIError(500, "internal error (the server's log has it)", kind='server_error').body
            if reply.streaming:  # the 200 went out already: end the stream with an error event, as OpenAI
                with contextlib.suppress(ConnectionError):
                    reply.write(f"data: {json.dumps(error)}\n\n".encode())
            elif not reply.answered:
                self.send_json(request, reply, 500, error)

    def route(self, request, reply):
        path, method = request.path, request.method
        if not self.host_allowed(request.host):
            raise APIError(421, f"this server does not answer to the host {request.host[:100]!r}: start it "
                                f"with --allowed_hosts=NAME to serve that name", code='misdirected_request')
        if method == 'OPTIONS':  # a browser's CORS preflight
            return self.send(request, reply, 204, b'', None, [
                ('Allow', ALLOWED_METHODS), ('Access-Control-Allow-Methods', ALLOWED_METHODS),
                ('Access-Control-Allow-Headers', 'Content-Type, Authorization'),
                ('Access-Control-Max-Age', '600')])
        if method not in ('GET', 'HEAD', 'POST'):
            raise APIError(405, f"method {method!r} is not allowed: use {ALLOWED_METHODS}",
                           code='method_not_allowed', headers=[('Allow', ALLOWED_METHODS)])
        if path.startswith('/v1/'):
            self.check_caller(request)
        if method == 'POST':
            if path not in ('/v1/completions', '/v1/chat/completions'):
                raise APIError(404, f"no such endpoint: POST {path[:200]}", code='not_found')
            chat = path == '/v1/chat/completions'
            body = parse_json(request.body, self.max_json_depth)
            return self.answer(request, reply, parse_request(body, self, chat), chat)
        if path == '/health':
            self.send_json(request, reply, 200, {'status': 'ok', 'model': self.model_name})
        elif path == '/v1/models':
            self.send_json(request, reply, 200, {'object': 'list', 'data': [self.model_card()]})
        elif path == f'/v1/models/{self.model_name}':
            self.send_json(request, reply, 200, self.model_card())
        elif path in ('/', '/index.html'):
            page = CHAT_PAGE.replace('MODEL_NAME', json.dumps(self.model_name))
            self.send(request, reply, 200, page.encode(), 'text/html; charset=utf-8')
        elif path == '/favicon.ico':
            self.send(request, reply, 200, FAVICON, 'image/x-icon', [('Cache-Control', 'max-age=86400')])
        else:
            raise APIError(404, f"no such endpoint: {method} {path[:200]}", code='not_found')

    def answer(self, request, reply, job, chat):
        """Generate a request's completions in turns on the model, and answer them whole or as a stream."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = dict(id=rid, object='chat.completion' if chat else 'text_completion', created=int(time.time()),
                    model=self.model_name)
        if job['dropped'] is not None:  # truncation='auto': how many of the oldest messages did not fit
            head['dropped_messages'] = job['dropped']
        rows = len(job['prompts'])
        texts, finish, tokens = [''] * rows, [None] * rows, [0] * rows

        def usage():
            return dict(prompt_tokens=job['prompt_tokens'], completion_tokens=sum(tokens),
                        total_tokens=job['prompt_tokens'] + sum(tokens))

        def choice(r, text, reason):
            if chat:
                return dict(index=r, delta=text, logprobs=None, finish_reason=reason)
            return dict(index=r, text=text, logprobs=None, finish_reason=reason)

        def sse(obj):
            if not reply.writable():  # a client that does not read waits without holding the model
                self.turns.give()
                held[0] = False
                if not reply.writable(self.body_timeout):
                    raise ConnectionError("the client stopped reading its answer")
                self.turns.take()
                held[0] = True
            reply.write(f"data: {json.dumps(obj)}\n\n".encode())

        if not self.turns.take(self.generation_wait):
            raise APIError(503, f"the server is busy: no turn on the model within {self.generation_wait:g} s",
                           code='overloaded', kind='server_error', headers=[('Retry-After', '1')])
        events, held = None, [True]
        try:
            events = self.generate(job['prompts'], job['params'], chat, job['seed'])
            if not job['stream']:
                for r, delta, reason, n in events:
                    texts[r], finish[r], tokens[r] = texts[r] + delta, reason, n
                    if reply.gone():  # nobody will read the answer: free the model for the next request
                        raise ConnectionAbortedError("the client left")
                    self.turns.share()
                choices = [dict(index=r, message=dict(role='assistant', content=texts[r]), logprobs=None,
                                finish_reason=finish[r]) if chat else choice(r, texts[r], finish[r])
                           for r in range(rows)]
                return self.send_json(request, reply, 200, dict(head, choices=choices, usage=usage()))
            origin = request.header('origin')
            cors = ([('Access-Control-Allow-Origin', origin), ('Vary', 'Origin')]
                    if origin and self.origin_allowed(request, origin) else [])
            reply.start(200, [('Content-Type', 'text/event-stream'), ('Cache-Control', 'no-cache'), *cors])
            chunk = dict(head, object='chat.completion.chunk') if chat else head
            if chat:
                for r in range(rows):
                    sse(dict(chunk, choices=[choice(r, {'role': 'assistant', 'content': ''}, None)]))
            chunk.pop('dropped_messages', None)  # said once, in the first chunk
            for r, delta, reason, n in events:
                tokens[r] = n
                if reply.gone():
                    raise ConnectionAbortedError("the client left")
                if not chat:
                    sse(dict(chunk, choices=[choice(r, delta, reason)]))
                elif delta:
                    sse(dict(chunk, choices=[choice(r, {'content': delta}, None)]))
                if chat and reason:  # a chat choice ends with an empty delta that carries the reason
                    sse(dict(chunk, choices=[choice(r, {}, reason)]))
                self.turns.share()
            if job['include_usage']:
                sse(dict(chunk, choices=[], usage=usage()))
            reply.write(b'data: [DONE]\n\n')
        finally:
            if events is not None:
                events.close()  # stops the generation, if it is still running
            if held[0]:
                self.turns.give()


with open(os.path.join(lumi.ROOT, 'assets', 'chat.html'), encoding='utf-8') as _f:
    CHAT_PAGE = _f.read()
with open(os.path.join(lumi.ROOT, 'assets', 'favicon.ico'), 'rb') as _f:
    FAVICON = _f.read()
# -----------------------------------------------------------------------------
# the stage

USAGE = """usage: python serve.py [--ckpt=PATH] [--host=127.0.0.1] [--port=8000] [--key=value ...] \\
  (or sample.py --serve)
Serves a model over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models), /health and a \\
chat page at /."""


def main(argv):
    cfg = lumi.load_config(KEYS, argv, shares_with=('sample.py',))
    cfg.api_key = cfg.api_key or os.environ.get('LUMI_API_KEY', '')
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
    if warning := exposure_warning(cfg.host, cfg.api_key):
        print(warning, file=sys.stderr)
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
