"""Migration between emulated VMs, each mode end to end on real processes, in QEMU 10's order, with QEMU's texts."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from helpers import CPR_TRANSFER_SOURCE_EVENTS, unix

from labkit.host.hardware import VMConfig
from labkit.host.qmp_sync import QMPCommandError
from labkit.host.runners import spawn
from labkit.lab.engine import Lab, migrate
from labkit.qemu_syntax import GuestConfig, MiB

pytestmark = pytest.mark.timeout(90)

CPR_BLOCKER = (
    "Memory region {} is not compatible with CPR. share=on is required for memory-backend objects, "
    "and aux-ram-share=on is required."
)


def migration_events(events: list[dict], since_setup: bool = False) -> list[str]:
    """Event names in order; since_setup drops what came before the migration (the start-up RESUME)."""
    out = []
    for e in events:
        if e["event"] == "MIGRATION":
            out.append(f"MIGRATION {e['data']['status']}")
        elif e["event"] in ("STOP", "RESUME", "MIGRATION_PASS"):
            out.append(e["event"])
    if since_setup and "MIGRATION setup" in out:
        out = out[out.index("MIGRATION setup") :]
    return out


def collapse_passes(names: list[str]) -> list[str]:
    """Several MIGRATION_PASS in a row become one "MIGRATION_PASS+" (normal mode makes as many as it needs)."""
    out: list[str] = []
    for n in names:
        if n == "MIGRATION_PASS" and out and out[-1].startswith("MIGRATION_PASS"):
            out[-1] = "MIGRATION_PASS+"
        else:
            out.append(n)
    return out


@pytest.fixture
def source():
    m = spawn(VMConfig(name="src", ram=64 * MiB, guest=GuestConfig(dirty_rate=64 * MiB)))
    m.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    yield m
    m.shutdown()


def set_mode(m, mode):
    m.cmd("migrate-set-parameters", {"mode": mode})


def wait_status(m, statuses, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = m.cmd("query-migrate")
        if info.get("status", "none") in statuses:
            return info
        time.sleep(0.01)
    raise AssertionError(f"status stayed {info.get('status')}")


# -- end to end -------------------------------------------------------------------------------------------
def test_cpr_transfer_end_to_end():
    with Lab(mode="cpr-transfer", ram="128M", dirty_rate="64M") as lab:
        r = lab.run()
        src_events = migration_events(lab.src.cmd("x-labkit-events"), since_setup=True)
        dst_events = migration_events(lab.dst.cmd("x-labkit-events"))
    assert r.status == "completed", r.error
    assert r.guest_verified and r.verify["written"] > 0
    assert r.bytes["main"] < 64 * 1024 and r.bytes["cpr"] > 0
    assert r.states == {"source": "postmigrate", "destination": "running"}
    assert src_events == CPR_TRANSFER_SOURCE_EVENTS
    assert dst_events == ["RESUME"]  # its monitor opens after the source migrates: events were off
    ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
    assert ram0["source"].inode == ram0["destination"].inode
    assert ram0["source"].start != ram0["destination"].start
    assert ram0["source"].path == "/memfd:ram0 (deleted)"
    if os.geteuid() == 0:  # the same physical pages: compare the sampled pages both processes have faulted in
        both = [
            (a, b) for a, b in zip(ram0["source"].frames, ram0["destination"].frames, strict=True) if a and b
        ]
        assert both and all(a == b for a, b in both)
    assert r.query_migrate["ram"]["total"] == 0 and r.passes == 2
    assert r.pause_ms["events"] is not None and r.pause_ms["guest"] is not None


def test_normal_end_to_end_sends_every_page_touched():
    with Lab(mode="normal", ram="64M", dirty_rate="32M") as lab:
        r = lab.run()
        src_events = collapse_passes(migration_events(lab.src.cmd("x-labkit-events"), since_setup=True))
        dst_events = migration_events(lab.dst.cmd("x-labkit-events"))
        written = lab.dst.cmd("x-labkit-guest-stats")["pages-written"]
    assert r.status == "completed", r.error
    assert r.guest_verified and written > 0
    ram = r.query_migrate["ram"]
    assert ram["normal"] + ram["duplicate"] >= (64 * MiB) // 4096  # pass 1 covers every page
    assert src_events[:3] == ["MIGRATION setup", "MIGRATION_PASS", "MIGRATION active"]
    assert src_events[3:] in (
        ["MIGRATION_PASS+", "STOP", "MIGRATION device", "MIGRATION_PASS", "MIGRATION completed"],
        ["MIGRATION_PASS", "STOP", "MIGRATION device", "MIGRATION_PASS", "MIGRATION completed"],
        # QEMU's rule: a first pass that ends within 100 ms has no bandwidth estimate, so no bitmap sync
        ["STOP", "MIGRATION device", "MIGRATION_PASS", "MIGRATION completed"],
    )
    # the destination listened from start-up, before the lab could enable events there: setup is not seen
    assert dst_events == ["MIGRATION active", "RESUME", "MIGRATION completed"]
    mains = {m.side: m for m in r.mappings if m.block == "ram0"}
    assert mains["source"].inode != mains["destination"].inode
    if os.geteuid() == 0:
        assert mains["source"].frames != mains["destination"].frames


def test_cpr_reboot_saves_restarts_and_restores():
    r = migrate(mode="cpr-reboot", ram="64M", dirty_rate="32M")
    assert r.status == "completed", r.error
    assert r.guest_verified
    assert r.states == {"source": "postmigrate", "destination": "running"}


def test_cpr_reboot_file_backend_stays_in_place_with_x_ignore_shared():
    r = migrate(mode="cpr-reboot", ram="64M", memory_backend="file", dirty_rate="32M")
    assert r.status == "completed", r.error
    assert r.guest_verified
    assert r.query_migrate["ram"]["total"] < 64 * MiB  # ram0 stayed in its file


@pytest.mark.parametrize("mode", ["cpr-transfer", "normal"])
def test_defer_destination(mode):
    r = migrate(mode=mode, ram="64M", defer=True, dirty_rate="16M")
    assert r.status == "completed", r.error
    assert r.guest_verified


def test_destination_with_S_stays_paused(source, tmp_path):
    dst = spawn(
        VMConfig(name="dst", ram=64 * MiB, start_paused=True).with_incoming(f"unix:{tmp_path}/m.sock")
    )
    try:
        source.cmd("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        wait_status(source, ("completed",))
        wait_status(dst, ("completed",))
        assert dst.cmd("query-status")["status"] == "paused"
        assert dst.cmd("x-labkit-verify")["ok"]
    finally:
        dst.shutdown()


def test_paused_source_gives_paused_destination(source, tmp_path):
    source.cmd("stop")
    dst = spawn(VMConfig(name="dst", ram=64 * MiB).with_incoming(f"unix:{tmp_path}/m.sock"))
    try:
        source.cmd("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        wait_status(source, ("completed",))
        wait_status(dst, ("completed",))
        assert dst.cmd("query-status")["status"] == "paused"
        assert "STOP" not in migration_events(source.cmd("x-labkit-events"), since_setup=True)
    finally:
        dst.shutdown()


# -- the cpr channel on the wire --------------------------------------------------------------------------
def recv_cpr_state(conn: socket.socket):
    data, fds = b"", []
    while True:
        msg, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if not msg:
            return data, fds
        data += msg


def test_cpr_state_bytes_follow_qemus_format_and_carry_the_memfds(source, tmp_path):
    set_mode(source, "cpr-transfer")
    path = str(tmp_path / "cpr.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    try:
        source.cmd("migrate", {"channels": [unix(str(tmp_path / "main.sock")), unix(path, "cpr")]})
        conn, _ = listener.accept()
        data, fds = recv_cpr_state(conn)  # the source half-closed: we read to EOF
        try:
            assert data[:8] == b"QCPR\x00\x00\x00\x01"
            off, names = 8, []
            while data[off] == 1:
                (n,) = struct.unpack_from(">I", data, off + 1)
                name = data[off + 5 : off + 5 + n]
                assert name.endswith(b"\0")
                (fid,) = struct.unpack_from(">i", data, off + 5 + n)
                assert fid == 0 and data[off + 9 + n : off + 10 + n] == b" "
                names.append(name[:-1].decode())
                off += 10 + n
            assert data[off:] == b"\x00"
            blocks = [b["name"] for b in source.cmd("x-labkit-ram-blocks")]
            assert names == list(reversed(blocks))  # QEMU inserts at the head of its list
            assert len(fds) == len(names)
            src_inodes = {m.path: m.inode for m in source.maps()}
            for name, fd in zip(names, fds, strict=True):
                assert os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{name} (deleted)"
                assert os.fstat(fd).st_ino == src_inodes[f"/memfd:{name} (deleted)"]
            assert source.cmd("query-migrate")["status"] == "setup"
            assert source.cmd("query-status")["status"] == "running"  # the guest runs on meanwhile
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()  # the hang-up: the source connects main, finds nobody, and fails
        info = wait_status(source, ("failed",))
        assert "main.sock" in info["error-desc"]
        assert source.cmd("query-status")["status"] == "running"
        assert source.cmd("x-labkit-verify")["ok"]
    finally:
        listener.close()


def test_cancel_while_waiting_for_the_hang_up(source, tmp_path):
    set_mode(source, "cpr-transfer")
    path = str(tmp_path / "cpr.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    try:
        source.cmd("migrate", {"channels": [unix(str(tmp_path / "main.sock")), unix(path, "cpr")]})
        conn, _ = listener.accept()
        data, fds = recv_cpr_state(conn)
        for fd in fds:
            os.close(fd)
        source.cmd("migrate_cancel")
        assert source.cmd("query-migrate")["status"] == "cancelled"
        assert migration_events(source.cmd("x-labkit-events"))[-3:] == [
            "MIGRATION setup",
            "MIGRATION cancelling",
            "MIGRATION cancelled",
        ]
        assert source.cmd("query-status")["status"] == "running"
        conn.close()
    finally:
        listener.close()


def test_destination_killed_after_cpr_state_then_source_recovers(source, tmp_path):
    set_mode(source, "cpr-transfer")
    cfg = VMConfig(name="dst", ram=64 * MiB).with_incoming(
        f"unix:{tmp_path}/dead.sock", unix(str(tmp_path / "c.sock"), "cpr")
    )
    cfg.incoming[0] = "defer"  # it will never listen on main
    dst = spawn(cfg, connect=False)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(tmp_path / "c.sock") and time.monotonic() < deadline:
            time.sleep(0.01)
        source.cmd(
            "migrate",
            {"channels": [unix(str(tmp_path / "dead.sock")), unix(str(tmp_path / "c.sock"), "cpr")]},
        )
        dst.connect()  # it loaded CPR state and opened its monitor: now it dies
        dst.kill()
        info = wait_status(source, ("failed",))
        assert "Failed to connect" in info["error-desc"] or "dead.sock" in info["error-desc"]
        assert source.cmd("query-status")["status"] == "running"
        assert source.cmd("x-labkit-verify")["ok"]
    finally:
        dst.kill()


# -- blockers and bad channels ----------------------------------------------------------------------------
CPR_BLOCKER_RSDP = (
    "Memory region /rom@etc/acpi/rsdp is not compatible with CPR. share=on is required for memory-backend "
    "objects, and aux-ram-share=on is required."
)


def _refused(m, args, text, status="none"):
    with pytest.raises(QMPCommandError) as e:
        m.cmd("migrate", args)
    assert str(e.value) == text
    assert m.cmd("query-status")["status"] == "running"
    assert m.cmd("query-migrate").get("status", "none") == status  # QEMU answers {} before any migration


@pytest.mark.parametrize(
    "backend,share,aux,blocked",
    [
        ("ram", False, True, "ram0"),
        ("memfd", True, False, "/rom@etc/acpi/rsdp"),
        ("epc", None, True, "ram0"),
        ("none", None, True, "pc.ram"),
    ],
)
def test_cpr_blockers_with_qemus_text(tmp_path, backend, share, aux, blocked):
    cfg = VMConfig(ram=32 * MiB, memory_backend=backend, share=share, aux_ram_share=aux)
    with spawn(cfg) as m:
        set_mode(m, "cpr-transfer")
        text = CPR_BLOCKER.format(blocked)
        assert text in m.cmd("query-migrate")["blocked-reasons"]
        _refused(m, {"channels": [unix(f"{tmp_path}/m"), unix(f"{tmp_path}/c", "cpr")]}, text)


@pytest.mark.parametrize(
    "channels,text,status",
    [
        ([unix("/x/m")], "missing 'cpr' migration channel", "none"),
        (
            [
                unix("/x/m"),
                {
                    "channel-type": "cpr",
                    "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"},
                },
            ],
            "bad cpr channel address; must be unix",
            "failed",
        ),
        (
            [
                {"channel-type": "main", "addr": {"transport": "file", "filename": "/x/f", "offset": 0}},
                unix("/x/c", "cpr"),
            ],
            "Migration requires streamable transport (eg unix)",
            "none",
        ),
        (
            [unix("/x/m"), unix("/x/c", "cpr"), unix("/x/d", "cpr")],
            "Channel list has more than one cpr entry",
            "none",
        ),
        ([unix("/x/c", "cpr")], "Channel list has no main entry", "none"),
        (
            [unix("/x/m"), unix("/nonexistent-dir/cpr.sock", "cpr")],
            "Failed to connect to '/nonexistent-dir/cpr.sock': No such file or directory",
            "failed",
        ),
    ],
)
def test_bad_channels_with_qemus_text(source, channels, text, status):
    set_mode(source, "cpr-transfer")
    _refused(source, {"channels": channels}, text, status)
    assert source.cmd("x-labkit-verify")["ok"]


def test_postcopy_refused_under_cpr_after_the_blockers(source):
    """migrate_prepare(): migration_is_blocked() first, then "Cannot use %s with CPR" (QEMU 10.0.2's order)."""
    set_mode(source, "cpr-transfer")
    source.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    _refused(source, {"channels": [unix("/x/m"), unix("/x/c", "cpr")]}, "Cannot use postcopy with CPR")
    cfg = VMConfig(name="blocked", ram=32 * MiB, aux_ram_share=False)
    with spawn(cfg) as m:
        set_mode(m, "cpr-transfer")
        m.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        _refused(m, {"channels": [unix("/x/m"), unix("/x/c", "cpr")]}, CPR_BLOCKER_RSDP)


def test_inet_port_0_is_not_checked_under_cpr(source):
    """QEMU 10.0.2 documents "the port cannot be 0" but checks nothing: the cpr channel is tried first."""
    set_mode(source, "cpr-transfer")
    inet0 = {
        "channel-type": "main",
        "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "0"},
    }
    _refused(source, {"channels": [inet0, unix("/x/c", "cpr")]},
             "Failed to connect to '/x/c': No such file or directory", "failed")  # fmt: skip


def test_parameters_and_capabilities(source):
    with pytest.raises(QMPCommandError) as e:
        set_mode(source, "cpr-bogus")
    assert str(e.value) == "Parameter 'mode' does not accept value 'cpr-bogus'"
    source.cmd(
        "migrate-set-parameters", {"mode": "cpr-transfer", "downtime-limit": 50, "max-bandwidth": 1 << 30}
    )
    p = source.cmd("query-migrate-parameters")
    assert (p["mode"], p["downtime-limit"], p["max-bandwidth"]) == ("cpr-transfer", 50, 1 << 30)
    caps = {c["capability"]: c["state"] for c in source.cmd("query-migrate-capabilities")}
    assert caps["events"] is True and caps["x-ignore-shared"] is False
    with pytest.raises(QMPCommandError) as e:
        source.cmd("migrate", {})
    assert str(e.value) == "need either 'uri' or 'channels' argument"


def test_migrate_incoming_rules(tmp_path):
    cfg = VMConfig(name="d", ram=32 * MiB).with_incoming("defer")
    with spawn(cfg) as d:
        assert d.cmd("query-status")["status"] == "inmigrate"
        with pytest.raises(QMPCommandError) as e:
            d.cmd("migrate-incoming", {"channels": [unix(f"{tmp_path}/m"), unix(f"{tmp_path}/c", "cpr")]})
        assert str(e.value) == "Channel list must have only one entry, for type 'main'"
        d.cmd("migrate-incoming", {"uri": f"unix:{tmp_path}/m"})
        with pytest.raises(QMPCommandError) as e:
            d.cmd("migrate-incoming", {"uri": f"unix:{tmp_path}/m2"})
        assert str(e.value) == "The incoming migration has already been started"
    with spawn(VMConfig(name="e", ram=32 * MiB)) as e2:
        with pytest.raises(QMPCommandError) as e:
            e2.cmd("migrate-incoming", {"uri": f"unix:{tmp_path}/m3"})
        assert str(e.value) == "'-incoming' was not specified on the command line"


# -- pre-copy behaviour -----------------------------------------------------------------------------------
def test_guest_faster_than_the_link_does_not_converge_and_cancel_recovers(tmp_path):
    src = spawn(VMConfig(name="s", ram=32 * MiB, guest=GuestConfig(dirty_rate=256 * MiB, pattern="random")))
    dst = spawn(VMConfig(name="d", ram=32 * MiB).with_incoming(f"unix:{tmp_path}/m.sock"))
    try:
        src.cmd("migrate-set-parameters", {"max-bandwidth": 16 * MiB, "downtime-limit": 10})
        src.cmd("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        deadline = time.monotonic() + 30
        while src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        info = src.cmd("query-migrate")
        assert info["status"] == "active"
        assert info["ram"]["dirty-sync-count"] >= 3
        assert info["expected-downtime"] > 10  # what is left does not fit in the downtime limit
        assert info["ram"]["dirty-pages-rate"] > 0
        # each pass finds more dirty than the link could send within the limit
        assert info["ram"]["remaining"] > 16 * MiB * 10 / 1000
        src.cmd("migrate_cancel")
        wait_status(src, ("cancelled",))
        assert src.cmd("query-status")["status"] == "running"
        assert src.cmd("x-labkit-verify")["ok"]
    finally:
        dst.kill()
        src.shutdown()


def test_pause_before_switchover_and_migrate_continue(source, tmp_path):
    dst = spawn(VMConfig(name="d", ram=64 * MiB).with_incoming(f"unix:{tmp_path}/m.sock"))
    try:
        source.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
        )
        source.cmd("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        wait_status(source, ("pre-switchover",))
        assert source.cmd("query-status")["status"] == "finish-migrate"
        with pytest.raises(QMPCommandError):
            source.cmd("migrate-continue", {"state": "active"})
        source.cmd("migrate-continue", {"state": "pre-switchover"})
        wait_status(source, ("completed",))
        wait_status(dst, ("completed",))
        assert dst.cmd("x-labkit-verify")["ok"]
    finally:
        dst.shutdown()
