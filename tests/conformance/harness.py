"""The differential conformance harness: one scenario, run on both backends with the same VMConfig, observed
the same way, gives two Observations whose checks must agree exactly or be listed as known differences.

A scenario is a function of a Run (one backend, one private directory, the VMs and channel captures it
started). It returns an Observation: `checks` are compared between the backends (event sequences as they
came, query-migrate member sets per status on both sides, error texts, CPR bytes, RAM block lists, stream
section lists); `info` is shown in docs/conformance.md but not compared (sizes, page counts, timings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.procfs import read_maps
from labkit.host.qmp_sync import QMPCommandError
from labkit.host.runners import get_runner
from labkit.host.runners.qemu import parse_ramblocks, qemu_argv
from labkit.host.runners.qemu_trace import strip_msg_timestamps
from labkit.qemu_syntax import GiB, KiB, MiB, format_size
from labkit.vm.migration.cpr import CprFd, cpr_state_save
from labkit.vm.migration.cpr_inspect import cpr_inspect

from .capture import CprSink, MainTee, wait_listening
from .sections import describe, section_list

BACKENDS = ("emulated", "qemu")
RAM = 32 * MiB
#: Bytes of the main stream let through before the tee holds both sides (header and the first sections).
PAUSE_AT = 256
#: Pre-copy must take the same path through QEMU's convergence check every run, however busy the host. QEMU
#: computes its threshold (bandwidth x downtime-limit) only after its first 100 ms window, and syncs the dirty
#: bitmap exactly (a MIGRATION_PASS) only while the estimate is under that threshold. So: a first pass that
#: certainly outlasts a window (every page rate-limited to 1 MiB/s, ~0.5 s), a guest that dirties almost nothing
#: meanwhile (64 KiB/s) and the largest downtime-limit, so that one exact sync always finds it can stop.
DIRTY_RATE = 64 * KiB
MAX_BANDWIDTH = 1 * MiB
DOWNTIME_LIMIT = 2000
PRECOPY = {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT}
FINAL = ("completed", "failed", "cancelled")


@dataclass
class Observation:
    checks: dict[str, object] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)


class Run:
    """One backend's side of a scenario: a private 0700 directory, the VMs and captures started in it."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.runner = get_runner(backend)
        self.dir = tempfile.mkdtemp(prefix=f"labkit-conf-{backend}-")
        self._closers: list[Callable[[], object]] = []

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def vm(self, config: VMConfig, *, seabios: bool = False, connect: bool = True) -> Machine:
        """Start a VM. seabios=True runs real QEMU with its default firmware (the argv a user types, with
        QEMU's own pc.bios); otherwise the qemu backend boots qboot, which starts the guest in ~1 s."""
        os.makedirs(self.path(config.name), mode=0o700)
        m = Machine(config, self.runner, run_dir=self.path(config.name))
        if self.backend == "qemu" and seabios:
            m.argv = qemu_argv(config, m.qmp_path, bios=None)
        self._closers.append(m.kill)
        m.launch(connect=connect)
        if connect:
            events_on(m)
        return m

    def booted(self, m: Machine) -> None:
        """The guest runs (real QEMU: its first heartbeat), so verification afterwards means something."""
        ready = getattr(self.runner, "ready", None)
        if ready is not None:
            ready(m)

    def tee(
        self, name: str, target: str | None = None, pause_at: int | None = None, backpressure: bool = False
    ) -> MainTee:
        t = MainTee(self.path(name), target, pause_at, backpressure)
        self._closers.append(t.close)
        return t

    def cpr_sink(self, name: str) -> CprSink:
        s = CprSink(self.path(name))
        self._closers.append(s.close)
        return s

    def text(self, s: str | None) -> str | None:
        """A text with this run's private directory written as DIR, so both backends' texts compare."""
        return None if s is None else s.replace(self.dir, "DIR")

    def close(self) -> None:
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- observing -----------------------------------------------------------------------------------------------
def events_on(m: Machine) -> None:
    m.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})


