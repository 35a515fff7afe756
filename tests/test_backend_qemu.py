"""The qemu backend: the Lab's three modes on real QEMU 10 with labkit's guest, judged from outside.

Each run checks what the emulator's runs check: final runstates, QEMU's event order, bytes per channel,
the memfds and mappings from /proc, the pause three ways, and guest memory verified through the memfd.
Skipped where qemu-system-x86_64 >= 10 is absent (scripts/install-qemu installs it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import CPR_TRANSFER_SOURCE_EVENTS

from labkit.host.hardware import VMConfig
from labkit.host.machine import VMStartError
from labkit.host.runners import spawn
from labkit.host.runners.qemu import (
    QemuRunner,
    parse_ramblocks,
    qemu_argv,
    qemu_missing,
    wall_to_monotonic_ns,
)
from labkit.lab.engine import Lab
from labkit.qemu_syntax import GuestConfig, MiB

_MISSING = qemu_missing()
pytestmark = [pytest.mark.qemu, pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")]


def migration_events(events: list[dict]) -> list[str]:
    """From the source's MIGRATION setup on: "MIGRATION <status>", STOP, RESUME, MIGRATION_PASS."""
    out = []
    for e in events:
        if e["event"] == "MIGRATION":
            out.append(f"MIGRATION {e['data']['status']}")
        elif e["event"] in ("STOP", "RESUME", "MIGRATION_PASS"):
            out.append(e["event"])
    return out[out.index("MIGRATION setup") :] if "MIGRATION setup" in out else out


def check_result_fields(r, dst_events: list[str]) -> None:
    """The fields a Result carries for either backend."""
    assert set(r.pause_ms) == {"reported", "events", "guest"}
    assert isinstance(r.pause_ms["reported"], int)
    if "RESUME" in dst_events:
        assert r.pause_ms["events"] > 0
    else:  # the destination resumed before its monitor could be connected (rare; docs/conformance.md)
        assert r.pause_ms["events"] is None
    if r.pause_ms["guest"] is None:  # unavailable: the Result says why
        assert any(n.startswith("guest pause unavailable: ") for n in r.notes), r.notes
    assert r.total_ms is not None and r.passes >= 2
    assert r.bytes["main"] > 0 and "cpr" in r.bytes
    assert r.guest_verified is True and r.verify["ok"] and r.verify["bad"] == 0 and r.verify["stale"] == 0
    assert r.verify["written"] > 0
    kinds = {(t.side, t.kind) for t in r.timeline}
    assert ("source", "STOP") in kinds and ("lab", "phase") in kinds
    assert (("destination", "RESUME") in kinds) == ("RESUME" in dst_events)


# -- argv -------------------------------------------------------------------------------------------------
def test_every_vmconfig_field_renders_to_qemus_options():
    guest = "/x/guest.elf"
    cfg = VMConfig(name="src", ram=128 * MiB, guest=GuestConfig(dirty_rate=64 * MiB), serial_path="/x/s")
    argv = qemu_argv(cfg, "/x/q.sock", accel="tcg", bios=None, binary="/bin/qemu", guest=guest)
    assert argv[:3] == ["/bin/qemu", "-accel", "tcg"]
    assert argv[3:] == [
        *cfg.common_argv("/x/q.sock"),
        "-kernel",
        guest,
        "-append",
        f"dirty-rate={64 * MiB}",
    ]
    joined = " ".join(argv)
    assert "-object memory-backend-memfd,id=ram0,size=128M,share=on" in joined
    assert "-machine q35,aux-ram-share=on,memory-backend=ram0" in joined
    assert "-serial file:/x/s" in joined and "-qmp unix:/x/q.sock,server=on,wait=off" in joined

    def opts(**kw):
        return qemu_argv(VMConfig(**kw), "/q", accel="kvm", bios="/b.rom", binary="q", guest=guest)

    assert "memory-backend-ram,id=ram0,size=256M,share=off" in opts(memory_backend="ram", share=False)
    assert "memory-backend-file,id=ram0,size=256M,share=on,mem-path=/m" in opts(
        memory_backend="file", mem_path="/m"
    )
    assert "memory-backend-epc,id=ram0,size=256M" in opts(memory_backend="epc")
    none = opts(memory_backend="none", aux_ram_share=False)
    assert "-object" not in none and "q35,aux-ram-share=off" in none
    assert "memory-backend-memfd,id=ram0,size=256M" in opts(share=None)
    dst = VMConfig(start_paused=True).with_incoming("defer", {"channel-type": "cpr"})
    a = qemu_argv(dst, "/q", accel="kvm", binary="q", guest=guest, bios="/b.rom")
    assert a[a.index("-incoming") : a.index("-incoming") + 4] == [
        "-incoming",
        "defer",
        "-incoming",
        '{"channel-type":"cpr"}',
    ]
    assert "-S" in a and a[a.index("-bios") + 1] == "/b.rom" and a[-1] == "dirty-rate=0"
    with pytest.raises(ValueError, match="x-hold"):
        qemu_argv(VMConfig(holds=["loaded"]), "/q", guest=guest)
    with pytest.raises(ValueError, match="sequential"):
        qemu_argv(VMConfig(guest=GuestConfig(pattern="random")), "/q", guest=guest)


