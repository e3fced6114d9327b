"""
What every Lumi stage shares: configuration (files and --key=value overrides, ranges, --help from the comments
beside the defaults, one-line user errors), files (atomic writes, hashes, JSON lines), logging, the tokenizer
and chat template, and the runtime (device, the one dtype rule, compile, distributed setup, RNG state).
`python lumi.py run|export|plot|info` runs the stage file that does it.

Deliberately left out: checkpoints (checkpoint.py), the training loop (training.py), generation (engine.py),
the model (model.py), data formats (data.py). This file imports no other project file but spm_proto.py (the
tokenizer's bytes) and stagefile.py (a stage's keys, read from its source): the rest build on it.
"""
import ast
import difflib
import hashlib
import json
import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import sentencepiece
import torch
import torch.distributed as dist

from spm_proto import markers_as_control, tokenizer_identity
from stagefile import constants, key_comments

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# configuration: plain Python files plus --key=value overrides, as in nanoGPT

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

    def __setattr__(self, key, value):
        self[key] = value


def config_defaults(namespace):
    """The configurable values of a stage: its lowercase module-level constants of plain types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and type(v) in CONFIG_TYPES}


# The allowed values of every numeric key, by name, in interval notation; a key means the same in every
# stage. A value outside is refused in one line, before it can do harm: lora_r=-4 silently became full
# fine-tuning, eval_interval=0 a ZeroDivisionError an hour into a run. A stage may narrow a range
# (load_config's `ranges`), e.g. train.py's eval_iters, where dpo.py's 0 means "all".
RANGES = {
    'batch_size': '[1, inf)', 'gradient_accumulation_steps': '[1, inf)', 'max_iters': '[0, inf)',
    'max_minutes': '[0, inf)', 'learning_rate': '[0, inf)', 'min_lr': '[0, inf)', 'warmup_iters': '[0, inf)',
    'decay_frac': '[0, 1]', 'weight_decay': '[0, inf)', 'beta1': '[0, 1)', 'beta2': '[0, 1)',
    'grad_clip': '[0, inf)', 'eval_interval': '[1, inf)', 'eval_iters': '[0, inf)', 'ckpt_interval': '[1, inf)',
    'keep_last': '[0, inf)', 'peak_flops': '[0, inf)', 'seed': '[0, inf)', 'num_threads': '[0, inf)',
    'n_layer': '[1, inf)', 'n_head': '[1, inf)', 'n_kv_head': '[1, inf)', 'n_embd': '[1, inf)',
    'ffn_hidden': '[1, inf)', 'block_size': '[0, inf)', 'dropout': '[0, 1)', 'rope_theta': '(0, inf)',
    'tokens_per_param': '(0, inf)',
    'val_frac': '[0, 1)', 'val_fraction': '[0, 1)', 'epochs': '(0, inf)', 'lora_r': '[0, inf)',
    'lora_alpha': '(0, inf)', 'lora_dropout': '[0, 1)', 'format_samples': '[0, inf)',
    'format_max_new_tokens': '[1, inf)', 'format_temperature': '[0, inf)',
    'max_sft_pairs': '[0, inf)', 'max_length': '[0, inf)', 'max_prompt_length': '[0, inf)', 'beta': '(0, inf)',
    'label_smoothing': '[0, 0.5)',
    'max_new_tokens': '[1, inf)', 'temperature': '[0, inf)', 'top_k': '[0, inf)', 'top_p': '(0, 1]',
    'repetition_penalty': '(0, inf)', 'port': '[0, 65535]', 'max_tokens_limit': '[1, inf)',
    'max_batch': '[1, inf)', 'max_body_bytes': '[1, inf)',
    'stride': '[0, inf)', 'limit': '[0, inf)', 'batch_tokens': '[0, inf)', 'smoke_max_new_tokens': '[1, inf)',
    'smoke_temperature': '[0, inf)', 'smoke_top_k': '[0, inf)',
    'max_doc_chars': '[1, inf)', 'min_doc_chars': '[0, inf)', 'min_alpha_ratio': '[0, 1]',
    'max_dup_line_frac': '[0, 1]', 'near_dup_threshold': '[0, 1]', 'num_perm': '[1, inf)',
    'shingle_words': '[1, inf)', 'tokenizer_sample_chars': '[1, inf)',
    'pretrain_minutes': '[0, inf)', 'sft_minutes': '[0, inf)', 'dpo_minutes': '[0, inf)', 'eval_limit': '[0, inf)',
    'sample_tokens': '[1, inf)',
}


def in_range(value, interval):
    """Whether value lies in an interval written '[0, 1)', '(0, inf)', ..."""
    lo, hi = (float(x) for x in interval[1:-1].split(','))
    return ((lo <= value) if interval[0] == '[' else (lo < value)) and \
           ((value <= hi) if interval[-1] == ']' else (value < hi))


AUTO_OR_BOOL = {'compile'}  # keys whose default is 'auto' that also take True / False


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


def _unknown_key(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known keys: {', '.join(sorted(known))}"
    return LumiError(f"unknown config key '{key}' ({hint}; --help lists every key)")


def split_args(argv, defaults):
    """(positional arguments, overrides as --key=value) from a command line that may also say `--key value`.

    A bool key's bare --flag means True and takes no value (`--compile configs/tiny.py` keeps the file
    positional), unless the next word is True or False; any other key takes the next word whatever it looks
    like, so `--temperature -1` is a negative number, not a flag."""
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
            if not flag:
                arg, i = f'--{key}={argv[i]}', i + 1
            elif argv[i] in ('True', 'False', 'auto'):
                arg, i = f'--{key}={argv[i]}', i + 1
        elif not eq and key in defaults and not flag:
            raise LumiError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
        flags.append(arg)
    return pos, flags


def file_defaults(script):
    """The defaults a stage file declares, read from its source without importing it: its DEFAULTS when that is
    written out as a dict, else its lowercase top-level constants over the training loop's defaults when it
    names them (train.py, sft.py, dpo.py)."""
    path = script if os.path.isabs(script) else os.path.join(ROOT, script)
    declared = constants(path)
    if isinstance(declared.get('DEFAULTS'), dict):  # written out as one dict(...) (export.py, plot.py)
        return declared['DEFAULTS']
    with open(path) as f:
        trains = 'TRAINING_DEFAULTS' in f.read()
    base = constants(os.path.join(ROOT, 'training.py'))['TRAINING_DEFAULTS'] if trains else {}
    return {**base, **config_defaults(declared)}


def load_config(defaults, argv=None, ranges=None, shares_with=()):
    """Apply an optional config file (the first argument not starting with --), then --key=value overrides.

    A key this stage does not know is an error, in a config file as on the command line, except in a file
    that this stage shares with others: configs/tiny.py drives data.py and train.py, so train.py passes
    shares_with=('data.py',) and data.py's keys (file_defaults) are ignored there. Values are type-checked
    against the default and range-checked against RANGES (updated by `ranges`, this stage's own).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    ranges = dict(RANGES, **(ranges or {}))
    files, flags = split_args(argv, defaults)
    overrides = []
    for arg in flags:  # every key is checked before the config file runs: a typo is the first thing said
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in defaults:
            raise _unknown_key(key, defaults)
        overrides.append((key, eq, text))
    cfg = Config(defaults)
    if len(files) > 1:
        raise LumiError(f"expected at most one config file, got {files}")
    if files:
        path = files[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        namespace = {}
        with open(path) as f:
            source = f.read()
        exec(compile(source, path, 'exec'), namespace)
        shared = {k for script in shares_with or () for k in file_defaults(script)}
        lines = {n.targets[0].id: n.lineno for n in ast.parse(source).body if isinstance(n, ast.Assign)
                 and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
        for key, value in config_defaults(namespace).items():
            where = f"{path}:{lines.get(key, '?')}"
            if key in cfg:
                cfg[key] = _check_range(key, _coerce(key, value, defaults[key], defaults, where), ranges, where)
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
        cfg[key] = _check_range(key, _coerce(key, value, defaults[key], defaults, f"--{key}"), ranges, f"--{key}")
    return cfg


def _check_range(key, value, ranges, where):
    if key in ranges and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not in_range(value, ranges[key]):
            raise LumiError(f"{where}: '{key}' must be in {ranges[key]}, got {value!r}")
    return value


# -----------------------------------------------------------------------------
# the command line of every stage: --help from the comments beside the defaults, and user errors in one line


def config_help(defaults, usage, *sources):
    """The --help text: usage, then every key with its default and what it is for."""
    notes = key_comments(*sources, os.path.abspath(__file__), os.path.join(ROOT, 'training.py'))
    rows = [(f"--{k}={short_repr(v, 40)}", notes.get(k, '')) for k, v in sorted(defaults.items())]
    width = min(44, max(len(r[0]) for r in rows) + 2) if rows else 0
    lines = [usage, "  (--key value works too; --debug or LUMI_DEBUG=1 shows the traceback of an error)", "", "keys:"]
    lines += [f"  {flag:<{width}}{note}" if len(flag) < width else f"  {flag}\n  {'':<{width}}{note}"
              for flag, note in rows]
    return '\n'.join(lines)


# What counts as the user's error: a bad flag, value, file or checkpoint (LumiError and the ValueErrors of
# parsing), a file that is missing or unreadable, a port in use (OSError). Anything else is a bug in Lumi
# and keeps its traceback.
USER_ERRORS = (LumiError, ValueError, OSError)


def guard(main, argv, interrupted='interrupted'):
    """main(argv), with a user error said in one line on stderr (`error: ...`, exit 1) and Ctrl-C in one
    (exit 130). --debug in argv (or LUMI_DEBUG=1) shows the traceback instead, in the stages a pipeline runs
    too, which inherit the variable."""
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


def cli(main, defaults=None, usage='', interrupted='interrupted'):
    """Run a stage's main(argv) as its command, in its `if __name__ == '__main__'` block: --help (or -h)
    prints the usage and every key with its default and the comment beside it in the source; errors go
    through guard; the exit status is main's return value when it is an int, else 0."""
    argv, source = sys.argv[1:], sys.modules[main.__module__].__file__
    if defaults is not None and ('--help' in argv or '-h' in argv):
        print(config_help(defaults, usage or f"usage: python {os.path.basename(source)} [CONFIG.py] [--key=value ...]",
                          source))
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
    """Write a file so that a crash leaves either the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str), mode='w')


def read_json(path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def read_jsonl(path):
    """The records of a JSON-lines file. A last line cut short (what a kill during append_jsonl leaves) is
    skipped and said; a malformed line before it is refused in one line naming it."""
    with open(path) as f:
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
# tokenizer and chat template
# The ids of the special tokens are fixed when the tokenizer is trained (data.py), so SFT and DPO never
# resize the embeddings: pad 0, unk 1, bos 2, eos 3, then the chat markers in this order.

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
ROLES = ('system', 'user', 'assistant')
TEMPLATE_VARS = {'name': 'Lumi', 'author': 'the Lumi project'}  # what {{name}} and {{author}} become in chat data


# file SHA256 -> identity of every tokenizer loaded here, so that a checkpoint or bins made before the
# identity existed (they store the hash of the file) still match the tokenizer they were made with
_IDENTITY_OF_FILE = {}


class Tokenizer:
    """A frozen SentencePiece model. `sha256` names it everywhere: the hash of what it does
    (tokenizer_identity), equal for two trainings that differ only in, say, their thread count;
    `file_sha256` is the hash of its bytes."""

    def __init__(self, model_proto: bytes):
        self.proto = bytes(model_proto)
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.proto)
        self.file_sha256 = sha256_bytes(self.proto)
        self.sha256 = tokenizer_identity(self.proto)
        self.vocab_size = self.sp.get_piece_size()
        self.role_id = {role: self.sp.piece_to_id(f'<|{role}|>') for role in ROLES}
        self.end_id = self.sp.piece_to_id('<|end|>')
        for name, i in [('pad', PAD_ID), ('unk', UNK_ID), ('bos', BOS_ID), ('eos', EOS_ID)]:
            if getattr(self.sp, f'{name}_id')() != i:
                raise ValueError(f"tokenizer {self.sha256[:12]}: {name} id is {getattr(self.sp, f'{name}_id')()}, "
                                 f"Lumi expects {i}; retrain it with data.py")
        if self.end_id == UNK_ID or UNK_ID in self.role_id.values():
            raise ValueError(f"tokenizer {self.sha256[:12]} lacks the chat tokens {CHAT_TOKENS}")
        self.text_sp = sentencepiece.SentencePieceProcessor(model_proto=markers_as_control(self.proto, CHAT_TOKENS))
        _IDENTITY_OF_FILE[self.file_sha256] = self.sha256

    @classmethod
    def load(cls, path):
        with open(path, 'rb') as f:
            return cls(f.read())

    def encode(self, text):
        """Text as text: '<|end|>' written inside it becomes the pieces of those characters, never the marker
        (markers come only from render_chat), so no message, prompt or document can forge a turn."""
        return self.text_sp.encode(text)

    def encode_batch(self, texts, num_threads=-1):
        return self.text_sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i))


def encode_turn(tok, content):
    """A message's tokens after its role marker (a DPO reply's too): the content as text, then <|end|>."""
    return tok.encode(content) + [tok.end_id]


def render_chat(tok, messages, add_generation_prompt=False):
    """The one chat template: BOS, then <|role|> content <|end|> per message.

    Returns (ids, mask) where mask is 1 exactly on the tokens the model must learn to produce: each
    assistant reply and the <|end|> that closes it. With add_generation_prompt the ids end in
    <|assistant|>, ready for sampling until <|end|>.
    """
    ids, mask = [BOS_ID], [0]
    for i, m in enumerate(messages):
        role, content = m.get('role'), m.get('content')
        if role not in tok.role_id:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        body = encode_turn(tok, content)
        learn = 1 if role == 'assistant' else 0
        ids += [tok.role_id[role]] + body
        mask += [0] + [learn] * len(body)
    if add_generation_prompt:
        ids.append(tok.role_id['assistant'])
        mask.append(0)
    return ids, mask


def same_tokenizer(sha_a, sha_b):
    """Whether two stored tokenizer hashes name one tokenizer: equal identities, or a file hash (what
    checkpoints and bins stored before the identity) of a tokenizer loaded here whose identity is the other."""
    return _IDENTITY_OF_FILE.get(sha_a, sha_a) == _IDENTITY_OF_FILE.get(sha_b, sha_b)


def check_tokenizer(expected_sha, actual_sha, what):
    if not same_tokenizer(expected_sha, actual_sha):
        raise LumiError(f"{what} was built with tokenizer {str(expected_sha)[:12]}…, but this model's "
                        f"tokenizer is {str(actual_sha)[:12]}…; they must match (re-run data.py or pick "
                        f"the matching checkpoint)")


# -----------------------------------------------------------------------------
# device, precision, seeding, distributed (the RNG state a checkpoint saves is training.py's)

def pick_device(name='auto'):
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    return 'cpu'


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, dtype_name):
    """bf16 autocast where asked; 'float32' runs plain. (fp16 would need a grad scaler; Lumi uses bf16.)"""
    if dtype_name in ('bfloat16', 'bf16'):
        return torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16)
    if dtype_name not in ('float32', 'fp32'):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype_name!r}")
    return nullcontext()


def setup_distributed(device_name='auto'):
    """Initialise torch.distributed when launched by torchrun; returns (device, rank, local_rank, world)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_name)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
    return device, rank, local_rank, world


# -----------------------------------------------------------------------------
# the training loop shared by train.py, sft.py and dpo.py: each stage brings a model, a batch source with
# state_dict()/load_state_dict(), a loss function and an evaluation; the loop brings the optimizer, the
# schedule, accumulation, clipping, precision, compile, DDP, progress, metrics and exact resume.


def native_bf16():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX), and may torch use it? Without it torch
    emulates bf16, slower than fp32. ATEN_CPU_CAPABILITY=avx2 (how an AVX2-only CPU is imitated on a newer one)
    keeps torch's kernels off AVX-512, so there bf16 would be emulated too."""
    hardware = any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))
    return hardware and torch.backends.cpu.get_cpu_capability().startswith('AVX512')


