"""Workshop exercises, predict then reveal: the learner writes an answer, a check says right or wrong and why.

Where the answer is a measurement (which mode pauses least, how many bytes cross the main channel, whether a
pre-copy converges, whether ram0 keeps its inode) the check runs real, seeded migrations and judges the answer
against what they measured. Where it is one of QEMU's rules (which config cpr-transfer accepts, its error
text) the check asks a real VM, which speaks QEMU 10's texts. A check never raises: a missing answer says
"not answered yet", a malformed one says what it could not read. Measurements are cached per setting, so
changing an answer and checking again is instant; `clear_cache()` measures afresh.
"""

from __future__ import annotations

import functools
import html
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from labkit.config import VMConfig, format_size, human_size, parse_size
from labkit.lab import MODES, migrate

CPR_BLOCKER_RE = re.compile(r"^Memory region (?P<block>.+?) is not compatible with CPR\.")


@dataclass
class Check:
    """The verdict on one answer: ok, and an explanation in Markdown (rendered by Jupyter)."""

    exercise: str
    ok: bool
    answered: bool
    explanation: str
    answer: Any = None
    expected: Any = None
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        if not self.answered:
            return "✏️ Not answered yet"
        return "✅ Right" if self.ok else "❌ Not quite"

    def _repr_markdown_(self) -> str:
        return f"**{self.headline}** ({self.exercise})\n\n{self.explanation}"

    def __str__(self) -> str:
        return f"{self.headline} ({self.exercise}): {self.explanation}"

    def __bool__(self) -> bool:
        return self.ok


def _unanswered(answer: Any) -> bool:
    if answer is None or answer is Ellipsis:
        return True
    if isinstance(answer, str) and answer.strip() in ("", "...", "?"):
        return True
    if isinstance(answer, dict):
        return not answer or all(_unanswered(v) for v in answer.values())
    return False


def _not_answered(exercise: str, hint: str) -> Check:
    return Check(
        exercise, False, False, f"Replace the `...` in the prediction cell, run it, then this one. {hint}"
    )


def _never_raises(exercise: str, hint: str) -> Callable:
    """Wrap a check so that an unanswered exercise says so and anything unexpected becomes a verdict."""

    def wrap(fn: Callable[..., Check]) -> Callable[..., Check]:
        @functools.wraps(fn)
        def checked(answer: Any = None, **kwargs: Any) -> Check:
            if _unanswered(answer):
                return _not_answered(exercise, hint)
            try:
                return fn(answer, **kwargs)
            except _BadAnswer as e:
                return Check(exercise, False, True, f"Could not read your answer: {e}", answer=answer)
            except Exception as e:  # a measurement that failed must still render, never a traceback
                return Check(
                    exercise,
                    False,
                    True,
                    f"The check could not measure (`{type(e).__name__}: {html.escape(str(e))}`); "
                    "run the cell again.",
                    answer=answer,
                )

        checked.exercise = exercise  # type: ignore[attr-defined]
        CHECKS[exercise] = checked
        return checked

    return wrap


class _BadAnswer(ValueError):
    pass


CHECKS: dict[str, Callable[..., Check]] = {}
_cache: dict[tuple, Any] = {}


def clear_cache() -> None:
    """Forget every cached measurement: the next check migrates again."""
    _cache.clear()


def _measured(key: tuple, run: Callable[[], Any]) -> Any:
    if key not in _cache:
        _cache[key] = run()
    return _cache[key]


def check(exercise: str, answer: Any = None, **settings: Any) -> Check:
    """Check an answer by exercise name (see `CHECKS` for the names)."""
    fn = CHECKS.get(exercise)
    if fn is None:
        return Check(exercise, False, False, f"No exercise called `{exercise}`; known: {', '.join(CHECKS)}.")
    return fn(answer, **settings)


# -- reading answers ---------------------------------------------------------------------------------------
def _mode(answer: Any) -> str:
    text = str(answer).strip().lower().replace("_", "-").replace(" ", "-")
    if text not in MODES:
        raise _BadAnswer(f"`{answer!r}` is not a migration mode; write one of {', '.join(map(repr, MODES))}")
    return text


