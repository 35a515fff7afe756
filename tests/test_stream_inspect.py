"""`labkit stream-inspect` on main streams written by real QEMU 10 and by labkit-vm, and the emulator's loader
refusing a real QEMU stream at the first device section it does not model.

The QEMU tests run qemu-system-x86_64 10.0.2 with labkit's tiny guest, `migrate` to `file:` (normal mode) or
to a listening socket that plays the destination (cpr-transfer), and compare every decoded figure with what
QEMU's own query-migrate reported. They skip where QEMU 10 is absent.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import unix, wait_for

from labkit.host.hardware import VMConfig
from labkit.host.runners import qemu_guest as qg
from labkit.host.runners import spawn
from labkit.host.runners.qemu import default_bios, parse_ramblocks, qemu_missing
from labkit.measure.stream_inspect import inspect_stream, main, read_vmdesc_tail
from labkit.qemu_syntax import GuestConfig, MiB
from labkit.vm.migration import stream as s
from labkit.vm.migration.vmstate import q35_savevm_handlers

pytestmark = pytest.mark.timeout(180)

RAM = "64M"
RAM_BYTES = 64 << 20
_MISSING = qemu_missing()
needs_qemu = [pytest.mark.qemu, pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")]


# -- running either backend -------------------------------------------------------------------------------
def _wait_completed(cmd: Callable[..., dict], timeout: float = 90.0) -> dict:
    return wait_for(
        lambda: (i := cmd("query-migrate"))["status"] in ("completed", "failed") and i,
        "the migration to finish",
        timeout=timeout,
    )


class _RealQemu:
    """qemu-system-x86_64 with the tiny guest writing its RAM, QMP through qemu.qmp's legacy client."""

    def __init__(self, run_dir: Path, serial: bool = False):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        qmp = str(run_dir / "q.qmp")
        argv = qg.qemu_argv(
            qg.build_guest(),
            RAM,
            qmp=qmp,
            bios=default_bios(),
            append=f"dirty-rate={1 * MiB}",
            serial=f"file:{run_dir / 'serial.log'}" if serial else None,
        )
        self.log = open(run_dir / "qemu.log", "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.mon = None
        try:
            wait_for(
                lambda: os.path.exists(qmp) or self.proc.poll() is not None, "QEMU's monitor", timeout=30
            )
            self.mon = QEMUMonitorProtocol(qmp)
            self.mon.connect()
            mem = qg.find_ram_memfd(self.proc.pid, size=RAM_BYTES)
            qg.wait_for_heartbeat(mem, timeout=60, min_seq=64)
        except BaseException:
            self.close()
            raise

    def cmd(self, name: str, args: dict | None = None) -> dict:
        return self.mon.cmd(name, **(args or {}))

    def close(self) -> None:
        if self.mon is not None:
            with contextlib.suppress(Exception):
                self.mon.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


def _migrate_to_file(cmd: Callable[..., dict], path: Path) -> dict:
    cmd("migrate-set-parameters", {"max-bandwidth": 10 << 30})
    cmd("migrate", {"uri": f"file:{path}"})
    info = _wait_completed(cmd)
    assert info["status"] == "completed", info
    return info


def _cpr_transfer_main_stream(cmd: Callable[..., dict], run_dir: Path) -> tuple[bytes, dict]:
    """Play a cpr-transfer destination: take the CPR state (closing the fds it carries), hang up, accept the
    main channel and keep every byte the source sends on it."""
    cpr_path, main_path = str(run_dir / "cpr.sock"), str(run_dir / "main.sock")
    with socket.socket(socket.AF_UNIX) as cpr_l, socket.socket(socket.AF_UNIX) as main_l:
        cpr_l.bind(cpr_path)
        cpr_l.listen(1)
        main_l.bind(main_path)
        main_l.listen(1)
        cpr_l.settimeout(30)
        main_l.settimeout(30)
        cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        cmd("migrate", {"channels": [unix(main_path), unix(cpr_path, "cpr")]})
        conn, _ = cpr_l.accept()
        with conn:
            while True:
                data, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 64))
                for _, _, fds in anc:
                    for fd in array.array("i", fds[: len(fds) - len(fds) % 4]):
                        os.close(fd)
                if not data:
                    break
        main, _ = main_l.accept()
        main.settimeout(30)
        got = bytearray()
        with main:
            while chunk := main.recv(1 << 20):
                got += chunk
    info = _wait_completed(cmd)
    assert info["status"] == "completed", info
    return bytes(got), info


def _emulated(serial_log: Path | None = None):
    return spawn(
        VMConfig(name="src", ram=64 * MiB, guest=GuestConfig(dirty_rate=1 * MiB), serial_path=serial_log)
    )


@pytest.fixture(scope="module")
def qemu_normal(tmp_path_factory) -> tuple[Path, dict]:
    """A normal-mode stream real QEMU wrote to a file, and its query-migrate answer."""
    if _MISSING is not None:
        pytest.skip(_MISSING)
    run_dir = tmp_path_factory.mktemp("qemu-normal")
    vm = _RealQemu(run_dir)
    try:
        path = run_dir / "stream.bin"
        return path, _migrate_to_file(lambda n, a=None: vm.cmd(n, a), path)
    finally:
        vm.close()