def event_names(events: list[dict]) -> list[str]:
    """Every event as it came, none collapsed: MIGRATION by its status, MIGRATION_PASS as PASS."""
    out = []
    for e in events:
        if e["event"] == "MIGRATION":
            out.append(e["data"]["status"])
        elif e["event"] == "MIGRATION_PASS":
            out.append("PASS")
        else:
            out.append(e["event"])
    return out


def members(info: dict) -> list[str]:
    """query-migrate's member set: top-level names, and the ram object's as ram.NAME."""
    out = sorted(k for k in info)
    if isinstance(info.get("ram"), dict):
        out += sorted(f"ram.{k}" for k in info["ram"])
    return out


def status(m: Machine) -> str:
    return m.cmd("query-migrate", timeout=10).get("status", "none")


def wait_status(m: Machine, wanted: tuple[str, ...], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = status(m)
        if st in wanted or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def answer(m: Machine, command: str, args: dict | None = None) -> str:
    """A command's outcome as text: "ok" or "ErrorClass: text"."""
    try:
        m.cmd(command, args, timeout=15)
        return "ok"
    except QMPCommandError as e:
        return f"{e.error_class}: {e}"


def runstate(m: Machine) -> str:
    return m.cmd("query-status", timeout=10)["status"]


def query_ramblock(m: Machine) -> list[dict]:
    """x-query-ramblock's rows (HMP `info ramblock`), asked the same way of both backends: ram_list order,
    used and maximum length, host address."""
    return parse_ramblocks(m.cmd("x-query-ramblock", timeout=10)["human-readable-text"])


def ram_blocks(m: Machine) -> list[str]:
    """Name, used length and maximum length of every RAM block, in the VM's ram_list order."""
    return [f"{b['name']} {format_size(b['size'])}/{format_size(b['max-size'])}" for b in query_ramblock(m)]


def block_inodes(m: Machine) -> dict[str, int | None]:
    maps = {mp.start: mp.inode for mp in read_maps(m.pid)}
    return {b["name"]: maps.get(b["host-addr"]) for b in query_ramblock(m)}


def unix(path: str, ctype: str = "main") -> dict:
    return {"channel-type": ctype, "addr": {"transport": "socket", "type": "unix", "path": path}}


def stream_checks(obs: Observation, data: bytes) -> None:
    sl = section_list(data)
    # runs of PART sections collapsed: how many iterations the pre-copy loop makes depends on timing
    described: list[str] = []
    for s in sl["sections"]:
        d = describe(s)
        if s["kind"] == "PART":
            d += " (1 or more)"
            if described and described[-1] == d:
                continue
        described.append(d)
    obs.checks["stream.sections"] = described
    starts = [s for s in sl["sections"] if s.get("blocks") is not None]
    obs.checks["stream.ram-start-blocks"] = [f"{n} {format_size(n_)}" for n, n_ in starts[0]["blocks"]] if starts else []
    obs.checks["stream.decoded"] = sl["error"] or "ok"
    devices = [s for s in sl["sections"] if s.get("name") not in (None, "ram") and "size" in s]
    obs.info["stream"] = {
        "bytes": len(data),
        "format": sl.get("format"),
        "pages": sl["pages"],
        "device-sections": len(devices),
        "device-bytes": sum(s["size"] for s in devices),
        "vmdesc-bytes": next((x["size"] for x in sl["sections"] if x["kind"] == "VMDESCRIPTION"), None),
        "part-sections": sum(1 for s in sl["sections"] if s["kind"] == "PART"),
    }


def source_config(**kw) -> VMConfig:
    from labkit.qemu_syntax import GuestConfig

    return VMConfig(name="src", ram=RAM, guest=GuestConfig(dirty_rate=DIRTY_RATE), **kw)


def destination_answer(obs: Observation, dst: Machine, wanted: tuple[str, ...] | None = None) -> None:
    """The destination's query-migrate member set, keyed by its status (waiting a moment for `wanted`)."""
    if wanted:
        wait_status(dst, wanted, timeout=5)
    info = dst.cmd("query-migrate")
    obs.checks[f"destination.query-migrate@{info.get('status', 'none')}"] = members(info)


def finish_source(obs: Observation, run: Run, src: Machine, since: int = 0) -> None:
    info = src.cmd("query-migrate")
    obs.checks["source.events"] = event_names(src.events[since:])
    obs.checks[f"source.query-migrate@{info.get('status', 'none')}"] = members(info)
    obs.checks["source.runstate"] = runstate(src)
    obs.info["source.query-migrate"] = {k: v for k, v in info.items() if k != "x-labkit"}


def finish_destination(obs: Observation, run: Run, dst: Machine) -> None:
    deadline = time.monotonic() + 30
    while (status(dst) not in FINAL or runstate(dst) == "inmigrate") and time.monotonic() < deadline:
        time.sleep(0.01)
    info = dst.cmd("query-migrate")
    obs.checks[f"destination.query-migrate@{info.get('status', 'none')}"] = members(info)
    obs.checks["destination.events"] = event_names(dst.events)
    obs.checks["destination.runstate"] = runstate(dst)
    v = run.runner.verify(dst)
    obs.checks["destination.guest-verified"] = bool(v.get("ok"))


# -- scenarios: each mode -------------------------------------------------------------------------------------
def scenario_normal(run: Run) -> Observation:
    obs = Observation()
    src = run.vm(source_config())
    run.booted(src)
    src.cmd("migrate-set-parameters", PRECOPY)
    dst = run.vm(replace(source_config(), name="dst").with_incoming(f"unix:{run.path('dst-main')}"))
    destination_answer(obs, dst)
    tee = run.tee("main", target=run.path("dst-main"), pause_at=PAUSE_AT)
    tee.start.set()
    since = len(src.events)
    src.cmd("migrate", {"uri": f"unix:{tee.path}"})
    tee.paused.wait(30)
    destination_answer(obs, dst, ("active", *FINAL))  # held 256 bytes into the stream
    tee.resume.set()
    wait_status(src, FINAL)
    finish_source(obs, run, src, since)
    finish_destination(obs, run, dst)
    stream_checks(obs, tee.close(require_whole=True))
    return obs


def scenario_cpr_transfer(run: Run) -> Observation:
    obs = Observation()
    src = run.vm(source_config())
    run.booted(src)
    src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
    cpr = unix(run.path("cpr"), "cpr")
    dst_cfg = replace(source_config(), name="dst").with_incoming(f"unix:{run.path('dst-main')}", cpr)
    dst = run.vm(dst_cfg, connect=False)
    wait_listening(run.path("cpr"))
    tee = run.tee("main", target=run.path("dst-main"), pause_at=PAUSE_AT)
    since = len(src.events)
    obs.checks["source.migrate"] = answer(src, "migrate", {"channels": [unix(tee.path), cpr]})
    dst.connect()
    events_on(dst)
    destination_answer(obs, dst)
    tee.start.set()  # only now may the stream reach the destination: its RESUME cannot come before we listen
    tee.paused.wait(30)
    destination_answer(obs, dst, ("active", *FINAL))  # held 256 bytes into the stream
    tee.resume.set()
    wait_status(src, FINAL)
    finish_source(obs, run, src, since)
    finish_destination(obs, run, dst)
    s, d = block_inodes(src), block_inodes(dst)
    obs.checks["destination.blocks-on-source-inode"] = sorted(n for n in d if n in s and d[n] == s[n])
    stream_checks(obs, tee.close(require_whole=True))
    return obs


def scenario_cpr_reboot(run: Run) -> Observation:
    obs = Observation()
    src = run.vm(source_config())
    run.booted(src)
    src.cmd("migrate-set-parameters", {"mode": "cpr-reboot", **PRECOPY})
    state = run.path("vm.state")
    since = len(src.events)
    src.cmd("migrate", {"uri": f"file:{state}"})
    wait_status(src, FINAL)
    finish_source(obs, run, src, since)
    src.shutdown()
    dst = run.vm(replace(source_config(), name="dst").with_incoming("defer"))
    dst.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
    destination_answer(obs, dst)
    dst.cmd("migrate-incoming", {"uri": f"file:{state}"})
    finish_destination(obs, run, dst)
    stream_checks(obs, Path(state).read_bytes())
    return obs


def scenario_cpr_state(nodefaults: bool) -> Callable[[Run], Observation]:
    """cpr-transfer to a cpr channel that takes the CPR state and holds on: the source waits in setup for
    the hang-up; then cancel there. QEMU runs its default firmware, the argv exactly as a user types it."""

    def run_it(run: Run) -> Observation:
        obs = Observation()
        src = run.vm(VMConfig(name="src", ram=RAM, nodefaults=nodefaults), seabios=True)
        obs.checks["ram-blocks"] = ram_blocks(src)
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        sink = run.cpr_sink("cpr")
        since = len(src.events)
        channels = [unix(run.path("main")), unix(sink.path, "cpr")]
        obs.checks["source.migrate"] = answer(src, "migrate", {"channels": channels})
        sink.received.wait(30)
        obs.checks["source.query-migrate@waiting-for-hup"] = members(src.cmd("query-migrate"))
        obs.checks["source.status@waiting-for-hup"] = status(src)
        obs.checks["source.migrate_cancel"] = answer(src, "migrate_cancel")
        wait_status(src, ("cancelled", "failed"), timeout=10)
        finish_source(obs, run, src, since)
        cap = sink.close()
        report = cpr_inspect(cap.data, nfds=len(cap.fds))
        digest = hashlib.sha256(cap.data).hexdigest()[:16]
        obs.checks["cpr.bytes"] = f"{len(cap.data)} bytes, sha256 {digest}"
        obs.checks["cpr.fds"] = [
            f"{e.get('name')} {format_size(f['size'])}" for e, f in zip(report["fds"], cap.fds, strict=False)
        ]
        obs.checks["cpr.decoded"] = report["error"] or ("ok" if report["fds_match"] else "fd count mismatch")
        obs.info["cpr.hex"] = cap.data.hex()
        return obs

    return run_it


# -- cancel at each status, parameters mid-migration ------------------------------------------------------------
def scenario_cancel_and_parameters(run: Run) -> Observation:
    """One source, four migrations to a tee that swallows the stream: cancel in pre-switchover, cancel in
    active (tee held), raise downtime-limit and max-bandwidth while held in active and complete, then
    cancel after completion."""
    obs = Observation()
    src = run.vm(source_config())
    run.booted(src)
    src.cmd("migrate-set-parameters", PRECOPY)

    def phase(name: str, *, pause: bool, act: Callable[[], None]) -> None:
        since = len(src.events)
        tee = run.tee(f"main-{name}", pause_at=PAUSE_AT if pause else None, backpressure=True)
        src.cmd("migrate", {"uri": f"unix:{tee.path}"})
        act_tee[0] = tee
        act()
        tee.resume.set()
        obs.checks[f"{name}.final-status"] = wait_status(src, FINAL)
        info = src.cmd("query-migrate")
        obs.checks[f"{name}.query-migrate@{info.get('status', 'none')}"] = members(info)
        if "error-desc" in info:
            obs.checks[f"{name}.error-desc"] = info["error-desc"]
        obs.checks[f"{name}.events"] = event_names(src.events[since:])
        if obs.checks[f"{name}.final-status"] != "completed":  # a cancelled migration restarts the guest
            deadline = time.monotonic() + 5
            while runstate(src) != "running" and time.monotonic() < deadline:
                time.sleep(0.01)
        obs.checks[f"{name}.runstate"] = runstate(src)
        tee.close()

    act_tee: list[MainTee] = []
    act_tee.append(None)  # type: ignore[arg-type]

    def cancel_active() -> None:
        act_tee[0].paused.wait(30)
        obs.checks["cancel-active.query-migrate@held"] = members(src.cmd("query-migrate"))
        obs.checks["cancel-active.migrate_cancel"] = answer(src, "migrate_cancel")

    def cancel_pre_switchover() -> None:
        st = wait_status(src, ("pre-switchover", *FINAL))
        obs.checks["cancel-pre-switchover.reached"] = st
        obs.checks["cancel-pre-switchover.query-migrate@pre-switchover"] = members(src.cmd("query-migrate"))
        obs.checks["cancel-pre-switchover.migrate_cancel"] = answer(src, "migrate_cancel")

    def set_parameters() -> None:
        act_tee[0].paused.wait(30)
        time.sleep(0.3)  # well into the first pass, past QEMU's first 100 ms window
        new = {"downtime-limit": 1000, "max-bandwidth": 10 * GiB}
        obs.checks["parameters.migrate-set-parameters@active"] = answer(src, "migrate-set-parameters", new)
        params = src.cmd("query-migrate-parameters")
        obs.checks["parameters.after"] = [f"{k}={params.get(k)}" for k in sorted(new)]

    src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
    phase("cancel-pre-switchover", pause=False, act=cancel_pre_switchover)
    src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "pause-before-switchover", "state": False}]})
    phase("cancel-active", pause=True, act=cancel_active)
    obs.checks["parameters.verified-before"] = bool(run.runner.verify(src).get("ok"))
    phase("parameters", pause=True, act=set_parameters)
    obs.checks["completed.migrate_cancel"] = answer(src, "migrate_cancel")
    obs.checks["completed.status-after-cancel"] = status(src)
    return obs