def _size(answer: Any) -> int:
    if isinstance(answer, bool):
        raise _BadAnswer(f"{answer!r} is not a size")
    if isinstance(answer, float):
        if answer < 0 or math.isnan(answer) or math.isinf(answer):
            raise _BadAnswer(f"{answer!r} is not a size")
        return int(answer)
    try:
        return parse_size(answer.strip() if isinstance(answer, str) else answer)
    except (ValueError, TypeError, AttributeError) as e:
        raise _BadAnswer(f"{answer!r} is not a size in bytes (write 600, '4K' or '256M'): {e}") from None


def _yes_no(answer: Any) -> bool:
    if isinstance(answer, bool):
        return answer
    text = str(answer).strip().lower()
    if text in ("yes", "y", "true", "converges"):
        return True
    if text in ("no", "n", "false", "never", "does not converge"):
        return False
    raise _BadAnswer(f"{answer!r}: write True (it converges) or False (it does not)")


def _same_or_different(answer: Any) -> bool:
    """True for 'same'."""
    if isinstance(answer, bool):
        return answer
    text = str(answer).strip().lower()
    if text in ("same", "stays", "unchanged", "kept"):
        return True
    if text in ("different", "changes", "new", "changed"):
        return False
    raise _BadAnswer(f"{answer!r}: write 'same' or 'different'")


def _per_mode(answer: Any, modes: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise _BadAnswer(
            f"write a dict with one entry per mode: {{{', '.join(repr(m) + ': ...' for m in modes)}}}"
        )
    out = {}
    for key, value in answer.items():
        out[_mode(key)] = value
    missing = [m for m in modes if m not in out or _unanswered(out[m])]
    if missing:
        raise _BadAnswer(f"no prediction for {', '.join(missing)} yet")
    return out


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


# -- 1. which mode pauses least --------------------------------------------------------------------------
def measure_pauses(
    ram: str = "512M", dirty_rate: str = "64M", max_bandwidth: str = "128M", seed: int = 1
) -> dict[str, dict[str, Any]]:
    """One migration per mode of the same guest; the guest-visible pause (STOP to RESUME) of each."""

    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in MODES:
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, max_bandwidth=max_bandwidth, seed=seed)
            pause = r.pause_ms.get("events")
            if pause is None:
                pause = r.pause_ms.get("reported")
            out[mode] = {
                "status": r.status,
                "pause_ms": pause,
                "total_ms": r.total_ms,
                "main": r.bytes["main"],
            }
        return out

    return _measured(("pauses", ram, dirty_rate, max_bandwidth, seed), run)


@_never_raises("which-mode-pauses-least", "Write one of 'normal', 'cpr-reboot', 'cpr-transfer'.")
def check_least_pause(
    answer: Any, ram: str = "512M", dirty_rate: str = "64M", max_bandwidth: str = "128M", seed: int = 1
) -> Check:
    """Which mode pauses a busy guest least? Measured: one migration per mode, same guest, same seed."""
    mode = _mode(answer)
    m = measure_pauses(ram, dirty_rate, max_bandwidth, seed)
    done = {k: v for k, v in m.items() if v["status"] == "completed" and v["pause_ms"] is not None}
    least = min(done, key=lambda k: done[k]["pause_ms"]) if done else None
    rows = [
        (k, v["status"], _ms(v["pause_ms"]), _ms(v["total_ms"]), human_size(v["main"] or 0))
        for k, v in m.items()
    ]
    table = _table(("mode", "status", "pause (STOP→RESUME)", "total", "main channel"), rows)
    why = (
        "cpr-transfer pauses only to send device state: guest RAM stays in the memfds, which the new process "
        "maps. normal pre-copy pauses to send the pages the guest dirtied during the last pass (a busy guest "
        "leaves many). cpr-reboot pauses for everything: save RAM to a file, quit, start a new process, "
        "restore. (total is query-migrate's total-time on the old process: for cpr-reboot it ends when the "
        "file is written, before the restart that the pause includes.)"
    )
    ok = least is not None and mode == least
    lead = f"On this run **{least}** paused least." if least else "No mode completed on this run."
    if not ok and mode == "cpr-transfer" and least is not None:
        lead += (
            " The rule says cpr-transfer; this noisy machine disagreed this time: `clear_cache()` and retry."
        )
    return Check(
        "which-mode-pauses-least",
        ok,
        True,
        f"{lead} A {ram} guest writing {dirty_rate}/s, seed {seed}:\n\n{table}\n\n{why}",
        answer=mode,
        expected=least,
        measured=m,
    )


