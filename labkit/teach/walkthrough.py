"""cpr-transfer stepped through STOP, device state and RESUME using only what QEMU itself lets a client hold.

The Lab holds the emulator at any phase with its x-labkit-hold points, which real QEMU does not have. QEMU does
offer two holds of its own: the `pause-before-switchover` capability parks the source in status
`pre-switchover` (guest stopped, device state not yet sent) until `migrate-continue`, and `-S` keeps the
destination `paused` after it has loaded the device state, until `cont`. Between the two, a learner sees the
pause phase by phase on real QEMU too. The same calls drive the emulator, which implements both holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.qmp_sync import QMPCommandError
from labkit.host.runners import get_runner
from labkit.host.wait import WaitError, wait_until
from labkit.lab.progress import MigrationInfo
from labkit.qemu_syntax import GuestConfig, parse_size, unix_channel
from labkit.teach.hand_driven import HandDriven


@dataclass
class Hold:
    """One place the migration stands still: who holds it, and both processes as QMP reports them there."""

    step: str
    source_runstate: str | None
    source_status: str | None
    destination_runstate: str | None
    destination_status: str | None
    events_so_far: list[str]


@dataclass
class Walkthrough:
    """What stepping one migration on QEMU's own holds showed: both command lines, every QMP exchange, and
    the migration at each hold. `guest_verified` is the guest's own memory check on the destination."""

    backend: str
    argv: dict[str, list[str]] = field(default_factory=dict)
    transcript: list[dict[str, Any]] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    guest_verified: bool | None = None
    error: str | None = None

    def holds_frame(self):
        import pandas as pd

        return pd.DataFrame([vars(h) for h in self.holds])

    def transcript_text(self, width: int = 150) -> str:
        """The QMP exchanges as `-> side: command` / `<- reply` lines, events as `<- side: EVENT`."""
        lines = []
        for t in self.transcript:
            if "event" in t:
                data = f" {json.dumps(t['data'])}" if t.get("data") else ""
                lines.append(f"<- {t['to']:11s} event {t['event']}{data}"[:width])
                continue
            sent = json.dumps(
                {"execute": t["execute"], **({"arguments": t["arguments"]} if t["arguments"] else {})}
            )
            lines.append(f"-> {t['to']:11s} {sent}"[:width])
            lines.append(f"<- {t['to']:11s} {json.dumps(t['reply'])}"[:width])
        return "\n".join(lines)


class _Client:
    """Sends QMP commands to both sides and writes each exchange, and each event as it is seen, to the
    transcript, so the notebook shows exactly what a QMP client typed and what QEMU answered."""

    def __init__(self, walk: Walkthrough):
        self.walk = walk
        self.seen: dict[str, int] = {}

    def events(self, side: str, m: Machine) -> None:
        new = list(m.events)[self.seen.get(side, 0) :]
        self.seen[side] = self.seen.get(side, 0) + len(new)
        for e in new:
            self.walk.transcript.append({"to": side, "event": e.get("event"), "data": e.get("data", {})})

    def cmd(self, side: str, m: Machine, execute: str, arguments: dict | None = None) -> Any:
        self.events(side, m)
        try:
            reply: Any = m.cmd(execute, arguments, timeout=30)
            shown = {"return": reply}
        except QMPCommandError as e:
            reply, shown = None, {"error": str(e)}
        self.walk.transcript.append({"to": side, "execute": execute, "arguments": arguments, "reply": shown})
        self.events(side, m)
        return reply

    def quietly(self, m: Machine, execute: str) -> Any:
        """A poll that does not belong in the transcript (waiting for a status)."""
        return m.cmd(execute, timeout=10)

    def progress(self, m: Machine) -> MigrationInfo:
        """query-migrate, parsed, as a poll that does not belong in the transcript."""
        return MigrationInfo.from_qmp(self.quietly(m, "query-migrate"))

    def wait_status(self, what: str, m: Machine, status: str, timeout: float) -> None:
        """Poll query-migrate, out of the transcript, until `status` (or failed)."""
        wait_until(lambda: self.progress(m).status in (status, "failed"), what, timeout, m)


def _event_names(m: Machine | None) -> list[str]:
    return [] if m is None else [e.get("event", "") for e in m.events if e.get("event") in ("STOP", "RESUME")]


