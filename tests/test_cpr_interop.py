"""The cpr channel between real QEMU 10 and labkit-vm, both ways, with the README's command line.

Each test starts real qemu-system-x86_64 and labkit-vm with the same argv (the README's `labkit-vm` example,
with and without -nodefaults) and judges them from outside: QEMU's own `x-query-ramblock`, the CPR bytes a
listener receives, /proc/PID/maps and /proc/PID/fd. Nothing here is a recorded figure: QEMU is asked every time.
Skipped where QEMU 10 is absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading

import pytest
from helpers import unix, wait_for

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.procfs import read_fds, read_maps
from labkit.host.runners.emulated import EmulatedRunner
from labkit.host.runners.qemu import parse_ramblocks, qemu_missing
from labkit.host.runners.qemu_guest import qemu_binary
from labkit.vm.migration.cpr import CprFd, cpr_state_save
from labkit.vm.migration.cpr_inspect import cpr_inspect_listen

_MISSING = qemu_missing()
pytestmark = [pytest.mark.qemu, pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")]

# The README's `labkit-vm` line, less the emulator's own -x-guest. -display none keeps QEMU from opening a
# VNC server (its default here); the VGA device and its RAM are there either way.
README_ARGV = [
    "-m", "1G",
    "-machine", "q35,aux-ram-share=on,memory-backend=ram0",
    "-object", "memory-backend-memfd,id=ram0,size=1G,share=on",
    "-display", "none",
]  # fmt: skip
DEFAULTS = {"defaults": [], "nodefaults": ["-nodefaults"]}
PROGRAMS = ("qemu", "labkit-vm")
WAIT = 60.0  # seconds for any one step: generous, the machine is shared with other test runs


def program(name: str) -> list[str]:
    return [qemu_binary() or "qemu-system-x86_64"] if name == "qemu" else [sys.executable, "-m", "labkit.vm"]


class Run:
    """A private 0700 directory, the VMs started in it, and the channel paths they share."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lk-interop-")
        self.vms: list[Machine] = []
        self.main = os.path.join(self.dir, "main.sock")
        self.cpr = os.path.join(self.dir, "cpr.sock")

    def start(self, prog: str, extra: list[str], *more: str, connect: bool = True) -> Machine:
        """One VM of `prog` with the README argv + `extra` + `more`, its monitor on its own socket."""
        m = Machine(VMConfig(name=f"{prog}-{len(self.vms)}"), EmulatedRunner())
        m.backend = "qemu" if prog == "qemu" else "emulated"
        m.argv = [
            *program(prog),
            *README_ARGV,
            *extra,
            *more,
            "-qmp",
            f"unix:{m.qmp_path},server=on,wait=off",
        ]
        self.vms.append(m)
        return m.launch(connect=connect)

    def cpr_incoming(self) -> str:
        return json.dumps(unix(self.cpr, "cpr"))

    def migrate(self, src: Machine) -> None:
        """cpr-transfer from `src`: main and cpr channels on this run's paths."""
        src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        src.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
        src.cmd("migrate", {"channels": [unix(self.main), unix(self.cpr, "cpr")]})

    def stop_all(self) -> None:
        """Kill every VM and remove the channel sockets, so the next VM can use the same paths."""
        for m in self.vms:
            m.kill()
        for path in (self.main, self.cpr):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        self.stop_all()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def run():
    r = Run()
    yield r
    r.close()


def block_rows(m: Machine) -> list[tuple]:
    """x-query-ramblock's rows without the HVA column (where each process mapped a block is its own)."""
    return [
        (b["name"], b["offset"], b["size"], b["max-size"], b["readonly"])
        for b in parse_ramblocks(m.cmd("x-query-ramblock")["human-readable-text"])
    ]


def block_inodes(m: Machine) -> dict[str, int]:
    """{block name: inode of the memfd mapped there}, from x-query-ramblock's HVA and /proc/PID/maps."""
    starts = {mp.start: mp.inode for mp in read_maps(m.pid)}
    return {
        b["name"]: starts[b["host-addr"]]
        for b in parse_ramblocks(m.cmd("x-query-ramblock")["human-readable-text"])
    }


def memfd_overruns(pid: int) -> list[str]:
    """Every mapping of a memfd that reaches past the memfd's end (/proc/PID/maps against fstat through
    /proc/PID/fd): touching the part past the end would raise SIGBUS."""
    sizes = {f.inode: f.size for f in read_fds(pid) if f.kind == "memfd"}
    return [
        f"{mp.path}: maps {mp.offset + mp.size} bytes of a {sizes[mp.inode]}-byte memfd"
        for mp in read_maps(pid)
        if mp.inode in sizes and mp.offset + mp.size > sizes[mp.inode]
    ]


