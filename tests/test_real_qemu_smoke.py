"""Real QEMU 10: cpr-transfer and normal migration of labkit's guest, checked from outside the VM.

This is the ground truth the emulated VM is measured against: the same command lines, QMP commands and
event order as QEMU 10.0.2 showed here (docs/real-qemu-figures.md), with guest RAM verified page by page
through the memfds.
Skipped where qemu-system-x86_64 >= 10 is absent (install it with scripts/install-qemu).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import CPR_TRANSFER_SOURCE_EVENTS

from labkit.host.hardware import VMConfig
from labkit.host.runners import qemu_guest as qg
from labkit.host.runners.qemu import qemu_argv

qmp_legacy = pytest.importorskip("qemu.qmp.legacy")

_VERSION = qg.qemu_version()
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        _VERSION is None or _VERSION < (10, 0, 0),
        reason=f"needs qemu-system-x86_64 >= 10.0 (found {_VERSION}); run scripts/install-qemu",
    ),
]

RAM = "256M"
RAM_BYTES = 256 << 20
BOOT_TIMEOUT = 40.0  # SeaBIOS alone can take 5-8 s under a nested KVM


def _ts(ev: dict) -> float:
    t = ev["timestamp"]
    return t["seconds"] + t["microseconds"] / 1e6


def _short(ev: dict) -> str:
    """MIGRATION events as "MIGRATION <status>", the others by name."""
    if ev["event"] == "MIGRATION":
        return f"MIGRATION {ev['data']['status']}"
    return ev["event"]


@dataclass
class Qemu:
    """One real QEMU process with its run-dir paths; killed by the fixture's finalizer."""

    name: str
    proc: subprocess.Popen
    qmp_path: str
    log_path: str
    monitor: object | None = None
    events: list[dict] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, timeout: float = 30.0) -> object:
        """Connect to the QMP socket, retrying until it exists (a cpr-transfer destination opens its
        monitor only after it has read the CPR state)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
            if not os.path.exists(self.qmp_path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no QMP socket after {timeout} s")
                time.sleep(0.002)
                continue
            try:
                mon = qmp_legacy.QEMUMonitorProtocol(self.qmp_path)
                mon.connect()
                self.monitor = mon
                return mon
            except (OSError, qmp_legacy.QMPError):  # ConnectError is a QMPError
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)

    def cmd(self, name: str, **args: object) -> object:
        return self.monitor.cmd(name, **args)

    def pull_events(self, wait: float = 0.0) -> list[dict]:
        try:
            evs = self.monitor.get_events(wait=float(wait)) if wait else self.monitor.get_events()
        except TimeoutError:
            evs = []
        self.events += evs
        return evs

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-2000:]
        except OSError:
            return ""


class Lab:
    """A private run dir (0700) and the QEMUs started in it; `close` kills them and removes the dir."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="labkit-qemu-")  # mode 0700
        self.guest = qg.build_guest()
        self.accel = qg.default_accel()
        self.vms: list[Qemu] = []

    def start(self, name: str, incoming: tuple[str, ...] = ()) -> Qemu:
        qmp = os.path.join(self.dir, f"{name}.qmp")
        log = os.path.join(self.dir, f"{name}.log")
        # dirty-rate 0: the guest writes its RAM as fast as it can
        argv = qemu_argv(VMConfig(ram=RAM, incoming=list(incoming)), qmp, accel=self.accel, guest=self.guest)
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        vm = Qemu(name, proc, qmp, log)
        self.vms.append(vm)
        return vm

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def close(self) -> None:
        for vm in self.vms:
            if vm.monitor is not None:
                try:
                    vm.monitor.close()
                except Exception:
                    pass
            if vm.proc.poll() is None:
                vm.proc.kill()
            vm.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Lab:
    lab = Lab()
    request.addfinalizer(lab.close)
    return lab


def _boot_source(lab: Lab) -> tuple[Qemu, str]:
    src = lab.start("src")
    src.connect()
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    mem = qg.find_ram_memfd(src.pid, size=RAM_BYTES)
    qg.wait_for_heartbeat(mem, timeout=BOOT_TIMEOUT, min_passes=1)
    return src, mem


def _runstate_settles(src: Qemu, timeout: float = 5.0) -> str:
    """The source's run state once it leaves finish-migrate: QEMU emits MIGRATION completed from the migration
    thread and sets postmigrate in the bottom half that follows, so a query between the two sees
    finish-migrate (seen here under load)."""
    deadline = time.monotonic() + timeout
    while (state := src.cmd("query-status")["status"]) == "finish-migrate" and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


