"""`labkit doctor`: what this machine offers the lab, checked for real (no guesses from versions alone)."""

from __future__ import annotations

import os
import platform
import socket
import sys

from labkit import __version__
from labkit.host.hugepages import HugePagePool, read_pools
from labkit.host.runners.qemu_guest import kvm_usable, qemu_binary, qemu_version


def _memfd_and_scm_rights() -> tuple[bool, str]:
    """Create a memfd, pass it over a socketpair with SCM_RIGHTS, and read it back through the new fd."""
    try:
        fd = os.memfd_create("labkit-doctor", os.MFD_CLOEXEC)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.write(fd, b"labkit")
            socket.send_fds(a, [b" "], [fd])
            _, fds, _, _ = socket.recv_fds(b, 1, 1)
            try:
                ok = os.pread(fds[0], 6, 0) == b"labkit"
            finally:
                for f in fds:
                    os.close(f)
        finally:
            a.close()
            b.close()
            os.close(fd)
        return ok, "memfd_create and SCM_RIGHTS work"
    except (OSError, AttributeError) as e:
        return False, f"unavailable: {e}"


def doctor() -> dict:
    ok, memfd_text = _memfd_and_scm_rights()
    qpath = qemu_binary()
    qver = qemu_version(qpath) if qpath else None
    return {
        "python": platform.python_version(),
        "labkit": __version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memfd-scm-rights": ok,
        "memfd-scm-rights-detail": memfd_text,
        "kvm": kvm_usable(),
        "qemu": qpath,
        "qemu-version": ".".join(map(str, qver)) if qver else None,
        "qemu-cpr-transfer": bool(qver and qver >= (10, 0, 0)),
        "root": os.geteuid() == 0,
        "hugepages": [p.to_dict() for p in read_pools()],
        "python-executable": sys.executable,
    }


def _pools_line(pools: list[dict[str, int]]) -> str:
    """The huge page pools on one line: a --hugetlb guest needs free pages of its size here."""
    if not pools:
        return "none (this kernel has no hugetlbfs: --hugetlb cannot run)"
    shown = "; ".join(HugePagePool.from_dict(p).describe() for p in pools)
    if any(p["available"] for p in pools):
        return shown
    return f"{shown} (labkit hugepages --reserve SIZE sets one, as root)"


def format_doctor(r: dict) -> str:
    def yn(v: bool) -> str:
        return "yes" if v else "no"

    lines = [
        f"labkit {r['labkit']} on Python {r['python']} ({r['platform']}, {r['cpus']} CPUs)",
        f"  memfd + SCM_RIGHTS : {yn(r['memfd-scm-rights'])} ({r['memfd-scm-rights-detail']})",
        f"  /dev/kvm usable    : {yn(r['kvm'])}"
        + ("" if r["kvm"] else " (real QEMU would fall back to TCG)"),
    ]
    if r["qemu"]:
        lines.append(
            f"  qemu-system-x86_64 : {r['qemu-version']} at {r['qemu']}; cpr-transfer "
            + ("available" if r["qemu-cpr-transfer"] else "needs QEMU >= 10.0")
        )
    else:
        lines.append(
            "  qemu-system-x86_64 : not installed (scripts/install-qemu installs QEMU 10 on Debian 12)"
        )
    lines.append(
        f"  root               : {yn(r['root'])}"
        + ("" if r["root"] else " (physical frame numbers in /proc/PID/pagemap read as 0 without root)")
    )
    lines.append(f"  huge pages         : {_pools_line(r['hugepages'])}")
    lines.append("  emulated backend   : always available (labkit-vm: real processes, memfds, QMP)")
    return "\n".join(lines)
