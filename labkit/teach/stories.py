"""Scenarios for the notebooks: one QMP story each, run start to end, told back as a table of steps.

A notebook cell must leave no process behind, yet the lesson is often an order of QMP commands across two
processes (-incoming defer) or what a source does when its destination dies. These functions drive real VMs
through such a story inside one call, record each command and what came back, and end every process.
Where the story's commands are the Lab's phases, it steps a Lab (labkit.lab.engine) and looks, or adds its
own commands, between the steps; only what the Lab never sends (one refused `migrate`, an inet main channel)
is driven by hand, on labkit.teach.hand_driven.
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
from labkit.host.wait import wait_until
from labkit.lab.engine import Lab
from labkit.lab.report import Result
from labkit.lab.scenario import Scenario
from labkit.qemu_syntax import GuestConfig, parse_size, unix_channel
from labkit.teach.hand_driven import HandDriven, Steps


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
    said and how it is afterwards (still running, memory intact). The VM ends before this returns. One VM and
    one command, by hand: a refusal happens before there is any migration for the Lab to run."""
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


def _defer_lab(ram: str | int, dirty_rate: str | int, timeout: float) -> Lab:
    """A cpr-transfer Lab whose destination starts with `-incoming defer -incoming <cpr>` and gets
    `migrate-incoming` once connected, unheld, so a story can look at (and talk to) both sides between steps.
    Sizes may be spelled as QEMU spells them ("64M"): the Scenario parses them."""
    settings: dict[str, Any] = {"ram": ram, "dirty_rate": dirty_rate, "timeout": timeout}
    return Lab(Scenario(mode="cpr-transfer", defer=True, holds="never", **settings))


def defer_walkthrough(ram: str | int = "64M", dirty_rate: str | int = "16M", timeout: float = 30.0):
    """cpr-transfer to a destination started with `-incoming defer -incoming <cpr>`, step by step: the
    destination has no monitor until the source has sent `migrate`; only then may one talk to it and send
    `migrate-incoming`. These are the Lab's own phases with defer on; the story looks between them. Returns a
    DataFrame: step, to whom, what was sent, what came back."""
    steps = Steps()
    with _defer_lab(ram, dirty_rate, timeout) as lab:
        lab.step()  # start the source: migrate-set-parameters mode=cpr-transfer
        steps.note("source", "migrate-set-parameters mode=cpr-transfer", "{}")
        lab.step()  # start the destination; it listens on the cpr socket
        assert lab.dst is not None and lab.src is not None, lab.error
        dst = lab.dst
        steps.note(
            "destination", "start: -incoming defer -incoming {cpr channel}", "listening on the cpr socket"
        )
        steps.note("destination", "does its QMP socket exist?", os.path.exists(dst.qmp_path))
        steps.note("destination", "connect to QMP (1 s)", _connectable(dst, 1.0))
        lab.step()  # migrate channels=[main, cpr]
        steps.note("source", "migrate channels=[main, cpr]", "{} (CPR state and fds sent)")
        steps.note("source", "query-migrate", f"{lab.progress(lab.src).status} (waiting for the cpr hang-up)")
        steps.note("destination", "connect to QMP", _connectable(dst, timeout))
        steps.note("destination", "query-status", dst.cmd("query-status")["status"])
        lab.step()  # migrate-incoming on the destination
        steps.note(
            "destination",
            f"migrate-incoming unix:{os.path.basename(lab.main_path)}",
            "{} (listens, closes cpr)",
        )
        result = lab.run()
    steps.note("source", "query-migrate", result.status)
    steps.note("destination", "query-status", result.states.get("destination"))
    steps.note("destination", "x-labkit-verify (guest memory)", result.guest_verified)
    return steps.frame()


