"""
SentencePiece's ModelProto read and rewritten at the wire level, since protobuf is not a dependency: the
fields of a message, a field encoded back, the identity of a tokenizer (the hash of what it does, not of its
bytes), and a model with some pieces retyped as control pieces. lumi.Tokenizer and export.py's tokenizer.json
are built on it.

A message is a run of fields, each a varint tag (number << 3 | wire type), then a varint, 8 or 4 bytes, or a
varint length and that many bytes. ModelProto: 1 pieces (1 piece, 2 score, 3 type), 2 trainer_spec,
3 normalizer_spec, 4 self_test_data, 5 denormalizer_spec.

Deliberately left out: a general protobuf reader (groups, packed repeated fields: ModelProto has neither).
"""
import hashlib

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
    """The same model with the pieces in `markers` (strings) retyped from user-defined (matched anywhere in text)
    to control (never produced from text), so marker text encodes as the ordinary pieces of its characters."""
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

