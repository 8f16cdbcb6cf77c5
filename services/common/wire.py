"""Name the field that makes a serialized protobuf message undecodable.

protobuf's DecodeError names no field: `bad_utf8_field` walks the wire format against the descriptor and
returns the path of the first string field that is not UTF-8 ("prompt.text", "prompt.chat.messages[0].content").
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Malformed(Exception):
    """The bytes are not a well-formed message at all."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed


def _name(field: FieldDescriptor, index: int | None) -> str:
    oneof = field.containing_oneof
    name = f"{oneof.name}.{field.name}" if oneof is not None and not oneof.name.startswith("_") else field.name
    return name if index is None else f"{name}[{index}]"


def _walk(descriptor: Descriptor, data: bytes) -> str | None:
    seen: dict[int, int] = {}  # field number -> occurrences so far (repeated fields' indices)
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + size], pos + size
            if pos > len(data):
                raise _Malformed
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue  # unknown fields are kept, not checked
            index = seen.get(number, 0) if field.is_repeated else None
            seen[number] = seen.get(number, 0) + 1
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return _name(field, index)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = _walk(field.message_type, chunk)
                if inner is not None:
                    return f"{_name(field, index)}.{inner}"
        else:
            raise _Malformed  # groups (proto2 only) or a corrupt key
    if pos > len(data):
        raise _Malformed
    return None


def bad_utf8_field(descriptor: Descriptor, data: bytes) -> str | None:
    """The path of the first string field holding invalid UTF-8; None when
    there is none, or the bytes are not a well-formed message."""
    try:
        return _walk(descriptor, data)
    except _Malformed:
        return None