# -- cpr-transfer to an inet main channel with port 0 -----------------------------------------------------
def port_zero_walkthrough(ram: str | int = "32M", timeout: float = 30.0):
    """cpr-transfer with the main channel on inet port 0, as QEMU 10.0.2 runs it: nothing refuses the port.
    The destination listens on a port the kernel picks (its query-migrate socket-address names it); the
    source sends CPR state, then cannot connect to port 0 and fails, its guest still running. Returns a
    DataFrame: step, to whom, what was sent, what came back.

    Driven by hand: the Lab's channels are unix sockets, and this lesson is the inet channel's."""
    size = parse_size(ram, "m") if isinstance(ram, str) else ram
    steps = Steps()
    with HandDriven(timeout=timeout) as vms:
        src = vms.start(VMConfig(name="source", ram=size, guest=GuestConfig(dirty_rate=8 << 20)))
        cpr = vms.path("cpr.sock")
        dst = vms.start_cpr_destination(VMConfig(name="destination", ram=size), "tcp:127.0.0.1:0", cpr)
        steps.note(
            "destination",
            "start: -incoming tcp:127.0.0.1:0 -incoming {cpr channel}",
            "waits on the cpr socket",
        )
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        try:
            src.cmd("migrate", {"channels": [inet_channel("127.0.0.1", 0), unix_channel(cpr, "cpr")]})
            steps.note(
                "source", "migrate channels=[main tcp 127.0.0.1:0, cpr]", "{} (accepted: CPR state sent)"
            )
        except QMPCommandError as e:
            steps.note("source", "migrate channels=[main tcp 127.0.0.1:0, cpr]", f"refused: {e}")
        dst.connect(timeout)
        steps.note("destination", "query-migrate", dst.cmd("query-migrate"))
        wait_until(
            lambda: src.cmd("query-migrate").get("status") in ("failed", "completed"),
            "the source's migration to end",
            timeout,
            src,
        )
        steps.note("source", "query-migrate", src.cmd("query-migrate"))
        steps.note("source", "query-status", src.cmd("query-status")["status"])
        steps.note("source", "x-labkit-verify (guest memory)", bool(src.runner.verify(src).get("ok")))
    return steps.frame()


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
    steps = Steps()
    note = steps.note
    with Lab(mode="cpr-transfer", ram=ram, dirty_rate=dirty_rate) as lab:
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
    return steps.frame()


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
    steps = Steps()
    note = steps.note
    with Lab(mode="cpr-transfer", ram=ram, dirty_rate=dirty_rate) as lab:
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
    return steps.frame()


def cancel_during_hangup_wait(ram: str | int = "64M", dirty_rate: str | int = "16M", timeout: float = 30.0):
    """cpr-transfer to a destination started with -incoming defer: after `migrate` the source has sent its
    fds and waits for the destination's hang-up, which never comes until `migrate-incoming`. Cancel it there.
    The source goes back to `running`, its memory intact; the destination still holds the same memfds but
    never ran the guest, and must be killed. The Lab's phases with defer on, up to `migrate`; then the cancel,
    which the Lab never sends, by hand. Returns a DataFrame of steps."""
    steps = Steps()
    note = steps.note
    with _defer_lab(ram, dirty_rate, timeout) as lab:
        for _ in range(3):  # start the source, the destination (-incoming defer + cpr), migrate
            lab.step()
        src, dst = lab.src, lab.dst
        assert src is not None and dst is not None, lab.error
        note("source", "migrate channels=[main, cpr]", "{} (fds sent)")
        # it has read the fds and opened its monitor; it will not hang up before migrate-incoming
        dst.connect(timeout)
        note("source", "query-migrate", f"{lab.progress(src).status} (waiting for the hang-up)")
        src.cmd("migrate_cancel")
        note("source", "migrate_cancel", "{}")
        lab.wait_for(lambda: lab.progress(src).status in ("cancelled", "failed"), "the cancel", src)
        note("source", "query-migrate", lab.progress(src).status)
        note("source", "query-status", src.cmd("query-status")["status"])
        note("source", "x-labkit-verify", _verdict(lab.runner.verify(src)))
        note("destination", "query-status", dst.cmd("query-status")["status"])
        note(
            "destination", "holds the source's ram0 memfd (same inode)?", _ram0_inode(dst) == _ram0_inode(src)
        )
        dst.kill()
        note("destination", "SIGKILL (it must never run this guest)", "killed")
        note("source", "x-labkit-verify", _verdict(lab.runner.verify(src)))
    return steps.frame()