# -- 2. bytes on the main channel --------------------------------------------------------------------------
def measure_bytes(ram: str = "256M", dirty_rate: str = "32M", seed: int = 1) -> dict[str, dict[str, Any]]:
    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in ("cpr-transfer", "normal"):
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, seed=seed)
            out[mode] = {"status": r.status, "main": r.bytes["main"], "cpr": r.bytes["cpr"]}
        return out

    return _measured(("bytes", ram, dirty_rate, seed), run)


@_never_raises(
    "main-channel-bytes", "Write {'cpr-transfer': SIZE, 'normal': SIZE}, sizes like 600, '4K', '256M'."
)
def check_main_channel_bytes(answer: Any, ram: str = "256M", dirty_rate: str = "32M", seed: int = 1) -> Check:
    """How many bytes cross the main channel in each mode? Right within a factor of ten (order of magnitude)."""
    predicted = {k: _size(v) for k, v in _per_mode(answer, ("cpr-transfer", "normal")).items()}
    m = measure_bytes(ram, dirty_rate, seed)
    rows, ok = [], True
    for mode in ("cpr-transfer", "normal"):
        got, guess = m[mode]["main"] or 0, predicted[mode]
        if got <= 0 or guess <= 0:
            close = got == guess
        else:
            close = abs(math.log10(guess / got)) <= 1
        ok = ok and close and m[mode]["status"] == "completed"
        verdict = "✓ same order of magnitude" if close else f"✗ off by {_factor(guess, got)}"
        rows.append((mode, f"{guess:,} B ({human_size(guess)})", f"{got:,} B ({human_size(got)})", verdict))
    table = _table(("mode", "your prediction", "measured", ""), rows)
    cpr = m["cpr-transfer"]["cpr"]
    why = (
        f"cpr-transfer's main channel carries a header, an empty RAM section and the device state: hundreds of "
        f"bytes whatever the RAM size. The RAM itself does not move: its fds cross the cpr channel ({cpr} B of "
        f"CPR state, the fds in SCM_RIGHTS). normal pre-copy sends every page at least once, plus every page "
        f"dirtied meanwhile: bytes in the order of the guest's RAM."
    )
    return Check(
        "main-channel-bytes",
        ok,
        True,
        f"A {ram} guest writing {dirty_rate}/s, seed {seed}:\n\n{table}\n\n{why}",
        answer=predicted,
        expected={k: v["main"] for k, v in m.items()},
        measured=m,
    )


def _factor(guess: int, got: int) -> str:
    if guess <= 0 or got <= 0:
        return "a zero"
    f = max(guess / got, got / guess)
    return f"a factor of {f:,.0f} ({'too high' if guess > got else 'too low'})"


# -- 3. does a pre-copy converge -------------------------------------------------------------------------
@_never_raises("does-it-converge", "Write True (it converges) or False (it never does).")
def check_converges(
    answer: Any,
    ram: str = "64M",
    dirty_rate: str = "256M",
    max_bandwidth: str = "128M",
    downtime_limit: int = 300,
    passes: int = 6,
    seed: int = 1,
) -> Check:
    """Does a normal migration of this guest converge? Measured: pre-copy watched for `passes` passes."""
    from labkit.sweeps import watch_precopy

    predicted = _yes_no(answer)
    w = _measured(
        ("converge", ram, dirty_rate, max_bandwidth, downtime_limit, passes, seed),
        lambda: watch_precopy(
            ram=ram,
            dirty_rate=dirty_rate,
            max_bandwidth=max_bandwidth,
            downtime_limit=downtime_limit,
            passes=passes,
            timeout=25,
            seed=seed,
        ),
    )
    last = w.samples.iloc[-1]
    if w.converged:
        seen = f"It **converged**: completed after {int(last['dirty_sync_count'])} dirty-bitmap syncs."
    else:
        seen = (
            f"It did **not converge**: still `{last['status']}` after {int(last['dirty_sync_count'])} passes, "
            f"expected-downtime {last['expected_downtime_ms']} ms against a limit of {downtime_limit} ms; "
            f"after `migrate_cancel` the source says `{w.after_cancel.get('migration status')}`, runstate "
            f"`{w.after_cancel.get('source runstate')}`, guest memory verified: "
            f"{w.after_cancel.get('guest memory verified')}."
        )
    r = w.ratio
    why = (
        f"r = dirty rate / bandwidth = {human_size(w.dirty_rate)}/s ÷ {human_size(w.max_bandwidth)}/s = {r:.2f}. "
        + (
            "Each pass takes as long as the last and the guest dirties at least as much again meanwhile: "
            "what is left never fits in the downtime limit, so pre-copy goes on until cancelled."
            if r >= 1
            else "Pass i sends about M·r^i, a shrinking series: once what is left fits in the downtime limit "
            "at the measured bandwidth, the guest stops and the rest is copied."
        )
    )
    return Check(
        "does-it-converge",
        predicted == w.converged,
        True,
        f"A {ram} guest writing {dirty_rate}/s at max-bandwidth {max_bandwidth}/s: {seen}\n\n{why}",
        answer=predicted,
        expected=w.converged,
        measured={"samples": w.samples, "after_cancel": w.after_cancel},
    )


