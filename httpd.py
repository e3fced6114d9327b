"""
The HTTP/1.1 layer under serve.py, for clients that may be hostile. One asyncio event loop owns every
connection: it reads each request's head and body against deadlines and size caps and parses them strictly
(RFC 9112: lines end in CRLF, a field line is a token, a colon and a value, one Host, one way to frame the
body), and hands only a complete, valid request to a fixed pool of worker threads (HTTPServer.handle), whose
answer goes back out through the loop (Reply). An idle connection costs a socket and a small object, never a
thread. Open connections are capped in all and per client address, complete requests waiting for a worker are
capped too, and past either cap the answer is 503 with Retry-After.

What is refused, and why: anything a lenient parser and a proxy in front of it could read two ways is a 400
that closes the connection (a header line that is not `Name: value`, obs-fold, a bare CR or LF, both
Content-Length and Transfer-Encoding, differing Content-Lengths), so a body can never be taken for a second
request (request smuggling); a head over max_header_bytes is 431, a request line over 8 KiB 414, a
Content-Length over max_body_bytes 413 before any of the body is read.

Deliberately left out: what a request means (serve.py), chunked request bodies (411: OpenAI's clients send a
Content-Length), TLS, HTTP/2, answering pipelined requests in parallel (they are answered in order),
percent-decoding paths.
"""
import asyncio
import contextlib
import json
import queue
import re
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

import lumi

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value of serve.py (its KEY_FILES name this file)
header_timeout = 10.0       # (0, inf) seconds for a request's line and headers, from the connection's
                            # start or the end of the previous answer (then 408; an idle connection closes)
body_timeout = 30.0         # (0, inf) seconds for a request's body once its head is in, and for a client
                            # that stops reading to take the answer's next bytes (then 408 / closed)
max_header_bytes = 32768    # [1024, inf) bytes of a request's line and headers together (then 431)
max_body_bytes = 1 << 20    # [1, inf) a larger Content-Length is answered 413 before the body is read
max_connections = 1024      # [1, inf) open connections in all; one more is answered 503
max_client_connections = 256  # [1, inf) open connections from one client address; one more is answered 503
workers = 16                # [1, inf) threads answering complete requests (a generation runs on one)
queue_size = 128            # [0, inf) complete requests waiting for a worker (each holds its body, no
                            # thread); one more is answered 503
KEYS = lumi.declared_keys(__file__)
HTTP_KEYS = tuple(KEYS)

MAX_LINE = 8192        # bytes of a request line (then 414): RFC 9112 3 recommends at least 8000
MAX_FIELDS = 100       # header lines in one request (then 431); browsers send about 20
LINGER = 2.0           # seconds a closing connection still reads (and drops) what the client sends
PIPELINED = 1 << 16    # bytes of the next request read while this one is answered; then reading pauses
WRITE_BUFFER = 1 << 16  # bytes of an answer queued for a slow reader before its worker waits
BACKLOG = 1024         # connections the kernel holds before the loop accepts them (http.server's: 5)
REFUSING = 64          # connections past the caps that still get their 503; beyond them, a plain close
JSON = [('Content-Type', 'application/json')]

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb'[\x21-\x7e]+')  # visible ASCII: no space, control or non-ASCII byte
_VERSION = re.compile(rb'HTTP/([0-9])\.([0-9])')
_CONTROL = re.compile(rb'[\x00-\x08\x0a-\x1f\x7f]')  # in a field value: CTLs but HTAB
_DIGITS = re.compile(r'[0-9]{1,18}')  # ASCII only: str.isdigit passes '²' and Arabic-Indic digits
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")
_ABSOLUTE = re.compile(r'(?i:https?)://([^/?#@]+)([^#]*)')


class HTTPError(Exception):
    """A request the HTTP layer answers itself: status, a message for the client, an error code (the status's
    phrase in snake case by default), and whether the connection then closes (framing it cannot trust)."""

    def __init__(self, status, message, code=None, close=True, headers=()):
        super().__init__(message)
        self.status, self.close, self.headers = status, close, tuple(headers)
        self.code = code or HTTPStatus(status).phrase.lower().replace(' ', '_').replace('-', '_')


@dataclass
class Request:
    """A complete, valid request, as a worker is handed it. headers: lowercase name -> value (repeated
    fields joined with ', '); host: the authority it names (an absolute-form target's, else Host's)."""
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict
    host: str
    length: int = 0
    keep_alive: bool = True
    expect_continue: bool = False
    body: bytes = b''
    client: str = ''

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)


