"""
What every Lumi stage shares: configuration (keys declared as commented module constants, config files and
--key=value overrides, ranges, --help, one-line user errors), files (atomic writes, hashes, JSON lines),
logging, and the runtime (device, the one dtype rule and its loss scaling, the optimizer kernel, compile,
distributed setup). `python lumi.py run|export|plot|info` runs the stage file that does it.

Deliberately left out: the tokenizer and chat template (tokenizer.py), checkpoints (checkpoint.py), the
training loop (training.py), generation (engine.py), the model (model.py), data formats (corpus/). This file
imports no other project file: the rest build on it.
"""
import ast
import difflib
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tokenize
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# the runtime keys of every stage that runs a model (its KEY_FILES name lumi.py)

device = 'auto'             # auto: cuda when present, else mps (an Apple GPU), else cpu; or cpu | cuda |
                            # cuda:N | mps
dtype = 'auto'              # auto: bfloat16 where the device computes it natively (CUDA compute capability
                            # 8.0+, CPUs with AVX512-BF16 or AMX), float16 with loss scaling on older CUDA
                            # GPUs, else float32; or bfloat16 | float16 | float32

# -----------------------------------------------------------------------------
# configuration, as in nanoGPT: a stage's keys are its lowercase module constants, each with a comment saying
# what it is (a comment that opens with an interval, `[1, inf) ...`, is also its range); a config file is a
# plain Python file of the same assignments; --key=value overrides both.

CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


class LumiError(ValueError):
    """A user's error (a bad flag, file or checkpoint), said in one line that names what to fix. lumi.cli
    prints it without a traceback; a ValueError, so callers that catch bad values catch it too."""


class Config(dict):
    """A dict whose keys also read as attributes: cfg.batch_size."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    __setattr__ = dict.__setitem__


class Key(NamedTuple):
    """A declared key: its default, the comment beside it (what --help says), and its allowed values in
    interval notation ('[1, inf)'), or '' for any."""
    default: object
    doc: str = ''
    range: str = ''


def is_key(name, value):
    """Whether a module constant is a key: lowercase, public, of a plain type."""
    return not name.startswith('_') and name.islower() and type(value) in CONFIG_TYPES


def constants(path):
    """The top-level assignments of a Python file whose values follow from literals and the assignments
    before them (`x = 1 << 20`, `url = _BASE + 'a.jsonl'`), evaluated without importing the file."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    namespace = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                expr = compile(ast.Expression(node.value), path, 'eval')
                namespace[node.targets[0].id] = eval(expr, {'__builtins__': {}}, dict(namespace))
            except Exception:  # noqa: BLE001 - a value computed at import time is no key
                pass
    return namespace


def key_comments(path):
    """{name: the comment that explains it} for a file's top-level assignments: the comment on the line of
    `name = value`, with the comment-only lines indented under it, else the comment block just above it (which
    never takes the lines that continue the comment of the assignment before)."""
    with open(path, 'rb') as f:
        source = f.read()
    comments, code_lines = {}, set()
    for t in tokenize.tokenize(iter(source.splitlines(keepends=True)).__next__):
        if t.type == tokenize.COMMENT:
            comments[t.start[0]] = (t.string.lstrip('#').strip(), t.start[1])
        elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENCODING, tokenize.ENDMARKER):
            code_lines.update(range(t.start[0], t.end[0] + 1))

    def inline(line):
        return comments[line][0] if line in comments and line in code_lines else ''
    found, continued = {}, set()
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        first, last = node.lineno, node.end_lineno
        text = next((inline(n) for n in range(first, last + 1) if inline(n)), '')
        if text:  # comment-only lines indented under it continue it
            n, col = last + 1, comments.get(last, comments.get(first, ('', 0)))[1]
            while n in comments and n not in code_lines and comments[n][1] >= col > 0:
                text, n = f"{text} {comments[n][0]}", n + 1
                continued.add(n - 1)
        else:
            n, block = first - 1, []
            while (n in comments and n not in code_lines and n not in continued
                   and not comments[n][0].startswith('---')):
                block.insert(0, comments[n][0])
                n -= 1
            text = ' '.join(block)
        found[node.targets[0].id] = text
    return found


