"""Scenarios for the notebooks: one QMP story each, run start to end, told back as a table of steps.

A notebook cell must leave no process behind, yet the lesson is often an order of QMP commands across two
processes (-incoming defer) or what a source does when its destination dies. These functions drive real VMs
through such a story inside one call, record each command and what came back, and end every process.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout
from labkit.host.runners import spawn
from labkit.lab.engine import Lab
from labkit.lab.report import Result
from labkit.lab.scenario import Scenario
from labkit.qemu_syntax import GuestConfig, parse_size


def unix_channel(path: str, channel_type: str = "main") -> dict[str, Any]:
    """A MigrationChannel over a UNIX socket, as `migrate` and `-incoming` take it."""
    return {"channel-type": channel_type, "addr": {"transport": "socket", "type": "unix", "path": path}}


def file_channel(filename: str, channel_type: str = "main") -> dict[str, Any]:
    return {"channel-type": channel_type, "addr": {"transport": "file", "filename": filename, "offset": 0}}


def inet_channel(host: str, port: int | str, channel_type: str = "main") -> dict[str, Any]:
    addr = {"transport": "socket", "type": "inet", "host": host, "port": str(port)}
    return {"channel-type": channel_type, "addr": addr}


@dataclass
class Attempt:
    """What one `migrate` command did to a running source: refused or accepted, and the source after it."""

    args: dict[str, Any]
    error: str | None
    status: str
    runstate: str
    guest_verified: bool | None
    blocked_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "migrate": "accepted" if self.error is None else f"refused: {self.error}",
            "query-migrate status": self.status,
            "source runstate": self.runstate,
            "guest memory verified": self.guest_verified,
        }


def try_migrate(
    args: dict[str, Any], config: VMConfig | None = None, mode: str = "cpr-transfer", settle: float = 0.2
) -> Attempt:
    """Start a source VM, set the migration mode, send one `migrate` with `args`, and report what the source
    said and how it is afterwards (still running, memory intact). The VM ends before this returns."""
    config = config or VMConfig(name="source", ram=32 << 20, guest=GuestConfig(dirty_rate=8 << 20))
    with spawn(config) as m:
        m.cmd("migrate-set-parameters", {"mode": mode})
        blocked = m.cmd("query-migrate").get("blocked-reasons", [])
        error = None
        try:
            m.cmd("migrate", args)
        except QMPCommandError as e:
            error = str(e)
        time.sleep(settle)  # a connect that fails does so on the migration thread, just after
        info = m.cmd("query-migrate")
        if error is None and info.get("error-desc"):
            error = info["error-desc"]
        return Attempt(
            args,
            error,
            info.get("status", "none"),  # QEMU 10 answers {} when no migration ever started
            m.cmd("query-status")["status"],
            bool(m.runner.verify(m).get("ok")),
            blocked,
        )


# -- -incoming defer with cpr-transfer: who may be spoken to first -----------------------------------------
def _connectable(m: Machine, timeout: float) -> str:
    try:
        m.connect(timeout)
        return "connected"
    except (QMPTimeout, ConnectionError, OSError) as e:
        return f"cannot connect ({type(e).__name__})"


def defer_walkthrough(ram: str | int = "64M", dirty_rate: str | int = "16M", timeout: float = 30.0):
    """cpr-transfer to a destination started with `-incoming defer -incoming <cpr>`, step by step: the
    destination has no monitor until the source has sent `migrate`; only then may one talk to it and send
    `migrate-incoming`. Returns a DataFrame: step, to whom, what was sent, what came back."""
    import pandas as pd

    size = parse_size(ram, "m") if isinstance(ram, str) else ram
    rows: list[dict[str, Any]] = []

    def note(who: str, sent: str, seen: Any) -> None:
        rows.append({"step": len(rows) + 1, "to": who, "sent / looked at": sent, "came back": seen})

    cfg = VMConfig(name="source", ram=size, guest=GuestConfig(dirty_rate=parse_size(dirty_rate)))
    src = spawn(cfg)
    dst = None
    try:
        main = f"{src.run_dir}/main.sock"
        cpr = f"{src.run_dir}/cpr.sock"
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        note("source", "migrate-set-parameters mode=cpr-transfer", "{}")
        dcfg = VMConfig(name="destination", ram=size).with_incoming("defer", unix_channel(cpr, "cpr"))
        dst = spawn(dcfg, connect=False)
        deadline = time.monotonic() + timeout
        while not os.path.exists(cpr) and time.monotonic() < deadline:
            time.sleep(0.01)
        note("destination", "start: -incoming defer -incoming {cpr channel}", "listening on the cpr socket")
        note("destination", "does its QMP socket exist?", os.path.exists(dst.qmp_path))
        note("destination", "connect to QMP (1 s)", _connectable(dst, 1.0))
        src.cmd("migrate", {"channels": [unix_channel(main), unix_channel(cpr, "cpr")]})
        note("source", "migrate channels=[main, cpr]", "{} (CPR state and fds sent)")
        status = src.cmd("query-migrate").get("status")
        note("source", "query-migrate", f"{status} (waiting for the cpr hang-up)")
        note("destination", "connect to QMP", _connectable(dst, timeout))
        note("destination", "query-status", dst.cmd("query-status")["status"])
        dst.cmd("migrate-incoming", {"uri": f"unix:{main}"})
        note("destination", f"migrate-incoming unix:{os.path.basename(main)}", "{} (listens, closes cpr)")
        while (
            src.cmd("query-migrate").get("status") not in ("completed", "failed")
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        note("source", "query-migrate", src.cmd("query-migrate").get("status"))
        while dst.cmd("query-status")["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        note("destination", "query-status", dst.cmd("query-status")["status"])
        note("destination", "x-labkit-verify (guest memory)", bool(dst.runner.verify(dst).get("ok")))
    finally:
        if dst is not None:
            dst.shutdown(timeout=5)
        src.shutdown(timeout=5)
    return pd.DataFrame(rows)


# -- cpr-transfer to an inet main channel with port 0 -----------------------------------------------------
def port_zero_walkthrough(ram: str | int = "32M", timeout: float = 30.0):
    """cpr-transfer with the main channel on inet port 0, as QEMU 10.0.2 runs it: nothing refuses the port.
    The destination listens on a port the kernel picks (its query-migrate socket-address names it); the
    source sends CPR state, then cannot connect to port 0 and fails, its guest still running. Returns a
    DataFrame: step, to whom, what was sent, what came back."""
    import pandas as pd

    size = parse_size(ram, "m") if isinstance(ram, str) else ram
    rows: list[dict[str, Any]] = []

    def note(who: str, sent: str, seen: Any) -> None:
        rows.append({"step": len(rows) + 1, "to": who, "sent / looked at": sent, "came back": seen})

    src = spawn(VMConfig(name="source", ram=size, guest=GuestConfig(dirty_rate=8 << 20)))
    dst = None
    try:
        cpr = f"{src.run_dir}/cpr.sock"
        dcfg = VMConfig(name="destination", ram=size).with_incoming("tcp:127.0.0.1:0", unix_channel(cpr, "cpr"))
        dst = spawn(dcfg, connect=False)
        deadline = time.monotonic() + timeout
        while not os.path.exists(cpr) and time.monotonic() < deadline:
            time.sleep(0.01)
        note("destination", "start: -incoming tcp:127.0.0.1:0 -incoming {cpr channel}", "waits on the cpr socket")
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        try:
            src.cmd("migrate", {"channels": [inet_channel("127.0.0.1", 0), unix_channel(cpr, "cpr")]})
            note("source", "migrate channels=[main tcp 127.0.0.1:0, cpr]", "{} (accepted: CPR state sent)")
        except QMPCommandError as e:
            note("source", "migrate channels=[main tcp 127.0.0.1:0, cpr]", f"refused: {e}")
        dst.connect(timeout)
        info = dst.cmd("query-migrate")
        note("destination", "query-migrate", info)
        while src.cmd("query-migrate").get("status") not in ("failed", "completed") and time.monotonic() < deadline:
            time.sleep(0.02)
        note("source", "query-migrate", src.cmd("query-migrate"))
        note("source", "query-status", src.cmd("query-status")["status"])
        note("source", "x-labkit-verify (guest memory)", bool(src.runner.verify(src).get("ok")))
    finally:
        if dst is not None:
            dst.kill()
        src.shutdown(timeout=5)
    return pd.DataFrame(rows)


# -- the destination dies mid-way ------------------------------------------------------------------------
def destination_dies(mode: str = "normal", after_phase: int = 3, **lab_kwargs: Any) -> tuple[Any, Result]:
    """Step a migration through `after_phase` phases, SIGKILL the destination there, let the source go on,
    and return (the phases seen, as a DataFrame; the Result: status, error-desc, states, memory verified)."""
    import pandas as pd

    rows = []
    with Lab(Scenario(**{"ram": "64M", "dirty_rate": "16M", **lab_kwargs, "mode": mode})) as lab:
        for _ in range(after_phase):
            snap = lab.step()
            rows.append({"phase": snap.phase, **{f"{k} state": v for k, v in snap.states.items()}})
        assert lab.dst is not None
        lab.dst.kill()
        rows.append({"phase": "SIGKILL the destination", "destination state": "(killed)"})
        result = lab.run()
    rows.append({"phase": "source after", "source state": result.states.get("source")})
    return pd.DataFrame(rows), result


# -- cpr-reboot, phase by phase ----------------------------------------------------------------------------
def cpr_reboot_walkthrough(**lab_kwargs: Any) -> tuple[Any, Result]:
    """Step a cpr-reboot: at each phase the runstate of the old and the new process, and the size of the
    state file. Returns (DataFrame of phases, Result)."""
    import pandas as pd

    rows = []
    with Lab(Scenario(**{**lab_kwargs, "mode": "cpr-reboot"})) as lab:
        for _ in lab.phases:
            snap = lab.step()
            size = os.path.getsize(lab.file_path) if os.path.exists(lab.file_path) else None
            rows.append(
                {
                    "phase": snap.phase,
                    "old process": snap.states.get("source"),
                    "new process": snap.states.get("destination"),
                    "state file bytes": size,
                }
            )
        result = lab.run()
    return pd.DataFrame(rows).astype({"state file bytes": "Int64"}), result


def ram0_inodes(result: Result) -> dict[str, Any]:
    """ram0 in each process: inode, path, virtual address; and whether both are the same file."""
    out: dict[str, Any] = {}
    for m in result.mappings:
        if m.block == "ram0":
            out[m.side] = {"inode": m.inode, "path": m.path, "start": hex(m.start)}
    with contextlib.suppress(KeyError):
        out["same inode"] = out["source"]["inode"] == out["destination"]["inode"]
    return out


# -- safety: what must not be done after a handoff, and what survives -------------------------------------
def _ram0_inode(m: Machine) -> int | None:
    """The inode of the memfd that backs guest RAM in this process (memfd of the backend ram0)."""
    from labkit.host.procfs import read_maps

    for mapping in read_maps(m.pid):
        if "memfd:" in mapping.path and "ram0" in mapping.path or "memory-backend-memfd" in mapping.path:
            return mapping.inode
    return None


def cont_after_handoff(ram: str | int = "64M", dirty_rate: str | int = "32M", run_for: float = 1.0):
    """Complete a cpr-transfer, then send `cont` to the *old* process, which QEMU allows from postmigrate.
    Both guests now run on the same memfd: the new one with its current device state, the old one with the
    stale state it had at STOP. After `run_for` seconds each guest checks its own memory. Returns a DataFrame
    of steps; the destination's check is the one that must catch the damage."""
    import pandas as pd

    rows: list[dict[str, Any]] = []

    def note(who: str, sent: str, seen: Any) -> None:
        rows.append({"step": len(rows) + 1, "to": who, "sent / looked at": sent, "came back": seen})

    with Lab(Scenario(mode="cpr-transfer", ram=parse_size(ram, "m"), dirty_rate=parse_size(dirty_rate))) as lab:
        result = lab.run()
        assert lab.src is not None and lab.dst is not None
        note("both", "cpr-transfer", f"{result.status}; destination memory verified: {result.guest_verified}")
        note("source", "query-status", lab.src.cmd("query-status")["status"])
        note("destination", "x-labkit-verify (before)", bool(lab.dst.runner.verify(lab.dst).get("ok")))
        try:
            lab.src.cmd("cont")
            note("source", "cont", "{} (accepted: the old guest runs again)")
        except QMPCommandError as e:
            note("source", "cont", f"refused: {e}")
        time.sleep(run_for)
        note("source", "query-status", lab.src.cmd("query-status")["status"])
        same = _ram0_inode(lab.src) == _ram0_inode(lab.dst)
        note("both", "the same ram0 memfd (inode)?", same)
        check = lab.dst.runner.verify(lab.dst)
        note("destination", "x-labkit-verify (after)", _verdict(check))
    return pd.DataFrame(rows)


