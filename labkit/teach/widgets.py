"""Stepper: an ipywidgets panel that walks one migration phase by phase (Next, Run to end, Reset).

The panel shows the lab's phases with the current one marked, both VMs side by side (run state, migration
status, the memfds each process holds, where guest RAM is mapped), the bytes that crossed each migration
channel so far, and the address-space figure redrawn at every step.

The callbacks are plain methods (`on_next`, `on_run`, `on_reset`) that the buttons call, so tests and notebook
cells drive the panel exactly as a click does, without a browser. The figure is rendered to PNG bytes into an
`ipywidgets.Image`, so no matplotlib widget backend is needed. Stable descriptions and CSS classes
(`labkit-next`, `labkit-run`, `labkit-reset`, `labkit-phase`, ...) let a browser test find each part.
"""

from __future__ import annotations

import contextlib
import html
import io
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ipywidgets as w

from labkit.lab.engine import Lab, Snapshot
from labkit.lab.report import MappingRow, Result
from labkit.lab.scenario import Scenario
from labkit.qemu_syntax import SIDES, format_ms, human_size

T = TypeVar("T")

__all__ = ["Stepper", "lab_arguments", "figure_png"]



def lab_arguments(lab: Lab) -> dict[str, Any]:
    """The settings that make a Lab like `lab` again, every one of them (prefill, holds, timeout ...):
    Lab(**lab_arguments(lab)) builds the same Scenario. Reset uses lab.scenario itself."""
    return lab.scenario.to_dict()


