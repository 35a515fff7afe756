"""The floor of cpr-transfer's pause for a design like labkit's emulator, measured on this machine.

Two Python processes, each with a running vCPU thread built like the emulator's (labkit.vm.guest.VCPU: a
lock held while it runs a slice, an Event that wakes it, a numpy page write and a heartbeat every 0.5 ms
tick). The source stops its vCPU and waits until it is quiesced, sends ~500 bytes of JSON device state over
a unix socket; a loader thread in the destination, blocked in recv, parses it, wakes its vCPU and stamps
RESUME. STOP -> RESUME is what the emulator's pause cannot go below with this design: no fd passing, no
RAM, no QMP, no events, just the stop, the state and the start. Both timestamps are CLOCK_MONOTONIC, which
both processes share.

    python -m labkit.measure.pause_floor [--runs 30]      # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

PAGE = 4096
TICK_S = 0.0005  # as labkit.vm.guest.TICK_S: the emulated vCPU wakes every 0.5 ms
STEPS = ("stop->quiesced", "quiesced->sent", "sent->parsed", "parsed->RESUME")


class FloorVCPU(threading.Thread):
    """A vCPU like the emulator's: runs slices under a lock while an Event is set; pause() returns once the
    slice in progress has ended (QEMU's pause_all_vcpus)."""

    def __init__(self, ram: np.ndarray):
        super().__init__(name="vcpu0", daemon=True)
        self.ram = ram
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.quit = False
        self.ticks = 0

    def pause(self) -> None:
        self.running.clear()
        with self.lock:
            pass

    def resume(self) -> None:
        self.running.set()

    def run(self) -> None:
        pages = self.ram.size // PAGE
        while not self.quit:
            if not self.running.is_set():
                self.running.wait(0.05)
                continue
            with self.lock:
                if not self.running.is_set():
                    continue
                t = time.monotonic()
                p = self.ticks % pages
                self.ram[p * PAGE : (p + 1) * PAGE] = self.ticks & 0xFF  # one page, as a slow guest writes
                self.ram[:8] = self.ticks & 0xFF  # the heartbeat
                self.ticks += 1
            spare = TICK_S - (time.monotonic() - t)
            if spare > 0:
                time.sleep(spare)


def _vcpu(ram_bytes: int = 16 << 20) -> tuple[FloorVCPU, mmap.mmap]:
    fd = os.memfd_create("floor-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, ram_bytes)
    mm = mmap.mmap(fd, ram_bytes)
    os.close(fd)
    ram = np.frombuffer(mm, dtype=np.uint8)
    ram[:] = 1
    v = FloorVCPU(ram)
    v.start()
    return v, mm


def _device_state(i: int) -> bytes:
    """About 500 bytes of JSON, the size of the emulator's device state in cpr-transfer."""
    state = {
        "run": i,
        "vm-clock-ns": time.monotonic_ns(),
        "cpu": {"regs": list(range(16)), "rip": 0xFFF0, "rflags": 2, "ticks": i},
        "devices": {f"dev{k}": {"state": "running", "irq": k, "pending": []} for k in range(6)},
        "pad": "x" * 80,
    }
    return json.dumps(state).encode() + b"\n"


def run_source(sock: socket.socket, runs: int, gap_s: float) -> list[dict[str, float]]:
    vcpu, mm = _vcpu()
    out = []
    f = sock.makefile("rb")
    try:
        vcpu.resume()
        for i in range(runs):
            time.sleep(gap_s)  # the guest runs
            t_stop = time.monotonic_ns()
            vcpu.pause()
            t_quiesced = time.monotonic_ns()
            sock.sendall(_device_state(i))
            t_sent = time.monotonic_ns()
            reply = json.loads(f.readline())
            vcpu.resume()  # the next round starts from a running source again
            out.append(
                {
                    "stop->quiesced": (t_quiesced - t_stop) / 1e6,
                    "quiesced->sent": (t_sent - t_quiesced) / 1e6,
                    "sent->parsed": (reply["parsed"] - t_sent) / 1e6,
                    "parsed->RESUME": (reply["resume"] - reply["parsed"]) / 1e6,
                    "STOP->RESUME": (reply["resume"] - t_stop) / 1e6,
                }
            )
    finally:
        vcpu.quit = True
        vcpu.resume()
        vcpu.join()
        f.close()
        del vcpu.ram
        mm.close()
    return out


def run_destination(sock: socket.socket) -> None:
    vcpu, mm = _vcpu()

    def loader() -> None:  # the incoming migration's thread, as in the emulator
        f = sock.makefile("rb")
        while line := f.readline():
            state = json.loads(line)
            t_parsed = time.monotonic_ns()
            vcpu.resume()
            t_resume = time.monotonic_ns()  # RESUME
            sock.sendall(
                json.dumps({"run": state["run"], "parsed": t_parsed, "resume": t_resume}).encode() + b"\n"
            )
            vcpu.pause()  # off the critical path: ready to be started again next round
        f.close()

    t = threading.Thread(target=loader, name="incoming")
    t.start()
    t.join()  # the main thread waits, as the emulator's main loop does
    vcpu.quit = True
    vcpu.resume()
    vcpu.join()
    del vcpu.ram
    mm.close()


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    total = [r["STOP->RESUME"] for r in runs]
    return {
        "name": "pause_floor",
        "unit": "s",
        "value": statistics.median(total) / 1e3,
        "min": min(total) / 1e3,
        "max": max(total) / 1e3,
        "method": "two processes, vCPU thread each: stop, ~500 B JSON over a unix socket, loader thread parses, start",
        "steps_ms_median": {k: round(statistics.median(r[k] for r in runs), 4) for k in STEPS},
        "n": len(runs),
        "runs_ms": runs,
    }


def measure(runs: int = 30, gap_s: float = 0.02, timeout: float = 60.0) -> dict[str, Any]:
    """The floor over `runs` stop/start pairs between two fresh processes; median, min, max and the steps."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [sys.executable, "-m", "labkit.measure.pause_floor"]
    try:
        dst = subprocess.Popen(
            [*cmd, "--role", "destination", "--fd", str(b.fileno())], pass_fds=[b.fileno()]
        )
        try:
            src = subprocess.run(
                [*cmd, "--role", "source", "--fd", str(a.fileno()), "--runs", str(runs), "--gap", str(gap_s)],
                pass_fds=[a.fileno()], capture_output=True, text=True, timeout=timeout, check=True,
            )  # fmt: skip
        finally:
            a.close()
            b.close()
            try:
                dst.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dst.kill()
                dst.wait()
    finally:
        a.close()
        b.close()
    return summarize(json.loads(src.stdout))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["source", "destination"])
    p.add_argument("--fd", type=int)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--gap", type=float, default=0.02)
    args = p.parse_args(argv)
    if args.role is None:
        print(json.dumps(measure(args.runs, args.gap)))
        return 0
    sock = socket.socket(fileno=args.fd)
    try:
        if args.role == "source":
            print(json.dumps(run_source(sock, args.runs, args.gap)))
        else:
            run_destination(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