_INTERVAL = re.compile(r'([\[(])\s*(-?(?:inf|[\d.]+(?:e[-+]?\d+)?))\s*,\s*'
                       r'(-?(?:inf|[\d.]+(?:e[-+]?\d+)?))\s*([\])])')


def declared_keys(path):
    """The keys a Python file declares, by name: its keys (is_key) with their comments and ranges, read from
    its source, so that any stage or the pipeline knows another stage's keys without importing it. A file that
    names KEY_FILES (library files, relative to the repository root: the training loop's keys are
    training.py's) takes their keys first; its own declaration of one of them sets the default, and the
    comment and range too where it gives them."""
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    values, notes = constants(path), key_comments(path)
    keys = {}
    for included in values.get('KEY_FILES', ()):
        keys.update(declared_keys(included))
    for name, value in values.items():
        if not is_key(name, value):
            continue
        doc = notes.get(name, '')
        m = _INTERVAL.match(doc)
        base = keys.get(name, Key(value))
        keys[name] = Key(value, doc or base.doc, m.group(0) if m else base.range)
    return keys


def in_range(value, interval):
    """Whether value lies in an interval written '[0, 1)', '(0, inf)', ..."""
    lo, hi = (float(x) for x in interval[1:-1].split(','))
    return ((lo <= value) if interval[0] == '[' else (lo < value)) and \
           ((value <= hi) if interval[-1] == ']' else (value < hi))


AUTO_OR_BOOL = {'compile'}  # keys whose default is 'auto' that also take True / False


def _as_keys(keys):
    return {k: v if isinstance(v, Key) else Key(v) for k, v in keys.items()}


def _coerce(key, value, default, known, where):
    if default is None or value is None or key in AUTO_OR_BOOL and isinstance(value, bool):
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if type(value) is type(default):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise LumiError(f"{where}: '{key}' must be {type(default).__name__} (default {default!r}), "
                    f"got {type(value).__name__} {value!r}. Known keys: {', '.join(sorted(known))}")


def _check_range(key, value, interval, where):
    if (interval and isinstance(value, (int, float)) and not isinstance(value, bool)
            and not in_range(value, interval)):
        raise LumiError(f"{where}: '{key}' must be in {interval}, got {value!r}")
    return value


