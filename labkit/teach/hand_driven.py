"""Stories driven by hand: the QMP sequences the Lab does not send, on VMs that always end.

The Lab (labkit.lab.engine) runs a migration as its mode's phases, and a story that is those phases steps a
Lab and looks between the steps. A few lessons are an order of commands the Lab never sends: QEMU's own holds
(`pause-before-switchover` then `migrate-continue`, `-S` then `cont`), a main channel on inet port 0. Those
drive Machines one command at a time, and share what is here: one way to start VMs and end every one of them
(`HandDriven`), the wait for a cpr-transfer destination's socket, and the table of steps a story tells back
(`Steps`). Waiting is labkit.host.wait's, the loop the Lab waits with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.runners import Runner, get_runner
from labkit.host.wait import wait_until
from labkit.qemu_syntax import unix_channel


@dataclass
class Steps:
    """What a story did, one row per step: to whom, what was sent or looked at, what came back."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def note(self, who: str, sent: str, seen: Any) -> None:
        self.rows.append({"step": len(self.rows) + 1, "to": who, "sent / looked at": sent, "came back": seen})

    def frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows)


def _end(m: Machine) -> None:
    with contextlib.suppress(Exception):  # ending is best effort: the next VM must still end
        m.shutdown(timeout=5)


class HandDriven(contextlib.ExitStack):
    """VMs a story starts one by one, in a private 0700 folder for their sockets; leaving the `with` block
    ends every one (the last started first), then removes the folder, so a notebook cell leaves no process
    behind."""

    def __init__(self, runner: str | Runner = "emulated", timeout: float = 30.0):
        super().__init__()
        self.runner = get_runner(runner)
        self.timeout = timeout
        self.dir = tempfile.mkdtemp(prefix="labkit-story-")
        os.chmod(self.dir, 0o700)
        self.callback(shutil.rmtree, self.dir, ignore_errors=True)

    def path(self, name: str) -> str:
        """A socket or file of the story (main.sock, cpr.sock)."""
        return os.path.join(self.dir, name)

    def start(self, config: VMConfig, connect: bool = True) -> Machine:
        m = Machine(config, self.runner)
        self.callback(_end, m)  # ended on exit, even if it fails to start
        return m.launch(connect=connect, timeout=self.timeout)

    def start_cpr_destination(self, config: VMConfig, main: str | dict[str, Any], cpr_path: str) -> Machine:
        """A cpr-transfer destination, `-incoming main -incoming <cpr channel>`: it opens its monitor only once
        the source's `migrate` has sent CPR state, so it is not connected; returned once it listens on cpr."""
        m = self.start(config.with_incoming(main, unix_channel(cpr_path, "cpr")), connect=False)
        what = "the destination to listen on the cpr channel"
        wait_until(lambda: os.path.exists(cpr_path), what, self.timeout, m)
        return m