def scenario_downtime_limit_zero(run: Run) -> Observation:
    """downtime-limit 0: QEMU's threshold is then always 0, so it never syncs exactly before stopping and
    completes when its first pass ends (nothing it knows of is left). The rule, with no timing in it."""
    obs = Observation()
    src = run.vm(source_config())
    run.booted(src)
    src.cmd("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": 0})
    tee = run.tee("main")
    since = len(src.events)
    src.cmd("migrate", {"uri": f"unix:{tee.path}"})
    st = wait_status(src, FINAL, timeout=8)
    obs.info["status after 8 s"] = st  # the emulator's loop ends when a sync happens to find nothing dirty
    if st not in FINAL:
        src.cmd("migrate_cancel")
        wait_status(src, FINAL, timeout=10)
    names = event_names(src.events[since:])
    # what follows `active` is the rule itself; how many passes a non-converging loop makes is timing
    obs.checks["event after active"] = names[names.index("active") + 1] if "active" in names[:-1] else None
    obs.info["source.events"] = names
    tee.close()
    return obs


def scenario_destination_failed(run: Run) -> Observation:
    """A destination (-incoming defer, migrate-incoming with exit-on-error false) fed a stream with a bad
    magic: its answers once failed, and the text."""
    obs = Observation()
    dst = run.vm(VMConfig(name="dst", ram=RAM).with_incoming("defer"))
    obs.checks["query-migrate@before"] = members(dst.cmd("query-migrate"))
    main = run.path("main")
    obs.checks["migrate-incoming"] = answer(dst, "migrate-incoming", {"uri": f"unix:{main}", "exit-on-error": False})
    wait_listening(main)
    obs.checks["query-migrate@listening"] = members(dst.cmd("query-migrate"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(main)
        s.sendall(b"XXXX" + struct.pack(">I", 3))
        s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while dst.alive() and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the monitor goes away with a destination that exits
                if status(dst) in FINAL:
                    break
            time.sleep(0.01)
    finally:
        s.close()
    rc = dst.wait(1)
    obs.checks["process"] = "running" if rc is None else f"exited {rc}"
    obs.checks["events"] = event_names(dst.events)
    if rc is not None:
        obs.checks["last log line"] = last_log_line(run, dst.log())
        return obs
    info = dst.cmd("query-migrate")
    obs.checks[f"query-migrate@{info.get('status', 'none')}"] = members(info)
    obs.checks["error-desc"] = info.get("error-desc")
    obs.checks["runstate"] = runstate(dst)
    obs.checks["stderr"] = last_log_line(run, dst.log())  # the loader's own detail (error_report)
    return obs


# -- blockers -------------------------------------------------------------------------------------------------
def scenario_blocker(overrides: dict, caps: tuple[str, ...] = ()) -> Callable[[Run], Observation]:
    """A fresh source set to cpr-transfer and migrated to a cpr path nobody listens on: what blocks it,
    in QEMU's words, and what is left behind."""

    def run_it(run: Run) -> Observation:
        obs = Observation()
        kw = dict(overrides)
        if kw.get("memory_backend") == "file":
            kw["mem_path"] = run.path("guest-ram")
        try:
            src = run.vm(VMConfig(name="src", ram=RAM, **kw))
        except Exception as e:  # noqa: BLE001 - a VM that refuses to start is the observation
            log = Path(run.path("src/vm.log"))
            obs.checks["start"] = last_log_line(run, log.read_text(errors="replace") if log.exists() else "") or run.text(str(e))
            return obs
        obs.checks["start"] = "ok"
        obs.checks["query-migrate@before"] = members(src.cmd("query-migrate"))
        for cap in caps:
            obs.checks[f"set {cap}"] = answer(
                src, "migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": True}]}
            )
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        channels = [unix(run.path("m")), unix(run.path("c"), "cpr")]
        obs.checks["migrate"] = run.text(answer(src, "migrate", {"channels": channels}))
        wait_status(src, ("none", *FINAL), timeout=10)
        info = src.cmd("query-migrate")
        obs.checks["status-after"] = info.get("status", "none")
        obs.checks["query-migrate@after"] = members(info)
        obs.checks["blocked-reasons"] = info.get("blocked-reasons", [])
        obs.checks["events"] = event_names(src.events)
        obs.checks["runstate"] = runstate(src)
        return obs

    return run_it


