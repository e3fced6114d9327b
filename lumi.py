"""
What every Lumi stage shares: configuration, the tokenizer and chat template, checkpoints, device and
distributed setup, logging, and the training loop that train.py, sft.py and dpo.py all run.

Deliberately left out: anything one stage alone needs (data formats live in data.py, the model in model.py).
The core never imports a stage at module level; the end-to-end command imports them inside the function
that runs them.
"""
import ast
import difflib
import hashlib
import json
import math
import os
import random
import sys
import time
import tokenize
from contextlib import nullcontext

import numpy as np
import torch

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


def load_config(defaults, argv=None, ranges=None):
    """Apply an optional config file (the first argument not starting with --), then --key=value overrides.

    A config file is one Python file read by several stages (configs/tiny.py drives data, model and
    training), so its keys that this stage does not know are ignored. An override on the command line is
    meant for this stage: an unknown key there is an error. Both are type-checked against the default and
    range-checked against RANGES (updated by `ranges`, this stage's own).
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
            exec(compile(f.read(), path, 'exec'), namespace)
        for key, value in config_defaults(namespace).items():
            if key in cfg:
                cfg[key] = _check_range(key, _coerce(key, value, defaults[key], defaults, path), ranges, path)
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

def key_comments(*paths):
    """{key: the comment that explains it} for the defaults in these source files: the comment on the line of
    `key = value` (or `key=value,` inside a dict(...) of defaults), with the comment-only lines indented under
    it, else the comment block just above it. The first file that explains a key wins."""
    found = {}
    for path in paths:
        with open(path, 'rb') as f:
            source = f.read()
        comments, code_lines = {}, set()
        for t in tokenize.tokenize(iter(source.splitlines(keepends=True)).__next__):
            if t.type == tokenize.COMMENT:
                comments[t.start[0]] = (t.string.lstrip('#').strip(), t.start[1])
            elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENCODING, tokenize.ENDMARKER):
                code_lines.update(range(t.start[0], t.end[0] + 1))
        targets = []  # (key, first line, last line)
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                targets.append((node.targets[0].id, node.lineno, node.end_lineno))
                if isinstance(node.value, ast.Call) and getattr(node.value.func, 'id', '') == 'dict':
                    targets += [(k.arg, k.value.lineno, k.value.end_lineno) for k in node.value.keywords if k.arg]

        def inline(line):
            return comments[line][0] if line in comments and line in code_lines else ''
        for key, first, last in targets:
            if key in found:
                continue
            text = next((inline(n) for n in range(first, last + 1) if inline(n)), '')
            if text:  # comment-only lines indented under it continue it
                n, col = last + 1, comments.get(last, comments.get(first, ('', 0)))[1]
                while n in comments and n not in code_lines and comments[n][1] >= col > 0:
                    text, n = f"{text} {comments[n][0]}", n + 1
            else:
                n, block = first - 1, []
                while n in comments and n not in code_lines and not comments[n][0].startswith('---'):
                    block.insert(0, comments[n][0])
                    n -= 1
                text = ' '.join(block)
            if text:
                found[key] = text
    return found


def config_help(defaults, usage, *sources):
    """The --help text: usage, then every key with its default and what it is for."""
    notes = key_comments(*sources, os.path.abspath(__file__))
    rows = [(f"--{k}={_short(v, 40)}", notes.get(k, '')) for k, v in sorted(defaults.items())]
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


def cli(main, defaults=None, usage=''):
    """Run a stage's main(argv) as its command, in its `if __name__ == '__main__'` block: --help (or -h)
    prints the usage and every key with its default and the comment beside it in the source; errors go
    through guard; the exit status is main's return value when it is an int, else 0."""
    argv, source = sys.argv[1:], sys.modules[main.__module__].__file__
    if defaults is not None and ('--help' in argv or '-h' in argv):
        print(config_help(defaults, usage or f"usage: python {os.path.basename(source)} [CONFIG.py] [--key=value ...]",
                          source))
        sys.exit(0)
    code = guard(main, argv)
    sys.exit(code if isinstance(code, int) else 0)


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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6

# SentencePiece's ModelProto is read and rewritten at the wire level, since protobuf is not a dependency:
# a message is a run of fields, each a varint tag (number << 3 | wire type), then a varint, 8 or 4 bytes,
# or a varint length and that many bytes. ModelProto: 1 pieces (1 piece, 2 score, 3 type), 2 trainer_spec,
# 3 normalizer_spec, 4 self_test_data, 5 denormalizer_spec.


