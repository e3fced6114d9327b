"""
The server under load and abuse (issue 28): `python serve.py` of a checkout (this one, or --repo=DIR, say the
main branch, for the before/after arms) serving a tiny model written here (a 512-piece tokenizer trained on a
few KB of text, 2 layers x 64, context 64, random weights: the HTTP layer is what is measured), driven over
127.0.0.1 only, each phase bounded in connections and seconds:

  load     64 clients sending completions (max_tokens 8, keep-alive) back to back for --seconds; a 503 waits
           its Retry-After, as OpenAI's client does
  idle     200 connections that send nothing, re-opened as soon as the server drops them, while 4 clients send
           real requests for --seconds, each on a new connection: the share answered 200 within 5 s (the
           acceptance line: >= 90 %)
  headers  3 x 16 clients each sending 97 header lines of 65 KB: their statuses, the server's RSS growth (the
           acceptance line: < 100 MiB), and /health after
  smuggle  the three malformed header lines of the issue with a whole request as the body: whether it ran
  long     one request for n=8 x 1,024 tokens (the server ignores EOS) while 4 clients send short ones
           (max_tokens 8): their p50/p99 latency, which fair turns keep near a turn, not the long request

Each phase prints the connections held, requests answered by status, p50/p99 latency, the server's RSS before
and after and its CPU seconds. The server runs on one core (--server_core), the clients where this script
runs (taskset -c 0 keeps them off the server's core). On a shared machine the latencies are noisy; the counts
and RSS are not.

    taskset -c 0 python benchmarks/bench_serve.py [--seconds=30] [--repo=DIR] [--phases=load,idle,...]

Deliberately left out: the model's decode speed (benchmarks/bench_sample.py) and traffic to any other host.
"""
import http.client
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lumi  # noqa: E402

seconds = 30.0      # [1, inf) how long the load and idle phases run
repo = ''           # the checkout whose serve.py runs ('': this one)
phases = 'load,idle,headers,smuggle,long'
clients = 64        # [1, inf) concurrent clients of the load phase
idle_connections = 200  # [0, inf) connections that send nothing, in the idle phase
server_core = 1     # [-1, inf) the CPU core the server runs on, away from the clients (-1: any)
KEYS = {'seconds': seconds, 'repo': repo, 'phases': phases, 'clients': clients,
        'idle_connections': idle_connections, 'server_core': server_core}
TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Shall I compare thee to a "
        "summer's day? Thou art more lovely and more temperate. To be, or not to be, that is the question.\n")


def tiny_checkpoint(folder):
    """A tokenizer and a 2 x 64 model with random weights, saved as a pretrain checkpoint."""
    import sentencepiece as spm
    import torch

    import checkpoint
    from model import GPT, ModelConfig
    from tokenizer import CHAT_TOKENS, Tokenizer
    with open(os.path.join(folder, 'corpus.txt'), 'w') as f:
        f.write(TEXT * 40)
    spm.SentencePieceTrainer.train(
        input=os.path.join(folder, 'corpus.txt'), model_prefix=os.path.join(folder, 'tok'), vocab_size=512,
        model_type='bpe', byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(CHAT_TOKENS), minloglevel=2)
    tok = Tokenizer.load(os.path.join(folder, 'tok.model'))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128,
                            block_size=64))
    path = os.path.join(folder, 'ckpt_0000000.pt')
    checkpoint.save_checkpoint(path, dict(checkpoint.checkpoint_meta(model, tok, 'pretrain'),
                                          model=model.state_dict(), step=0, tokens_seen=0, config={}))
    return path


