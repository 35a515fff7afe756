"""qapi/qmp-registry.c: the table of QMP commands a monitor answers, in registration order.

query-commands lists it and the dispatcher looks commands up in it; keeping it apart from the monitor lets the
dispatcher be read without the socket code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from labkit.vm.qapi.qobject_input_visitor import Member


@dataclass
class QmpCommand:
    """One registered command: its handler, its argument members, whether it may run out of band."""

    name: str
    handler: Callable[..., Any]
    members: tuple[Member, ...]
    allow_oob: bool = False
    builtin: bool = False  # built-ins also get the session (qmp_capabilities changes it)


class QmpCommandList:
    """QmpCommandList: commands by name; a name is registered once."""

    def __init__(self) -> None:
        self._commands: dict[str, QmpCommand] = {}

    def register(self, cmd: QmpCommand) -> None:
        """qmp_register_command(); registering a name twice is a bug in the caller."""
        if cmd.name in self._commands:
            raise ValueError(f"QMP command {cmd.name!r} is already registered")
        self._commands[cmd.name] = cmd

    def find(self, name: str) -> QmpCommand | None:
        """qmp_find_command()."""
        return self._commands.get(name)

    def __iter__(self) -> Iterator[QmpCommand]:
        return iter(self._commands.values())
