"""
A threaded HTTP/1.1 server for clients that may be hostile, on the standard library's http.server: a fixed
pool of worker threads serves connections; connections waiting for one queue up to a bound, and one more is
answered on the accepting thread, briefly and without being read; every read of a request runs against a
deadline (DeadlineReader); closing the server cuts every connection and waits for the workers. serve.py builds
OpenAI's API on it.

Deliberately left out: what a request means (serve.py), TLS, HTTP/2.
"""
import io
import math
import queue
import socket
import threading
import time
from http.server import HTTPServer


class DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only the time left until `until`: a per-read timeout alone lets a client
    that trickles one byte at a time hold its connection for ever."""

    def __init__(self, sock):
        self.sock, self.until, self.got = sock, math.inf, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.until - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self.sock.settimeout(left)
        n = self.sock.recv_into(buffer)
        self.got += n
        return n


class PooledHTTPServer(HTTPServer):
    """handler's requests on address, served by `workers` threads; up to queue_size connections wait for one,
    and a connection past them gets busy_answer (the bytes of a whole HTTP response) and is closed."""

    def __init__(self, address, handler, workers, queue_size, busy_answer):
        # the workers, the connections waiting for one and those being served: server_close needs them all
        self.threads, self.pending, self.open = [], queue.Queue(), set()
        self.queue_size, self.busy_answer = queue_size, busy_answer
        super().__init__(address, handler)
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def process_request(self, request, client_address):
        if self.pending.qsize() < self.queue_size:  # only this thread adds, so the check holds until the put
            return self.pending.put((request, client_address))
        try:  # answered here, on the accepting thread: briefly, and without reading the request
            request.settimeout(1)
            request.sendall(self.busy_answer)
        except OSError:
            pass
        self.shutdown_request(request)

    def _work(self):
        while (item := self.pending.get()) is not None:
            request, client_address = item
            self.open.add(request)
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.open.discard(request)
                self.shutdown_request(request)

    def server_close(self):
        """Stop listening, cut every connection, and wait for the workers: a thread that ran torch and is
        still ending while the interpreter shuts down can abort the process."""
        super().server_close()
        while True:
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for request in list(self.open):
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _ in self.threads:
            self.pending.put(None)
        for t in self.threads:
            t.join(timeout=5)
