"""The Stepper in JupyterLab, in a real browser: what a person sees when they run notebook 02 and click Next.

Widgets that pass their unit tests can still fail in a browser: a missing lab extension, a comm that never
opens, an image that never redraws. This test starts `jupyter lab` on loopback with a random token and all
of Jupyter's state in a temporary directory, opens notebooks/02-cpr-transfer-step-by-step in Debian's
Chromium (driven by Playwright's Python package through `executable_path`; no browser is ever downloaded),
runs all cells from the Run menu, then clicks the Stepper's Next through a whole cpr-transfer migration and
checks the phase label, both VMs' states, the address-space figure and the absence of error output.
Screenshots of the start, a middle phase and the end go to test-artifacts/browser/.

Setup: `scripts/install-browser` (apt: chromium, chromium-driver) and `pip install playwright`. Where either
is missing the test is skipped, except under CI=true, where it fails so that a green CI cannot hide a
missing install step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pytest

from labkit.lab.engine import PHASES

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02-cpr-transfer-step-by-step.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'
MIDDLE = 4  # "destination mapped guest RAM, listening on main": both processes map the same memfds
STEP_TIMEOUT_MS = 30_000  # one phase on a busy 2-core machine, figure included
RUN_ALL_TIMEOUT_S = 75  # every cell of the notebook (one stepped and one straight migration)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def _require() -> None:
    """Skip (fail under CI) when Debian's Chromium or Playwright's Python package is missing."""
    missing = []
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (run: sudo scripts/install-browser)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install playwright; never `playwright install`)")
    if not missing:
        return
    reason = "browser test needs " + " and ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " -- CI must install them (.ci/run: bash scripts/install-browser)")
    pytest.skip(reason)


# ------------------------------------------------------------------------------------- the Jupyter server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings: Path) -> None:
    """JupyterLab user settings: no news pop-up, no autosave, every cell in the DOM."""
    files = {
        # the news and update check would fetch from the internet and pop a notification over the page
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
        # the notebook is a temporary copy, but a save dialog or a "file changed" banner must never appear
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
        # with windowing, cells scrolled out of view are not in the DOM and their errors could not be seen
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, value in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@dataclass
class LabServer:
    """`jupyter lab` on 127.0.0.1 with a random token, in its own process group, its state under `home`."""

    home: Path
    root: Path
    port: int = field(default_factory=_free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    proc: subprocess.Popen | None = None
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant ever observed

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "jupyter-lab.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            JUPYTER_CONFIG_DIR=str(self.home / "jupyter-config"),
            JUPYTER_DATA_DIR=str(self.home / "jupyter-data"),
            JUPYTER_RUNTIME_DIR=str(self.home / "jupyter-runtime"),
            IPYTHONDIR=str(self.home / "ipython"),
            JUPYTERLAB_SETTINGS_DIR=str(self.home / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.home / "lab-workspaces"),
            MPLCONFIGDIR=str(self.home / "matplotlib"),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            XDG_DATA_HOME=str(self.home / ".local" / "share"),
        )
        env.pop("JUPYTER_TOKEN", None)
        return env

    def spawn(self) -> None:
        """Start the server; wait_ready() waits for it (the browser starts meanwhile)."""
        _write_settings(self.home / "lab-settings")
        argv = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.extension_manager=readonly",  # no PyPI queries from the extension manager
            "--allow-root",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.root,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends the server and its helpers
            )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status = self.api("GET", "/api/status", timeout=2)
                if "started" in status:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"jupyter lab did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def api(self, method: str, path: str, timeout: float = 10):
        """One REST call with the token; the decoded JSON answer (None for an empty one)."""
        request = urllib.request.Request(
            self.base + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def watch(self) -> list[psutil.Process]:
        """Remember every process below the server (kernel, the Lab's VMs), so none escapes stop()."""
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)
        return [p for p in self.seen.values() if p.is_running()]

    def shutdown_kernels(self, timeout: float = 20) -> list[psutil.Process]:
        """Shut every kernel down as the Kernel menu does; return the processes still alive after it."""
        below = self.watch()
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=timeout)
        _, alive = psutil.wait_procs(below, timeout=timeout)
        return alive

    def stop(self) -> None:
        """End the server's whole process group, then anything it ever started that outlived it."""
        if self.proc is None:
            return
        self.watch()
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
                break
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(list(self.seen.values()), timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a helper left in the group after the leader exited
        self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"
        return text.replace(self.token, "<token>")


# ------------------------------------------------------------------------------------------ the page


def _prompts_done(page) -> bool:
    """True once every code cell has run: each input prompt shows a number, none `[*]` or blank."""
    return page.evaluate(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                .map(e => e.textContent.trim());
            return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t));
        }"""
    )


def _error_outputs(page) -> list[str]:
    """Text of every stderr or error output in the notebook, and of widgets that failed to render."""
    found = [
        t.strip()[:600]
        for t in page.locator(
            f".jp-Notebook .jp-OutputArea-output{STDERR}, .jp-Notebook {STDERR}"
        ).all_text_contents()
    ]
    found += [
        t.strip()[:600]
        for t in page.locator(".jp-Notebook .jp-OutputArea-output").all_text_contents()
        if "Error displaying widget" in t or "Traceback (most recent call last)" in t
    ]
    return list(dict.fromkeys(found))


_RUN_STATE = re.compile(r"run state: (.+)")
_MIGRATION = re.compile(r"migration: (\S+)")
_MAPS = re.compile(r"maps (\S+) at (0x[0-9a-f]+) .*?inode (\d+)")


@dataclass
class Seen:
    """What the panel showed after one click of Next."""

    label: str
    run_state: dict[str, str]  # side -> run state, or the side's first line ("not started", ...)
    migration: dict[str, str]
    maps: dict[str, list[tuple[str, str, str]]]  # side -> [(block, address, inode)]
    src: str


def _look(stepper, label: str, src: str) -> Seen:
    run_state, migration, maps = {}, {}, {}
    for side in ("source", "destination"):
        text = stepper.locator(f".labkit-{side}").inner_text()
        m = _RUN_STATE.search(text)
        run_state[side] = m.group(1) if m else text.replace(side, "", 1).strip().splitlines()[0]
        m = _MIGRATION.search(text)
        migration[side] = m.group(1) if m else "-"
        maps[side] = _MAPS.findall(text)
    return Seen(label, run_state, migration, maps, src)


def _shot(locator, name: str) -> Path:
    """A screenshot of the Stepper's cell (code and panel) as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    return path


