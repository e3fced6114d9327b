"""
sample.py against references: the sampling filters on hand-made logits, KV-cache generation against
recomputing the whole context (greedy and seeded sampling, a ragged batch, rows ending early, the context
shift), streamed text against plain decoding, history trimming, loading (adapter pairs, tokenizer checks),
the command line, and the interactive prompt through a pseudo-terminal. The server is tests/test_serve.py.
"""
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import engine
import lumi
import sample as sample_stage
from test_engine import complete
from tokenizer import BOS_ID, render_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS='1', TERM='dumb', PYTHONIOENCODING='utf-8')


@pytest.fixture(scope='module')
def sft_checkpoint(tmp_path_factory, lively_checkpoint):
    """The lively model saved as an SFT checkpoint, in an out/sft/ tree (what `python
    sample.py` looks for)."""
    ckpt = torch.load(lively_checkpoint, weights_only=True)
    path = tmp_path_factory.mktemp('run') / 'out' / 'sft' / 'ckpt_0000001.pt'
    checkpoint.save_checkpoint(str(path), dict(ckpt, kind='sft'))
    return str(path)


def greedy(n, **kw):
    return engine.Sampling(max_new_tokens=n, temperature=0.0, top_p=1.0, **kw)


# -----------------------------------------------------------------------------
# sampling filters on hand-made logits


# -----------------------------------------------------------------------------
# the engine against recomputing the context


# -----------------------------------------------------------------------------
# text


# -----------------------------------------------------------------------------
# loading

