"""Shared fixtures: every test must leave no process and no file descriptor behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from labkit.host.qmp_sync import _LoopThread


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the long soak tests too")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long run: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:
            pass
    return out


# open on purpose by libraries, once per process: matplotlib's font cache keeps its font files open
_NOT_LEAKS = ("/dev/urandom", "pytest", "/mpl-data/fonts/", ".ttf")


@pytest.fixture(scope="session", autouse=True)
def _warm_qmp_loop():
    _LoopThread.get()  # its self-pipe is created once per process, not a leak
    from qemu.qmp.util import get_or_create_event_loop

    get_or_create_event_loop()  # qemu.qmp's legacy client makes one loop per thread and keeps it
    yield


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a child process or an open fd in the test process."""
    before = _fds()
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5
    while me.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.02)
    kids = me.children(recursive=True)
    for k in kids:
        k.kill()
    assert not kids, f"processes left behind: {[(k.pid, k.cmdline()[:4]) for k in kids]}"
    deadline = time.monotonic() + 2
    while True:
        leaked = {f for f in _fds() - before if not any(ok in f for ok in _NOT_LEAKS)}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"