# -- 4. a config cpr-transfer accepts ---------------------------------------------------------------------
_CONFIG_KEYS = ("ram", "memory_backend", "share", "aux_ram_share")


def _config_kwargs(answer: Any) -> dict[str, Any]:
    if isinstance(answer, VMConfig) or is_dataclass(answer):
        d = asdict(answer)
    elif isinstance(answer, dict):
        d = dict(answer)
    else:
        raise _BadAnswer("write a VMConfig(...) or a dict with memory_backend=, share=, aux_ram_share=")
    unknown = [k for k in d if k not in _CONFIG_KEYS and not isinstance(answer, VMConfig)]
    if unknown:
        raise _BadAnswer(f"unknown key(s) {', '.join(unknown)}; use {', '.join(_CONFIG_KEYS)}")
    out = {k: d[k] for k in _CONFIG_KEYS if k in d}
    out.setdefault("ram", "64M")
    if isinstance(out["ram"], int) and not isinstance(out["ram"], bool):
        out["ram"] = format_size(min(out["ram"], 1 << 30))  # the check needs the layout, not a big guest
    if out.get("memory_backend", "memfd") not in ("memfd", "ram", "file", "epc", "none"):
        raise _BadAnswer(
            f"memory_backend must be memfd, ram, file, epc or none, not {out['memory_backend']!r}"
        )
    return out


@_never_raises(
    "config-cpr-transfer-accepts", "Write VMConfig(memory_backend=..., share=..., aux_ram_share=...)."
)
def check_cpr_config(answer: Any, seed: int = 1) -> Check:
    """Does cpr-transfer accept this VM? Measured: a real cpr-transfer migration of it."""
    kwargs = _config_kwargs(answer)
    r = migrate(mode="cpr-transfer", seed=seed, **kwargs)
    desc = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    if r.status == "completed":
        ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
        same = (
            "source" in ram0 and "destination" in ram0 and ram0["source"].inode == ram0["destination"].inode
        )
        text = (
            f"`{desc}`: cpr-transfer **completed**, {r.bytes['main']} B on the main channel"
            + (f", ram0 kept inode {ram0['source'].inode} in both processes." if same else ".")
            + "\n\nEvery RAM block is shared and backed by an fd the new process can map: the memory backend "
            "with share=on, the implicit blocks (BIOS, option ROMs, ACPI tables) through `-machine aux-ram-share=on`."
        )
        return Check("config-cpr-transfer-accepts", True, True, text, answer=kwargs, expected="completed")
    reasons = r.query_migrate.get("blocked-reasons") or []
    lines = "\n".join(f"- `{t}`" for t in reasons[:8]) or f"- `{r.error}`"
    text = (
        f"`{desc}`: refused, the source says\n\n> {r.error}\n\nquery-migrate's blocked-reasons:\n\n{lines}\n\n"
        "CPR needs **every** RAM block shared and backed by an fd: `share=on` on the memory backend "
        "(memfd, ram or file), and `aux_ram_share=True` so QEMU's implicit blocks get memfds too."
    )
    return Check("config-cpr-transfer-accepts", False, True, text, answer=kwargs, expected="completed")


# -- 5. QEMU's CPR error texts ---------------------------------------------------------------------------
def refusal(
    memory_backend: str = "memfd", share: bool | None = True, aux_ram_share: bool = True
) -> str | None:
    """The text a cpr-transfer `migrate` is refused with for this VM (None if it is accepted)."""
    return _refusal(memory_backend, share, aux_ram_share)[0]


def _refusal(memory_backend: str, share: bool | None, aux_ram_share: bool) -> tuple[str | None, list[str]]:
    def run() -> tuple[str | None, list[str]]:
        r = migrate(
            mode="cpr-transfer",
            ram="32M",
            memory_backend=memory_backend,
            share=share,
            aux_ram_share=aux_ram_share,
        )
        reasons = r.query_migrate.get("blocked-reasons") or []
        return (None if r.status == "completed" else r.error), list(reasons)

    return _measured(("refusal", memory_backend, share, aux_ram_share), run)