def _unknown_key(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known keys: {', '.join(sorted(known))}"
    return LumiError(f"unknown config key '{key}' ({hint}; --help lists every key)")


def split_args(argv, keys):
    """(positional arguments, overrides as --key=value) from a command line that may also say `--key value`.

    A bool key's bare --flag means True and takes no value (`--compile configs/tiny.py` keeps the file
    positional), unless the next word is True or False; any other key takes the next word whatever it looks
    like, so `--temperature -1` is a negative number, not a flag."""
    defaults = {k: v.default for k, v in _as_keys(keys).items()}
    pos, flags, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('--'):
            pos.append(arg)
            continue
        key, eq, _ = arg[2:].partition('=')
        key = key.replace('-', '_')
        flag = key in defaults and (isinstance(defaults[key], bool) or key in AUTO_OR_BOOL)
        if not eq and key in defaults and i < len(argv) and not argv[i].startswith('--'):
            if not flag or argv[i] in ('True', 'False', 'auto'):
                arg, i = f'--{key}={argv[i]}', i + 1
        elif not eq and key in defaults and not flag:
            raise LumiError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
        flags.append(arg)
    return pos, flags


def load_config(keys, argv=None, shares_with=()):
    """Apply an optional config file (the first argument not starting with --), then --key=value overrides,
    to a stage's keys (declared_keys; a plain {name: default} dict works too).

    A key this stage does not know is an error, in a config file as on the command line, except in a file
    that this stage shares with others: configs/tiny.py drives data.py and train.py, so train.py passes
    shares_with=('data.py',) and data.py's keys are ignored there. Values are type-checked against the
    default and range-checked against the key's range.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = _as_keys(keys)
    defaults = {k: v.default for k, v in keys.items()}
    files, flags = split_args(argv, keys)
    overrides = []
    for arg in flags:  # every key is checked before the config file runs: a typo is the first thing said
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in defaults:
            raise _unknown_key(key, defaults)
        overrides.append((key, eq, text))

    def checked(key, value, where):
        return _check_range(key, _coerce(key, value, defaults[key], defaults, where), keys[key].range, where)
    cfg = Config(defaults)
    if len(files) > 1:
        raise LumiError(f"expected at most one config file, got {files}")
    if files:
        path = files[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        namespace = {}
        with open(path, encoding='utf-8') as f:
            source = f.read()
        exec(compile(source, path, 'exec'), namespace)
        shared = {k for script in shares_with or () for k in declared_keys(script)}
        lines = {n.targets[0].id: n.lineno for n in ast.parse(source).body if isinstance(n, ast.Assign)
                 and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
        for key, value in namespace.items():
            if not is_key(key, value):
                continue
            where = f"{path}:{lines.get(key, '?')}"
            if key in cfg:
                cfg[key] = checked(key, value, where)
            elif key not in shared:
                raise LumiError(f"{where}: {_unknown_key(key, defaults)}"
                                + (f" (nor a key of {', '.join(shares_with)})" if shares_with else ''))
        cfg['config_file'] = path
    for key, eq, text in overrides:
        if not eq:  # a bare --flag means True
            value = True
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --device=cpu
            if isinstance(defaults[key], str) and not isinstance(value, str) and \
                    not (key in AUTO_OR_BOOL and isinstance(value, bool)):
                value = text  # --out_dir=123 stays a string
        cfg[key] = checked(key, value, f"--{key}")
    return cfg


# -----------------------------------------------------------------------------
# the command line of every stage: --help from the comments beside the keys, and user errors in one line

def config_help(keys, usage):
    """The --help text: usage, then every key with its default and the comment beside it."""
    rows = [(f"--{k}={short_repr(v.default, 40)}", v.doc) for k, v in sorted(_as_keys(keys).items())]
    width = min(44, max(len(r[0]) for r in rows) + 2) if rows else 0
    lines = [usage, "  (--key value works too; --debug or LUMI_DEBUG=1 shows the traceback of an error)", "",
             "keys:"]
    lines += [f"  {flag:<{width}}{note}" if len(flag) < width else f"  {flag}\n  {'':<{width}}{note}"
              for flag, note in rows]
    return '\n'.join(lines)


# The user's errors: a bad flag, value, file or checkpoint (LumiError, parsing's ValueErrors), a missing or
# unreadable file, a port in use (OSError). Anything else is a bug in Lumi and keeps its traceback.
USER_ERRORS = (LumiError, ValueError, OSError)


def guard(main, argv, interrupted='interrupted'):
    """main(argv), a user error said in one line on stderr (`error: ...`, exit 1), Ctrl-C in one (exit
    130). --debug in argv (or LUMI_DEBUG=1, which a pipeline's stages inherit) shows the traceback instead."""
    if '--debug' in argv:
        os.environ['LUMI_DEBUG'] = '1'
        argv = [a for a in argv if a != '--debug']
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        sys.exit(130)
    except USER_ERRORS as e:
        if os.environ.get('LUMI_DEBUG') == '1':
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


def cli(main, keys=None, usage='', interrupted='interrupted'):
    """Run a stage's main(argv) as its command, in its `if __name__ == '__main__'` block: --help (or -h)
    prints the usage and every key with its default and the comment beside it; errors go through guard; the
    exit status is main's return value when it is an int, else 0."""
    argv, source = sys.argv[1:], sys.modules[main.__module__].__file__
    if keys is not None and ('--help' in argv or '-h' in argv):
        print(config_help(keys, usage or f"usage: python {os.path.basename(source)} [CONFIG.py] "
                                         f"[--key=value ...]"))
        sys.exit(0)
    code = guard(main, argv, interrupted)
    sys.exit(code if isinstance(code, int) else 0)


def short_repr(value, width=100):
    """A value as text of at most width characters (repr unless a string), cut with an ellipsis."""
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 1] + '…'


def one_line(e):
    """An exception as one line: its message with newlines folded (a FileNotFoundError's file included)."""
    return ' '.join(str(e).split()) or type(e).__name__


# -----------------------------------------------------------------------------
# files: atomic writes, hashes, JSON lines

def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write_fn, mode='wb'):
    """Write a file so that a crash leaves either the old file or the new one, never half of one. A failed
    write (a full disk, a quota) is an OSError whose one line names the file; the old file stays as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        # text is UTF-8 on every platform (Python 3.11 on Windows would write the locale's code page, cp1252)
        with open(tmp, mode, encoding=None if 'b' in mode else 'utf-8') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = 'the previous file is unchanged' if os.path.exists(path) else 'nothing was written'
        raise OSError(f"cannot write {path}: {e.strerror or e} ({kept})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str), mode='w')


def read_json(path):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def append_jsonl(path, record):
    """Append one record as a line; a failed write (a full disk) is an OSError whose one line names the file,
    whose earlier lines stay (a last line cut short is what read_jsonl skips)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e