def _verdict(check: dict) -> str:
    if check.get("ok"):
        return "ok: every page is what this guest wrote"
    bad = check.get("bad-pages")
    parts = [f"{len(bad) if isinstance(bad, list) else bad} bad pages" if bad else None]
    if check.get("checksum-ok") is False:
        parts.append("the guest's checksum of its generation table does not match")
    if check.get("error"):
        parts.append(check["error"])
    return "FAILED: " + "; ".join(p for p in parts if p) if any(parts) else "FAILED"


def source_dies_after_handoff(ram: str | int = "64M", dirty_rate: str | int = "16M", wait: float = 1.0):
    """Step a cpr-transfer until the destination has mapped the fds and listens on main, SIGKILL the
    source there, and look at what is left: the guest's RAM lives on in the destination's memfds (the
    kernel frees a memfd only when no process refers to it), but nobody will ever send the device state, so
    no process can run the guest. Returns a DataFrame of steps."""
    import pandas as pd

    rows: list[dict[str, Any]] = []

    def note(who: str, sent: str, seen: Any) -> None:
        rows.append({"step": len(rows) + 1, "to": who, "sent / looked at": sent, "came back": seen})

    with Lab(Scenario(mode="cpr-transfer", ram=parse_size(ram, "m"), dirty_rate=parse_size(dirty_rate))) as lab:
        for _ in range(4):
            snap = lab.step()
        assert lab.src is not None and lab.dst is not None
        note("both", f"step to '{snap.phase}'", snap.states)
        inode = _ram0_inode(lab.src)
        lab.src.kill()
        note("source", "SIGKILL", "killed (after it had handed over the fds)")
        time.sleep(wait)
        note("destination", "still holds guest RAM (same ram0 inode)?", _ram0_inode(lab.dst) == inode)
        note("destination", "query-status", lab.dst.cmd("query-status")["status"])
        note("destination", "query-migrate", lab.dst.cmd("query-migrate").get("status"))
        note("destination", "x-labkit-verify (the RAM itself)", _verdict(lab.dst.runner.verify(lab.dst)))
        try:
            lab.dst.cmd("cont")
            note("destination", "cont", "{} (it only sets autostart: there is no device state to start from)")
        except QMPCommandError as e:
            note("destination", "cont", f"refused: {e}")
        time.sleep(0.2)
        note("destination", "query-status", lab.dst.cmd("query-status")["status"])
    return pd.DataFrame(rows)


