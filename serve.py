"""
The HTTP face of sample.py: OpenAI's completions and chat completions APIs, plain and streamed as
server-sent events, with /v1/models, /health and a small chat page at /, on the standard library's threaded
HTTP server. `python sample.py --serve` starts it; generation is handed in (sample.stream_text), so this
file knows HTTP and OpenAI's shapes and nothing of models.

Deliberately left out: batching across requests (one generation runs at a time behind a lock; one request
may carry several prompts, which share a batch), logprobs, tools, authentication, TLS.
"""
import json
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lumi
from lumi import BOS_ID

class APIError(Exception):
    """A refused request, answered with OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, kind='invalid_request_error'):
        super().__init__(message)
        self.status, self.body = status, {'error': dict(message=message, type=kind, param=param, code=code)}


def _field(body, key, types, default, valid=None, rule=''):
    """body[key] if it has one of types (a bool is never a number) and passes valid; absent or null: default."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types) or (valid and not valid(value)):
        raise APIError(400, f"'{key}' must be {rule}, got {json.dumps(value)[:100]}", key, 'invalid_value')
    return value


def parse_request(body, server, chat):
    """What a request asks for: the token ids of each sequence (prompts x n), the Sampling, the seed, whether
    to stream. Refuses what Lumi cannot honour rather than ignore it."""
    name = _field(body, 'model', (str,), server.model_name, rule='a string')
    if name != server.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{server.model_name}'",
                       'model', 'model_not_found')
    for key in ('logprobs', 'top_logprobs', 'echo', 'suffix', 'logit_bias', 'tools', 'functions'):
        if body.get(key):
            raise APIError(400, f"'{key}' is not supported by this server", key, 'unsupported_parameter')
    for key in ('presence_penalty', 'frequency_penalty'):
        if _field(body, key, (int, float), 0, rule='a number'):
            raise APIError(400, f"'{key}' is not supported; use 'repetition_penalty'", key, 'unsupported_parameter')
    d = server.defaults
    key = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
    max_tokens = _field(body, key, (int,), d.max_new_tokens, lambda v: v >= 1, 'an integer >= 1')
    if max_tokens > server.max_tokens_limit:
        raise APIError(400, f"'{key}' is {max_tokens}, over this server's limit of {server.max_tokens_limit}",
                       key, 'max_tokens_exceeded')
    stop = _field(body, 'stop', (str, list), [], lambda v: isinstance(v, str) or (
        len(v) <= 4 and all(isinstance(s, str) for s in v)), 'a string or a list of at most 4 strings')
    params = replace(
        d, max_new_tokens=max_tokens,
        temperature=_field(body, 'temperature', (int, float), d.temperature, lambda v: 0 <= v <= 2, 'in [0, 2]'),
        top_k=max(0, _field(body, 'top_k', (int,), d.top_k, lambda v: v >= -1, 'an integer >= -1')),
        top_p=_field(body, 'top_p', (int, float), d.top_p, lambda v: 0 < v <= 1, 'in (0, 1]'),
        repetition_penalty=_field(body, 'repetition_penalty', (int, float), d.repetition_penalty, lambda v: v > 0,
                                  'a number > 0'),
        stop=(stop,) if isinstance(stop, str) else tuple(stop))
    n = _field(body, 'n', (int,), 1, lambda v: 1 <= v <= server.max_batch, f'in [1, {server.max_batch}]')
    seed = _field(body, 'seed', (int,), None, rule='an integer')
    stream = _field(body, 'stream', (bool,), False, rule='a boolean')
    options = _field(body, 'stream_options', (dict,), {}, rule='an object')
    include_usage = _field(options, 'include_usage', (bool,), False, rule='a boolean')

    tok = server.tok
    if chat:
        prompts = [render_messages(tok, body.get('messages'))]
    else:
        texts = _field(body, 'prompt', (str, list), None, lambda v: isinstance(v, str) or (
            0 < len(v) <= server.max_batch and all(isinstance(t, str) for t in v)), 'a string or a list of strings')
        if texts is None:
            raise APIError(400, "'prompt' is required", 'prompt', 'missing_required_parameter')
        prompts = [[BOS_ID] + ids for ids in tok.encode_batch([texts] if isinstance(texts, str) else texts)]
    window = server.window
    for ids in prompts:
        if len(ids) > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens; the prompt has "
                                f"{len(ids)}", 'messages' if chat else 'prompt', 'context_length_exceeded')
    if len(prompts) * n > server.max_batch:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is over this server's batch limit of {server.max_batch}",
                       'n', 'invalid_value')
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
        role = 'system' if role == 'developer' else role
        if role not in lumi.ROLES or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be {{'role': one of {list(lumi.ROLES)}, 'content': text}}, "
                                f"got {json.dumps(m)[:100]}", f'messages[{i}]', 'invalid_value')
        plain.append({'role': role, 'content': content})
    return lumi.render_chat(tok, plain, add_generation_prompt=True)[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive for JSON answers; a stream ends by closing the connection
    server_version = 'lumi'
    timeout = 120  # seconds a silent client may hold its connection's thread

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def send_body(self, status, data, content_type='application/json'):
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status, obj):
        self.send_body(status, json.dumps(obj).encode())

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
            self.send_json(404, APIError(404, f"no such endpoint: GET {path}", code='not_found').body)

    def do_POST(self):
        path, self.streaming = self.path.split('?')[0], False
        try:
            if path not in ('/v1/completions', '/v1/chat/completions'):
                raise APIError(404, f"no such endpoint: POST {path}", code='not_found')
            chat = path == '/v1/chat/completions'
            self.generate(parse_request(self.read_json(), self.server, chat), chat)
        except APIError as e:
            self.send_json(e.status, e.body)
        except (BrokenPipeError, ConnectionResetError):  # the client left; its generation stopped with it
            self.close_connection = True
        except Exception as e:  # a bug must not take the server down; the client learns what happened
            self.log_error('%s', repr(e))
            self.close_connection = True
            error = APIError(500, f"internal error: {e!r}", kind='server_error').body
            if self.streaming:  # the 200 went out already: end the stream with an error event, as OpenAI does
                self.sse(error)
            else:
                self.send_json(500, error)

    def read_json(self):
        length = self.headers.get('Content-Length')
        if length is None:
            raise APIError(411, "a Content-Length header is required", code='length_required')
        if not length.isdigit():
            raise APIError(400, f"bad Content-Length {length!r}", code='invalid_value')
        length, limit = int(length), self.server.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread unless small enough to drain
            while 0 < length <= 16 * limit:  # so the client, still sending, gets to read the answer
                chunk = self.rfile.read(min(length, 1 << 16))
                length = length - len(chunk) if chunk else 0
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes", code='too_large')
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as e:  # json's errors and UnicodeDecodeError both are ValueErrors
            raise APIError(400, f"the body is not valid JSON: {e}", code='invalid_json') from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code='invalid_json')
        return body

    def sse(self, obj):
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def generate(self, job, chat):
        s, rid, created = self.server, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
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

        with s.lock:  # one generation at a time: bounded memory, and each request runs at full speed
            events = s.generate(job['prompts'], job['params'], chat, job['seed'])
            if not job['stream']:
                for r, delta, reason, n in events:
                    texts[r], finish[r], tokens[r] = texts[r] + delta, reason, n
                choices = [dict(index=r, message=dict(role='assistant', content=texts[r]), logprobs=None,
                                finish_reason=finish[r]) if chat else choice(r, texts[r], finish[r])
                           for r in range(rows)]
                return self.send_json(200, dict(head, choices=choices, usage=usage()))
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.send_header('Connection', 'close')
            self.end_headers()
            self.close_connection, self.streaming = True, True
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