def _wait_migration(src: Qemu, timeout: float = 60.0, on_slow: Callable[[], None] | None = None) -> dict:
    """Collect source events until MIGRATION completed; returns the final query-migrate."""
    deadline = time.monotonic() + timeout
    slow_at = time.monotonic() + timeout / 2
    while True:
        for ev in src.pull_events(wait=0.5):
            if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed", "cancelled"):
                info = src.cmd("query-migrate")
                assert ev["data"]["status"] == "completed", info
                return info
        now = time.monotonic()
        if on_slow and now > slow_at:
            on_slow()
            on_slow = None
        if now > deadline:
            raise TimeoutError(f"migration not completed: {src.cmd('query-migrate')}")


def _gen_events(vm: Qemu) -> list[str]:
    return [_short(e) for e in vm.events if e["event"] in ("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME")]


def _report(label: str, **kv: object) -> None:
    print(f"\n[{label}] " + json.dumps(kv, default=str))


@pytest.mark.timeout(150)
def test_cpr_transfer_real_qemu(lab: Lab) -> None:
    src, src_mem = _boot_source(lab)
    main_sock, cpr_sock = lab.path("main.sock"), lab.path("cpr.sock")
    cpr_incoming = json.dumps(
        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr_sock}}
    )
    dst = lab.start("dst", incoming=(f"unix:{main_sock}", cpr_incoming))
    deadline = time.monotonic() + 30
    while not os.path.exists(cpr_sock):  # the destination listens on the cpr socket before anything else
        assert dst.proc.poll() is None, dst.log()
        assert time.monotonic() < deadline, "destination never listened on the cpr socket"
        time.sleep(0.005)

    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.pull_events()
    src.events.clear()
    channels = [
        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main_sock}},
        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr_sock}},
    ]
    t0 = time.monotonic()
    assert src.cmd("migrate", channels=channels) == {}
    t_return = time.monotonic()
    dst.connect()  # only now: its monitor exists once it has loaded the CPR state
    t_dst = time.monotonic()
    info = _wait_migration(src)
    t_done = time.monotonic()

    # Source events exactly as QEMU 10.0.2 did (docs/real-qemu-figures.md).
    assert _gen_events(src) == CPR_TRANSFER_SOURCE_EVENTS
    assert _runstate_settles(src) == "postmigrate"
    deadline = time.monotonic() + 10
    while dst.cmd("query-status")["status"] != "running":
        assert time.monotonic() < deadline, dst.cmd("query-status")
        time.sleep(0.01)
    dst.pull_events(wait=0.2)
    resume = [e for e in dst.events if e["event"] == "RESUME"]
    stop = [e for e in src.events if e["event"] == "STOP"]
    pause_ms = (_ts(resume[0]) - _ts(stop[0])) * 1e3 if resume else None

    # The same memfd inode maps ram0 in both processes, at different virtual addresses.
    src_maps = [m for m in qg.memfd_mappings(src.pid) if m.name == "memory-backend-memfd"]
    dst_maps = [m for m in qg.memfd_mappings(dst.pid) if m.name == "memory-backend-memfd"]
    assert len(src_maps) == 1 and len(dst_maps) == 1, (src_maps, dst_maps)
    assert src_maps[0].inode == dst_maps[0].inode
    assert src_maps[0].size == dst_maps[0].size == RAM_BYTES
    assert src_maps[0].start != dst_maps[0].start
    dst_mem = qg.find_ram_memfd(dst.pid, size=RAM_BYTES)
    assert os.stat(dst_mem).st_ino == os.stat(src_mem).st_ino

    # Guest memory, checked through the destination's memfd with the guest stopped, then running on.
    # The guest's own view of the switch-over, read before our verification stop adds a gap of its own.
    hb_after = qg.wait_for_heartbeat(dst_mem, timeout=10, min_seq=qg.read_heartbeat(dst_mem).seq + 1000)
    dst.cmd("stop")
    res = qg.verify_guest_memory(dst_mem, stopped=True)
    hb = res["heartbeat"]
    assert res["bad"] == 0 and res["stale"] == 0, res
    assert res["ok"] + res["in_progress"] == res["pages"] == hb.patterned_pages, res
    dst.cmd("cont")
    hb2 = qg.wait_for_heartbeat(dst_mem, timeout=10, min_seq=hb.seq + 1000)
    assert hb2.seq > hb.seq

    _report(
        "cpr-transfer",
        accel=lab.accel,
        downtime_ms=info.get("downtime"),
        total_ms=info.get("total-time"),
        setup_ms=info.get("setup-time"),
        ram_transferred=info.get("ram", {}).get("transferred"),
        stop_to_resume_ms=pause_ms,
        migrate_returned_ms=round((t_return - t0) * 1e3, 1),
        dst_qmp_after_return_ms=round((t_dst - t_return) * 1e3, 1),
        completed_ms=round((t_done - t0) * 1e3, 1),
        dst_events=[_short(e) for e in dst.events],
        pages_ok=res["ok"],
        generation=hb.generation,
        guest_max_gap_ms=hb_after.max_gap_ms,
        guest_gaps_ms=[round(g[1] / hb_after.tsc_khz, 2) for g in hb_after.gaps[-4:]]
        if hb_after.tsc_khz
        else [],
        src_map=hex(src_maps[0].start),
        dst_map=hex(dst_maps[0].start),
        inode=src_maps[0].inode,
    )


