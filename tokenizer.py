"""
The tokenizer and the one chat template: a frozen SentencePiece model (Tokenizer), whose identity is the hash
of what it does, not of its bytes; chat markers that text can never forge (marker escaping); render_chat, the
template every stage and the server use; and SentencePiece's ModelProto read and rewritten at the wire level,
since protobuf is not a dependency (export.py builds tokenizer.json on it).

A protobuf message is a run of fields, each a varint tag (number << 3 | wire type), then a varint, 8 or 4
bytes, or a varint length and that many bytes. ModelProto: 1 pieces (1 piece, 2 score, 3 type), 2
trainer_spec, 3 normalizer_spec, 4 self_test_data, 5 denormalizer_spec.

Also here: training one with Lumi's reserved ids, and its quality on held-out text (data.py's tokenizer step
caches, samples and freezes it).

Deliberately left out: choosing what a tokenizer trains on (data.py), a general protobuf reader (groups,
packed repeated fields: ModelProto has neither).
"""
import hashlib
import io
import itertools

import numpy as np
import sentencepiece

from lumi import LumiError

# -----------------------------------------------------------------------------
# tokenizer and chat template
# The ids of the special tokens are fixed when the tokenizer is trained (data.py), so SFT and DPO never
# resize the embeddings: pad 0, unk 1, bos 2, eos 3, then the chat markers in this order.

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
ROLES = ('system', 'user', 'assistant')
TEMPLATE_VARS = {'name': 'Lumi', 'author': 'the Lumi project'}  # what {{name}} and {{author}} become
                                                                # in chat data


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
        self.file_sha256 = hashlib.sha256(self.proto).hexdigest()
        self.sha256 = tokenizer_identity(self.proto)
        self.vocab_size = self.sp.get_piece_size()
        self.role_id = {role: self.sp.piece_to_id(f'<|{role}|>') for role in ROLES}
        self.end_id = self.sp.piece_to_id('<|end|>')
        for name, i in [('pad', PAD_ID), ('unk', UNK_ID), ('bos', BOS_ID), ('eos', EOS_ID)]:
            if getattr(self.sp, f'{name}_id')() != i:
                raise ValueError(f"tokenizer {self.sha256[:12]}: {name} id is "
                                 f"{getattr(self.sp, f'{name}_id')()}, Lumi expects {i}; "
                                 f"retrain it with data.py")
        if self.end_id == UNK_ID or UNK_ID in self.role_id.values():
            raise ValueError(f"tokenizer {self.sha256[:12]} lacks the chat tokens {CHAT_TOKENS}")
        self.text_sp = sentencepiece.SentencePieceProcessor(
            model_proto=markers_as_control(self.proto, CHAT_TOKENS))
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
    checkpoints and bins stored before the identity) of a tokenizer loaded here whose identity is the
    other."""
    return _IDENTITY_OF_FILE.get(sha_a, sha_a) == _IDENTITY_OF_FILE.get(sha_b, sha_b)


def check_tokenizer(expected_sha, actual_sha, what):
    if not same_tokenizer(expected_sha, actual_sha):
        raise LumiError(f"{what} was built with tokenizer {str(expected_sha)[:12]}…, but this model's "
                        f"tokenizer is {str(actual_sha)[:12]}…; they must match (re-run data.py or pick "
                        f"the matching checkpoint)")


# -----------------------------------------------------------------------------
# training one, with Lumi's reserved ids (data.py's tokenizer step), and measuring it

def train_sentencepiece(sentences, vocab_size, model_type='bpe', num_threads=1):
    """The bytes of a SentencePiece model trained on an iterator of texts, with Lumi's special ids (pad 0,
    unk 1, bos 2, eos 3, the chat markers 4-7), byte fallback, and text kept as it is, so
    decode(encode(text)) == text."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=buf, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995, split_digits=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece='<pad>', unk_piece='<unk>', bos_piece='<s>', eos_piece='</s>',
        user_defined_symbols=list(CHAT_TOKENS),
        # identity normalisation and kept whitespace: decode(encode(text)) == text
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, max_sentence_length=16384,
        num_threads=num_threads, minloglevel=2)
    proto = buf.getvalue()
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    if [sp.piece_to_id(t) for t in CHAT_TOKENS] != list(range(4, 4 + len(CHAT_TOKENS))):
        raise ValueError(f"tokenizer: chat tokens {CHAT_TOKENS} must have ids 4..7")
    return proto


def tokenizer_quality(tok, texts):
    """Characters per token, unknown and byte-fallback rates, exact round trips, on held-out texts."""
    ids = tok.encode_batch(texts)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64)
    is_byte = np.array([tok.sp.is_byte(i) for i in range(tok.vocab_size)])
    return {'docs': len(texts), 'chars': sum(map(len, texts)), 'tokens': int(len(flat)),
            'chars_per_token': round(sum(map(len, texts)) / max(1, len(flat)), 4),
            'unk_rate': float((flat == UNK_ID).mean()) if len(flat) else 0.0,
            'byte_fallback_rate': float(is_byte[flat].mean()) if len(flat) else 0.0,
            'roundtrip_exact': sum(tok.decode(i) == t for i, t in zip(ids, texts)) / max(1, len(texts))}


# -----------------------------------------------------------------------------
# SentencePiece's ModelProto, at the wire level

# a piece's type (ModelProto.SentencePiece.Type)
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6


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
    return hashlib.sha256(b''.join(out)).hexdigest()


def markers_as_control(model_proto, markers):
    """The same model with the pieces in `markers` (strings) retyped from user-defined (matched anywhere in
    text) to control (never produced from text), so marker text encodes as the ordinary pieces of its
    characters."""
    markers = {t.encode() for t in markers}
    out = []
    for number, value, raw in proto_fields(model_proto):
        if number == 1 and b'<|' in value:  # parse only the few pieces that can be markers
            piece = proto_fields(value)
            if any(n == 1 and v in markers for n, v, _ in piece):
                retyped = b''.join(r for n, _, r in piece if n != 3) + encode_proto_field(3, PIECE_CONTROL)
                raw = encode_proto_field(1, retyped)
        out.append(raw)
    return b''.join(out)
