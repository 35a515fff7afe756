"""qapi/qobject-input-visitor.c: a command's arguments checked against its schema, with QEMU's error texts.

QEMU generates a marshaller per command that visits each member in schema order and then refuses what is
left over; the order of the checks decides which error a client sees first, so it is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from labkit.vm.qapi.error import QMPErrorResponse, invalid_parameter_type
from labkit.vm.qobject.qdict import qdict_order
from labkit.vm.qobject.qnum import INT64_MAX, INT64_MIN, UINT64_MAX

SCALAR_TYPES = ("str", "int", "number", "bool", "any", "dict", "list", "uint64", "size")

# A QAPI-like schema as commands give it: {"mode": "str", "*downtime-limit": "int", "level": ("a", "b")}
Schema = dict[str, str | Sequence[str]]


@dataclass(frozen=True)
class Member:
    """One member of a command's argument struct (QAPI's optional flag, type, enum values)."""

    name: str
    optional: bool
    type: str  # one of SCALAR_TYPES, or "enum"
    values: tuple[str, ...] = ()


def parse_schema(args: Schema | None) -> tuple[Member, ...]:
    """The members of a schema; a leading '*' marks an optional one, a sequence of strings an enum."""
    members = []
    for key, typ in (args or {}).items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if isinstance(typ, str):
            if typ not in SCALAR_TYPES:
                raise ValueError(f"unknown QMP argument type {typ!r} for {name!r}")
            members.append(Member(name, optional, typ))
        else:
            members.append(Member(name, optional, "enum", tuple(typ)))
    return tuple(members)


def visit_args(args: dict[str, Any], members: Sequence[Member]) -> dict[str, Any]:
    """The generated qmp_marshal_*() visit: members in schema order, then visit_check_struct()."""
    for m in members:
        if m.name not in args:
            if m.optional:
                continue
            raise QMPErrorResponse(f"Parameter '{m.name}' is missing")
        v = args[m.name]
        t = m.type
        if t == "any":
            continue
        if t == "str" or t == "enum":
            if type(v) is not str:
                raise invalid_parameter_type(m.name, "string")
            if t == "enum" and v not in m.values:
                raise QMPErrorResponse(f"Parameter '{m.name}' does not accept value '{v}'")
        elif t == "int":
            if type(v) is not int or not INT64_MIN <= v <= INT64_MAX:
                raise invalid_parameter_type(m.name, "integer")
        elif t == "uint64" or t == "size":
            if type(v) is not int or not INT64_MIN <= v <= UINT64_MAX:
                raise QMPErrorResponse(f"Parameter '{m.name}' expects uint64")
            args[m.name] = v & UINT64_MAX  # negative values are accepted for compatibility
        elif t == "number":
            if type(v) not in (int, float):
                raise invalid_parameter_type(m.name, "number")
            args[m.name] = float(v)
        elif t == "bool":
            if type(v) is not bool:
                raise invalid_parameter_type(m.name, "boolean")
        elif t == "dict":
            if type(v) is not dict:
                raise invalid_parameter_type(m.name, "object")
        elif t == "list":
            if type(v) is not list:
                raise invalid_parameter_type(m.name, "array")
    known = {m.name for m in members}
    for key in qdict_order(args):
        if key not in known:
            raise QMPErrorResponse(f"Parameter '{key}' is unexpected")
    return args