def step_through_switchover(
    backend: str = "qemu", ram: str | int = "256M", dirty_rate: str | int = "32M", timeout: float = 60.0
) -> Walkthrough:
    """Run one cpr-transfer with the source's `pause-before-switchover` and the destination's `-S`, holding
    at each: source stopped with device state unsent; device state loaded but guest not resumed; resumed.
    Both processes end before this returns.

    Driven by hand (labkit.teach.hand_driven), not by the Lab: the Lab holds a migration with the emulator's
    x-labkit-hold points, and this lesson is QEMU's own holds, `migrate-continue` and `cont`, which the Lab
    never sends."""
    size = parse_size(ram, "m") if isinstance(ram, str) else ram
    walk = Walkthrough(backend)
    client = _Client(walk)
    src: Machine | None = None
    dst: Machine | None = None

    def hold(step: str) -> None:
        def state(m: Machine | None) -> tuple[str | None, str | None]:
            if m is None or not m.qmp.connected:
                return None, None
            return client.quietly(m, "query-status")["status"], client.progress(m).status

        (sr, ss), (dr, ds) = state(src), state(dst)
        walk.holds.append(Hold(step, sr, ss, dr, ds, _event_names(src) + _event_names(dst)))

    with HandDriven(backend, timeout) as vms:
        main, cpr = vms.path("main.sock"), vms.path("cpr.sock")
        try:
            src = vms.start(
                VMConfig(name="source", ram=size, guest=GuestConfig(dirty_rate=parse_size(dirty_rate)))
            )
            walk.argv["source"] = list(src.argv)
            vms.runner.ready(src)  # real QEMU: the guest has booted and writes its RAM
            caps = [
                {"capability": "events", "state": True},
                {"capability": "pause-before-switchover", "state": True},
            ]
            client.cmd("source", src, "migrate-set-capabilities", {"capabilities": caps})
            client.cmd("source", src, "migrate-set-parameters", {"mode": "cpr-transfer"})
            hold("source running, pause-before-switchover on")

            dst_cfg = VMConfig(name="destination", ram=size, start_paused=True)
            dst = vms.start_cpr_destination(dst_cfg, f"unix:{main}", cpr)
            walk.argv["destination"] = list(dst.argv)
            hold("destination started with -S, waiting on the cpr channel (no monitor yet)")

            client.cmd("source", src, "migrate", {"channels": [unix_channel(main), unix_channel(cpr, "cpr")]})
            dst.connect(timeout)  # its monitor exists once it has loaded CPR state
            client.cmd("destination", dst, "migrate-set-capabilities", {"capabilities": caps[:1]})
            client.wait_status("the source to reach pre-switchover", src, "pre-switchover", timeout)
            client.cmd("source", src, "query-migrate")
            hold("held by pause-before-switchover: source STOPped, device state not sent")

            client.cmd("source", src, "migrate-continue", {"state": "pre-switchover"})
            client.wait_status("the source to complete", src, "completed", timeout)
            client.wait_status("the destination to load the device state", dst, "completed", timeout)
            client.cmd("destination", dst, "query-status")
            hold("held by -S: device state loaded, destination paused, no RESUME yet")

            client.cmd("destination", dst, "cont")
            wait_until(lambda: "RESUME" in _event_names(dst), "the RESUME event", timeout, dst)
            client.cmd("destination", dst, "query-status")
            hold("cont: destination running (RESUME), source in postmigrate")
            walk.guest_verified = bool(vms.runner.verify(dst).get("ok"))
            client.events("source", src)
            client.events("destination", dst)
        except (WaitError, ConnectionError, QMPCommandError, RuntimeError) as e:
            walk.error = f"{type(e).__name__}: {e}"
    return walk


@dataclass
class BackendComparison:
    """One migration run on each backend with the same settings, and their pauses cut at QEMU's checkpoints
    side by side (`steps`: one row per step, one ms column per backend), so a learner sees which pause is
    longer and in which step the difference sits."""

    results: dict[str, Any]  # backend -> Result
    steps: Any  # pandas DataFrame from labkit.lab.breakdown.compare_steps

    @property
    def longer(self) -> str | None:
        """The backend whose STOP -> RESUME pause was longer (None if either was not measured)."""
        pauses = {b: r.pause_ms.get("events") for b, r in self.results.items()}
        if any(p is None for p in pauses.values()):
            return None
        return max(pauses, key=pauses.__getitem__)

    @property
    def widest_step(self) -> str | None:
        """The checkpoint that ends the step where the two pauses differ most (e.g. the destination's
        dst-precopy-loadvm-completed, when loading device state is what takes the time)."""
        from labkit.lab.breakdown import largest_difference

        step = largest_difference(self.steps, *self.results)
        return None if step is None else step.split(" -> ")[1]


def compare_backends(
    mode: str = "cpr-transfer",
    ram: str | int = "256M",
    backends: tuple[str, str] = ("emulated", "qemu"),
    **settings,
) -> BackendComparison:
    """Migrate once on each backend with the same mode, RAM and settings (a Scenario's, e.g. dirty_rate=),
    one after the other, and compare their pauses step by step."""
    from labkit.lab.breakdown import compare_steps
    from labkit.lab.engine import migrate
    from labkit.lab.scenario import Scenario

    scenario = Scenario(mode=mode, ram=ram, **settings)  # type: ignore[arg-type]
    results = {b: migrate(scenario.with_(backend=b)) for b in backends}
    return BackendComparison(results, compare_steps({b: r.pause_breakdown for b, r in results.items()}))