def request_line(line):
    """(method, target, version) of a request line, or HTTPError: three parts split by single spaces, a token,
    visible ASCII, HTTP/1.x (RFC 9112 3)."""
    parts = line.split(b' ')
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HTTPError(400, f"a request line is 'METHOD TARGET HTTP/1.1', got {_shown(line)}")
    m = _VERSION.fullmatch(parts[2])
    if not m or m[1] != b'1':  # never 505: a 5xx would blame the server for the client's request
        raise HTTPError(400, f"this server speaks HTTP/1.1 and HTTP/1.0, not {_shown(parts[2])}",
                        'http_version_not_supported')
    return parts[0].decode(), parts[1].decode(), 'HTTP/1.0' if m[2] == b'0' else 'HTTP/1.1'


def parse_head(head):
    """The Request (no body yet) of a request's head: its line and header lines, without the empty line that
    ends them. Read as RFC 9112 says, strictly; what it refuses is HTTPError (module docstring)."""
    lines = head.split(b'\r\n')
    if any(b'\r' in line or b'\n' in line for line in lines):
        raise HTTPError(400, "a line ends in a bare CR or LF: every line of a request ends with CRLF")
    method, target, version = request_line(lines[0])
    if len(lines) - 1 > MAX_FIELDS:
        raise HTTPError(431, f"more than {MAX_FIELDS} header lines")
    fields = {}
    for line in lines[1:]:
        if line[:1] in (b' ', b'\t'):
            raise HTTPError(400, "a header line starts with whitespace (obs-fold, refused by RFC 9112 5.2): "
                                 "fold no header")
        name, colon, value = line.partition(b':')
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPError(400, f"a header line is 'Name: value', a token and a colon with no space "
                                 f"between, got {_shown(line)}")
        value = value.strip(b' \t')
        if _CONTROL.search(value):
            raise HTTPError(400, f"the {name.decode()} header holds a control character")
        fields.setdefault(name.decode().lower(), []).append(value.decode('latin-1'))
    lengths, coding = fields.get('content-length'), fields.get('transfer-encoding')
    if lengths and coding:
        raise HTTPError(400, "both Content-Length and Transfer-Encoding: the body's length could be read two "
                             "ways")
    if coding:
        raise HTTPError(411, "chunked bodies are not supported: send a Content-Length", 'length_required')
    length = 0
    if lengths:
        values = {v.strip() for field in lengths for v in field.split(',')}
        if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise HTTPError(400, f"bad Content-Length {', '.join(lengths)[:40]!r}", 'invalid_value')
        length = int(values.pop())
    hosts = fields.get('host', [])
    if len(hosts) > 1 or (version == 'HTTP/1.1' and not hosts) or (hosts and not _HOST.fullmatch(hosts[0])):
        raise HTTPError(400, "an HTTP/1.1 request names its host in exactly one valid Host header")
    host, m = (hosts or [''])[0], _ABSOLUTE.fullmatch(target)
    if m:  # absolute-form (as a request to a proxy): its authority wins over Host (RFC 9112 3.2.2)
        host, rest = m[1], m[2] or '/'
    elif target == '*' and method == 'OPTIONS':
        rest = '*'
    elif target.startswith('/'):
        rest = target
    else:
        raise HTTPError(400, f"a request target is a path ('/v1/models') or an absolute URL, "
                             f"got {target[:80]!r}")
    expect = [e.lower() for e in fields.get('expect', [])]
    if expect not in ([], ['100-continue']):
        raise HTTPError(417, "the only expectation this server meets is 'Expect: 100-continue'")
    tokens = {t.strip().lower() for field in fields.get('connection', []) for t in field.split(',')}
    path, _, query = rest.partition('?')
    return Request(method, target, path, query, version, {k: ', '.join(v) for k, v in fields.items()}, host,
                   length, version == 'HTTP/1.1' and 'close' not in tokens, bool(expect) and length > 0)


def _shown(data, width=60):
    return repr(data[:width].decode('latin-1')) + ('...' if len(data) > width else '')