def receive_cpr_state(run: Run, prog: str, extra: list[str]) -> dict:
    """Start `prog` as a source and send its CPR state to labkit's cpr-inspect listener."""
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(cpr_inspect_listen(run.cpr, timeout=WAIT, file=None)), daemon=True
    )
    t.start()
    src = run.start(prog, extra, "-S")
    wait_for(lambda: os.path.exists(run.cpr), "the cpr listener", timeout=WAIT)
    run.migrate(src)
    t.join(WAIT + 10)
    assert out, "no CPR state received"
    # The listener hung up without listening on main: the source fails to connect and keeps its guest.
    wait_for(
        lambda: src.cmd("query-migrate").get("status") == "failed", "the source to give up", timeout=WAIT
    )
    return out


# -------------------------------------------------------------------------------- the same RAM blocks
@pytest.mark.timeout(180)
@pytest.mark.parametrize("defaults", list(DEFAULTS))
def test_ram_blocks_are_qemus(run, defaults):
    """Names (PCI paths included), offsets, used and maximum lengths, read-only flags and ram_list order."""
    extra = DEFAULTS[defaults]
    vms = {prog: run.start(prog, extra, "-S") for prog in PROGRAMS}
    rows = {prog: block_rows(m) for prog, m in vms.items()}
    assert rows["labkit-vm"] == rows["qemu"]
    # the text itself, column widths and all, but for the host addresses (the header's HVA stays)
    hva = re.compile(r"0x[0-9a-f]{16}(?= +r[ow]$)", re.M)
    texts = {
        prog: hva.sub("HVA", m.cmd("x-query-ramblock")["human-readable-text"]) for prog, m in vms.items()
    }
    assert texts["labkit-vm"] == texts["qemu"] and texts["qemu"].count("HVA") == 1 + len(rows["qemu"])
    names = [r[0] for r in rows["qemu"]]
    assert ("0000:00:01.0/vga.vram" in names) == (defaults == "defaults")
    maxima = [r[3] for r in rows["qemu"]]
    assert maxima == sorted(maxima, reverse=True)


# ------------------------------------------------------------------------------- the same CPR bytes
@pytest.mark.timeout(300)
@pytest.mark.parametrize("defaults", list(DEFAULTS))
def test_cpr_state_bytes_are_qemus(run, defaults):
    """The same argv sends the same bytes; the fds ride outside them (SCM_RIGHTS), so only their sizes
    and order are compared, and each memfd is as large as its block's maximum length."""
    got = {}
    for prog in PROGRAMS:
        report = receive_cpr_state(run, prog, DEFAULTS[defaults])
        data = bytes.fromhex("".join(f["hex"] for f in report["fields"]).replace(" ", ""))
        assert len(data) == report["length"] and report["complete"] and report["fds_match"]
        got[prog] = (
            data,
            [(e["name"], e["id"]) for e in report["fds"]],
            [(i["kind"], i["size"]) for i in report["fd_info"]],
        )
        run.stop_all()
    assert got["labkit-vm"][0] == got["qemu"][0]
    assert got["labkit-vm"][1] == got["qemu"][1]
    assert got["labkit-vm"][2] == got["qemu"][2]
    assert all(kind == "memfd" for kind, _ in got["qemu"][2])


# ------------------------------------------------------------------------------ QEMU -> labkit-vm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("defaults", list(DEFAULTS))
def test_qemu_source_labkit_destination(run, defaults):
    """labkit-vm maps every memfd real QEMU sends (the same inodes), opens its monitor, listens on main and
    accepts QEMU's main connection; it fails only then, loading QEMU's device state: the loader's line names
    the first section it lacks, then QEMU's last line gives the errno."""
    extra = DEFAULTS[defaults]
    src = run.start("qemu", extra, "-S")
    dst = run.start("labkit-vm", extra, "-incoming", "defer", "-incoming", run.cpr_incoming(), connect=False)
    wait_for(lambda: os.path.exists(run.cpr), "the destination's cpr socket", timeout=WAIT)
    run.migrate(src)
    dst.connect()  # the monitor opens once the CPR state is loaded and RAM is mapped
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert all(b["reused"] for b in dst.cmd("x-labkit-ram-blocks"))
    theirs, ours = block_inodes(src), block_inodes(dst)
    assert ours == theirs and len(set(ours.values())) == len(ours)
    assert memfd_overruns(dst.pid) == []
    assert src.cmd("query-migrate")["status"] == "setup"  # QEMU still waits for the hang-up

    dst.cmd("migrate-incoming", {"uri": f"unix:{run.main}"})  # listen on main, then close the cpr socket
    src.qmp.wait_event("MIGRATION", WAIT, match=lambda e: e["data"]["status"] == "active")  # main connected
    assert dst.wait(WAIT) == 1
    lines = [ln for ln in dst.log().splitlines() if ln.strip()]
    # QEMU's two lines: the loader's error_report() naming the first section it lacks, then the errno
    assert len(lines) == 2 and lines[0].startswith("labkit-vm: Unknown savevm section or instance "), lines
    assert lines[1] == "labkit-vm: load of migration failed: Invalid argument", lines
    info = wait_for(
        lambda: (i := src.cmd("query-migrate"))["status"] in ("failed", "completed") and i,
        "QEMU to finish",
        timeout=WAIT,
    )
    assert "connect" not in info.get("error-desc", "")