# -- the checks both backends' streams pass ---------------------------------------------------------------
def _check_layout(rep, info: dict, mode: str, serial: bool) -> None:
    """QEMU 10's layout, section by section, with page counts equal to the source's query-migrate."""
    kinds = [x["kind"] for x in rep.sections]
    assert kinds[:2] == ["CONFIGURATION", "START"] and kinds[-2:] == ["EOF", "VMDESCRIPTION"], kinds
    assert rep.machine == s.Q35_MACHINE_NAME
    i_cmd = kinds.index("COMMAND")
    assert rep.sections[i_cmd]["idstr"] == "0xb"  # MIG_CMD_SWITCHOVER_START, then the last RAM section
    assert kinds[i_cmd + 1] == "END" and set(kinds[2:i_cmd]) <= {"PART"}
    assert set(kinds[i_cmd + 2 : -2]) == {"FULL"}
    ram = [x for x in rep.sections if x["idstr"] == "ram"]
    assert {x["section_id"] for x in ram} == {1} and ram[0]["version_id"] == 4
    # QEMU's section ids: the index of each handler in its registration list
    ids = {(h[0], h[1]): n for n, h in enumerate(q35_savevm_handlers(serial))}
    for x in rep.sections:
        if x["kind"] == "FULL":
            assert x["section_id"] == ids[(x["idstr"], x["instance_id"])], x
    assert rep.ram_blocks and rep.ram_blocks[0]["name"] == "ram0"  # listed in cpr-transfer too
    if mode == "cpr-transfer":
        assert len(ram) == 2 and rep.pages == {"normal": 0, "zero": 0}
    # every page QEMU counted as sent: normal pages with their data, zero pages as a header and a fill byte
    assert rep.pages == {"normal": info["ram"]["normal"], "zero": info["ram"]["duplicate"]}
    full = [(x["idstr"], x["instance_id"]) for x in rep.sections if x["kind"] == "FULL"]
    assert [(d["idstr"], d["instance_id"]) for d in rep.devices] == full
    assert [(d["name"], d["instance_id"]) for d in rep.vmdesc["devices"]] == full
    assert (
        rep.vmdesc["page_size"] == s.PAGE_SIZE and rep.vmdesc["configuration"]["vmsd_name"] == "configuration"
    )
    assert sum(x["size"] for x in rep.sections) + 8 == rep.bytes  # 8: magic and version


# -- real QEMU ---------------------------------------------------------------------------------------------
@pytest.mark.qemu
def test_real_qemu_normal_stream_decodes_with_qemus_page_counts(qemu_normal, capsys):
    path, info = qemu_normal
    rep = inspect_stream(str(path))
    _check_layout(rep, info, "normal", serial=False)
    assert rep.bytes == path.stat().st_size == info["ram"]["transferred"]  # QEMU counts the whole channel
    assert len(rep.devices) >= 25  # timer, cpu_common, cpu, apic, mch, ICH9LPC, ... globalstate
    assert rep.pages["normal"] > 0 and rep.pages["zero"] > 0
    # the CLI prints the same report, as text and as JSON
    assert main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pages"] == rep.pages and len(out["sections"]) == len(rep.sections)
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "globalstate" in text and f"pages: {rep.pages['normal']} normal, {rep.pages['zero']} zero" in text


@pytest.mark.qemu
@pytest.mark.parametrize("serial", [False, True], ids=["no-serial", "serial"])
def test_real_qemu_cpr_transfer_main_stream(tmp_path, serial):
    if _MISSING is not None:
        pytest.skip(_MISSING)
    vm = _RealQemu(tmp_path, serial=serial)
    try:
        data, info = _cpr_transfer_main_stream(lambda n, a=None: vm.cmd(n, a), tmp_path)
    finally:
        vm.close()
    path = tmp_path / "main.bin"
    path.write_bytes(data)
    rep = inspect_stream(str(path))
    _check_layout(rep, info, "cpr-transfer", serial=serial)
    assert ("serial", 0) in {(d["idstr"], d["instance_id"]) for d in rep.devices} if serial else True


@pytest.mark.qemu
def test_emulator_sections_match_qemus_ids_versions_and_exact_layouts(qemu_normal, tmp_path):
    """Every section the emulator sends has QEMU's id, idstr, instance and version; timer and globalstate
    also QEMU's field layout, so their sizes are equal."""
    qpath, _ = qemu_normal
    qemu = {
        (x["idstr"], x["instance_id"]): x for x in inspect_stream(str(qpath)).sections if x["kind"] == "FULL"
    }
    vm = _emulated()
    try:
        info = _migrate_to_file(vm.cmd, tmp_path / "emu.bin")
    finally:
        vm.kill()
    emu = inspect_stream(str(tmp_path / "emu.bin"))
    for x in emu.sections:
        if x["kind"] == "FULL":
            q = qemu[(x["idstr"], x["instance_id"])]
            assert (x["section_id"], x["version_id"]) == (q["section_id"], q["version_id"]), x
            if x["idstr"] in ("timer", "globalstate"):
                assert x["size"] == q["size"]
    assert emu.pages == {"normal": info["ram"]["normal"], "zero": info["ram"]["duplicate"]}