def answer_bytes(status, headers, length, close):
    """An answer's status line and headers (Content-Length when length is not None)."""
    lines = [f'HTTP/1.1 {status} {HTTPStatus(status).phrase}', f'Date: {formatdate(usegmt=True)}',
             'Server: lumi']
    lines += [f'{key}: {value}' for key, value in headers]
    if length is not None:
        lines.append(f'Content-Length: {length}')
    if close:
        lines.append('Connection: close')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def json_error(status, message, code):
    """The body of an answer the layer gives itself (HTTPServer.error_body, which serve.py overrides)."""
    return json.dumps({'error': {'message': message, 'code': code}}).encode()

# -----------------------------------------------------------------------------
# a connection, on the event loop


class Connection(asyncio.Protocol):
    """One client connection, read and written on the event loop. state: 'head' (reading a request's line
    and headers), 'body', 'busy' (a worker answers; the next request's first bytes wait in the buffer), or
    'closing' (the last answer goes out; what still arrives is dropped)."""

    def __init__(self, server):
        self.server, self.buffer, self.state, self.request = server, bytearray(), 'head', None
        self.scanned = self.answered = 0  # bytes searched for the head's end; requests answered
        self.line_checked = self.counted = False
        self.timer, self.transport, self.client = None, None, ''
        self.gone = False  # the client closed or reset the connection: a worker's answer stops
        self.writable = threading.Event()  # cleared while the client reads slower than the answer comes
        self.writable.set()

    def connection_made(self, transport):
        s, self.transport = self.server, transport
        peer = transport.get_extra_info('peername')
        self.client = peer[0] if peer else ''
        s.connections.add(self)
        s.per_client[self.client] += 1
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        over = len(s.connections) - s.max_connections
        if over > REFUSING:
            return transport.abort()
        if over > 0 or s.per_client[self.client] > s.max_client_connections:
            return self.fail(HTTPError(503, "the server is busy: too many open connections"
                                       + ('' if over > 0 else " from your address"), 'overloaded',
                                       headers=[('Retry-After', '1')]))
        self.await_head()

    def connection_lost(self, exc):
        self.gone = True
        self.writable.set()  # wakes a worker waiting to write, which then finds the client gone
        self.set_timer(None)
        self.server.connections.discard(self)
        self.server.per_client[self.client] -= 1
        if not self.server.per_client[self.client]:
            del self.server.per_client[self.client]

    def pause_writing(self):
        self.writable.clear()

    def resume_writing(self):
        self.writable.set()

    def set_timer(self, seconds, then=None):
        if self.timer:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(seconds, then or self.timed_out) if seconds else None

    def await_head(self):
        self.state, self.request, self.scanned, self.line_checked = 'head', None, 0, False
        self.set_timer(self.server.header_timeout)
        if self.buffer:
            self.advance()

    def data_received(self, data):
        if self.state == 'closing':
            return  # lingering: dropped
        self.buffer += data
        if self.state == 'busy':
            if len(self.buffer) > PIPELINED:
                self.transport.pause_reading()
            return
        self.advance()

    def eof_received(self):
        if self.state == 'busy':
            self.gone = True  # a client that sent its request and half-closed is taken as gone, as one that
            return True       # closed: the two look the same without writing to it
        if self.state == 'body' or (self.state == 'head' and self.buffer.strip(b'\r\n')):
            self.fail(HTTPError(400, "the connection was closed in the middle of a request"))
            return True
        return False  # closed between requests (or while closing): close our side too

    def timed_out(self):
        if self.state == 'closing':
            return self.transport.close()
        if self.state == 'head' and not self.buffer.strip(b'\r\n') and self.answered:
            return self.transport.close()  # idle keep-alive: a 408 could be read as the next request's answer
        self.fail(HTTPError(408, "the request was not received in time", 'request_timeout'))

    def advance(self):
        """Read what the buffer holds of the current request; a complete one goes to a worker."""
        try:
            if self.state == 'head':
                self.read_head()
            if self.state == 'body' and len(self.buffer) >= self.request.length:
                request, n = self.request, self.request.length
                request.body, self.buffer[:n] = bytes(self.buffer[:n]), b''
                self.dispatch(request)
        except HTTPError as e:
            self.fail(e)

    def read_head(self):
        buf, start, s = self.buffer, 0, self.server
        while buf.startswith(b'\r\n', start):  # RFC 9112 2.2: empty lines before a request are ignored
            start += 2
        if buf[start:] == b'\r':  # the start of one more
            return
        line_end = buf.find(b'\r\n', start)
        if not self.line_checked:
            method = _TOKEN.match(buf, start)
            if len(buf) > start and (not method or (method.end() < len(buf) and buf[method.end()] != 32)):
                raise HTTPError(400, f"not an HTTP request: it starts {_shown(bytes(buf[start:start + 20]))}")
            if (line_end < 0 and len(buf) - start > MAX_LINE) or line_end - start > MAX_LINE:
                raise HTTPError(414, f"the request line is over {MAX_LINE} bytes")
            if line_end >= 0:
                request_line(bytes(buf[start:line_end]))  # garbage is refused now, not at the deadline
                self.line_checked = True
        end = buf.find(b'\r\n\r\n', max(start, self.scanned - 3))
        if (end < 0 and len(buf) > s.max_header_bytes) or end + 4 > s.max_header_bytes:
            raise HTTPError(431, f"the request's line and headers are over {s.max_header_bytes} bytes")
        if end < 0:
            self.scanned = len(buf)
            return
        request = parse_head(bytes(buf[start:end]))
        del buf[:end + 4]
        request.client = self.client
        if request.length > s.max_body_bytes:
            raise HTTPError(413, f"the request body is over this server's limit of {s.max_body_bytes} bytes",
                            'too_large')
        self.state, self.request = 'body', request
        self.set_timer(s.body_timeout)
        if request.expect_continue and len(buf) < request.length:
            self.transport.write(b'HTTP/1.1 100 Continue\r\n\r\n')

    def dispatch(self, request):
        s = self.server
        self.state = 'busy'
        self.set_timer(None)
        if s.in_flight >= s.workers + s.queue_size:
            return self.fail(HTTPError(503, "the server is busy: too many requests waiting", 'overloaded',
                                       close=not request.keep_alive, headers=[('Retry-After', '1')]))
        s.in_flight += 1
        self.counted = True
        s.jobs.put((request, Reply(self, request)))

    def write(self, data):
        if not self.transport.is_closing():
            self.transport.write(data)

    def answer(self, data):
        """A worker's whole answer goes out, and with it the request's place in the queue: a client that reads
        it and asks again at once must not be refused for the moment the worker takes to return."""
        self.write(data)
        self.release()

    def release(self):
        if self.counted:
            self.server.in_flight -= 1
            self.counted = False

    def finished(self, close):
        """A worker's answer has been queued whole: read the next request, or close."""
        self.release()
        self.answered += 1
        if close or self.gone:
            return self.close()
        self.transport.resume_reading()
        self.await_head()

    def fail(self, e):
        """Answer HTTPError e from the loop (the request, if any, never reaches a worker)."""
        method = self.request.method if self.request else ''
        body = self.server.error_body(e.status, str(e), e.code)
        close = e.close or (self.request is not None and not self.request.keep_alive)
        self.server.log(self.client, method, self.request.path if self.request else '', e.status)
        headers = [('Content-Type', 'application/json'), *e.headers]
        self.write(answer_bytes(e.status, headers, len(body), close) + (b'' if method == 'HEAD' else body))
        self.finished(close)

    def close(self):
        """Close after the answer has gone out: the write side first, then what the client still sends is read
        and dropped for up to LINGER seconds. Closing a socket with unread bytes resets the connection, and
        the reset can destroy the answer before the client reads it."""
        self.state, self.buffer = 'closing', bytearray()
        if self.transport.is_closing():  # reset or aborted already
            return
        if self.gone:  # the client has sent all it will: close once the answer is out
            return self.transport.close()
        self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.set_timer(LINGER, self.transport.close)