def start_server(root, ckpt, core):
    pin = (lambda: os.sched_setaffinity(0, {core})) if core >= 0 else None
    proc = subprocess.Popen([sys.executable, os.path.join(root, 'serve.py'), f'--ckpt={ckpt}', '--port=0',
                             '--device=cpu', '--dtype=float32', '--ignore_eos=True', '--max_new_tokens=8'],
                            cwd=root, stderr=subprocess.PIPE, text=True, preexec_fn=pin,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    line = ''
    while 'serving' not in line:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"{root}/serve.py exited before serving")
    port = int(line.split('http://127.0.0.1:')[1].split('/')[0])
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain its log
    return proc, port


def rss_mib(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def cpu_seconds(pid):
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def request(port, conn, path, body=None, timeout=10.0):
    """(status, seconds) of one request on a kept-alive connection (conn[0], re-opened when it fails). A 503
    waits its Retry-After (at most 1 s), as OpenAI's client does before it retries."""
    t0 = time.perf_counter()
    try:
        if conn[0] is None:
            conn[0] = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
        data = json.dumps(body).encode() if body is not None else None
        conn[0].request('POST' if data else 'GET', path, data,
                        {'Content-Type': 'application/json'} if data else {})
        r = conn[0].getresponse()
        r.read()
        if r.getheader('Connection') == 'close':
            conn[0].close()
            conn[0] = None
        if r.status == 503:
            time.sleep(min(float(r.getheader('Retry-After') or 0), 1.0))
        return r.status, time.perf_counter() - t0
    except (OSError, http.client.HTTPException):
        if conn[0] is not None:
            conn[0].close()
        conn[0] = None
        return 'error', time.perf_counter() - t0


def drive(port, n, done, body, results, timeout=10.0, fresh=False):
    """n clients sending body to /v1/completions until done() is true, on a kept-alive connection each or
    (fresh) a new connection for every request; results: (status, seconds)."""
    def client():
        conn = [None]
        while not done():
            results.append(request(port, conn, '/v1/completions', body, timeout))
            if fresh and conn[0]:
                conn[0].close()
                conn[0] = None
        if conn[0]:
            conn[0].close()
    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def summary(results):
    counts = {}
    for status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    times = sorted(s for _, s in results)
    pct = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1000 if times else float('nan')
    return (f"{len(results):,} requests, statuses {dict(sorted(counts.items(), key=str))}, "
            f"p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms")


class Phase:
    """Prints what the server's process did during a phase: RSS before and after, CPU seconds."""

    def __init__(self, name, pid):
        self.name, self.pid = name, pid

    def __enter__(self):
        self.rss, self.cpu, self.t0 = rss_mib(self.pid), cpu_seconds(self.pid), time.perf_counter()
        print(f"[{self.name}]", flush=True)
        return self

    def __exit__(self, *exc):
        print(f"  server RSS {self.rss:.0f} -> {rss_mib(self.pid):.0f} MiB, "
              f"{cpu_seconds(self.pid) - self.cpu:.1f} CPU s in {time.perf_counter() - self.t0:.1f} s",
              flush=True)


def load(port, cfg):
    results = []
    end = time.perf_counter() + cfg.seconds
    for t in drive(port, cfg.clients, lambda: time.perf_counter() > end, {'prompt': 'To be', 'max_tokens': 8},
                   results):
        t.join()
    print(f"  {cfg.clients} clients for {cfg.seconds:g} s: {summary(results)}")


def idle(port, cfg):
    stop, held, reopened = threading.Event(), [0], [0]

    def hold():
        sel = selectors.DefaultSelector()

        def opened():
            try:
                s = socket.create_connection(('127.0.0.1', port), timeout=5)
            except OSError:
                return
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        for _ in range(cfg.idle_connections):
            opened()
        while not stop.is_set():
            held[0] = max(held[0], len(sel.get_map()))
            for key, _ in sel.select(0.05):  # readable: the server answered (408, 503) or closed
                try:
                    while key.fileobj.recv(1 << 16):
                        pass
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sel.unregister(key.fileobj)
                key.fileobj.close()
                reopened[0] += 1
                opened()
        for key in list(sel.get_map().values()):
            key.fileobj.close()
    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(1)
    results, end = [], time.perf_counter() + cfg.seconds
    for t in drive(port, 4, lambda: time.perf_counter() > end, {'prompt': 'To be', 'max_tokens': 8}, results,
                   timeout=5, fresh=True):
        t.join()
    stop.set()
    holder.join()
    ok = sum(1 for status, s in results if status == 200 and s <= 5)
    print(f"  {held[0]} idle connections held ({reopened[0]:,} re-opened after the server dropped them); "
          f"4 real clients: {summary(results)}; answered 200 within 5 s: {ok / max(len(results), 1):.1%}")


def headers(port, pid, cfg):
    line = b'X-Flood: ' + b'v' * 65_000 + b'\r\n'
    data = b'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n' + line * 97 + b'\r\n'
    before, statuses = rss_mib(pid), {}

    def flood():
        answer = b''
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
                try:
                    s.sendall(data)
                except OSError:
                    pass
                while b'\r\n' not in answer and (chunk := s.recv(1 << 16)):
                    answer += chunk
        except OSError:
            pass
        status = answer.split()[1].decode() if answer else 'closed'
        statuses[status] = statuses.get(status, 0) + 1
    for _ in range(3):
        threads = [threading.Thread(target=flood) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    time.sleep(1)
    health = request(port, [None], '/health')[0]
    print(f"  3 x 16 clients with 97 x 65 KB header lines: statuses {statuses}; RSS grew "
          f"{rss_mib(pid) - before:.0f} MiB; /health after: {health}")


def smuggle(port, cfg):
    inner = (b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
             b'Content-Length: 17\r\n\r\n{"max_tokens": 1}')
    for bad in (b'X-Bad : y', b'NoColonHere', b'X Bad: y'):
        data = (b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                + bad + b'\r\nContent-Length: %d\r\n\r\n' % len(inner) + inner)
        answers = b''
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.sendall(data)
            try:
                while chunk := s.recv(1 << 16):
                    answers += chunk
            except OSError:
                pass
        statuses = [int(a.split(b' ', 2)[1]) for a in answers.split(b'HTTP/1.')[1:]]
        print(f"  {bad.decode()!r}: answers {statuses}; the body ran as a request: "
              f"{'yes' if len(statuses) > 1 else 'no'}")


def long(port, cfg):
    results, done = [], []

    def big():
        body = {'prompt': 'To be', 'n': 8, 'max_tokens': 1024}
        done.append(request(port, [None], '/v1/completions', body, timeout=600))
    t_big = threading.Thread(target=big)
    t_big.start()
    time.sleep(0.5)  # the long one has the model
    for t in drive(port, 4, lambda: not t_big.is_alive(), {'prompt': 'Hi', 'max_tokens': 8}, results,
                   timeout=600):
        t.join()
    print(f"  n=8 x 1,024 tokens: {done[0][0]} in {done[0][1]:.1f} s; short requests meanwhile: "
          f"{summary(results)}")


def main(argv):
    cfg = lumi.load_config(KEYS, argv, shares_with=())
    root = os.path.abspath(cfg.repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    flags = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    model = next((line.split(':', 1)[1].strip() for line in flags.splitlines() if 'Model name' in line), '?')
    print(f"{root}: serve.py; CPU {model}, {os.cpu_count()} cores; avx512_bf16 "
          f"{'yes' if 'avx512_bf16' in flags else 'no'}, avx2 {'yes' if 'avx2' in flags else 'no'}")
    with tempfile.TemporaryDirectory() as folder:
        proc, port = start_server(root, tiny_checkpoint(folder), cfg.server_core)
        try:
            for name in cfg.phases.split(','):
                with Phase(name, proc.pid):
                    if name == 'headers':
                        headers(port, proc.pid, cfg)
                    else:
                        globals()[name](port, cfg)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == '__main__':
    lumi.cli(main, KEYS)