def read_jsonl(path):
    """The records of a JSON-lines file. A last line cut short (what a kill during append_jsonl leaves) is
    skipped and said; a malformed line before it is refused in one line naming it."""
    with open(path, encoding='utf-8') as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise LumiError(f"{path}:{n}: not a JSON record ({e.msg})") from None
            log(f"{path}:{n}: skipped the last line, cut short ({e.msg})")
    return records


def log(msg, rank=None):
    """Print from rank 0 only, flushed, so logs of a torchrun job read like a single process."""
    if (rank if rank is not None else int(os.environ.get('RANK', 0))) == 0:
        print(msg, flush=True)


# -----------------------------------------------------------------------------
# device, precision, seeding, distributed: which device, dtype, loss scaling, optimizer kernel, compile and
# process group a run gets is decided here for every stage (the RNG state a checkpoint saves is
# training.py's). The MPS rules follow PyTorch 2.13's documentation; none of them has run on Apple hardware.

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def pick_device(name='auto'):
    """'auto' is CUDA when present, then an Apple GPU (MPS), then the CPU; a device named outright must be
    here, or it is refused in one line."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == 'auto':
        return 'cuda' if cuda else 'mps' if mps else 'cpu'
    kind, colon, index = name.partition(':')
    if kind == 'cuda' and (not colon or index.isdigit()):
        if not cuda or colon and int(index) >= torch.cuda.device_count():
            raise LumiError(f"--device={name}: no such CUDA GPU here ({torch.cuda.device_count()} visible to "
                            f"torch {torch.__version__}); use --device=cpu or auto")
    elif name == 'mps' and not mps:
        raise LumiError("--device=mps: no Apple GPU here (MPS needs an Apple-silicon Mac and a torch built "
                        "for it); use --device=cpu or auto")
    elif name not in ('cpu', 'mps'):
        raise LumiError(f"--device={name}: not a device; use auto, cpu, cuda, cuda:N or mps")
    return name


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, dtype_name):
    """Autocast to bf16 or fp16 where asked (fp16 training also needs loss_scaler); 'float32' runs plain."""
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    if dtype_name == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=DTYPES[dtype_name])


def loss_scaler(device, dtype_name):
    """The GradScaler training steps through: on for float16 only (its small gradients flush to zero
    unscaled; bf16 has fp32's range), else a pass-through. torch 2.13 documents it for cuda and cpu only."""
    kind = device.split(':')[0]
    if dtype_name == 'float16' and kind not in ('cuda', 'cpu'):
        raise LumiError(f"--dtype=float16 cannot train on {kind}: torch documents its loss scaling "
                        f"(GradScaler) for cuda and cpu only; use --dtype=float32 (or bfloat16 on macOS 14+)")
    return torch.amp.GradScaler(kind if kind in ('cuda', 'cpu') else 'cpu', enabled=dtype_name == 'float16')


def fused_adamw(device):
    """Whether AdamW takes torch's fused kernel: torch 2.13 has it for CUDA, CPU and MPS. On a 2-core CPU it
    steps the tiny model's 14.7M parameters ~8x faster than the per-tensor loop (0.017 s against 0.14 s)."""
    return device.split(':')[0] in ('cuda', 'cpu', 'mps')


def setup_distributed(device_name='auto'):
    """Initialise torch.distributed when launched by torchrun; returns (device, rank, local_rank, world).
    NCCL where torch has it (Linux with CUDA), else gloo (CPU; Windows has no NCCL); torch 2.13 has no
    backend for MPS, so torchrun on an Apple GPU is refused."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_name)
    if world > 1:
        if device == 'mps':
            raise LumiError("torchrun with --device=mps: torch.distributed has no backend for Apple GPUs")
        if not dist.is_initialized():
            nccl = device.startswith('cuda') and dist.is_nccl_available()
            dist.init_process_group(backend='nccl' if nccl else 'gloo')
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
    return device, rank, local_rank, world


def native_bf16():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX), and may torch use it? Else torch emulates
    bf16, slower than fp32, as under ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU imitated on a newer one)."""
    hardware = any(getattr(torch.cpu, f, lambda: False)()
                   for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))
    return hardware and torch.backends.cpu.get_cpu_capability().startswith('AVX512')