# -- bad input on one source ----------------------------------------------------------------------------------
INET0 = {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "0"}


def scenario_bad_input(run: Run) -> Observation:
    """Parameters and channels QEMU refuses, one after another on one running source; those that leave the
    status `none` first, then those that fail a started migration."""
    obs = Observation()
    src = run.vm(VMConfig(name="src", ram=RAM))
    d = run.dir
    file_main = {"channel-type": "main", "addr": {"transport": "file", "filename": f"{d}/f", "offset": 0}}
    cpr_inet = {"channel-type": "cpr", "addr": {**INET0, "port": "4444"}}
    cases: list[tuple[str, str, dict | None]] = [
        ("migrate_cancel with no migration", "migrate_cancel", None),
        ("mode cpr-bogus", "migrate-set-parameters", {"mode": "cpr-bogus"}),
        ("downtime-limit 2000001", "migrate-set-parameters", {"downtime-limit": 2000001}),
        ("capability x-bogus", "migrate-set-capabilities", {"capabilities": [{"capability": "x-bogus", "state": True}]}),
        ("migrate with neither uri nor channels", "migrate", {}),
        ("migrate with both uri and channels", "migrate", {"uri": f"unix:{d}/m", "channels": [unix(f"{d}/m")]}),
        ("mode cpr-transfer", "migrate-set-parameters", {"mode": "cpr-transfer"}),
        ("cpr-transfer: only a main channel", "migrate", {"channels": [unix(f"{d}/m")]}),
        ("cpr-transfer: two cpr channels", "migrate", {"channels": [unix(f"{d}/m"), unix(f"{d}/c", "cpr"), unix(f"{d}/e", "cpr")]}),
        ("cpr-transfer: main channel of transport file", "migrate", {"channels": [file_main, unix(f"{d}/c", "cpr")]}),
        ("cpr-transfer: main channel inet port 0", "migrate", {"channels": [{"channel-type": "main", "addr": INET0}, unix(f"{d}/c", "cpr")]}),
        ("cpr-transfer: cpr channel over inet", "migrate", {"channels": [unix(f"{d}/m"), cpr_inet]}),
        ("cpr-transfer: nobody listening on the cpr path", "migrate", {"channels": [unix(f"{d}/m"), unix(f"{d}/c", "cpr")]}),
        ("mode normal", "migrate-set-parameters", {"mode": "normal"}),
        ("normal: nobody listening on the main path", "migrate", {"uri": f"unix:{d}/m"}),
        ("migrate_cancel after a failure", "migrate_cancel", None),
    ]  # fmt: skip
    for name, command, args in cases:
        since = len(src.events)
        obs.checks[f"{name}: answer"] = run.text(answer(src, command, args))
        wait_status(src, ("none", *FINAL), timeout=10)
        info = src.cmd("query-migrate")
        obs.checks[f"{name}: status after"] = info.get("status", "none")
        if info.get("error-desc"):
            obs.checks[f"{name}: error-desc"] = run.text(info["error-desc"])
        obs.checks[f"{name}: events"] = event_names(src.events[since:])
    obs.checks["runstate"] = runstate(src)
    return obs