def cancel_during_hangup_wait(ram: str | int = "64M", dirty_rate: str | int = "16M", timeout: float = 30.0):
    """cpr-transfer to a destination started with -incoming defer: after `migrate` the source has sent its
    fds and waits for the destination's hang-up, which never comes until `migrate-incoming`. Cancel it there.
    The source goes back to `running`, its memory intact; the destination still holds the same memfds but
    never ran the guest, and must be killed. Returns a DataFrame of steps."""
    import pandas as pd

    size = parse_size(ram, "m") if isinstance(ram, str) else ram
    rows: list[dict[str, Any]] = []

    def note(who: str, sent: str, seen: Any) -> None:
        rows.append({"step": len(rows) + 1, "to": who, "sent / looked at": sent, "came back": seen})

    src = spawn(VMConfig(name="source", ram=size, guest=GuestConfig(dirty_rate=parse_size(dirty_rate))))
    dst = None
    try:
        main, cpr = f"{src.run_dir}/main.sock", f"{src.run_dir}/cpr.sock"
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        dcfg = VMConfig(name="destination", ram=size).with_incoming("defer", unix_channel(cpr, "cpr"))
        dst = spawn(dcfg, connect=False)
        deadline = time.monotonic() + timeout
        while not os.path.exists(cpr) and time.monotonic() < deadline:
            time.sleep(0.01)
        src.cmd("migrate", {"channels": [unix_channel(main), unix_channel(cpr, "cpr")]})
        note("source", "migrate channels=[main, cpr]", "{} (fds sent)")
        dst.connect(
            timeout
        )  # it has read the fds and opened its monitor; it will not hang up before migrate-incoming
        note("source", "query-migrate", f"{src.cmd('query-migrate').get('status')} (waiting for the hang-up)")
        src.cmd("migrate_cancel")
        note("source", "migrate_cancel", "{}")
        while (
            src.cmd("query-migrate").get("status") not in ("cancelled", "failed")
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        note("source", "query-migrate", src.cmd("query-migrate").get("status"))
        note("source", "query-status", src.cmd("query-status")["status"])
        note("source", "x-labkit-verify", _verdict(src.runner.verify(src)))
        note("destination", "query-status", dst.cmd("query-status")["status"])
        note(
            "destination", "holds the source's ram0 memfd (same inode)?", _ram0_inode(dst) == _ram0_inode(src)
        )
        dst.kill()
        note("destination", "SIGKILL (it must never run this guest)", "killed")
        note("source", "x-labkit-verify", _verdict(src.runner.verify(src)))
    finally:
        if dst is not None:
            dst.kill()
        src.shutdown(timeout=5)
    return pd.DataFrame(rows)