def figure_png(fig, dpi: int = 72) -> bytes:
    """A matplotlib Figure as PNG bytes (Agg, no pyplot, no widget backend)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _esc(value: object) -> str:
    return html.escape(str(value))


class Stepper:
    """Step a Lab through its phases from buttons or from code.

    Stepper(lab), Stepper(Scenario(...)), Stepper(factory=lambda: Lab(...)) or Stepper(mode="cpr-transfer",
    ram="256M", ...). Reset closes the current Lab and builds a new one from the same Scenario (or factory). Call close() (or use it as a context
    manager) so no VM process outlives the notebook.
    """

    def __init__(
        self,
        lab: Lab | Scenario | None = None,
        *,
        factory: Callable[[], Lab] | None = None,
        blocks: Sequence[str] | None = None,
        figure: bool = True,
        dpi: int = 72,
        **lab_kwargs: Any,
    ):
        if lab_kwargs and (lab is not None or factory is not None):
            raise TypeError("give a Lab, a factory, or the Lab's keyword arguments, not several")
        if isinstance(lab, Scenario):
            scenario: Scenario | None = lab
            lab = None
        else:
            scenario = lab.scenario if lab is not None else None
        if factory is None:  # the settings become a Scenario in the Lab, so a refusal shows in the panel
            factory = lambda: Lab(scenario, **lab_kwargs)  # noqa: E731 - a one-line factory reads best here
        self.factory = factory  # Reset calls it; given a Lab and a factory, the Lab is used first
        self.blocks = tuple(blocks) if blocks else None
        self.figure = figure
        self.dpi = dpi
        self.lab: Lab | None = None
        self.snapshots: list[Snapshot] = []
        self.result: Result | None = None
        self.error: str | None = None  # the last callback's failure, as shown in the panel
        self.closed = False
        self.png = b""  # the address-space figure last drawn

        self.next_button = self._button("Next", "labkit-next", "step-forward", "Run one phase and look")
        self.run_button = self._button("Run to end", "labkit-run", "fast-forward", "Run the phases left")
        self.reset_button = self._button("Reset", "labkit-reset", "undo", "End both VMs and start over")
        self.next_button.on_click(lambda _b: self.on_next())
        self.run_button.on_click(lambda _b: self.on_run())
        self.reset_button.on_click(lambda _b: self.on_reset())
        self.phase_label = self._classed(w.Label(value="Phase:"), "labkit-phase")
        self.phase_list = self._classed(w.HTML(), "labkit-phases")
        self.side_html = {side: self._classed(w.HTML(), f"labkit-{side}") for side in SIDES}
        self.channels_html = self._classed(w.HTML(), "labkit-channels")
        self.status_html = self._classed(w.HTML(), "labkit-status")
        self.image = self._classed(w.Image(format="png", layout=w.Layout(max_width="760px")), "labkit-figure")
        sides = w.HBox(
            [self.side_html["source"], self.side_html["destination"]],
            layout=w.Layout(grid_gap="24px"),
        )
        self.widget = self._classed(
            w.VBox(
                [
                    w.HBox([self.next_button, self.run_button, self.reset_button]),
                    self.phase_label,
                    w.HBox(
                        [self.phase_list, w.VBox([sides, self.channels_html])],
                        layout=w.Layout(grid_gap="24px"),
                    ),
                    self.status_html,
                    self.image,
                ]
            ),
            "labkit-stepper",
        )
        self._new_lab(lab)

    # -- widgets -----------------------------------------------------------------------------------------
    @staticmethod
    def _classed(widget: w.DOMWidget, css: str) -> Any:
        widget.add_class(css)
        return widget

    def _button(self, description: str, css: str, icon: str, tooltip: str) -> w.Button:
        return self._classed(w.Button(description=description, icon=icon, tooltip=tooltip), css)

    def _repr_mimebundle_(self, **kwargs: Any):
        """Show the panel when the Stepper is the last expression of a cell."""
        return self.widget._repr_mimebundle_(**kwargs)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot | None:
        """The latest Snapshot (None before the first step)."""
        return self.snapshots[-1] if self.snapshots else None

    @property
    def phase(self) -> str | None:
        """The phase last run, None before the first step."""
        return self.snapshot.phase if self.snapshot else None

    @property
    def done(self) -> bool:
        return self.lab is None or self.lab.index >= len(self.lab.phases)

    def _new_lab(self, lab: Lab | None = None) -> None:
        self.snapshots, self.result, self.error, self.png = [], None, None, b""
        try:
            self.lab = lab if lab is not None else self.factory()
        except Exception as e:  # a refused configuration: show QEMU's text, keep the panel alive
            self.lab = None
            self.error = f"{type(e).__name__}: {e}"
        self.refresh()

    # -- callbacks (the buttons call these; so can tests and cells) ------------------------------------------
    def on_next(self) -> Snapshot | None:
        """Run one phase, redraw, and return its Snapshot (None when nothing is left or it failed)."""
        if self.closed or self.done:
            return None

        def step() -> Snapshot:
            assert self.lab is not None  # done is True without a lab
            snap = self.lab.step()
            self.snapshots.append(snap)
            if self.done:
                self._finish()
            return snap

        return self._guarded(step)

    def on_run(self) -> Result | None:
        """Run every phase left (the panel follows along) and return the Result."""
        if self.closed or self.lab is None:
            return None

        def run() -> Result | None:
            assert self.lab is not None
            while not self.done:
                self.snapshots.append(self.lab.step())
                self.refresh(figure=False)
            self._finish()
            return self.result

        return self._guarded(run)

    def _guarded(self, action: Callable[[], T]) -> T | None:
        """Run a button's action with the panel busy; a failure shows in the panel (and returns None) rather
        than raising into the widget's callback, where a notebook would only log it."""
        self._busy(True)
        try:
            return action()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            return None
        finally:
            self._busy(False)
            self.refresh()

    def on_reset(self) -> None:
        """End both VM processes and start again with a fresh Lab built the same way."""
        if self.closed:
            return
        self._busy(True)
        try:
            self._close_lab()
        finally:
            self._new_lab()

    def close(self) -> None:
        """End both VM processes and disable the panel. Safe to call twice."""
        if self.closed:
            return
        self._close_lab()
        self.closed = True
        self.refresh()

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_lab(self) -> None:
        if self.lab is not None:
            with contextlib.suppress(Exception):
                self.lab.close()
            self.lab = None

    def _finish(self) -> None:
        if self.result is None and self.lab is not None:
            self.result = self.lab.run()

    def _busy(self, busy: bool) -> None:
        for b in (self.next_button, self.run_button, self.reset_button):
            b.disabled = busy
        if not busy:
            self._enable()

    def _enable(self) -> None:
        stuck = self.closed or self.lab is None
        self.next_button.disabled = stuck or self.done
        self.run_button.disabled = stuck or self.result is not None
        self.reset_button.disabled = self.closed

    # -- what the panel shows ------------------------------------------------------------------------------
    def mappings(self) -> list[MappingRow]:
        """The RAM block mappings of the latest Snapshot (only the chosen blocks, when given)."""
        rows = self.snapshot.mappings if self.snapshot else []
        if self.result is not None and self.result.mappings:
            rows = self.result.mappings
        return [r for r in rows if self.blocks is None or r.block in self.blocks]

    def mappings_frame(self):
        """The mappings as a pandas DataFrame: side, block, start (hex), size, inode."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "side": r.side,
                    "block": r.block,
                    "start": f"{r.start:#x}",
                    "size": human_size(r.size),
                    "inode": r.inode,
                }
                for r in self.mappings()
            ],
            columns=["side", "block", "start", "size", "inode"],
        )

    def phase_text(self) -> str:
        lab = self.lab
        if self.closed:
            return "Phase: closed (both VMs ended)"
        if lab is None:
            return "Phase: no lab (see the error below; Reset tries again)"
        n = len(lab.phases)
        if not self.snapshots:
            return f"Phase: not started ({n} phases; press Next)"
        snap = self.snapshots[-1]
        text = f"Phase: {snap.index}/{n} {snap.phase}"
        if self.result is not None:
            text += f" (migration {self.result.status})"
        return text

    def side_lines(self, side: str, full: bool = False) -> list[str]:
        """What one VM looks like now, a line per fact: run state, migration status, the memfds it holds and
        where guest RAM is mapped. Only the largest RAM block is named unless `full`."""
        snap = self.snapshot
        if snap is None or snap.states.get(side) is None:
            return ["not started"]
        lines = [f"run state: {snap.states.get(side)}"]
        if side in snap.migration:  # QEMU answers {} to query-migrate before any migration: status none
            lines.append(f"migration: {snap.migration[side].get('status', 'none')}")
        else:
            lines.append("migration: n/a (no monitor)")
        memfds = sorted(snap.fds.get(side, []), key=lambda f: -(f.get("size") or 0))
        if not memfds:
            lines.append("memfds held: none")
        elif full:
            lines.append(f"memfds held: {len(memfds)}")
            lines += [f"  fd {f['fd']}: memfd:{f['name']} inode {f['inode']}" for f in memfds]
        else:
            big = memfds[0]
            more = f"; + {len(memfds) - 1} more" if len(memfds) > 1 else ""
            lines.append(
                f"memfds held: {len(memfds)} ({big['name']}: fd {big['fd']}, inode {big['inode']}{more})"
            )
        rows = sorted(
            (r for r in snap.mappings if r.side == side and (self.blocks is None or r.block in self.blocks)),
            key=lambda r: -r.size,
        )
        for r in rows if full else rows[:1]:
            lines.append(f"maps {r.block} at {r.start:#x} ({human_size(r.size)}, inode {r.inode})")
        return lines

    def channel_lines(self) -> list[str]:
        snap = self.snapshot
        if snap is None:
            return ["main channel: 0 B", "cpr channel: 0 B"]
        main, cpr = snap.bytes.get("main") or 0, snap.bytes.get("cpr")
        uncounted = cpr is None and self.lab is not None and not self.lab.runner.has_migration_details
        return [
            f"main channel: {main} B" + (f" ({human_size(main)})" if main >= 1024 else ""),
            "cpr channel: " + ("n/a (real QEMU does not count it)" if uncounted else f"{cpr or 0} B"),
        ]

    def result_lines(self) -> list[str]:
        r = self.result
        if r is None:
            return []
        ms = format_ms
        p = r.pause_ms
        where = "on the destination" if r.status == "completed" else "on the source (the migration failed)"
        return [
            f"{r.mode} migration ({r.backend}, {human_size(r.ram_bytes)} guest RAM): {r.status}",
            f"pause: STOP->RESUME {ms(p.get('events'))}, reported by QEMU {ms(p.get('reported'))}, "
            f"seen by the guest {ms(p.get('guest'))}",
            f"guest memory verified {where}: {r.guest_verified}",
        ]

    def error_text(self) -> str | None:
        """Why the last step or the migration failed: the callback's exception, else QEMU's error text."""
        if self.error:
            return self.error
        if self.lab is not None and self.lab.error:
            return self.lab.error
        return self.result.error if self.result is not None else None

    def report(self, full: bool = False) -> str:
        """The panel as plain text, for a cell's output or a log (`full`: every memfd and mapping)."""
        out = [self.phase_text()]
        for side in SIDES:
            out.append(f"{side}:")
            out += [f"  {line}" for line in self.side_lines(side, full)]
        out += self.channel_lines()
        out += self.result_lines()
        if self.error_text():
            out.append(f"error: {self.error_text()}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"<Stepper {self.phase_text()}>"

    def refresh(self, figure: bool = True) -> None:
        """Redraw every part of the panel from the current state."""
        self.phase_label.value = self.phase_text()
        phases = self.lab.phases if self.lab is not None else []
        current = self.snapshot.index if self.snapshot else 0
        items = []
        for i, name in enumerate(phases, start=1):
            if i == current:
                items.append(f"<li class='labkit-current'><b>&#9654; {_esc(name)}</b></li>")
            elif i < current:
                items.append(f"<li style='color:#777'>&#10003; {_esc(name)}</li>")
            else:
                items.append(f"<li>{_esc(name)}</li>")
        self.phase_list.value = f"<ol style='margin:0;padding-left:1.4em'>{''.join(items)}</ol>"
        for side in SIDES:
            lines = self.side_lines(side)
            self.side_html[
                side
            ].value = f"<b>{side}</b><pre style='margin:0;font-size:85%'>{_esc(chr(10).join(lines))}</pre>"
        self.channels_html.value = "<pre style='margin:0'>" + _esc("\n".join(self.channel_lines())) + "</pre>"
        status = "<br>".join(_esc(line) for line in self.result_lines())
        if self.error_text():
            status += f"<div style='color:#b00'>error: {_esc(self.error_text())}</div>"
        self.status_html.value = status
        if figure and self.figure:
            self._draw()
        self._enable()

    def _draw(self) -> None:
        from labkit.measure.plots import plot_address_space

        rows = self.mappings()
        title = f"phase {self.snapshot.index}" if self.snapshot else "before the first step"
        self.png = figure_png(plot_address_space(rows, title=title), dpi=self.dpi)
        self.image.value = self.png