def resolve_dtype(name, device):
    """The one meaning of dtype='auto' in every stage; a dtype named outright that device cannot compute is
    refused in one line. CUDA: bf16 where the GPU has bf16 units (compute capability 8.0+; a T4, V100 or
    RTX 20-series emulates it), else fp16, loss-scaled in training. CPU: bf16 where native_bf16 (there bf16
    autocast trained the tiny model 1.85x faster than fp32 and bf16 weights decode 1.24x faster:
    docs/BENCHMARKS.md, "Training" and "Sampling"), else fp32. MPS: fp32, as torch 2.13 documents neither
    autocast nor GradScaler for it; bfloat16 is there from macOS 14, float16 for inference (loss_scaler)."""
    kind = device.split(':')[0]
    if name == 'auto':
        if kind == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
        return 'bfloat16' if kind == 'cpu' and native_bf16() else 'float32'
    if name not in DTYPES:
        raise LumiError(f"--dtype={name}: not a dtype; use auto, bfloat16, float16 or float32")
    if name == 'bfloat16' and kind == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=True):
        raise LumiError("--dtype=bfloat16: this GPU cannot compute bf16, not even emulated; use float16")
    if name == 'bfloat16' and kind == 'mps' and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise LumiError("--dtype=bfloat16: Apple GPUs compute bf16 from macOS 14 on; use --dtype=float32")
    return name


def resolve_compile(value, device, one_shape=False, minutes=0.0):
    """compile='auto': on CUDA where triton imports (no Windows or macOS wheels); on a Linux CPU with native
    bf16, a C++ compiler and Python's headers (inductor's), for batches of one shape (pretraining's; SFT's
    would compile anew at each length) and max_minutes >= 3, as compiling takes ~40 s (an unknown length, as
    in tests, stays eager). The CPU profile made 24 % more steps in 8 minutes, compiling included (BENCHMARKS,
    "Compiled on an AMX CPU", pairs 8-9); without native bf16 it cost minutes and gained nothing."""
    if value != 'auto':
        return bool(value)
    if device.startswith('cuda'):
        return importlib.util.find_spec('triton') is not None
    return (device == 'cpu' and one_shape and minutes >= 3 and native_bf16()
            and sys.platform == 'linux' and shutil.which(os.environ.get('CXX') or 'g++') is not None
            and os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))


# =============================================================================
# the lab's command line: `python lumi.py run | export | plot | info` runs the stage file that does it, in
# this process's place (run_script), so the core imports none of them

USAGE = """usage: python lumi.py COMMAND ...
  run [CONFIG] [--key=value ...]     every stage in order: data, pretrain, eval, SFT, eval, DPO, eval, \
a sample
  export CKPT OUT [--format=F]       hf (transformers) | pt | gguf (llama.cpp, Ollama) | peft (an adapter)
  plot RUN [RUN ...] [--out=FILE]    train/val loss and LR against tokens as an SVG
  info CKPT                          config, parameters, tokenizer, tokens seen, last metrics
every command takes --help; --debug shows the traceback of an error"""

COMMANDS = {'run': 'pipeline.py', 'export': 'export.py', 'plot': 'curves.py', 'info': 'checkpoint.py'}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ('--help', '-h'):
        print(USAGE)
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    run_script(os.path.join(ROOT, COMMANDS[argv[0]]), argv[1:])


def run_script(path, args):
    """Run the Python file at path with args in this process's place, which ends with its exit status:
    os.execv on POSIX; on Windows, where exec starts another process and hands the console back to the
    shell at once (the exit status lost, the output arriving after the prompt), as a child it waits for."""
    sys.stdout.flush()
    if os.name == 'nt':
        sys.exit(subprocess.call([sys.executable, path, *args]))
    os.execv(sys.executable, [sys.executable, path, *args])


if __name__ == '__main__':
    main()