def _norm(text: str) -> str:
    return " ".join(str(text).replace("`", "").strip().strip("'\"").split()).rstrip(".").lower()


@_never_raises("cpr-error-text", "Write the whole error text as a string.")
def check_cpr_error_text(answer: Any, memory_backend: str = "memfd") -> Check:
    """The exact text QEMU refuses cpr-transfer with when the memory backend has share=off."""
    if not isinstance(answer, str):
        raise _BadAnswer("write the text as a string")
    text = refusal(memory_backend, share=False, aux_ram_share=True) or ""
    ok = _norm(answer) == _norm(text)
    hints = []
    if not ok:
        for part in ("ram0", "share=on", "aux-ram-share=on", "not compatible with CPR"):
            if part.lower() not in answer.lower():
                hints.append(f"`{part}`")
    more = f" Your text lacks {', '.join(hints)}." if hints else ""
    return Check(
        "cpr-error-text",
        ok,
        True,
        f"memory-backend-{memory_backend} with share=off, `migrate` in cpr-transfer mode says:\n\n> {text}\n\n"
        f"{'' if ok else 'Your text differs.' + more} It names the block (`ram0`, the backend's id) and both "
        "rules, since either one can be the cause. QEMU adds this blocker per RAM block when the block is "
        "created (ram_block_add_cpr_blocker), so query-migrate's blocked-reasons lists it before any migrate.",
        answer=answer,
        expected=text,
    )


@_never_raises("blocked-block", "Write the name of a RAM block, as a string.")
def check_blocked_block(answer: Any) -> Check:
    """Which block does QEMU name when the RAM backend is fine (memfd, share=on) but aux-ram-share is off?"""
    text, reasons = _refusal("memfd", True, False)
    text = text or ""
    match = CPR_BLOCKER_RE.match(text)
    block = match.group("block") if match else text
    given = str(answer).strip().strip("'\"")
    ok = given == block or _norm(given) == _norm(text)
    names = [m.group("block") for m in map(CPR_BLOCKER_RE.match, reasons) if m]
    listed = ", ".join(f"`{n}`" for n in names) or "none"
    return Check(
        "blocked-block",
        ok,
        True,
        f"QEMU names **`{block}`**:\n\n> {text}\n\nWithout aux-ram-share the implicit blocks are private "
        f"anonymous memory that no other process can map; query-migrate's blocked-reasons lists each of them: "
        f"{listed}. Each block adds its blocker as it is created, and `migrate` quotes the head of QEMU's "
        "blocker list, which is prepended to: the block created last.",
        answer=given,
        expected=block,
    )


# -- 6. does ram0 keep its inode -------------------------------------------------------------------------
def measure_inodes(ram: str = "64M", seed: int = 1) -> dict[str, dict[str, Any]]:
    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in ("cpr-transfer", "normal"):
            r = migrate(mode=mode, ram=ram, dirty_rate="16M", seed=seed)
            ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
            src, dst = ram0.get("source"), ram0.get("destination")
            out[mode] = {
                "status": r.status,
                "source": (src.inode, hex(src.start)) if src else None,
                "destination": (dst.inode, hex(dst.start)) if dst else None,
                "same": bool(src and dst and src.inode == dst.inode),
            }
        return out

    return _measured(("inodes", ram, seed), run)


@_never_raises(
    "ram0-inode", "Write {'cpr-transfer': 'same' or 'different', 'normal': 'same' or 'different'}."
)
def check_inode(answer: Any, ram: str = "64M", seed: int = 1) -> Check:
    """Is ram0 the same file (inode) in source and destination after the migration?"""
    predicted = {k: _same_or_different(v) for k, v in _per_mode(answer, ("cpr-transfer", "normal")).items()}
    m = measure_inodes(ram, seed)
    rows, ok = [], True
    for mode in ("cpr-transfer", "normal"):
        got = m[mode]["same"]
        ok = ok and predicted[mode] == got and m[mode]["status"] == "completed"
        src, dst = m[mode]["source"], m[mode]["destination"]
        rows.append(
            (
                mode,
                "same" if predicted[mode] else "different",
                "same" if got else "different",
                f"inode {src[0]} at {src[1]}" if src else "n/a",
                f"inode {dst[0]} at {dst[1]}" if dst else "n/a",
            )
        )
    table = _table(("mode", "you said", "measured", "source ram0", "destination ram0"), rows)
    why = (
        "cpr-transfer hands the memfd itself to the new process (SCM_RIGHTS on the cpr channel): the same "
        "inode, the same physical pages, mapped at a new virtual address. normal migration starts a "
        "destination with its own new memfd and copies the pages into it: a different inode."
    )
    return Check(
        "ram0-inode",
        ok,
        True,
        f"{table}\n\n{why}",
        answer=predicted,
        expected={k: v["same"] for k, v in m.items()},
        measured=m,
    )


