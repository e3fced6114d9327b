"""
The sampling stage: a model's replies, at the interactive prompt or for one prompt, what users touch last and
most.

    python sample.py                                      # the newest model this checkout made, interactive
    python sample.py --ckpt=out/sft --prompt="Hello"      # print one completion and exit
    python sample.py --serve --ckpt=out/sft --port=8000   # the same as
                                                          # python serve.py --ckpt=out/sft --port=8000

With no --ckpt it runs the newest model under out/ and runs/ (checkpoint.newest_checkpoint: a run's DPO model
before its SFT and pretrained ones), with the sample.py flags its run recorded beside it as defaults (a small
model's repetition penalties; recommended_args); its first line says which model and settings it chose.
Loading is checkpoint.load_model (a checkpoint, or a base + LoRA adapter pair); generation is engine.py's
(sampling filters, the KV-cached batch and decoding step, stop strings); this file is the interactive prompt
and main().
`--serve` hands the whole command line to serve.py, the OpenAI-compatible HTTP server.

Deliberately left out: beam search, speculative decoding, logprobs (the engine has none).
"""
import os
import sys
import time
from dataclasses import replace

import lumi
from checkpoint import load_model, newest_checkpoint, recommended_args
from engine import Sampling, fit_conversation, make_generator, model_device, stream_text
from tokenizer import BOS_ID

# -----------------------------------------------------------------------------
# keys: set in a config file or as --key=value. Which model runs (ckpt, adapter, device, dtype, ...) is
# checkpoint.py's, how it samples (temperature, top_p, max_new_tokens, seed, ...) engine.py's.
KEY_FILES = ('checkpoint.py', 'engine.py')
mode = 'auto'              # auto: chat for sft/dpo checkpoints and adapters, completion otherwise
system = ''                # chat: the system message
prompt = ''                # print one completion of this prompt and exit
serve = False              # run serve.py instead, with the rest of the command line: the HTTP API
                           # and chat page
KEYS = lumi.declared_keys(__file__)

CHAT_KINDS = ('sft', 'dpo')

# -----------------------------------------------------------------------------
# the interactive prompt

HELP = """/temp X        temperature (0 is greedy)      /top_p X   nucleus threshold (1 is off)
/top_k N       keep the N likeliest tokens    /max N     new tokens per reply
/rep X         repetition penalty (1 is off)  /seed N    restart sampling from seed N
/freq X        frequency penalty (0 is off)   /pres X    presence penalty (0 is off)
/system TEXT   set the system message and start a new chat
/chat, /completion   switch mode              /reset     forget the conversation
/settings      show settings                  /quit      leave (or Ctrl-D); Ctrl-C stops a reply"""

# the slash commands that set a sampling key, held to the key's range (engine.py's keys)
SETTINGS = {'temp': 'temperature', 'top_p': 'top_p', 'top_k': 'top_k', 'max': 'max_new_tokens',
            'rep': 'repetition_penalty', 'freq': 'frequency_penalty', 'pres': 'presence_penalty'}


class Prompt:
    """The state of an interactive session: settings, mode, and the chat so far."""

    def __init__(self, model, tok, params, chat, system='', seed=1337):
        self.model, self.tok, self.params, self.chat = model, tok, params, chat
        self.system, self.messages = system, []
        self.generator = make_generator(seed, model_device(model))

    def reset(self):
        self.messages = [{'role': 'system', 'content': self.system}] if self.system else []

    def command(self, line):
        """Apply a slash command; returns what to print, or None to quit."""
        name, _, arg = line[1:].strip().partition(' ')
        arg = arg.strip()
        if name in ('quit', 'exit', 'q'):
            return None
        if name in SETTINGS:
            field = SETTINGS[name]
            kind = type(KEYS[field].default)
            try:
                value = kind(arg)
            except ValueError:
                value = None
            if value is None or not lumi.in_range(value, KEYS[field].range):
                return f"/{name} needs a valid {kind.__name__}, got {arg!r}"
            self.params = replace(self.params, **{field: value})
            return f"{field} = {value}"
        if name == 'seed':
            if not arg.isdigit():
                return f"/seed needs a non-negative integer, got {arg!r}"
            self.generator = make_generator(int(arg), model_device(self.model))
            return f"seed = {arg}"
        if name in ('chat', 'completion'):
            self.chat = name == 'chat'
            self.reset()
            return f"{name} mode"
        if name == 'system':
            self.system = arg
            self.reset()
            return f"system message {'set' if arg else 'cleared'}; new chat"
        if name == 'reset':
            self.reset()
            return "new chat" if self.chat else "ok"
        if name == 'settings':
            return f"mode {'chat' if self.chat else 'completion'}, {describe_sampling(self.params)}"
        return HELP if name == 'help' else f"unknown command /{name}\n{HELP}"

    def reply(self, text, out=None):
        """Stream the model's answer to text (a chat turn, or a text to continue) to out (stdout); Ctrl-C
        stops it."""
        out = out or sys.stdout
        if self.chat:
            self.messages.append({'role': 'user', 'content': text})
            ids, _ = fit_conversation(self.tok, self.messages, self.model.cfg.block_size,
                                      self.params.max_new_tokens)
        else:
            ids = [BOS_ID] + self.tok.encode(text)
        answer, n, t0 = '', 0, time.time()
        try:
            for _, delta, _, n in stream_text(self.model, self.tok, [ids], self.params, self.chat,
                                              self.generator):
                out.write(delta)
                out.flush()
                answer += delta
        except KeyboardInterrupt:
            out.write(' [stopped]')
        out.write('\n')
        out.flush()
        if self.chat:  # a stopped reply stays in the history as far as it got
            self.messages.append({'role': 'assistant', 'content': answer})
        print(f"[{n} tokens, {n / max(time.time() - t0, 1e-9):.1f} tokens/s]", file=sys.stderr, flush=True)
        return answer

    def loop(self):
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.reset()
        print(f"{'chat' if self.chat else 'completion'} mode; /help for commands, /quit to leave", flush=True)
        while True:
            try:
                line = input('you> ' if self.chat else '> ')
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print('\n(Ctrl-D or /quit to leave)')
                continue
            if line.startswith('/'):
                said = self.command(line)
                if said is None:
                    return
                print(said, flush=True)
            elif line.strip():
                self.reply(line)