def test_ramblock_table_and_event_clock():
    text = (
        "              Block Name    PSize              Offset               Used              Total"
        "                HVA  RO\n"
        "                    ram0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000"
        " 0x00007fcea3fff000  rw\n"
        "    /rom@etc/acpi/tables    4 KiB  0x0000000010080000 0x0000000000020000 0x0000000000200000"
        " 0x00007fcea3a00000  ro\n"
    )
    blocks = parse_ramblocks(text)
    assert [(b["name"], b["size"], b["host-addr"], b["readonly"]) for b in blocks] == [
        ("ram0", 256 * MiB, 0x7FCEA3FFF000, False),
        ("/rom@etc/acpi/tables", 0x20000, 0x7FCEA3A00000, True),
    ]
    now_wall, now_mono = time.time_ns(), time.monotonic_ns()
    ts = {"seconds": now_wall // 10**9, "microseconds": now_wall % 10**9 // 1000}
    assert abs(wall_to_monotonic_ns(ts) - now_mono) < 50_000_000  # same instant, within NTP slew


# -- one real QEMU ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_vm_that_does_not_start_is_named_in_qemus_words_without_the_trace_time(tmp_path):
    """The qemu backend runs QEMU with `-msg timestamp=on` (for its trace log), which puts an ISO time in
    front of every stderr line; the reason VMStartError gives is the line as QEMU prints it by default."""
    (tmp_path / "vm").mkdir(mode=0o700)
    with pytest.raises(VMStartError) as e:
        spawn(VMConfig(ram=32 * MiB, memory_backend="epc"), "qemu", run_dir=str(tmp_path / "vm"))
    log = (tmp_path / "vm" / "vm.log").read_text()
    assert log.startswith("20") and "Z qemu-system-x86_64: invalid object type: memory-backend-epc" in log
    assert str(e.value) == "the vm VM exited: qemu-system-x86_64: invalid object type: memory-backend-epc"


@pytest.mark.timeout(60)
def test_guest_stats_see_a_stop_as_a_gap_since_reset():
    runner = QemuRunner()
    with spawn(VMConfig(name="g", ram=64 * MiB), backend="qemu") as m:
        runner.reset_gap(m)  # waits for the guest to run
        m.cmd("stop")
        time.sleep(0.1)
        m.cmd("cont")
        seq = runner.read_heartbeat(m).seq
        deadline = time.monotonic() + 10
        while runner.read_heartbeat(m).seq < seq + 100:  # it ran on after cont, so it logged the gap
            assert time.monotonic() < deadline, "the guest never wrote a page after cont"
            time.sleep(0.01)
        s = runner.guest_stats(m)
        assert s["heartbeat-seq"] > 0 and s["pages-written"] == s["heartbeat-seq"]
        assert s["bytes-written"] == 4096 * s["heartbeat-seq"]
        if s["accel"] == "kvm":
            # KVM's TSC runs on while stopped: the guest sees the stop (its TSC calibration under nested KVM is
            # rough, so allow for it)
            assert s["max-gap-ns"] >= 50_000_000
        else:
            assert s["max-gap-ns"] is None and "TCG" in s["max-gap-why"]
        v = runner.verify(m)
        assert v["ok"], v
        assert m.cmd("query-status")["status"] == "running"  # verify stopped it and let it run on
        blocks = {b["name"]: b for b in runner.ram_blocks(m)}
        assert blocks["ram0"]["size"] == 64 * MiB
        assert blocks["ram0"]["path"] == "/memfd:memory-backend-memfd (deleted)"
        assert {"pc.bios", "pc.rom", "/rom@etc/acpi/rsdp"} <= set(blocks)


@pytest.mark.timeout(60)
def test_paced_guest_sees_a_stop_inside_its_pacing_wait():
    runner = QemuRunner()
    cfg = VMConfig(name="p", ram=64 * MiB, memory_backend="ram", share=False, guest=GuestConfig(16 * MiB))
    with spawn(cfg, backend="qemu") as m:
        runner.reset_gap(m)
        m.cmd("stop")
        time.sleep(0.1)
        m.cmd("cont")
        time.sleep(0.3)
        s = runner.guest_stats(m)
        assert s["dirty-rate"] == 16 * MiB
        if s["accel"] == "kvm":
            assert s["max-gap-ns"] is not None and s["max-gap-ns"] >= 50_000_000, s
        v = runner.verify(m)  # private RAM: read through /proc/PID/mem while stopped
        assert v["ok"] and "/mem" in v["read-through"], v


@pytest.mark.timeout(60)
def test_qemu_dies_with_the_process_that_spawned_it():
    code = (
        "import sys, time\n"
        "from labkit.host.hardware import VMConfig\n"
        "from labkit.host.machine import VMStartError\n"
        "from labkit.host.runners import spawn\n"
        "m = spawn(VMConfig(name='orphan', ram=32 << 20), backend='qemu')\n"
        "print(m.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        qemu_pid = int(parent.stdout.readline())
        assert os.path.exists(f"/proc/{qemu_pid}")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu_pid}/exe") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{qemu_pid}/exe"), "QEMU outlived its parent"