# -- 7. cpr-exec: the same PID, and what fills its pause ---------------------------------------------------
def _startup_or_rest(answer: Any) -> str:
    text = str(answer).strip().lower().replace("_", "-")
    if text in ("start-up", "startup", "start up", "new program", "the new program's start-up"):
        return "start-up"
    if text in ("rest", "the rest", "everything else", "state", "saving and loading"):
        return "the rest"
    raise _BadAnswer(f"`{answer!r}`: write 'start-up' or 'the rest'")


def measure_cpr_exec(ram: str = "64M", seed: int = 1) -> dict[str, Any]:
    """One cpr-exec migration: PIDs, and the pause cut into the new program's start-up and everything else."""
    from labkit.pause_breakdown import new_process_window

    def run() -> dict[str, Any]:
        r = migrate(mode="cpr-exec", ram=ram, dirty_rate="16M", seed=seed)
        pause = r.pause_ms.get("events")
        window = new_process_window(r)
        inside = None
        if pause is not None and window is not None:
            inside = max(0.0, min(window[1], pause) - max(window[0], 0.0))
        return {
            "status": r.status,
            "pids": dict(r.pids),
            "pause_ms": pause,
            "start_up_ms": None if inside is None else round(inside, 3),
            "rest_ms": None if inside is None or pause is None else round(pause - inside, 3),
            "verified": r.guest_verified,
        }

    return _measured(("cpr-exec", ram, seed), run)


@_never_raises("cpr-exec-pause", "Write {'pid': 'same' or 'different', 'bigger': 'start-up' or 'the rest'}.")
def check_cpr_exec_pause(answer: Any, ram: str = "64M", seed: int = 1) -> Check:
    """cpr-exec: does the guest keep its PID, and is its pause mostly the new program's start-up?"""
    if not isinstance(answer, dict) or set(answer) != {"pid", "bigger"}:
        raise _BadAnswer("write a dict with the keys 'pid' and 'bigger'")
    pid_same = _same_or_different(answer["pid"])
    bigger = _startup_or_rest(answer["bigger"])
    m = measure_cpr_exec(ram, seed)
    if m["status"] != "completed" or m["start_up_ms"] is None:
        return Check("cpr-exec-pause", False, True, f"The migration did not complete here: {m}", measured=m)
    same = m["pids"]["source"] == m["pids"]["destination"]
    measured_bigger = "start-up" if m["start_up_ms"] >= m["rest_ms"] else "the rest"
    ok = pid_same == same and bigger == measured_bigger
    table = _table(
        ("", "you said", "measured"),
        [
            ("PID", "same" if pid_same else "different", f"{m['pids']['source']} → {m['pids']['destination']}"),
            ("bigger part of the pause", bigger, measured_bigger),
            ("the new program's start-up", "", _ms(m["start_up_ms"])),
            ("everything else (stop, save, load, resume)", "", _ms(m["rest_ms"])),
        ],
    )
    why = (
        "cpr-exec replaces the program inside the same process (execvp): the PID stays, the fds that hold "
        "guest RAM stay open, and the kernel tears down the old program's mappings. The new program only "
        "starts *after* the guest stopped, so its whole start-up (here a Python interpreter and labkit's "
        "imports; in QEMU, the new binary's initialisation) is part of the pause, while saving and loading "
        "the device state is a few milliseconds. cpr-transfer starts the new process before the guest stops."
    )
    return Check(
        "cpr-exec-pause",
        ok,
        True,
        f"A {ram} guest, seed {seed}:\n\n{table}\n\n{why}",
        answer={"pid": "same" if pid_same else "different", "bigger": bigger},
        expected={"pid": "same" if same else "different", "bigger": measured_bigger},
        measured=m,
    )