@pytest.mark.timeout(150)
def test_normal_migration_real_qemu(lab: Lab) -> None:
    src, _ = _boot_source(lab)
    main_sock = lab.path("main.sock")
    dst = lab.start("dst", incoming=(f"unix:{main_sock}",))
    dst.connect()
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
    src.pull_events()
    src.events.clear()
    t0 = time.monotonic()
    src.cmd(
        "migrate",
        channels=[
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main_sock}}
        ],
    )

    def give_more_downtime() -> None:
        # Noisy 2-core machine: let a migration that does not converge finish rather than time out.
        src.cmd("migrate-set-parameters", **{"downtime-limit": 2000})

    info = _wait_migration(src, timeout=100, on_slow=give_more_downtime)
    t_done = time.monotonic()

    ev = _gen_events(src)
    # setup, PASS, active, PASS (one per pass), STOP, device, PASS, completed
    assert ev[:3] == ["MIGRATION setup", "MIGRATION_PASS", "MIGRATION active"], ev
    assert ev[-4:] == ["STOP", "MIGRATION device", "MIGRATION_PASS", "MIGRATION completed"], ev
    assert set(ev[3:-4]) <= {"MIGRATION_PASS"}, ev
    assert _runstate_settles(src) == "postmigrate"
    deadline = time.monotonic() + 10
    while dst.cmd("query-status")["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dst.pull_events(wait=0.2)
    resume = [e for e in dst.events if e["event"] == "RESUME"]
    stop = [e for e in src.events if e["event"] == "STOP"]

    # A different memfd on each side this time: RAM was copied over the socket.
    src_ino = os.stat(qg.find_ram_memfd(src.pid, size=RAM_BYTES)).st_ino
    dst_mem = qg.find_ram_memfd(dst.pid, size=RAM_BYTES)
    assert os.stat(dst_mem).st_ino != src_ino
    # The guest's own view of the switch-over, read before our verification stop adds a gap of its own.
    hb_after = qg.wait_for_heartbeat(dst_mem, timeout=10, min_seq=qg.read_heartbeat(dst_mem).seq + 1000)
    dst.cmd("stop")
    res = qg.verify_guest_memory(dst_mem, stopped=True)
    hb = res["heartbeat"]
    assert res["bad"] == 0 and res["stale"] == 0, res
    assert res["ok"] + res["in_progress"] == res["pages"] == hb.patterned_pages, res
    dst.cmd("cont")
    hb2 = qg.wait_for_heartbeat(dst_mem, timeout=10, min_seq=hb.seq + 1000)
    assert hb2.seq > hb.seq

    _report(
        "normal",
        accel=lab.accel,
        downtime_ms=info.get("downtime"),
        total_ms=info.get("total-time"),
        ram_transferred=info.get("ram", {}).get("transferred"),
        passes=info.get("ram", {}).get("dirty-sync-count"),
        mbps=info.get("ram", {}).get("mbps"),
        stop_to_resume_ms=(_ts(resume[0]) - _ts(stop[0])) * 1e3 if resume and stop else None,
        completed_ms=round((t_done - t0) * 1e3, 1),
        src_events=ev,
        pages_ok=res["ok"],
        guest_max_gap_ms=hb_after.max_gap_ms,
        guest_gaps_ms=[round(g[1] / hb_after.tsc_khz, 2) for g in hb_after.gaps[-4:]]
        if hb_after.tsc_khz
        else [],
    )