class Reply:
    """How a worker answers one request: send() a whole answer, or start() a streamed one (its end closes the
    connection) and write() its pieces; both go out through the event loop. gone() is True once the client
    has closed or reset the connection; a write then raises ConnectionError, as it does for a client that has
    read nothing for body_timeout seconds."""

    def __init__(self, conn, request):
        self.conn, self.request = conn, request
        self.answered = self.streaming = False
        self.close = not request.keep_alive  # set it to close the connection after this answer

    def gone(self):
        return self.conn.gone

    def writable(self, timeout=0.0):
        """Whether the client takes the answer's bytes, waiting up to timeout seconds for it to catch up."""
        return self.conn.writable.wait(timeout) and not self.conn.gone

    def send(self, status, body=b'', headers=()):
        close = self.close
        self._put(answer_bytes(status, headers, len(body), close)
                  + (b'' if self.request.method == 'HEAD' else body), status, whole=True)

    def start(self, status, headers=()):
        self.streaming = self.close = True
        self._put(answer_bytes(status, headers, None, True), status)

    def write(self, data):
        if self.request.method != 'HEAD':
            self._put(data)

    def _put(self, data, status=None, whole=False):
        conn = self.conn
        if not self.writable(conn.server.body_timeout):
            raise ConnectionError("the client left" if conn.gone else "the client stopped reading its answer")
        if status is not None:
            self.answered = True
            conn.server.log(conn.client, self.request.method, self.request.path, status)
        try:
            conn.server.loop.call_soon_threadsafe(conn.answer if whole else conn.write, data)
        except RuntimeError:  # the loop has closed: the server is stopping
            raise ConnectionError("the server is closing") from None

