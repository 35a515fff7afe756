"""qemu_init() for the emulated VM: the start-up order that cpr-transfer depends on.

The CPR channel is read *first*, before RAM blocks, devices or the monitor exist (system/vl.c:
"Load incoming CPR state before any devices are created, because it contains file descriptors that are needed in
device initialization code"). Any error here is fatal: the process prints one line and exits with status 1.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from labkit.vm.memory import RAMBlockError, ram_blocks_create
from labkit.vm.migration.channels import parse_incoming_option
from labkit.vm.migration.cpr import CprError, cpr_state_load
from labkit.vm.migration.cpr_exec import IGNORED_CHANNEL_TEXT, cpr_exec_has_state, cpr_exec_state_load
from labkit.vm.migration.cpr_transfer import cpr_transfer_input
from labkit.vm.options import PROG, USAGE, HelpRequested, OptionError, parse_args
from labkit.vm.vm import VM

# when the cpr channel was accepted and its state loaded; handed to the Migration once it exists
CPR_MARKS: list[tuple[str, int]] = []


def _error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 1


def cpr_state_load_from_cmdline(raw: str, hold: bool = False) -> tuple[socket.socket, dict[str, int]]:
    """Block on the cpr channel until the source sends CPR state; return (socket, {name: fd}).

    With the lab's "cpr-load" hold, the connection is accepted but nothing is read until SIGUSR1: the fds
    sit in the socket, in flight, for a learner to look at. There is no monitor yet to send a command to.
    """
    _, channel = parse_incoming_option(raw)
    assert channel is not None  # options kept this value as a cpr channel, never 'defer'
    sock = cpr_transfer_input(channel)
    CPR_MARKS.append(("labkit-cpr-accepted", time.monotonic_ns()))
    if hold:
        print(f"{PROG}: holding at cpr-load: CPR state not read yet (send SIGUSR1 to go on)", flush=True)
        signal.sigwait({signal.SIGUSR1})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    try:
        fds = cpr_state_load(sock)
    except BaseException:
        sock.close()
        raise
    by_name: dict[str, int] = {}
    for f in fds:
        if f.name in by_name or f.id != 0:
            for fd in [*by_name.values(), *(g.fd for g in fds if g.fd not in by_name.values())]:
                os.close(fd)
            sock.close()
            raise CprError(f"unexpected cpr fd {f.name!r} id {f.id} (duplicate or non-zero id)")
        by_name[f.name] = f.fd
    CPR_MARKS.append(("labkit-cpr-loaded", time.monotonic_ns()))
    return sock, by_name


def qemu_init(argv: list[str]) -> VM | int:
    """Parse argv and build the VM in QEMU's order; an int return is an exit status."""
    try:
        opts = parse_args(argv)
    except HelpRequested:
        print(USAGE, end="")
        return 0
    except OptionError as e:
        return _error(str(e))
    if not opts.qmp:
        # QEMU would open a window; the emulator has only its monitor, so without one nothing can drive it
        print(
            f"{PROG}: warning: no -qmp given: nothing can talk to this VM (see labkit-vm --help); "
            "Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
    cpr_sock, cpr_fds, cpr_exec_state = None, {}, None
    if cpr_exec_has_state():  # exec'd by a cpr-exec migration: the state is in a memfd, not on a channel
        try:
            cpr_exec_state = cpr_exec_state_load()
        except CprError as e:
            return _error(f"cpr_state_load: {e}")
        cpr_fds = dict(cpr_exec_state.fds)
        if opts.incoming.get("cpr"):
            print(f"{PROG}: warning: {IGNORED_CHANNEL_TEXT}", file=sys.stderr, flush=True)
    elif cpr_raw := opts.incoming.get("cpr"):
        hold = "cpr-load" in opts.holds
        if hold:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # before listening: none can be lost
        try:
            cpr_sock, cpr_fds = cpr_state_load_from_cmdline(cpr_raw, hold)
        except CprError as e:
            # QEMU prints its error as it is (error_fatal); where labkit knows more it says so first, then
            # gives QEMU 10.0.2's own last line for the same bytes
            if e.qemu_line:
                _error(str(e))
            return _error(e.qemu_line or str(e))
        except (OSError, ValueError) as e:
            return _error(str(e))
    try:
        ram = ram_blocks_create(opts, cpr_fds)
    except (RAMBlockError, OSError, ValueError) as e:
        for held in (cpr_sock, cpr_exec_state):
            if held is not None:
                held.close()
        return _error(str(e))
    if cpr_exec_state is not None:
        cpr_exec_state.t_mapped_ns = time.monotonic_ns()
    incoming = "main" in opts.incoming
    vm = VM(opts, ram, incoming=incoming)
    if cpr_sock is not None:
        vm.migration.incoming_cpr(cpr_sock, tuple(CPR_MARKS))
    if cpr_exec_state is not None:
        vm.migration.incoming_cpr_exec(cpr_exec_state)
    return vm
