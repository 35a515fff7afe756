"""qapi/error.json's ErrorClass and the exception a QMP command raises to fail, as QEMU's error_setg() does.

Every failed command becomes one {"error": {"class": ..., "desc": ...}} response, so the exception carries
exactly those two facts. Named after the response it becomes: qemu.qmp's client-side root error is QMPError.
"""

from __future__ import annotations

from typing import Literal

from labkit.errors import LabkitError

# qapi/error.json: the classes QEMU still uses (GenericError for almost everything)
ErrorClass = Literal["GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"]


class QMPErrorResponse(LabkitError):
    """A command failure, answered as {"error": {"class": error_class, "desc": desc}}."""

    def __init__(self, desc: str, error_class: ErrorClass = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class: ErrorClass = error_class


def invalid_parameter_type(name: str, expected: str) -> QMPErrorResponse:
    """QERR_INVALID_PARAMETER_TYPE, the text of every wrongly typed argument."""
    return QMPErrorResponse(f"Invalid parameter type for '{name}', expected: {expected}")