# -----------------------------------------------------------------------------

def with_recommended(cfg, source, argv):
    """(cfg, keys, file): cfg again with the sample.py flags recorded beside the model at source
    (checkpoint.recommended_args) as its defaults, so that a config file and the command line still win; the
    keys whose values came from them, and the file. A recorded flag that chooses the model is refused."""
    flags, where = recommended_args(source)
    if not flags:
        return cfg, [], None
    try:
        names = [a[2:].partition('=')[0].replace('-', '_') for a in lumi.split_args(flags, KEYS)[1]]
        if set(names) & {'ckpt', 'adapter', 'out_root', 'runs_root', 'serve'}:
            raise lumi.LumiError("it may not choose the model")
        values = lumi.load_config(KEYS, flags, shares_with=())
    except lumi.LumiError as e:
        raise lumi.LumiError(f"{where}: {e}") from e
    given = lumi.load_config(KEYS, argv, shares_with=())
    keys = {k: key._replace(default=values[k]) if k in names else key for k, key in KEYS.items()}
    cfg = lumi.load_config(keys, argv, shares_with=())
    return cfg, [k for k in dict.fromkeys(names) if cfg[k] == values[k] != given[k]], where


def describe_sampling(p):
    """A Sampling's settings in one line."""
    return (f"temperature {p.temperature}, top_k {p.top_k}, top_p {p.top_p}, "
            f"max_new_tokens {p.max_new_tokens}, repetition_penalty {p.repetition_penalty}, "
            f"frequency_penalty {p.frequency_penalty}, presence_penalty {p.presence_penalty}, "
            f"stop {list(p.stop)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--serve' in argv or '--serve=True' in argv:  # serving is serve.py's: run it in this process's place
        rest = [a for a in argv if a not in ('--serve', '--serve=True')]
        lumi.run_script(os.path.join(lumi.ROOT, 'serve.py'), rest)
    cfg = lumi.load_config(KEYS, argv, shares_with=())
    source = cfg.ckpt or cfg.adapter or newest_checkpoint(cfg.out_root, cfg.runs_root)
    cfg, recommended, where = with_recommended(cfg, source, argv)
    if cfg.mode not in ('auto', 'chat', 'completion'):
        raise ValueError(f"mode must be auto, chat or completion, got {cfg.mode!r}")
    dev = lumi.pick_device(cfg.device)
    dt = lumi.resolve_dtype(cfg.dtype, dev)
    lumi.seed_everything(cfg.seed)
    model, tok, info = load_model(source, dev, dt, adapter=cfg.adapter if cfg.ckpt else '',
                                  tokenizer=cfg.tokenizer)
    chat = (info['kind'] in CHAT_KINDS or bool(info['adapter'])) if cfg.mode == 'auto' else cfg.mode == 'chat'
    params = Sampling.from_config(cfg)
    what = info['path'] + (f" + adapter {info['adapter']}" if info['adapter'] else '')
    why = '' if cfg.ckpt or cfg.adapter else f" (the newest model under {cfg.out_root}/ and {cfg.runs_root}/)"
    print(f"{what}{why}: {info['kind']} model, {model.num_params() / 1e6:.1f}M parameters, {dev} {dt}; "
          f"{describe_sampling(params)}" + (f" ({', '.join(recommended)} as {where} recommends; flags win)"
                                   if recommended else ''), file=sys.stderr, flush=True)
    session = Prompt(model, tok, params, chat, cfg.system, cfg.seed)
    if cfg.prompt:
        session.reset()
        session.reply(cfg.prompt)
    else:
        session.loop()
    return 0


if __name__ == '__main__':
    lumi.cli(main, KEYS)