def scenario_no_main_entry(run: Run) -> Observation:
    obs = Observation()
    src = run.vm(VMConfig(name="src", ram=RAM))
    src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
    try:
        obs.checks["migrate"] = answer(src, "migrate", {"channels": [unix(run.path("c"), "cpr")]})
    except Exception:  # noqa: BLE001 - the monitor connection goes when QEMU dies
        obs.checks["migrate"] = "no answer"
    rc = src.wait(2)
    obs.checks["process"] = "alive" if rc is None else f"exited {rc}"
    return obs


# -- a destination given bad CPR state ------------------------------------------------------------------------
def _strip_program(line: str) -> str:
    for prog in ("qemu-system-x86_64: ", "labkit-vm: "):
        line = line.removeprefix(prog)
    return line


def last_log_line(run: Run, text: str) -> str | None:
    """A VM's last word on stderr as both backends print it: QEMU's `-msg timestamp=on` time (which the
    qemu backend turns on for its trace log) and the program's name taken off, warnings left out."""
    lines = [ln for ln in strip_msg_timestamps(text).splitlines() if ln.strip() and "warning" not in ln]
    return run.text(_strip_program(lines[-1])) if lines else None


def scenario_cpr_destination(kind: str) -> Callable[[Run], Observation]:
    """A cpr-transfer destination sent CPR state it must refuse: a bad magic, or a RAM fd too small."""

    def run_it(run: Run) -> Observation:
        obs = Observation()
        cpr = run.path("cpr")
        dst = run.vm(VMConfig(name="dst", ram=RAM).with_incoming(f"unix:{run.path('m')}", unix(cpr, "cpr")),
                     connect=False)  # fmt: skip
        wait_listening(cpr)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fd = os.memfd_create("small", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 4096)
            s.connect(cpr)
            if kind == "bad-magic":
                s.sendall(b"XXXX" + struct.pack(">I", 1) + b"\0")
            else:
                cpr_state_save(s, [CprFd("ram0", 0, fd)])
            s.shutdown(socket.SHUT_WR)
            rc = dst.wait(15)
        finally:
            os.close(fd)
            s.close()
        obs.checks["exit"] = "running" if rc is None else ("0" if rc == 0 else "non-zero")
        obs.checks["error"] = last_log_line(run, dst.log())
        return obs

    return run_it