def _varint(buf, i):
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _varint_bytes(value):
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def proto_fields(buf):
    """The fields of one serialized protobuf message, in order, as (number, value, raw bytes of the field);
    value is an int for a varint, else bytes (a length-delimited payload, or the 4 or 8 fixed bytes)."""
    fields, i = [], 0
    while i < len(buf):
        start = i
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 2, 5):
            n, i = (8, i) if wire == 1 else (4, i) if wire == 5 else _varint(buf, i)
            value, i = bytes(buf[i:i + n]), i + n
        else:
            raise ValueError(f"protobuf field {number}: unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError(f"protobuf field {number} runs past the end of the message")
        fields.append((number, value, bytes(buf[start:i])))
    return fields


def encode_proto_field(number, value):
    """One serialized field: a varint for an int, length-delimited for bytes."""
    if isinstance(value, int):
        return _varint_bytes(number << 3) + _varint_bytes(value)
    return _varint_bytes(number << 3 | 2) + _varint_bytes(len(value)) + value


def _submessage(number, fields, keep):
    return encode_proto_field(number, b''.join(raw for n, _, raw in fields if keep(n)))


# The TrainerSpec fields that encoding or decoding reads: model type, whitespace handling, digit splitting,
# byte fallback, the special ids and pieces, unk's surface. The others say how training ran (its inputs,
# threads, sampling) and show in the pieces and scores or nowhere; num_threads differs between two machines
# that train the same tokenizer.
_ENCODING_TRAINER_FIELDS = frozenset({3, 22, 24, 25, 26, 35, *range(40, 49)})
_RULE_FILE = 6  # NormalizerSpec.normalization_rule_tsv: the rule file's path; its rules are in the charsmap


def tokenizer_identity(model_proto):
    """The SHA256 of what a SentencePiece model does: its pieces, scores and types, its normalizer and
    denormalizer, and the trainer settings that encoding reads, kept as a ModelProto without the rest."""
    out = []
    for number, value, raw in proto_fields(model_proto):
        if number == 2:
            raw = _submessage(2, proto_fields(value), lambda n: n in _ENCODING_TRAINER_FIELDS)
        elif number in (3, 5):
            raw = _submessage(number, proto_fields(value), lambda n: n != _RULE_FILE)
        elif number == 4:  # self-test samples: a check of the model, not part of it
            continue
        out.append(raw)
    return sha256_bytes(b''.join(out))


def _chat_markers_as_control(model_proto):
    """The same model with the chat markers retyped from user-defined (matched anywhere in text) to control
    (never produced from text), so marker text encodes as the ordinary pieces of its characters."""
    markers = {t.encode() for t in CHAT_TOKENS}
    out = []
    for number, value, raw in proto_fields(model_proto):
        if number == 1 and b'<|' in value:  # parse only the few pieces that can be markers
            piece = proto_fields(value)
            if any(n == 1 and v in markers for n, v, _ in piece):
                retyped = b''.join(r for n, _, r in piece if n != 3) + encode_proto_field(3, PIECE_CONTROL)
                raw = encode_proto_field(1, retyped)
        out.append(raw)
    return b''.join(out)


# file SHA256 -> identity of every tokenizer loaded here, so that a checkpoint or bins made before the
# identity existed (they store the hash of the file) still match the tokenizer they were made with
_IDENTITY_OF_FILE = {}


class Tokenizer:
    """A frozen SentencePiece model. `sha256` names it everywhere: the hash of what it does
    (tokenizer_identity), equal for two trainings that differ only in, say, their thread count;
    `file_sha256` is the hash of its bytes."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
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
        self.text_sp = spm.SentencePieceProcessor(model_proto=_chat_markers_as_control(self.proto))
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


def distinct_ngrams(sequences, n):
    """Unique n-grams over all n-grams of some token sequences (none spans two of them): near 0 for a loop."""
    grams = [tuple(ids[i:i + n]) for ids in sequences for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def one_token_loop(ids):
    """A reply that is mostly one token repeated ('.......', 'the the the'): one id is at least half of 4+."""
    return len(ids) >= 4 and max(ids.count(i) for i in set(ids)) * 2 >= len(ids)


# -----------------------------------------------------------------------------
# checkpoints: one torch file, written atomically, loadable with weights_only=True, its tensors checksummed

def _tensors(obj, prefix=''):
    """(dotted name, tensor) for every tensor in a nested checkpoint, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k != 'tensor_sha256':
                yield from _tensors(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def tensor_sha256(t):
    """SHA256 of a tensor's dtype, shape and bytes (about 2 GB/s: a 60 MB checkpoint costs 0.03 s)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(path, state):
    """Write state to path atomically, with the SHA256 of every tensor in it, so that a flipped bit is
    found when the file is loaded instead of training or answering on silently wrong weights."""
    state = dict(state, tensor_sha256={name: tensor_sha256(t) for name, t in _tensors(state)})
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint file, or the newest checkpoint in a directory, and verify its tensors' checksums
    (a file saved before they existed loads unchecked). Any file that cannot be used, for any reason, is
    refused in one line naming it (LumiError): not a checkpoint, cut short, pickled objects beyond plain
    data, a tensor whose bytes changed."""
    if os.path.isdir(path):
        found = find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch says why in several types: UnpicklingError, RuntimeError, EOFError, ...
        said = (str(e).strip().splitlines() or [type(e).__name__])[0].split('. ')[0][:120]
        if 'Weights only load failed' in said:
            reason = "it holds pickled objects other than tensors and plain data, which Lumi never writes"
        else:
            reason = f"not a torch checkpoint, or cut short ({type(e).__name__}: {said})"
        raise LumiError(f"{path}: cannot load this checkpoint: {reason}") from e
    if not isinstance(ckpt, dict):
        raise LumiError(f"{path}: not a Lumi checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    stored = ckpt.pop('tensor_sha256', None)
    if stored is not None:
        names = dict(_tensors(ckpt))
        if set(names) != set(stored):
            odd = sorted(set(names) ^ set(stored))
            raise LumiError(f"{path}: its tensors differ from those its checksums list ({', '.join(odd[:3])}): "
                            f"the file was altered")
        for name, t in names.items():
            if tensor_sha256(t) != stored[name]:
                raise LumiError(f"{path}: tensor '{name}' does not match its checksum: the file is corrupt")
    ckpt['path'] = path
    return ckpt


def find_checkpoint(out_dir):
    """The newest step checkpoint in out_dir (ckpt_<step>.pt), or None."""
    if not os.path.isdir(out_dir):
        return None
    steps = [(int(n[5:-3]), n) for n in os.listdir(out_dir)
             if n.startswith('ckpt_') and n.endswith('.pt') and n[5:-3].isdigit()]
    return os.path.join(out_dir, max(steps)[1]) if steps else None


def tokenizer_from_checkpoint(ckpt):
    """Every checkpoint carries its tokenizer's bytes, so it is usable on its own. Refuses bytes that are not
    a tokenizer, or that do not match the stored tokenizer_sha256 (which may be the hash of the bytes or
    Tokenizer.sha256)."""
    where = ckpt.get('path', 'checkpoint')
    if not isinstance(ckpt.get('tokenizer'), torch.Tensor):
        raise LumiError(f"{where}: not a Lumi checkpoint: it has no 'tokenizer'")
    raw = ckpt['tokenizer'].numpy().tobytes()
    try:
        tok = Tokenizer(raw)
    except Exception as e:  # sentencepiece raises RuntimeError on bytes that are not a model
        raise LumiError(f"{where}: its stored tokenizer is unusable: {' '.join(str(e).split())[:200]}") from e
    stored = ckpt.get('tokenizer_sha256')
    if stored is not None and stored not in (sha256_bytes(raw), tok.sha256):
        raise LumiError(f"{where}: its tokenizer_sha256 {str(stored)[:12]}… is not the hash of the tokenizer it "
                        f"carries ({sha256_bytes(raw)[:12]}…): the file was altered or assembled from two models")
    return tok


def tokenizer_tensor(tok):
    return torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)


def same_tokenizer(sha_a, sha_b):
    """Whether two stored tokenizer hashes name one tokenizer: equal identities, or a file hash (what
    checkpoints and bins stored before the identity) of a tokenizer loaded here whose identity is the other."""
    return _IDENTITY_OF_FILE.get(sha_a, sha_a) == _IDENTITY_OF_FILE.get(sha_b, sha_b)


def check_tokenizer(expected_sha, actual_sha, what):
    if not same_tokenizer(expected_sha, actual_sha):
        raise LumiError(f"{what} was built with tokenizer {str(expected_sha)[:12]}…, but this model's "
                        f"tokenizer is {str(actual_sha)[:12]}…; they must match (re-run data.py or pick "
                        f"the matching checkpoint)")


def checkpoint_meta(model, tok, kind, **extra):
    """What every checkpoint carries besides weights, so that it stands alone: the model's shape, its
    tokenizer (bytes and hash), what stage made it, and its LoRA config if it has adapters."""
    from dataclasses import asdict
    return dict(kind=kind, model_args=asdict(model.cfg), tokenizer=tokenizer_tensor(tok),
                tokenizer_sha256=tok.sha256, lora=dict(getattr(model, 'lora_config', None) or {}), **extra)


def check_fit(where, weights, model_args, lora=None, against='its model_args', keys=None):
    """Refuse, in one line naming `where`, tensors whose names and shapes are not those that model_args (and
    lora) imply; keys picks the names to compare (an adapter holds the LoRA tensors alone). The model is
    built on the meta device, shapes without storage, so a crafted n_embd=10**9 or r=10**6 allocates nothing."""
    from model import GPT, ModelConfig, apply_lora  # model.py imports nothing from lumi.py
    try:
        with torch.device('meta'):
            model = GPT(ModelConfig(**model_args))
            if lora:
                apply_lora(model, **lora)
    except (TypeError, ValueError, AssertionError) as e:
        raise LumiError(f"{where}: {against} do not describe a Lumi model: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if keys is None or keys(k)}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise LumiError(f"{where}: its weights do not fit {against}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [f"{k} is {tuple(weights[k].shape)}, expected {s}" for k, s in expected.items()
             if tuple(weights[k].shape) != s]
    if wrong:
        raise LumiError(f"{where}: its weights do not fit {against}: {'; '.join(wrong[:3])}")


def model_from_checkpoint(ckpt, device='cpu'):
    """Rebuild the model a checkpoint describes (adapters included) and load its weights, once check_fit has
    held the shapes its model_args imply against the stored tensors."""
    from model import GPT, ModelConfig, apply_lora
    where = ckpt.get('path', 'checkpoint')
    if not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('model_args'), dict):
        raise LumiError(f"{where}: not a Lumi model checkpoint: it has no 'model' weights and 'model_args'")
    check_fit(where, ckpt['model'], ckpt['model_args'], ckpt.get('lora'), 'its model_args or lora')
    model = GPT(ModelConfig(**ckpt['model_args']))
    if ckpt.get('lora'):
        apply_lora(model, **ckpt['lora'])
    model.load_state_dict(ckpt['model'])
    return model.to(device)


# -----------------------------------------------------------------------------
# device, precision, seeding, distributed

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
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
    return device, rank, local_rank, world


def rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state()[1].tolist(),
             'numpy_pos': int(np.random.get_state()[2]), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(('MT19937', np.array(state['numpy'], dtype=np.uint32), state['numpy_pos'], 0, 0.0))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -----------------------------------------------------------------------------
# the training loop shared by train.py, sft.py and dpo.py: each stage brings a model, a batch source with
# state_dict()/load_state_dict(), a loss function and an evaluation; the loop brings the optimizer, the
# schedule, accumulation, clipping, precision, compile, DDP, progress, metrics and exact resume.

TRAINING_DEFAULTS = dict(
    out_dir='out/run',        # where checkpoints, metrics.jsonl and loss.svg go
    device='auto',            # auto: cuda when present, else cpu
    dtype='auto',             # auto: bfloat16 on CUDA and on CPUs with native bf16, else float32; or 'bfloat16' / 'float32'
    compile='auto',           # auto: torch.compile on CUDA only (on a CPU it costs minutes and gains nothing); True / False
    seed=1337,                # seeds init, batches and dropout; a resumed run restores its RNGs
    batch_size=8,             # sequences per micro-step on each process
    gradient_accumulation_steps=1,  # micro-steps per optimizer step
    max_iters=0,              # optimizer steps; 0 lets the stage derive it (e.g. from a token budget)
    max_minutes=0.0,          # > 0: a wall-clock cap; the schedule is fitted to the steps that fit in it
    learning_rate=1e-3,       # peak AdamW learning rate, after warmup
    min_lr=1e-4,              # where cosine and wsd end
    lr_schedule='cosine',     # cosine | wsd (warmup-stable-decay) | constant
    warmup_iters=20,          # steps of linear warmup
    decay_frac=0.2,           # wsd: the fraction of steps spent decaying at the end
    weight_decay=0.1,         # AdamW decay on matrices (norms and vectors never decay)
    beta1=0.9,                # AdamW's first-moment decay
    beta2=0.95,               # AdamW's second-moment decay
    grad_clip=1.0,            # clip the gradient norm to this; 0 is off
    eval_interval=100,        # steps between held-out evaluations
    eval_iters=20,            # held-out batches per evaluation
    ckpt_interval=100,        # steps between step checkpoints (an improved val loss saves too)
    keep_last=2,              # step checkpoints kept besides best.pt
    resume='auto',            # auto: continue from the newest checkpoint in out_dir; never; or a path
    peak_flops=0.0,           # for MFU; 0 guesses from the device
)


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters: matrices decay, norms and vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    # the fused kernel exists for CUDA and CPU; on a 2-core CPU it steps the tiny model's 14.7M parameters
    # ~8x faster than the per-tensor loop (0.017 s against 0.14 s)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.split(':')[0] in ('cuda', 'cpu'))


def lr_at(step, max_iters, cfg):
    """Linear warmup, then cosine to min_lr, or flat then a linear decay over the last decay_frac (wsd)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == 'constant':
        return cfg.learning_rate
    if cfg.lr_schedule == 'wsd':
        decay_start = int(max_iters * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.learning_rate
        frac = (step - decay_start) / max(1, max_iters - decay_start)
        return cfg.learning_rate + min(frac, 1.0) * (cfg.min_lr - cfg.learning_rate)
    if cfg.lr_schedule != 'cosine':
        raise ValueError(f"lr_schedule must be cosine, wsd or constant, got {cfg.lr_schedule!r}")
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


def cpu_facts():
    """(vendor, flags, MHz) from /proc/cpuinfo: what the CPU peak is derived from. Empty where it is missing."""
    facts = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                facts.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    mhz = float(facts.get('cpu MHz') or 0)
    try:  # the rated maximum, where the kernel exposes it, beats the momentary clock
        with open('/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq') as f:
            mhz = int(f.read()) / 1000
    except (OSError, ValueError):
        pass
    return facts.get('vendor_id', ''), set(facts.get('flags', '').split()), mhz


def cpu_peak_flops(flags, mhz, cores, dtype, vendor=''):
    """Nominal dense peak of `cores` x86 cores and how it was derived: 2 FMA units x fp32 lanes x 2 FLOPs x clock.

    Lanes come from the widest vector unit: 16 with AVX-512, 8 with AVX2/FMA, 4 otherwise. AMD Zen 4 runs a
    512-bit op as two 256-bit halves (it lacks Zen 5's avx512_vp2intersect), so it counts 8. bf16 counts twice
    the fp32 rate only where the CPU has AVX512-BF16 dot products; elsewhere torch emulates bf16 on fp32 units."""
    lanes = 16 if 'avx512f' in flags else 8 if {'avx2', 'fma'} <= flags else 4
    if lanes == 16 and vendor == 'AuthenticAMD' and 'avx512_vp2intersect' not in flags:
        lanes = 8
    ghz = (mhz or 2500) / 1000
    bf16 = 2 if dtype == 'bfloat16' and 'avx512_bf16' in flags else 1
    peak = cores * 2 * lanes * 2 * ghz * 1e9 * bf16
    how = (f"{cores} core(s) x 2 FMA x {lanes} fp32 lanes x 2 x {ghz:.2f} GHz{' x 2 (avx512_bf16)' if bf16 > 1 else ''}"
           f"{'' if mhz else ' (clock unknown: 2.5 GHz assumed)'} = {peak / 1e9:,.0f} GFLOP/s")
    return peak, how


def guess_peak_flops(device, dtype):
    """(peak FLOP/s, how it was found) for MFU: a table of GPUs, or the CPU's flags and clock."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        dense_bf16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, '4090': 165e12}
        peak = next((v for k, v in dense_bf16.items() if k in name), 100e12)
        peak = peak if dtype == 'bfloat16' else peak / 2
        return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s dense {dtype}"
    # the cores used: torch's threads, but no more than this process may run on
    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 1)
    vendor, flags, mhz = cpu_facts()
    return cpu_peak_flops(flags, mhz, cores, dtype, vendor)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class TrainingDiverged(LumiError, RuntimeError):
    pass


def native_bf16():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Without it torch emulates bf16, slower than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


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


def fit(cfg, model, batches, loss_fn, evaluate=None, meta=None, on_start=None):
    """Train model and return the path of the final checkpoint.

    batches: has next_batch(), state_dict() and load_state_dict(); loss_fn(model, batch) returns the loss
    or (loss, stats) where stats is a dict of floats to log (and 'tokens', the tokens the batch trained);
    evaluate(model) returns a dict of held-out metrics, 'val_loss' among them for the best checkpoint;
    meta is stored in every checkpoint (model_args, tokenizer, kind, ...). The model must already be on
    the device. on_start(step) runs once after resume, before the first step.
    """
    import torch.distributed as dist
    from tqdm import tqdm
    device, rank, _, world = setup_distributed(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    if master:  # a kill during a checkpoint write leaves its temp file; it was never a checkpoint
        for name in os.listdir(cfg.out_dir):
            if name.startswith(('ckpt_', 'best.pt')) and '.tmp.' in name:
                os.remove(os.path.join(cfg.out_dir, name))
    metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    raw = model
    optimizer = make_optimizer(raw, cfg, device)
    step, tokens_seen, best_val, max_iters = 0, 0, float('inf'), cfg.max_iters

    ckpt_path = None
    if cfg.resume == 'auto':
        ckpt_path = find_checkpoint(cfg.out_dir)
    elif cfg.resume != 'never':
        ckpt_path = cfg.resume
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        lacking = [k for k in ('model', 'optimizer', 'step', 'tokens_seen', 'best_val', 'max_iters', 'sampler', 'rng')
                   if k not in ckpt]
        if lacking:
            raise LumiError(f"{ckpt_path}: not a training checkpoint to resume (it has no {', '.join(lacking)}); "
                            f"use another --out_dir or --resume=never")
        try:
            raw.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
        except (RuntimeError, ValueError) as e:
            raise LumiError(f"{ckpt_path}: its weights do not fit this model ({' '.join(str(e).split())[:200]}); "
                            f"use another --out_dir or --resume=never") from e
        step, tokens_seen, best_val = ckpt['step'], ckpt['tokens_seen'], ckpt['best_val']
        max_iters = ckpt['max_iters']
        # a resumed run keeps its plan unless asked for another length: then the schedule is re-planned over
        # the new one (a plan fitted to max_minutes is kept: the clock made it)
        if cfg.max_iters and cfg.max_iters != max_iters:
            if cfg.max_minutes:
                log(f"keeping the checkpoint's plan of {max_iters} steps (fitted to max_minutes), not max_iters="
                    f"{cfg.max_iters}; pass --max_minutes=0 for max_iters")
            elif cfg.max_iters < step:
                raise LumiError(f"{ckpt_path} is at step {step}, past max_iters={cfg.max_iters}: raise max_iters "
                                f"or start afresh with --resume=never")
            else:
                log(f"max_iters={cfg.max_iters}: the checkpoint planned {max_iters} steps; the learning-rate "
                    f"schedule is re-planned over {cfg.max_iters}")
                max_iters = cfg.max_iters
        sampler = ckpt['sampler']
        batches.load_state_dict(sampler[rank] if isinstance(sampler, list) else sampler)
        set_rng_state(ckpt['rng'][rank] if isinstance(ckpt['rng'], list) else ckpt['rng'])
        if master and os.path.exists(metrics_path):  # drop what was logged after the checkpoint
            kept = [r for r in read_jsonl(metrics_path) if r.get('step', 0) <= step]
            atomic_write(metrics_path, lambda f: f.writelines(json.dumps(r) + '\n' for r in kept), mode='w')
        log(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    model = raw
    if resolve_compile(cfg.compile, device):
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)
    peak, how = (cfg.peak_flops, f"peak_flops={cfg.peak_flops:.3g}") if cfg.peak_flops else guess_peak_flops(device, dtype)
    if master:
        log(f"MFU against {how}")
    flops_per_token = raw.flops_per_token() if hasattr(raw, 'flops_per_token') else 0

    def run_eval():
        if evaluate is None:
            return {}
        raw.eval()
        with torch.no_grad(), autocast(device, dtype):
            out = evaluate(raw)
        raw.train()
        if world > 1 and out:  # ranks must agree on `improved`, or only some of them enter save()'s gather
            keys = sorted(k for k, v in out.items() if isinstance(v, (int, float)))
            t = torch.tensor([float(out[k]) for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            out = dict(out, **{k: t[i].item() / world for i, k in enumerate(keys)})
        return out

    def save(path_step, val_metrics, last_metrics, best=False):
        samplers, rngs = batches.state_dict(), rng_state()
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (samplers, rngs))
            samplers, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        if not master:
            return None
        state = dict(meta or {}, model=raw.state_dict(), optimizer=optimizer.state_dict(), step=path_step,
                     max_iters=max_iters, tokens_seen=tokens_seen, best_val=best_val, sampler=samplers,
                     rng=rngs, config=dict(cfg), metrics=dict(last_metrics, **val_metrics))
        path = os.path.join(cfg.out_dir, f'ckpt_{path_step:07d}.pt')
        if best:  # best.pt first: a kill before the step checkpoint resumes from an earlier one and redoes both
            save_checkpoint(os.path.join(cfg.out_dir, 'best.pt'), state)
        save_checkpoint(path, state)
        old = sorted(n for n in os.listdir(cfg.out_dir) if n.startswith('ckpt_') and n.endswith('.pt'))
        for name in old[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            os.remove(os.path.join(cfg.out_dir, name))
        return path

    if on_start is not None:
        on_start(step)
    t_start = time.time()
    budget_s = cfg.max_minutes * 60
    replan = budget_s > 0 and not ckpt_path  # fit the schedule to the clock; a resumed run keeps its plan
    planned, cap, recent = False, max_iters or 10**12, []  # recent: the last step times, for the plan
    last, final_path = {}, ckpt_path  # resuming a finished run returns the checkpoint it resumed
    raw.train()
    bar = tqdm(total=max_iters or None, initial=step, disable=not master, dynamic_ncols=True, desc=cfg.out_dir)
    eval_s, resumed_at = 0.0, step if ckpt_path else -1
    while True:
        # evaluate and checkpoint on schedule, and at the end; the step we resumed at was done before
        done = bool(max_iters and step >= max_iters)
        if budget_s > 0 and not done:  # the clock is a safety net past the plan; every rank must agree on it
            over = torch.tensor(float(time.time() - t_start > budget_s * 1.05), device=device)
            if world > 1:
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            done = bool(over.item())
        if step == resumed_at:
            pass
        elif step % cfg.eval_interval == 0 or done:
            t0 = time.time()
            val = run_eval()
            eval_s = time.time() - t0
            if val and master:
                append_jsonl(metrics_path, dict(step=step, tokens=tokens_seen, **val))
                bar.write(f"step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float)))
            improved = 'val_loss' in val and val['val_loss'] < best_val
            if improved:
                best_val = val['val_loss']
            if step > 0 and (improved or step % cfg.ckpt_interval == 0 or done):
                final_path = save(step, val, last, best=improved) or final_path
        elif step % cfg.ckpt_interval == 0:
            final_path = save(step, {}, last) or final_path
        if done:
            break

        lr = lr_at(step, max_iters or 1, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        loss_sum, stats_sum, step_tokens = 0.0, {}, 0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = _to_device(batches.next_batch(), device)
            sync = micro == cfg.gradient_accumulation_steps - 1
            ctx = model.no_sync() if world > 1 and not sync else nullcontext()
            with ctx, autocast(device, dtype):
                out = loss_fn(model, batch)
                loss, stats = out if isinstance(out, tuple) else (out, {})
                (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.item()
            step_tokens += int(stats.pop('tokens', batch[0].numel() if isinstance(batch, (list, tuple)) else 0))
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        loss_val = loss_sum / cfg.gradient_accumulation_steps
        if world > 1:
            t = torch.tensor([loss_val, step_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            loss_val, step_tokens = t[0].item() / world, int(t[1].item())
        if not math.isfinite(loss_val):
            bar.close()
            good = find_checkpoint(cfg.out_dir)
            raise TrainingDiverged(f"loss is {loss_val} at step {step}: stopping. The last good checkpoint "
                                   f"{good or '(none yet)'} is untouched; lower learning_rate or raise warmup_iters.")
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        step += 1
        if step > 1:  # the first step is not timed: it holds torch.compile's compilation (~30 s on 2 cores)
            recent = (recent + [dt])[-10:]
        tokens_seen += step_tokens
        tps = step_tokens / max(dt, 1e-9)
        last = dict(step=step, loss=loss_val, lr=lr, tokens=tokens_seen, tokens_per_sec=round(tps, 1),
                    mfu=round(flops_per_token * tps / peak, 5),
                    **{k: v / cfg.gradient_accumulation_steps for k, v in stats_sum.items()})
        if grad_norm is not None:
            last['grad_norm'] = float(grad_norm)
        if master:
            append_jsonl(metrics_path, last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * last['mfu']:.1f}%")
        if replan and len(recent) >= max(2, min(10, cfg.warmup_iters // 2)):
            # fit the schedule to the clock: steps left = (time left - the final eval) / (step time + the evals
            # to come), planned again after every step from the last ten, so that a machine that slows down
            # midway (a shared one does) still finishes its cosine on time instead of being cut off high
            per_step = sum(recent) / len(recent)
            left = budget_s - (time.time() - t_start) - eval_s
            n = max(0, int(left / (per_step + eval_s / max(1, cfg.eval_interval))))
            if world > 1:  # rank 0's plan for all: ranks that stopped at different steps would hang
                t = torch.tensor([n], dtype=torch.int64, device=device)
                dist.broadcast(t, 0)
                n = int(t.item())
            max_iters = max(step, min(cap, step + n))
            bar.total = max_iters
            if not planned:
                log(f"max_minutes={cfg.max_minutes}: {per_step:.3f}s a step, planning {max_iters} steps")
            planned = True
    bar.close()
    if master:
        import plot  # imported here: the pictures are not part of the core
        plot.write_loss_plot(cfg.out_dir)  # never raises
    if world > 1:
        dist.barrier()
    return final_path


# =============================================================================
# the lab's command line: `python lumi.py run | export | plot | info`. The pipeline (pipeline.py), the
# pictures (plot.py) and the export (export.py) are imported only by the command that needs them.

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# facts about a checkpoint

def _short(value, width=100):
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 1] + '…'


def checkpoint_info(path):
    """The facts `lumi.py info` prints, as a dict: kind, shape, parameters, tokenizer, progress, metrics."""
    ckpt = load_checkpoint(path)
    info = dict(path=ckpt['path'], kind=ckpt.get('kind', '?'), bytes=os.path.getsize(ckpt['path']))
    if 'model' not in ckpt:  # an adapter file (sft.py / dpo.py): small, points at its base
        info.update({k: ckpt[k] for k in ('lora', 'base_path', 'base_sha256', 'tokenizer_sha256') if k in ckpt})
        info['adapter_params'] = sum(t.numel() for t in ckpt.get('lora_state', {}).values())
        return info
    model = model_from_checkpoint(ckpt)
    info.update(model_args=ckpt.get('model_args'), params=model.num_params(),
                params_no_embeddings=model.num_params(embeddings=False),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                lora=ckpt.get('lora') or None, tokenizer_sha256=ckpt.get('tokenizer_sha256'),
                vocab_size=tokenizer_from_checkpoint(ckpt).vocab_size if 'tokenizer' in ckpt else None)
    for k in ('step', 'max_iters', 'tokens_seen', 'best_val', 'parent', 'parent_sha256', 'metrics', 'config'):
        if k in ckpt:
            info[k] = ckpt[k]
    log_path = os.path.join(os.path.dirname(ckpt['path']), 'metrics.jsonl')
    if os.path.isfile(log_path):  # the run's log knows more than the checkpoint's last step
        from plot import read_run  # it skips a line cut short by a kill
        records = read_run(log_path)[1]
        info['last_train'] = next((r for r in reversed(records) if 'loss' in r), None)
        info['last_eval'] = next((r for r in reversed(records) if 'val_loss' in r), None)
    return info


def print_info(info):
    print(f"{info['path']}  ({info['bytes'] / 1e6:.1f} MB)")
    print(f"  kind                {info['kind']}")
    if 'params' not in info:
        for k in ('lora', 'adapter_params', 'base_path', 'base_sha256', 'tokenizer_sha256'):
            if k in info:
                print(f"  {k:<19} {info[k]}")
        return
    a = info['model_args'] or {}
    print(f"  model               {a.get('n_layer')} layers, d {a.get('n_embd')}, {a.get('n_head')} heads "
          f"({a.get('n_kv_head')} kv), ffn {a.get('ffn_hidden')}, context {a.get('block_size')}, "
          f"vocab {a.get('vocab_size')}, {'tied' if a.get('tie_embeddings') else 'untied'} head")
    print(f"  parameters          {info['params']:,} ({info['params_no_embeddings']:,} without embeddings)")
    if info.get('lora'):
        print(f"  lora                {info['lora']} ({info['trainable_params']:,} trainable)")
    print(f"  tokenizer           {info['tokenizer_sha256']} (vocab {info['vocab_size']})")
    if 'step' in info:
        print(f"  step                {info['step']:,} of {info.get('max_iters') or '?'}")
    if 'tokens_seen' in info:
        print(f"  tokens seen         {info['tokens_seen']:,}")
    if 'best_val' in info and math.isfinite(info['best_val']):
        print(f"  best val loss       {info['best_val']:.4f}")
    if info.get('parent'):
        print(f"  parent              {info['parent']}")
    for key, name in (('metrics', 'checkpoint metrics'), ('last_train', 'last train step'), ('last_eval', 'last eval')):
        if info.get(key):
            print(f"  {name:<19} " + ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in info[key].items()))
    if info.get('config'):
        print("  config")
        for k in sorted(info['config']):
            print(f"    {k:<26} {_short(info['config'][k])}")


# -----------------------------------------------------------------------------
# entry point

USAGE = """usage: python lumi.py COMMAND ...
  run [CONFIG] [--key=value ...]     every stage in order: data, pretrain, eval, SFT, eval, DPO, eval, a sample
  export CKPT OUT [--format=hf|pt]   a Hugging Face Llama directory (safetensors) or a plain state dict
  plot RUN [RUN ...] [--out=FILE]    train/val loss and LR against tokens as an SVG
  info CKPT                          config, parameters, tokenizer, tokens seen, last metrics
every command takes --help; --debug shows the traceback of an error"""


PLOT_DEFAULTS = dict(
    out='',                   # the SVG to write; '' is RUN/loss.svg for one run directory, else loss.svg
    title='',                 # '' names the runs
)


def _usage(line):
    return 'usage: python lumi.py ' + USAGE.splitlines()[line].strip()


def _command(argv):
    command, rest = argv[0], argv[1:]
    wants_help = '--help' in rest or '-h' in rest
    if command == 'run':
        import pipeline
        if wants_help:
            return print(config_help(pipeline.PIPELINE_DEFAULTS, _usage(1), pipeline.__file__))
        return pipeline.run_pipeline(rest)
    if command == 'export':
        import export
        if wants_help:
            return print(config_help(export.DEFAULTS, _usage(2), export.__file__))
        return export.main(rest)
    if command == 'plot':
        if wants_help:
            return print(config_help(PLOT_DEFAULTS, _usage(3)))
        runs, flags = split_args(rest, PLOT_DEFAULTS)
        if not runs:
            raise LumiError("usage: python lumi.py plot RUN [RUN ...] [--out=FILE.svg]")
        cfg = load_config(PLOT_DEFAULTS, flags)
        out = cfg.out or (os.path.join(runs[0], 'loss.svg') if len(runs) == 1 and os.path.isdir(runs[0])
                          else 'loss.svg')
        import plot
        path = plot.plot_svg([plot.read_run(r) for r in runs], out, title=cfg.title or ', '.join(map(os.path.normpath, runs)))
        log(f"wrote {path}")
        return path
    if wants_help:
        return print(_usage(4))
    pos, flags = split_args(rest, {})
    if len(pos) != 1 or flags:
        raise LumiError("usage: python lumi.py info CKPT")
    info = checkpoint_info(pos[0])
    print_info(info)
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # run as a script, this file is __main__; the stages it imports must find it as `lumi`, not load it again
    sys.modules.setdefault('lumi', sys.modules[__name__])
    if argv and argv[0] in ('--help', '-h'):
        print(USAGE)
        sys.exit(0)
    if not argv or argv[0] not in ('run', 'export', 'plot', 'info'):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    return guard(_command, argv, interrupted="interrupted: run the same command again to resume")


if __name__ == '__main__':
    main()