@pytest.mark.qemu
def test_labkit_vm_refuses_a_real_qemu_stream_at_the_first_section_it_does_not_model(qemu_normal, tmp_path):
    """A labkit-vm destination loads QEMU's RAM pages and its timer section, then stops with QEMU's one-line
    error naming cpu_common. Only the RAM START block list is rewritten to the destination's own blocks."""
    qpath, _ = qemu_normal
    data = qpath.read_bytes()
    start = next(x for x in inspect_stream(str(qpath)).sections if x["kind"] == "START")
    probe = spawn(VMConfig(name="probe", ram=64 * MiB).with_incoming("defer"))
    try:
        blocks = [(b["name"], b["size"]) for b in probe.cmd("x-labkit-ram-blocks")]
    finally:
        probe.kill()
    body = struct.pack(">Q", sum(n for _, n in blocks) | s.RAM_SAVE_FLAG_MEM_SIZE)
    body += b"".join(bytes([len(n)]) + n.encode() + struct.pack(">Q", size) for n, size in blocks)
    head = data[start["offset"] : start["offset"] + 1 + 4 + 4 + 4 + 4]  # type, id, "ram", instance, version
    section = head + body + struct.pack(">Q", s.RAM_SAVE_FLAG_EOS) + b"\x7e" + struct.pack(">I", 1)
    spliced = data[: start["offset"]] + section + data[start["offset"] + start["size"] :]
    path = tmp_path / "from-qemu.bin"
    path.write_bytes(spliced)
    dst = spawn(VMConfig(name="dst", ram=64 * MiB).with_incoming(f"file:{path}"))
    try:
        rc = dst.wait(60)
        lines = [ln for ln in dst.log().splitlines() if ln.strip()]
    finally:
        dst.kill()
    assert rc == 1 and lines == [  # QEMU's error_report() of the fault, then its fatal line with the errno
        "labkit-vm: Unknown savevm section or instance 'cpu_common' 0. Make sure that your current VM setup "
        "matches your saved VM setup, including any hotplugged devices",
        "labkit-vm: load of migration failed: Invalid argument",
    ], (rc, lines)


# -- the emulator alone ------------------------------------------------------------------------------------
@pytest.mark.parametrize("serial", [False, True], ids=["no-serial", "serial"])
def test_emulator_normal_stream_decodes_like_qemus(tmp_path, serial):
    vm = _emulated(tmp_path / "serial.log" if serial else None)
    try:
        info = _migrate_to_file(vm.cmd, tmp_path / "emu.bin")
    finally:
        vm.kill()
    rep = inspect_stream(str(tmp_path / "emu.bin"))
    _check_layout(rep, info, "normal", serial=serial)
    names = [d["idstr"] for d in rep.devices]
    assert names == ["timer", "cpu", *(["serial"] if serial else []), "globalstate"]
    assert read_vmdesc_tail(str(tmp_path / "emu.bin")) == rep.vmdesc


def test_emulator_cpr_transfer_main_stream_lists_the_ignored_blocks(tmp_path):
    vm = _emulated()
    try:
        # ram_save_setup() lists the blocks in ram_list order, which x-query-ramblock shows
        blocks = [b["name"] for b in parse_ramblocks(vm.cmd("x-query-ramblock")["human-readable-text"])]
        data, info = _cpr_transfer_main_stream(vm.cmd, tmp_path)
    finally:
        vm.kill()
    path = tmp_path / "main.bin"
    path.write_bytes(data)
    rep = inspect_stream(str(path))
    _check_layout(rep, info, "cpr-transfer", serial=False)
    assert [b["name"] for b in rep.ram_blocks] == blocks


def test_inspector_refuses_bad_files_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"QEVX\0\0\0\3")
    assert main([str(bad)]) == 1
    assert capsys.readouterr().err == "labkit stream-inspect: Not a migration stream\n"
    assert main([str(tmp_path / "missing.bin")]) == 1
    assert capsys.readouterr().err.startswith("labkit stream-inspect: No such file or directory")
    # a device section the vmdesc does not describe cannot be sized: refused, named
    buf = bytearray()

    class Sink:
        def write(self, b):
            buf.extend(b)
            return len(b)

    f = s.QEMUFileOut(Sink())
    s.qemu_savevm_state_header(f)
    s.ram_save_setup(f, [("pc.ram", s.PAGE_SIZE)])
    s.ram_save_complete_end(f)
    f.put_bytes(b"\x04" + struct.pack(">I", 3) + b"\x0acpu_common" + struct.pack(">II", 0, 1) + bytes(8))
    f.put_bytes(b"\x7e" + struct.pack(">I", 3))
    s.qemu_savevm_state_end(f)
    bad.write_bytes(bytes(buf))
    assert main([str(bad)]) == 1
    assert "section 'cpu_common' 0 is not in the vmdesc" in capsys.readouterr().err