@dataclass
class Scenario:
    name: str
    what: str
    fn: Callable[[Run], Observation]
    timeout: int = 90


SCENARIOS: list[Scenario] = [
    Scenario("normal", "normal pre-copy to a destination, main channel through the tee (held 256 bytes in)",
             scenario_normal),
    Scenario("cpr-transfer", "cpr-transfer to a destination, main channel through the tee (held 256 bytes in)",
             scenario_cpr_transfer),
    Scenario("cpr-reboot", "cpr-reboot: save to a file:, quit, restore with -incoming defer", scenario_cpr_reboot),
    Scenario("cpr-state", "cpr-transfer to a cpr channel that holds on; cancel in setup (-nodefaults)",
             scenario_cpr_state(True)),
    Scenario("cpr-state-defaults", "the same without -nodefaults (VGA and NIC)", scenario_cpr_state(False)),
    Scenario("cancel-and-parameters", "cancel in active and in pre-switchover, set parameters mid-migration, "
             "cancel after completion", scenario_cancel_and_parameters),
    Scenario("downtime-limit-0", "normal pre-copy with downtime-limit 0 (QEMU's convergence rule, no timing)",
             scenario_downtime_limit_zero),
    Scenario("destination-failed", "a destination fed a stream with a bad magic (exit-on-error false)",
             scenario_destination_failed),
    Scenario("blocker-ram-share-off", "memory-backend-ram share=off",
             scenario_blocker({"memory_backend": "ram", "share": False})),
    Scenario("blocker-ram-share-on", "memory-backend-ram share=on (not a blocker)",
             scenario_blocker({"memory_backend": "ram", "share": True})),
    Scenario("blocker-file-share-off", "memory-backend-file share=off",
             scenario_blocker({"memory_backend": "file", "share": False})),
    Scenario("blocker-pc-ram", "no memory backend (the default pc.ram)",
             scenario_blocker({"memory_backend": "none"})),
    Scenario("blocker-epc", "memory-backend-epc", scenario_blocker({"memory_backend": "epc"})),
    Scenario("blocker-aux-ram-share-off", "aux-ram-share=off", scenario_blocker({"aux_ram_share": False})),
    Scenario("blocker-aux-ram-share-off-defaults", "aux-ram-share=off without -nodefaults",
             scenario_blocker({"aux_ram_share": False, "nodefaults": False})),
    Scenario("blocker-and-postcopy", "aux-ram-share=off with postcopy-ram on: which check comes first",
             scenario_blocker({"aux_ram_share": False}, ("postcopy-ram",))),
    Scenario("bad-input", "parameters and channels QEMU refuses, on one source", scenario_bad_input),
    Scenario("no-main-entry", "cpr-transfer with a channel list that has no main entry", scenario_no_main_entry),
    Scenario("cpr-destination-bad-magic", "a destination sent CPR state with a bad magic",
             scenario_cpr_destination("bad-magic")),
    Scenario("cpr-destination-small-fd", "a destination sent a 4 KiB memfd for ram0",
             scenario_cpr_destination("small-fd")),
]  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}


def observe(scenario: Scenario) -> dict[str, Observation]:
    """Run one scenario on each backend in turn; an exception becomes an observation, so it diffs too."""
    out = {}
    for backend in BACKENDS:
        run = Run(backend)
        try:
            out[backend] = scenario.fn(run)
        except Exception as e:  # noqa: BLE001
            out[backend] = Observation(checks={"harness-error": f"{type(e).__name__}: {run.text(str(e))}"})
        finally:
            run.close()
    return out


def render(value: object) -> str:
    """The text a check is compared by, shown in the docs and kept in known_differences.toml."""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)