def made(path, t, state=None):
    """A file at path written at time t: a checkpoint of state, or empty (the newest-model rule reads names
    and times alone)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    if state is None:
        open(path, 'w').close()
    else:
        checkpoint.save_checkpoint(path, state)
    os.utime(path, (t, t))


def test_no_ckpt_means_the_newest_model_a_runs_last_stage_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    newest = lambda: checkpoint.newest_checkpoint('out', 'runs')
    for stage, t in (('pretrain/ckpt_0000100.pt', 100), ('sft/merged.pt', 110), ('dpo/merged.pt', 120)):
        made(f'runs/old/{stage}', t)
    assert newest() == 'runs/old/dpo/merged.pt'
    made('out/cpu/ckpt_0000200.pt', 200)
    made('out/cpu/best.pt', 201)  # one --ckpt away, not what the folder means
    assert newest() == 'out/cpu/ckpt_0000200.pt'
    # a newer run: its DPO model, though the adapter and the step checkpoint beside it were written after it
    for stage, t in (('pretrain/ckpt_0000060.pt', 300), ('sft/merged.pt', 310), ('dpo/ckpt_0000010.pt', 319),
                     ('dpo/merged.pt', 320), ('dpo/adapter.pt', 321)):
        made(f'runs/new/{stage}', t)
    assert newest() == 'runs/new/dpo/merged.pt'
    # pretraining and SFT ran again: the DPO model left from before is older than the SFT it would tune
    made('runs/new/pretrain/ckpt_0000090.pt', 400)
    made('runs/new/sft/merged.pt', 410)
    assert newest() == 'runs/new/sft/merged.pt'
    # the stages' default out_dirs (out/pretrain, out/sft, out/dpo) are a run too
    made('out/pretrain/ckpt_0000050.pt', 500)
    made('out/dpo/merged.pt', 490)  # from an earlier pretrain and SFT
    assert newest() == 'out/pretrain/ckpt_0000050.pt'
    made('out/sft/merged.pt', 510)
    made('out/dpo/merged.pt', 520)
    assert newest() == 'out/dpo/merged.pt'
    made('out/sft_cpu/merged.pt', 600)  # any other out_dir is a model of its own: the newest wins
    assert newest() == 'out/sft_cpu/merged.pt'
    with pytest.raises(FileNotFoundError, match='lumi.py run'):
        checkpoint.newest_checkpoint('nowhere', 'nothing')


def test_sample_with_no_arguments_chats_with_the_runs_dpo_model_and_its_settings(
        tmp_path, monkeypatch, capsys, lively_checkpoint):
    monkeypatch.chdir(tmp_path)
    state = torch.load(lively_checkpoint, weights_only=True)
    state.pop('tensor_sha256')
    made('out/cpu/ckpt_0000200.pt', 100, dict(state, kind='pretrain'))  # an older model of another run
    for stage, name, t in (('pretrain', 'ckpt_0000060.pt', 200), ('sft', 'merged.pt', 210),
                           ('dpo', 'merged.pt', 220)):
        made(f'runs/pipeline_cpu/{stage}/{name}', t, dict(state, kind=stage))
    lumi.write_json('runs/pipeline_cpu/sample_args.json',  # as pipeline.py records them
                    dict(sample_args=['--repetition_penalty=1.3', '--frequency_penalty', '0.3']))
    model, tok, _ = checkpoint.load_model('runs/pipeline_cpu/dpo/merged.pt')
    ids, _ = render_chat(tok, [{'role': 'user', 'content': 'hello there'}], add_generation_prompt=True)
    reply = lambda **kw: complete(model, tok, [ids], greedy(12, ignore_eos=True, **kw), chat=True)[0][0]

    def sample(*flags):
        sample_stage.main(['--prompt=hello there', '--temperature=0', '--max_new_tokens=12', '--ignore_eos',
                           *flags])
        out, err = capsys.readouterr()
        return out, err.splitlines()[0]
    out, first = sample()
    assert first.startswith('runs/pipeline_cpu/dpo/merged.pt (the newest model under out/ and runs/): dpo '
                            'model')
    assert 'repetition_penalty 1.3, frequency_penalty 0.3' in first
    assert first.endswith('(repetition_penalty, frequency_penalty as runs/pipeline_cpu/sample_args.json '
                          'recommends; flags win)')
    assert out == reply(repetition_penalty=1.3, frequency_penalty=0.3) + '\n'
    assert reply(repetition_penalty=1.3, frequency_penalty=0.3) != reply()  # the settings show in the reply
    out, first = sample('--frequency_penalty=0')  # a flag wins over the run's setting
    assert out == reply(repetition_penalty=1.3) + '\n' and '(repetition_penalty as' in first
    out, first = sample('--ckpt=runs/pipeline_cpu/sft')  # and --ckpt over the newest
    assert first.startswith('runs/pipeline_cpu/sft/merged.pt: sft model')
    assert 'repetition_penalty 1.3' in first
    with pytest.raises(FileNotFoundError, match=r'did you mean runs/pipeline_cpu/dpo/merged\.pt'):
        sample('--ckpt=runs/pipline_cpu/dpo')
    lumi.write_json('runs/pipeline_cpu/sample_args.json', dict(sample_args=['--ckpt=out/cpu']))
    with pytest.raises(lumi.LumiError, match='sample_args.json: it may not choose the model'):
        sample()



# -----------------------------------------------------------------------------
# the command line and the interactive prompt

def test_cli_prompt_prints_the_greedy_completion(loaded, lively_checkpoint):
    model, tok, _ = loaded
    run = subprocess.run([sys.executable, 'sample.py', f'--ckpt={os.path.dirname(lively_checkpoint)}',
                          '--prompt=To be, or', '--max_new_tokens=15', '--temperature=0', '--dtype=float32'],
                         cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text, _, _ = complete(model, tok, [[BOS_ID] + tok.encode('To be, or')], greedy(15))[0]
    assert run.stdout == text + '\n'
    bad = subprocess.run([sys.executable, 'sample.py', '--ckpt=/nonexistent/ckpt.pt', '--prompt=x'],
                         cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and 'not found' in bad.stderr


def default_ctrl_c():
    """SIGINT at its default in a child about to exec: an ignored or blocked SIGINT is inherited across exec
    (and Python installs no KeyboardInterrupt handler over an ignored one), so whatever the test process's own
    signal state after hundreds of tests, the child meets Ctrl-C as it would from a shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Terminal:
    """A child process on a pseudo-terminal: what it prints is read as a screen, keys are written to it."""

    def __init__(self, argv, cwd):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once, Ctrl-C delivered as a shell would deliver it
            os.chdir(cwd)
            default_ctrl_c()
            os.execve(sys.executable, [sys.executable] + argv, CHILD_ENV)
        self.screen, self.pos = '', 0

    def expect(self, text, timeout=60):
        """Wait until text appears after what was matched before."""
        deadline = time.time() + timeout
        while text not in self.screen[self.pos:]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            data = os.read(self.fd, 65536) if ready else b''
            if not data:
                raise AssertionError(f"no {text!r} on screen; it shows: {self.screen[-1500:]!r}")
            self.screen += data.decode('utf-8', errors='replace').replace('\r\n', '\n')
        self.pos = self.screen.index(text, self.pos) + len(text)

    def more(self, n, timeout=60):
        """Wait for n more characters beyond what was matched."""
        deadline = time.time() + timeout
        while len(self.screen) - self.pos < n and time.time() < deadline:
            if select.select([self.fd], [], [], 0.5)[0]:
                self.screen += os.read(self.fd, 65536).decode('utf-8', errors='replace').replace('\r\n', '\n')
        assert len(self.screen) - self.pos >= n, self.screen[-500:]

    def send(self, keys):
        os.write(self.fd, keys.encode())

    def wait(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    os.read(self.fd, 65536)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise AssertionError("the prompt did not exit")


def test_the_prompt_decodes_through_decode_step(loaded, monkeypatch, capsys):
    # sample.py's model comes from load_model, frozen: it decodes through model.decode_step, not forward()
    model, tok, _ = loaded
    steps, real = [], engine.decode_step
    monkeypatch.setattr(engine, 'decode_step', lambda *a: steps.append(1) or real(*a))
    session = sample_stage.Prompt(model, tok, greedy(6, ignore_eos=True), chat=True)
    session.reset()
    session.reply('hello there')
    assert len(steps) == 5  # the first token comes from the prefill
    ids, _ = render_chat(tok, [{'role': 'user', 'content': 'hello there'}], add_generation_prompt=True)
    want = complete(model, tok, [ids], greedy(6, ignore_eos=True), chat=True)[0][0]
    assert capsys.readouterr().out == want + '\n'


def test_interactive_chat_slash_command_ctrl_c_and_quit(loaded, sft_checkpoint):
    model, tok, _ = loaded
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(sft_checkpoint)))  # holds out/sft/ckpt_*.pt
    term = Terminal([os.path.join(REPO, 'sample.py'), '--max_new_tokens=8', '--temperature=0',
                     '--ignore_eos'], run_dir)
    try:
        term.expect('out/sft/ckpt_0000001.pt (the newest model under out/ and runs/): sft model')  # no --ckpt
        term.expect('chat mode')
        term.expect('you> ')
        term.send('hello there\n')
        ids, _ = render_chat(tok, [{'role': 'user', 'content': 'hello there'}], add_generation_prompt=True)
        reply, _, _ = complete(model, tok, [ids], greedy(8, ignore_eos=True), chat=True)[0]
        term.expect('hello there\n' + reply + '\n')
        term.expect('[8 tokens')
        term.expect('you> ')
        term.send('/temp 0.9\n')
        term.expect('temperature = 0.9')
        term.send('/max 1000000\n')
        term.expect('max_new_tokens = 1000000')
        term.send('tell me a long story\n')
        term.expect('tell me a long story\n')
        term.more(40)  # the reply is streaming
        term.send('\x03')  # Ctrl-C
        term.expect('[stopped]')
        term.expect('you> ')  # still at the prompt
        term.send('/settings\n')
        term.expect('temperature 0.9')
        term.send('/quit\n')
        assert term.wait() == 0
    finally:
        try:
            os.kill(term.pid, 9)
        except ProcessLookupError:
            pass
        os.close(term.fd)