def resolve_dtype(name, device):
    """The one meaning of dtype='auto' in every stage: bf16 on CUDA and on CPUs that compute it natively
    (there bf16 autocast trained the tiny model 1.85x faster than fp32 and bf16 weights decode 1.24x faster:
    docs/BENCHMARKS.md, "Training" and "Sampling"), fp32 elsewhere."""
    if name != 'auto':
        return name
    return 'bfloat16' if device.startswith('cuda') or native_bf16() else 'float32'


def resolve_compile(value, device):
    """compile='auto': on CUDA only. On a 2-core CPU compiling cost 57 s (AVX512-BF16) to ~3 minutes (AVX2)
    of a short budget and gave no faster steps in bf16 (docs/BENCHMARKS.md, "Recipe")."""
    return device.startswith('cuda') if value == 'auto' else bool(value)


# =============================================================================
# the lab's command line: `python lumi.py run | export | plot | info` runs the stage file that does it, in
# this process's place (os.execv), so the core imports none of them

USAGE = """usage: python lumi.py COMMAND ...
  run [CONFIG] [--key=value ...]     every stage in order: data, pretrain, eval, SFT, eval, DPO, eval, a sample
  export CKPT OUT [--format=hf|pt]   a Hugging Face Llama directory (safetensors) or a plain state dict
  plot RUN [RUN ...] [--out=FILE]    train/val loss and LR against tokens as an SVG
  info CKPT                          config, parameters, tokenizer, tokens seen, last metrics
every command takes --help; --debug shows the traceback of an error"""

COMMANDS = {'run': 'pipeline.py', 'export': 'export.py', 'plot': 'plot.py', 'info': 'checkpoint.py'}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ('--help', '-h'):
        print(USAGE)
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    script = os.path.join(ROOT, COMMANDS[argv[0]])
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, script, *argv[1:]])


if __name__ == '__main__':
    main()