def _wait_kernel_idle(page, expect) -> None:
    """The kernel is up once the status bar says Idle beside the notebook's name (the execution indicator
    says idle before the kernel exists, and Run All would then run nothing)."""
    status = page.locator(".jp-StatusBar-Widget").first
    expect(status).to_contain_text(NOTEBOOK.name, timeout=60_000)
    expect(status).to_contain_text("| Idle", timeout=60_000)


def _run_all_cells(page, expect, context) -> None:
    """Run > Run All Cells, then wait until every code cell has run and the kernel is idle again."""
    page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
    page.locator('.lm-Menu-itemLabel:text-is("Run All Cells")').click()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(".labkit-stepper").wait_for(state="visible", timeout=60_000)
    except PlaywrightTimeout:
        errors = _error_outputs(page)
        raise AssertionError(
            "the Stepper never rendered: no .labkit-stepper element (is the ipywidgets lab extension there, "
            f"did the widget's comm open?); error outputs: {errors}{context()}"
        ) from None
    deadline = time.monotonic() + RUN_ALL_TIMEOUT_S
    while not _prompts_done(page):
        errors = _error_outputs(page)
        assert not errors, f"error output while running all cells: {errors}{context()}"
        assert time.monotonic() < deadline, (
            f"Run All Cells did not finish in {RUN_ALL_TIMEOUT_S} s{context()}"
        )
        time.sleep(0.5)
    _wait_kernel_idle(page, expect)


def _click_next(page, expect, stepper, index: int, name: str, total: int) -> Seen:
    """Click Next once; wait for the label to name phase `index` and for a new, loaded figure."""
    label, image = stepper.locator(".labkit-phase"), stepper.locator("img.labkit-figure")
    next_button = stepper.locator("button.labkit-next")
    before = image.get_attribute("src")
    expect(next_button).to_be_enabled()
    next_button.click()
    expect(label).to_have_text(
        re.compile(rf"^Phase: {index}/{total} {re.escape(name)}"), timeout=STEP_TIMEOUT_MS
    )
    # the figure is redrawn: new PNG bytes give the image a new blob: URL, and it decodes to a picture
    page.wait_for_function(
        """([img, before]) => img.getAttribute('src') && img.getAttribute('src') !== before
                              && img.complete && img.naturalWidth > 0""",
        arg=[image.element_handle(), before],
        timeout=STEP_TIMEOUT_MS,
    )
    return _look(stepper, label.inner_text(), image.get_attribute("src"))