# ------------------------------------------------------------------------------ labkit-vm -> QEMU
@pytest.mark.timeout(300)
@pytest.mark.parametrize("defaults", list(DEFAULTS))
def test_labkit_source_qemu_destination(run, defaults):
    """Real QEMU takes labkit-vm's CPR state without a word, maps the same memfds and none past its end,
    and listens on main: the source, held just after the hang-up, finds QEMU's monitor up and quiet."""
    extra = DEFAULTS[defaults]
    src = run.start("labkit-vm", extra, "-x-hold", "cpr-hup")
    dst = run.start(
        "qemu", extra, "-incoming", f"unix:{run.main}", "-incoming", run.cpr_incoming(), connect=False
    )
    wait_for(lambda: os.path.exists(run.cpr), "the destination's cpr socket", timeout=WAIT)
    run.migrate(src)
    wait_for(lambda: src.cmd("x-labkit-hold")["held-at"] == "cpr-hup", "the hang-up", timeout=WAIT)
    assert dst.alive() and os.path.exists(run.main), dst.log()
    dst.connect()
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert dst.log().strip() == ""  # no cpr-channel error, no warning
    assert memfd_overruns(dst.pid) == []
    ours, theirs = block_inodes(src), block_inodes(dst)
    assert theirs == ours
    assert block_rows(dst) == block_rows(src)

    src.cmd("x-labkit-continue", {"point": "cpr-hup"})
    wait_for(
        lambda: src.cmd("query-migrate")["status"] in ("completed", "failed"),
        "the source to finish",
        timeout=WAIT,
    )
    dst.wait(WAIT)  # QEMU then refuses labkit's device sections: the main stream is not yet QEMU's


# ------------------------------------------------------------------------ fd sizes, judged by both
def _send_state(path: str, blocks: list[tuple[str, int]]) -> dict[str, int]:
    """Play a source: memfds of the given sizes, sent newest first as QEMU does; returns their inodes."""
    fds = []
    try:
        for name, size in blocks:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            fds.append(CprFd(name, 0, fd))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            cpr_state_save(s, list(reversed(fds)))
            s.shutdown(socket.SHUT_WR)
            s.settimeout(WAIT)
            s.recv(1)  # the hang-up: the destination listens on main, or it has exited
        return {f.name: os.fstat(f.fd).st_ino for f in fds}
    finally:
        for f in fds:
            os.close(f.fd)


def _qemu_blocks(run: Run) -> list[tuple[str, int]]:
    """(name, maximum length) of every RAM block of real QEMU for the README argv, asked of QEMU."""
    m = run.start("qemu", [], "-S")
    try:
        return [(row[0], row[3]) for row in block_rows(m)]
    finally:
        m.kill()


FD_CASES = {
    "all-twice-as-large": lambda n, size: size * 2,
    "ram0-half": lambda n, size: size // 2 if n == "ram0" else size,
    "ram0-empty": lambda n, size: 0 if n == "ram0" else size,
    "tables-used-length-only": lambda n, size: 128 << 10 if n == "/rom@etc/acpi/tables" else size,
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(FD_CASES))
def test_fd_sizes_judged_as_qemu_judges_them(run, case):
    """The same hand-made CPR state to QEMU and to labkit-vm: both take it or both refuse it, in QEMU's
    words; what they take, they map no further than the memfd's end (growing an empty or short one)."""
    blocks = [(n, FD_CASES[case](n, size)) for n, size in _qemu_blocks(run)]
    outcome = {}
    for prog in PROGRAMS:
        dst = run.start(
            prog, [], "-incoming", f"unix:{run.main}", "-incoming", run.cpr_incoming(), connect=False
        )
        wait_for(lambda: os.path.exists(run.cpr), "the destination's cpr socket", timeout=WAIT)
        inodes = _send_state(run.cpr, blocks)
        wait_for(
            lambda d=dst: not d.alive() or os.path.exists(run.main),
            "the destination to listen or exit",
            timeout=WAIT,
        )
        if not dst.alive():
            lines = [ln for ln in dst.log().splitlines() if ln.strip()]
            assert len(lines) == 1, lines
            outcome[prog] = ("refused", lines[0].split(": ", 1)[1])  # without the program's name
        else:
            dst.connect()
            assert memfd_overruns(dst.pid) == []
            assert block_inodes(dst) == inodes  # every fd adopted, none replaced
            outcome[prog] = ("accepted", None)
        run.stop_all()
    assert outcome["labkit-vm"] == outcome["qemu"]
    if case == "ram0-half":
        assert outcome["qemu"][1].startswith("ram0 backing store size 0x")
    else:
        assert outcome["qemu"][0] == "accepted"