# -- the Lab, each mode -----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_lab_cpr_transfer_on_qemu_shares_the_memfd():
    with Lab(backend="qemu", mode="cpr-transfer", ram="128M") as lab:
        snaps = []
        while lab.index < len(lab.phases):
            snaps.append(lab.step())
        r = lab.run()
        src_events = migration_events(lab.runner.events(lab.src))
        dst_events = migration_events(lab.runner.events(lab.dst))
    assert r.status == "completed", r.error
    check_result_fields(r, dst_events)
    assert r.states == {"source": "postmigrate", "destination": "running"}
    assert src_events == CPR_TRANSFER_SOURCE_EVENTS
    # its monitor opened after migrate, and the lab connected before the main channel opened (-incoming
    # defer, the lab's choice on real QEMU): RESUME is always seen
    assert lab.scenario.defer is True and dst_events == ["RESUME"]
    assert r.bytes["main"] < 1 << 20 and r.bytes["cpr"] is None  # QEMU does not count its cpr channel
    ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
    assert ram0["source"].inode == ram0["destination"].inode
    assert ram0["source"].start != ram0["destination"].start
    assert ram0["source"].path == ram0["destination"].path == "/memfd:memory-backend-memfd (deleted)"
    # every snapshot saw both sides; once loaded, the destination holds the source's memfd
    assert [s.phase for s in snaps] == lab.phases
    last = snaps[-1]
    src_fds = {f["name"]: f["inode"] for f in last.fds["source"]}
    dst_fds = {f["name"]: f["inode"] for f in last.fds["destination"]}
    assert dst_fds["memory-backend-memfd"] == src_fds["memory-backend-memfd"]
    assert snaps[0].states["source"] == "running"
    assert snaps[1].states["destination"] == "(no monitor yet)"
    assert last.states == {"source": "postmigrate", "destination": "running"}


@pytest.mark.timeout(90)
def test_lab_normal_on_qemu_copies_every_page():
    with Lab(backend="qemu", mode="normal", ram="128M") as lab:
        r = lab.run()
        src_events = migration_events(lab.runner.events(lab.src))
        dst_events = migration_events(lab.runner.events(lab.dst))
    assert r.status == "completed", r.error
    check_result_fields(r, dst_events)
    assert r.states == {"source": "postmigrate", "destination": "running"}
    assert src_events[:3] == ["MIGRATION setup", "MIGRATION_PASS", "MIGRATION active"]
    assert src_events[-4:] == ["STOP", "MIGRATION device", "MIGRATION_PASS", "MIGRATION completed"]
    assert set(src_events[3:-4]) <= {"MIGRATION_PASS"}
    assert dst_events == ["MIGRATION active", "RESUME", "MIGRATION completed"]
    ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
    assert ram0["source"].inode != ram0["destination"].inode
    assert r.query_migrate["ram"]["transferred"] == r.bytes["main"]


@pytest.mark.timeout(90)
def test_lab_cpr_reboot_on_qemu_restores_from_the_file():
    with Lab(backend="qemu", mode="cpr-reboot", ram="64M") as lab:
        r = lab.run()
        dst_events = migration_events(lab.runner.events(lab.dst))
    assert r.status == "completed", r.error
    check_result_fields(r, dst_events)
    assert r.states == {"source": "postmigrate", "destination": "running"}
    assert dst_events == ["MIGRATION setup", "MIGRATION active", "RESUME", "MIGRATION completed"]
    assert {m.side for m in r.mappings if m.block == "ram0"} == {"source", "destination"}


@pytest.mark.timeout(90)
def test_cli_memory_backend_ram_fails_with_qemus_text(capsys):
    from labkit.cli.main import main

    rc = main(["migrate", "--backend", "qemu", "--ram", "64M", "--memory-backend", "ram", "--share", "off"]
              + ["--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1
    assert (
        '"error": "Memory region ram0 is not compatible with CPR. share=on is required for memory-backend '
        'objects, and aux-ram-share=on is required."' in out
    )
    assert '"guest_verified": true' in out  # the source kept its guest, intact, and running