def explain_comparison(cmp: BackendComparison) -> str:
    """The reveal's "why", built from the measurement: which pause was longer, by how much, and the step
    that holds most of the difference, with what QEMU does in that step."""
    from labkit.lab.breakdown import CHECKPOINT_WHAT

    names = list(cmp.results)
    pauses = {b: r.pause_ms.get("events") for b, r in cmp.results.items()}
    if cmp.longer is None or cmp.widest_step is None:
        return "one of the runs recorded no STOP -> RESUME pause, so there is nothing to compare"
    row = cmp.steps[cmp.steps["step"].str.endswith(" -> " + cmp.widest_step)].iloc[0]
    side = next((s for (s, n) in CHECKPOINT_WHAT if n == cmp.widest_step), "destination")
    what = CHECKPOINT_WHAT.get((side, cmp.widest_step), cmp.widest_step)
    shorter = next(b for b in names if b != cmp.longer)
    return (
        f"{cmp.longer}'s pause was {pauses[cmp.longer]:.2f} ms against {shorter}'s {pauses[shorter]:.2f} ms; "
        f"the step {row['step']} ({what}) took {row[names[0]]:.2f} ms on {names[0]} and "
        f"{row[names[1]]:.2f} ms on {names[1]}, the largest difference of any step"
    )


# what each step of the pause does, as the reason a backend spends longer there
_STEP_WHY = {
    "src-iterable-saved": "the source's last RAM pass: even with every block in a memfd (no page sent), QEMU "
    "syncs the dirty log and ends the RAM section",
    "src-non-iterable-saved": "writing the device state: real QEMU's q35 machine has dozens of devices (about "
    "75 KiB of state) against the emulator's four",
    "dst-precopy-loadvm-completed": "the destination reading and loading the device state section by section "
    "as it arrives (real QEMU's many devices, about 75 KiB, against the emulator's four)",
}


def check_comparison(
    cmp: BackendComparison, longer_pause: Any, widest_step: Any, tie_ms: float = 1.0
) -> tuple[Any, Any]:
    """The learner's two predictions (the backend whose pause is longer; the checkpoint ending the step that
    differs most) against this run, fairly: pauses closer than `tie_ms` or 20 % count either way, and any step
    whose difference is within `tie_ms` of the largest is right too (one run each: that is the noise a busy
    shared machine adds). Returns two labkit.teach.predictions.Verdicts; the "why" follows the measurement."""
    from labkit.lab.breakdown import CHECKPOINT_WHAT
    from labkit.teach.predictions import NOT_YET, RIGHT, WRONG, Verdict, unanswered

    a, b = list(cmp.results)
    pauses = {k: r.pause_ms.get("events") for k, r in cmp.results.items()}
    q1, q2 = "the backend with the longer pause", "the checkpoint ending the step that differs most"
    if cmp.longer is None or cmp.widest_step is None:
        why = explain_comparison(cmp)
        return Verdict(q1, longer_pause, None, NOT_YET, why), Verdict(q2, widest_step, None, NOT_YET, why)
    close = abs(pauses[a] - pauses[b]) < max(tie_ms, 0.2 * min(pauses.values()))
    ok1 = str(longer_pause).strip().lower() in ((a, b) if close else (cmp.longer,))
    why1 = explain_comparison(cmp) + (" (close enough that either answer counts)" if close else "")
    first = Verdict(
        q1, longer_pause, cmp.longer, NOT_YET if unanswered(longer_pause) else RIGHT if ok1 else WRONG, why1
    )

    both = cmp.steps.dropna(subset=[a, b])
    diff = (both[b] - both[a]).abs()
    ends = both["step"].str.split(" -> ").str[1]
    accepted = set(ends[diff >= diff.max() - tie_ms])
    row = both[ends == cmp.widest_step].iloc[0]
    slower = a if row[a] > row[b] else b
    side = next((s for (s, n) in CHECKPOINT_WHAT if n == cmp.widest_step), "destination")
    reason = _STEP_WHY.get(cmp.widest_step, CHECKPOINT_WHAT.get((side, cmp.widest_step), cmp.widest_step))
    why2 = f"{slower} took longer in that step ({max(row[a], row[b]):.2f} against {min(row[a], row[b]):.2f} ms): {reason}"
    runner = get_runner(cmp.results[slower].backend)
    if runner.slower_because and len({r.backend for r in cmp.results.values()}) > 1:
        why2 += f"; this time {runner.description} was the slower one there: {runner.slower_because}"
    if len(accepted) > 1:
        why2 += f" (steps ending at {', '.join(sorted(accepted))} differ by as much, within {tie_ms:g} ms: any counts)"
    ok2 = str(widest_step).strip() in accepted
    second = Verdict(
        q2,
        widest_step,
        cmp.widest_step,
        NOT_YET if unanswered(widest_step) else RIGHT if ok2 else WRONG,
        why2,
    )
    return first, second