def test_stepper_in_jupyterlab(tmp_path):
    """Run notebook 02 in JupyterLab, click Next through a cpr-transfer migration, look at every phase."""
    _require()
    from playwright.sync_api import expect, sync_playwright

    phases = PHASES["cpr-transfer"]
    root = tmp_path / "notebooks"
    root.mkdir()
    # a copy: JupyterLab writes checkpoints and would store outputs beside a notebook it saves
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    (tmp_path / "home").mkdir()
    server = LabServer(home=tmp_path / "home", root=root)
    console: list[str] = []
    times: dict[str, float] = {}
    t0 = time.monotonic()

    def mark(what: str) -> None:
        times[what] = round(time.monotonic() - t0, 1)

    def context() -> str:
        return "\nbrowser console:\n" + "\n".join(console[-30:]) + "\nserver log:\n" + server.log_tail()

    steps: list[Seen] = []
    try:
        server.spawn()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            mark("browser up")
            try:
                server.wait_ready()
                mark("server up")
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(STEP_TIMEOUT_MS)
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:300]))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"[:300]))
                page.goto(f"{server.base}/lab/tree/{NOTEBOOK.name}?reset&token={server.token}")
                page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
                _wait_kernel_idle(page, expect)
                mark("kernel idle")

                _run_all_cells(page, expect, context)
                mark("all cells run")
                errors = _error_outputs(page)
                assert not errors, f"error output after Run All Cells: {errors}"

                # the notebook's own cells stepped that panel to the end and closed it; run the Stepper's cell
                # again, as a person would, for a fresh migration to click through
                cell = page.locator(".jp-CodeCell:has(.labkit-stepper)")
                expect(cell).to_have_count(1)
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Control+Enter")  # run this cell, stay on it
                stepper = cell.locator(".labkit-stepper")
                expect(stepper.locator(".labkit-phase")).to_have_text(re.compile(r"^Phase: not started"))
                expect(stepper.locator("button.labkit-next")).to_be_enabled()
                stepper.locator("img.labkit-figure").wait_for(state="visible")
                _shot(cell, "start.png")

                for index, name in enumerate(phases, start=1):
                    steps.append(_click_next(page, expect, stepper, index, name, len(phases)))
                    errors = _error_outputs(page)
                    assert not errors, f"error output at phase {index}: {errors}"
                    if index == MIDDLE:
                        _shot(cell, "middle.png")
                mark("stepped through")
                expect(stepper.locator(".labkit-phase")).to_contain_text("(migration completed)")
                expect(stepper.locator("button.labkit-next")).to_be_disabled()
                status = stepper.locator(".labkit-status")
                expect(status).to_contain_text("guest memory verified on the destination: True")
                expect(status).not_to_contain_text("error")
                _shot(cell, "end.png")
                errors = _error_outputs(page)
                assert not errors, f"error output at the end: {errors}"
            except Exception as e:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(ARTIFACTS / "failure.png"))
                raise AssertionError(f"{type(e).__name__}: {e}{context()}") from e
            finally:
                browser.close()
        # shut the kernel down: the Lab's VM processes (the kernel's children) must end with it
        left = server.shutdown_kernels()
        assert not left, f"still running after the kernel shut down: {[(p.pid, p.name()) for p in left]}"
        mark("kernel shut down")
    finally:
        server.stop()
        mark("server stopped")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "jupyter-lab.log").write_text(server.log_tail(n=200_000))
        (ARTIFACTS / "steps.json").write_text(
            json.dumps({"times_s": times, "steps": [asdict(s) for s in steps]}, indent=1)
        )
    print("browser test, seconds since start:", times)

    # what a person saw, phase by phase
    assert [s.label.split(" (migration")[0] for s in steps] == [
        f"Phase: {i}/{len(phases)} {n}" for i, n in enumerate(phases, start=1)
    ]
    assert len({s.src for s in steps}) == len(steps), "the figure was not redrawn at every step"
    first, middle, last = steps[0], steps[MIDDLE - 1], steps[-1]
    assert first.run_state == {"source": "running", "destination": "not started"}, first
    assert middle.run_state == {"source": "running", "destination": "inmigrate"}, middle
    assert last.run_state == {"source": "postmigrate", "destination": "running"}, last
    assert last.migration == {"source": "completed", "destination": "completed"}, last
    assert all(s.run_state["destination"] != "running" for s in steps[:-1]), steps
    # mid-migration both processes map guest RAM: the same block and inode at two addresses
    src, dst = middle.maps["source"][0], middle.maps["destination"][0]  # (block, address, inode)
    assert (src[0], src[2]) == (dst[0], dst[2]) and src[1] != dst[1], middle.maps