# -----------------------------------------------------------------------------
# the server: a listening socket, the event loop, the workers


class HTTPServer:
    """Serves HTTP/1.1 on address (port 0 picks a free one) until shutdown(): a subclass's handle(request,
    reply) answers each complete request on a worker thread. options: the HTTP_KEYS, each defaulting to its
    key's default. The socket is bound here, so a taken port is an OSError at once."""

    def __init__(self, address, quiet=False, **options):
        unknown = set(options) - set(HTTP_KEYS)
        if unknown:
            raise TypeError(f"unknown server options {sorted(unknown)}")
        for key in HTTP_KEYS:
            setattr(self, key, options.get(key, KEYS[key].default))
        host = address[0]
        self.socket = socket.create_server(address, family=socket.AF_INET6 if ':' in host else socket.AF_INET,
                                           backlog=BACKLOG)
        self.server_address, self.quiet = self.socket.getsockname()[:2], quiet
        self.connections, self.per_client, self.in_flight = set(), Counter(), 0
        self.loop, self.stop, self.ready, self.stopped = None, None, threading.Event(), threading.Event()
        self.jobs = queue.Queue()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]
        for t in self.threads:
            t.start()

    def handle(self, request, reply):
        """Answer request through reply (on a worker thread); a subclass's."""
        reply.send(404, self.error_body(404, 'not found', 'not_found'), JSON)

    def error_body(self, status, message, code):
        return json_error(status, message, code)

    def log(self, client, method, path, status):
        if not self.quiet:
            print(f'{client} {time.strftime("%H:%M:%S")} "{method} {path[:200]}" {status}', file=sys.stderr,
                  flush=True)

    def serve_forever(self):
        """Serve until shutdown() is called from another thread (or Ctrl-C)."""
        self.loop = asyncio.new_event_loop()
        main = self.loop.create_task(self._serve())
        try:
            self.loop.run_until_complete(main)
        finally:
            main.cancel()
            with contextlib.suppress(BaseException):  # Ctrl-C lands here; its finally still runs
                self.loop.run_until_complete(main)
            self.loop.close()
            self.stopped.set()

    async def _serve(self):
        self.stop = asyncio.Event()
        listener = await self.loop.create_server(lambda: Connection(self), sock=self.socket, backlog=BACKLOG)
        self.ready.set()
        try:
            await self.stop.wait()
        finally:
            listener.close()
            for conn in list(self.connections):
                conn.transport.abort()
            await asyncio.sleep(0)  # their connection_lost runs: waiting workers learn the client is gone

    def shutdown(self):
        """Stop serve_forever (from another thread) and wait until it has returned."""
        if self.loop is None:
            return
        self.ready.wait(10)
        with contextlib.suppress(RuntimeError):  # the loop has closed already
            self.loop.call_soon_threadsafe(self.stop.set)
        self.stopped.wait(10)

    def server_close(self):
        """Stop listening and wait for the workers: a thread that ran torch and is still ending while the
        interpreter shuts down can abort the process."""
        self.socket.close()
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(timeout=5)

    def _work(self):
        while (job := self.jobs.get()) is not None:
            request, reply = job
            try:
                self.handle(request, reply)
                if not reply.answered and not reply.gone():
                    raise RuntimeError(f"no answer to {request.method} {request.path}")
            except ConnectionError:
                reply.close = True
            except Exception:  # a bug must not take the server down; the client learns what happened
                traceback.print_exc()
                reply.close = True
                if not reply.answered:
                    with contextlib.suppress(ConnectionError):
                        reply.send(500, self.error_body(500, "internal error (the server's log has it)",
                                                        'server_error'), JSON)
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                self.loop.call_soon_threadsafe(reply.conn.finished, reply.close)