class Server(ThreadingHTTPServer):
    """OpenAI's API on host:port (port 0 picks a free one) for one model.

    generate(prompts, params, chat, seed) runs a batch of token-id prompts with a sample.Sampling and yields
    (row, text delta, finish_reason, tokens so far), as sample.stream_text does; defaults is the Sampling a
    request starts from; window is the model's context length."""
    daemon_threads = True  # a client that hangs on never holds up shutdown

    def __init__(self, generate, tok, window, defaults, model_name='lumi', host='127.0.0.1', port=8000,
                 max_tokens_limit=4096, max_batch=8, max_body_bytes=1 << 20, created=0, quiet=False):
        super().__init__((host, port), Handler)
        self.generate, self.tok, self.window, self.defaults = generate, tok, window, defaults
        self.model_name, self.created, self.quiet = model_name, created, quiet
        self.max_tokens_limit, self.max_batch, self.max_body_bytes = max_tokens_limit, max_batch, max_body_bytes
        self.lock = threading.Lock()

    def model_card(self):
        return dict(id=self.model_name, object='model', created=self.created, owned_by='lumi')


CHAT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Lumi</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; color: #222 }
 #log p { white-space: pre-wrap; margin: .6em 0 } .user { color: #555 }
 .user::before { content: "you: "; font-weight: bold }
 form { display: flex; gap: .5em } textarea { flex: 1; font: inherit } small { color: #777 }
</style></head><body>
<h3>Lumi <small id="name"></small></h3>
<div id="log"></div>
<form id="form"><textarea id="input" rows="2" placeholder="Message (Enter sends, Shift+Enter is a new line)"></textarea>
<button>Send</button></form>
<p><small>system <input id="system" size="30"> temperature <input id="temp" type="number" step="0.1" min="0" max="2"
value="0.8" style="width:4em"> max tokens <input id="max" type="number" min="1" value="256" style="width:5em">
<button id="reset" type="button">New chat</button></small></p>
<script>
const MODEL = MODEL_NAME, $ = id => document.getElementById(id);
let history = [];
$('name').textContent = MODEL;
function show(cls, text) { const p = document.createElement('p'); p.className = cls; p.textContent = text;
  $('log').append(p); return p; }
async function send(text) {
  history.push({role: 'user', content: text}); show('user', text);
  const out = show('assistant', ''); let reply = '';
  const messages = ($('system').value ? [{role: 'system', content: $('system').value}] : []).concat(history);
  const r = await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({model: MODEL, messages, stream: true, temperature: +$('temp').value,
                          max_tokens: +$('max').value})});
  if (!r.ok) { out.textContent = 'error: ' + (await r.json()).error.message; history.pop(); return; }
  const reader = r.body.getReader(), utf8 = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += utf8.decode(value, {stream: true}); let i;
    while ((i = buf.indexOf('\\n\\n')) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
      const c = JSON.parse(line.slice(6)).choices[0];
      if (c && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
    }
  }
  history.push({role: 'assistant', content: reply});
}
$('form').onsubmit = e => {
  e.preventDefault(); const t = $('input').value.trim(); $('input').value = ''; if (t) send(t); };
$('input').onkeydown = e => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('form').requestSubmit(); } };
$('reset').onclick = () => { history = []; $('log').innerHTML = ''; };
</script></body></html>
"""
