"""Emulated devices whose state must cross the main migration channel, as QEMU's vmstate sections do.

Each device saves a versioned section (name, instance id, version, bytes) and loads one; a section with a version
newer than the device knows is refused, as vmstate_load_state refuses it. Payloads are JSON here so a learner can
read them with `labkit migrate --json` or a hex dump; QEMU packs binary fields, the idea is the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol

from labkit.vm.guest import Guest


class DeviceError(Exception):
    pass


class Device(Protocol):
    name: str
    version: int

    def save(self) -> bytes: ...

    def load(self, data: bytes, version: int) -> None: ...


def _decode(name: str, data: bytes, version: int, known: int) -> dict:
    if version > known:
        raise DeviceError(f"{name}: incoming version_id {version} is too new (max {known})")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeviceError(f"{name}: malformed device state ({e})") from None
    if not isinstance(obj, dict):
        raise DeviceError(f"{name}: malformed device state (not an object)")
    return obj


@dataclass
class CPUDevice:
    """vCPU registers: tick count, workload position, random generator state (QEMU's "cpu" section)."""

    guest: Guest
    name: str = "cpu"
    version: int = 1

    def save(self) -> bytes:
        c = self.guest.cpu
        return json.dumps(
            {
                "ticks": c.ticks,
                "position": c.position,
                "budget": c.budget,
                "rng": self.guest.rng.bit_generator.state,
            }
        ).encode()

    def load(self, data: bytes, version: int) -> None:
        s = _decode(self.name, data, version, self.version)
        try:
            c = self.guest.cpu
            c.ticks, c.position, c.budget = int(s["ticks"]), int(s["position"]), float(s["budget"])
            self.guest.rng.bit_generator.state = s["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"cpu: malformed device state ({e})") from None


@dataclass
class TimerDevice:
    """The guest's virtual clock, which stands still while the VM is stopped (QEMU's "timer" section)."""

    guest: Guest
    name: str = "timer"
    version: int = 1

    def save(self) -> bytes:
        return json.dumps({"vm-clock-ns": self.guest.vm_clock_ns}).encode()

    def load(self, data: bytes, version: int) -> None:
        s = _decode(self.name, data, version, self.version)
        try:
            self.guest.vm_clock_ns = int(s["vm-clock-ns"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"timer: malformed device state ({e})") from None


class SerialDevice:
    """A 16550-like console: the guest writes lines, QMP reads them, a log file keeps them (-serial file:)."""

    name = "serial"
    version = 1

    def __init__(self, guest: Guest, path: str | None):
        self.guest = guest
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if path else -1
        guest.console_sink = self._emit

    def _emit(self, line: str) -> None:
        if self._fd >= 0:
            os.write(self._fd, (line + "\n").encode())

    def save(self) -> bytes:
        return json.dumps({"lines": self.guest.console[-50:]}).encode()

    def load(self, data: bytes, version: int) -> None:
        s = _decode(self.name, data, version, self.version)
        lines = s.get("lines", [])
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise DeviceError("serial: malformed device state (lines)")
        self.guest.console[:] = lines

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class GlobalState:
    """The run state the source had when it stopped, so the destination knows whether to resume (global_state)."""

    runstate: str = "running"
    name: str = "globalstate"
    version: int = 1

    def save(self) -> bytes:
        return json.dumps({"runstate": self.runstate}).encode()

    def load(self, data: bytes, version: int) -> None:
        s = _decode(self.name, data, version, self.version)
        if not isinstance(s.get("runstate"), str):
            raise DeviceError("globalstate: malformed device state")
        self.runstate = s["runstate"]
