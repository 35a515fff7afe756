"""monitor/qmp-cmds-control.c: the commands every QMP monitor has, whatever the machine.

qmp_capabilities ends the negotiation a client must go through first; query-version and query-commands are
how clients (qmp-shell, qemu.qmp) find out what they talk to.
"""

from __future__ import annotations

from typing import Any

from labkit.vm.monitor.qmp import QMPSession
from labkit.vm.qapi.error import QMPErrorResponse, invalid_parameter_type
from labkit.vm.qapi.qmp_registry import QmpCommandList


def qmp_capabilities(session: QMPSession, args: dict[str, Any]) -> None:
    """qmp_qmp_capabilities() and qmp_caps_accept()."""
    enable = args.get("enable", [])
    for index, cap in enumerate(enable):
        if type(cap) is not str:
            raise invalid_parameter_type(f"enable[{index}]", "string")
        if cap != "oob":
            raise QMPErrorResponse(f"Parameter 'null' does not accept value '{cap}'")
    if session.negotiated:
        raise QMPErrorResponse(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
        )
    session.oob_enabled = "oob" in enable
    session.negotiated = True


def query_version(version: tuple[int, int, int], package: str) -> dict[str, Any]:
    """qmp_query_version(): the VersionInfo the greeting carries too."""
    major, minor, micro = version
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package}


def query_commands(cmds: QmpCommandList) -> list[dict[str, str]]:
    """qmp_query_commands(): newest first, as QAPI_LIST_PREPEND builds the list."""
    return [{"name": cmd.name} for cmd in reversed(list(cmds))]
