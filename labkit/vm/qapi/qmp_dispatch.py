"""qapi/qmp-dispatch.c: one QMP request in, one response out, with QEMU's checks in QEMU's order.

The request's members are checked in QDict order (first error wins), then the command is found, its arguments
visited and its handler run; any failure becomes an error response, and a handler's bug never takes the
monitor down.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

from labkit.vm.qapi.error import QMPErrorResponse
from labkit.vm.qapi.qmp_registry import QmpCommandList
from labkit.vm.qapi.qobject_input_visitor import visit_args
from labkit.vm.qobject.json_writer import qobject_to_json
from labkit.vm.qobject.qdict import qdict_order

log = logging.getLogger(__name__)


class QmpSessionState(Protocol):
    """What dispatch reads of the client's session (monitor/qmp.c's MonitorQMP)."""

    negotiated: bool  # mon->commands == &qmp_commands
    oob_enabled: bool


async def qmp_dispatch(cmds: QmpCommandList, request: Any, session: QmpSessionState) -> dict[str, Any]:
    """qmp_dispatch(): the response to one request, {"return": ...} or {"error": ...}, with its "id"."""
    rsp: dict[str, Any]
    try:
        ret = await _do_dispatch(cmds, request, session)
        rsp = {"return": {} if ret is None else ret}
    except QMPErrorResponse as e:
        rsp = {"error": {"class": e.error_class, "desc": e.desc}}
    except Exception as e:  # a handler bug must never take the monitor down
        log.exception("QMP command failed")
        rsp = {"error": {"class": "GenericError", "desc": str(e) or type(e).__name__}}
    if isinstance(request, dict) and "id" in request:
        rsp["id"] = request["id"]
    return rsp


async def _do_dispatch(cmds: QmpCommandList, request: Any, session: QmpSessionState) -> Any:
    if not isinstance(request, dict):
        raise QMPErrorResponse("QMP input must be a JSON object")
    exec_key = None
    for name in qdict_order(request):  # qmp_dispatch_check_obj()
        value = request[name]
        if name == "execute" or (name == "exec-oob" and session.oob_enabled):
            if type(value) is not str:
                raise QMPErrorResponse(f"QMP input member '{name}' must be a string")
            if exec_key:
                raise QMPErrorResponse(f"QMP input member '{name}' clashes with '{exec_key}'")
            exec_key = name
        elif name == "arguments":
            if type(value) is not dict:
                raise QMPErrorResponse("QMP input member 'arguments' must be an object")
        elif name != "id":
            raise QMPErrorResponse(f"QMP input member '{name}' is unexpected")
    if exec_key is None:
        raise QMPErrorResponse("QMP input lacks member 'execute'")
    command = request[exec_key]
    cmd = cmds.find(command)
    if cmd is None or (not session.negotiated and command != "qmp_capabilities"):
        raise QMPErrorResponse(f"The command {command} has not been found", "CommandNotFound")
    if exec_key == "exec-oob" and not cmd.allow_oob:
        raise QMPErrorResponse(f"The command {command} does not support OOB")
    args = visit_args(request.get("arguments", {}), cmd.members)
    ret = cmd.handler(session, args) if cmd.builtin else cmd.handler(args)
    if inspect.isawaitable(ret):
        ret = await ret
    if ret is not None:
        qobject_to_json(ret)  # a handler returning something unsendable is its error, not ours
    return ret
