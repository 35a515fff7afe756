"""Workshop exercises, predict then reveal: the learner writes an answer, a check says right or wrong and why.

Each exercise has seeded variants, the OSTEP way: `EXERCISES` lists the exercise ids and
`variant(exercise_id, seed=N)` returns that variant's parameters (RAM size, dirty rate, bandwidth, memory
backend, which option is off), so every attendee gets their own numbers and must apply the method, not recall
an answer. `check(exercise_id, answer, seed=N)` runs the variant. Where the answer is a measurement the check
runs real migrations on the backend asked for and judges the answer against what they measured, with a
tolerance taken from the run's own spread (the pause's three measures, or the order of magnitude the question
asks for). Where it is one of QEMU's rules (which config cpr-transfer accepts, what its refusal names) the
check asks a real VM, which speaks QEMU 10's texts; any correct answer passes (any blocked block, not the first
of QEMU's list). A check never raises: a missing answer or a template still holding `...` says "not answered
yet", a malformed one says what it could not read. Measurements are cached per setting, so changing an answer
and checking again is instant; `clear_cache()` measures afresh.
"""

from __future__ import annotations

import functools
import getpass
import html
import math
import os
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.lab.engine import MODES, migrate
from labkit.qemu_syntax import format_size, human_size, parse_size

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


def _placeholder(value: Any) -> bool:
    return value is Ellipsis or (isinstance(value, str) and value.strip() in ("", "...", "?"))


def _unanswered(answer: Any) -> bool:
    """Nothing written yet, or a template that still holds a `...` anywhere (a dict value, a VMConfig
    field): a template must never pass, whatever its other fields say."""
    if answer is None or _placeholder(answer):
        return True
    if isinstance(answer, dict):
        return not answer or any(_unanswered(v) for v in answer.values())
    if isinstance(answer, (list, tuple)):
        return not answer or any(_unanswered(v) for v in answer)
    if is_dataclass(answer) and not isinstance(answer, type):
        return any(getattr(answer, f) is Ellipsis for f in answer.__dataclass_fields__)
    return False


def _not_answered(exercise: str, hint: str) -> Check:
    return Check(
        exercise, False, False, f"Replace the `...` in the prediction cell, run it, then this one. {hint}"
    )


def _never_raises(exercise: str, hint: str) -> Callable:
    """Wrap a check so that an unanswered exercise says so and anything unexpected becomes a verdict."""

    def wrap(fn: Callable[..., Check]) -> Callable[..., Check]:
        @functools.wraps(fn)
        def checked(answer: Any = None, seed: int = 1, **settings: Any) -> Check:
            if _unanswered(answer):
                return _not_answered(exercise, hint)
            try:
                params = {**variant(exercise, seed), **settings}
            except ValueError as e:
                return Check(exercise, False, False, f"Pick another seed: {e}.")
            try:
                return fn(answer, **params)
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
    """Check an answer by exercise name (see `EXERCISES`): `seed=N` picks the variant, any other setting
    (ram=, dirty_rate=, backend=, ...) overrides that variant's."""
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


# -- variants ----------------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return format_size(int(n) << 20)


def _v_pauses(rng: random.Random) -> dict[str, Any]:
    bandwidth = rng.choice((128, 256, 512))
    # a dirty rate well under the bandwidth, so that normal converges and all three modes can be compared
    return {"ram": _mib(rng.choice((128, 192, 256, 384))), "max_bandwidth": _mib(bandwidth),
            "dirty_rate": _mib(bandwidth * rng.choice((1, 2, 3)) // 8)}  # fmt: skip


def _v_bytes(rng: random.Random) -> dict[str, Any]:
    return {"ram": _mib(rng.choice((128, 192, 256, 384, 512))), "dirty_rate": _mib(rng.choice((0, 16, 32, 64)))}


def _v_converge(rng: random.Random) -> dict[str, Any]:
    """A guest whose fate the model decides clearly: rerolled while RAM is near what the downtime limit lets
    the link send, where noise could decide it either way."""
    while True:
        ram, bandwidth = rng.choice((32, 64, 96, 128)), rng.choice((64, 128, 256))
        ratio, limit = rng.choice((0.25, 0.5, 2, 3)), rng.choice((100, 300))
        fits = ram / (bandwidth * limit / 1000)
        if ratio * bandwidth <= 512 and not 0.6 <= fits <= 1.6 and (ratio < 1 or fits < 0.6 or ram >= 64):
            return {"ram": _mib(ram), "dirty_rate": _mib(ratio * bandwidth), "max_bandwidth": _mib(bandwidth),
                    "downtime_limit": limit}  # fmt: skip


def _v_config(rng: random.Random) -> dict[str, Any]:
    return {"ram": _mib(rng.choice((32, 64))), "memory_backend": rng.choice(("memfd", "ram", "file"))}


def _v_error(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:  # the memory backend is private
        return {"memory_backend": rng.choice(("memfd", "ram", "file")), "share": False, "aux_ram_share": True}
    return {"memory_backend": rng.choice(("memfd", "ram", "file")), "share": True, "aux_ram_share": False}


def _v_blocked(rng: random.Random) -> dict[str, Any]:
    return {"memory_backend": rng.choice(("memfd", "ram", "file")), "share": True, "aux_ram_share": False}


def _v_inode(rng: random.Random) -> dict[str, Any]:
    return {"ram": _mib(rng.choice((32, 64, 128))), "memory_backend": rng.choice(("memfd", "ram")),
            "dirty_rate": _mib(rng.choice((0, 16, 32)))}  # fmt: skip


def _v_cpr_exec(rng: random.Random) -> dict[str, Any]:
    return {"ram": _mib(rng.choice((32, 64, 128))), "dirty_rate": _mib(rng.choice((0, 16, 64)))}


_VARIANTS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "which-mode-pauses-least": _v_pauses,
    "main-channel-bytes": _v_bytes,
    "does-it-converge": _v_converge,
    "config-cpr-transfer-accepts": _v_config,
    "cpr-error-text": _v_error,
    "blocked-block": _v_blocked,
    "ram0-inode": _v_inode,
    "cpr-exec-pause": _v_cpr_exec,
}
EXERCISES: tuple[str, ...] = tuple(_VARIANTS)


def variant(exercise_id: str, seed: int = 1) -> dict[str, Any]:
    """The parameters of one exercise's variant: the same seed always gives the same ones, and the guest's
    workload seed is `seed` too, so a variant is one reproducible experiment."""
    make = _VARIANTS.get(exercise_id)
    if make is None:
        raise ValueError(f"no exercise called {exercise_id!r}; known: {', '.join(EXERCISES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, not {seed!r}")
    return {**make(random.Random(f"{exercise_id}/{seed}")), "seed": seed}


def my_seed() -> int:
    """A seed for this attendee: $LABKIT_SEED if set, else a number from the user name (1-999), so that
    neighbours get different variants without choosing."""
    env = os.environ.get("LABKIT_SEED", "").strip()
    if env.isdigit():
        return int(env)
    return zlib.crc32(getpass.getuser().encode()) % 999 + 1


def _on(backend: str) -> str:
    return "real QEMU 10" if backend == "qemu" else "the emulated backend"


# -- 1. which mode pauses least --------------------------------------------------------------------------
def _pause_band(r: Any) -> tuple[float, float] | None:
    """The run's own spread of its pause: the lowest and highest of QEMU's downtime, STOP→RESUME from the
    events, and the guest's own gap. A mode whose band reaches into the least one's cannot be told apart."""
    values = [v for v in r.pause_ms.values() if v is not None]
    return (min(values), max(values)) if values else None


def measure_pauses(
    ram: str = "256M", dirty_rate: str = "64M", max_bandwidth: str = "256M", seed: int = 1,
    backend: str = "emulated",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One migration per mode of the same guest; the guest-visible pause (STOP to RESUME) of each, with
    its band (the lowest and highest of the run's three pause measures)."""

    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in MODES:
            if backend == "qemu" and mode == "cpr-reboot":
                continue
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, max_bandwidth=max_bandwidth, seed=seed,
                        backend=backend)  # fmt: skip
            pause = r.pause_ms.get("events")
            if pause is None:
                pause = r.pause_ms.get("reported")
            out[mode] = {"status": r.status, "pause_ms": pause, "band_ms": _pause_band(r),
                         "total_ms": r.total_ms, "main": r.bytes["main"]}  # fmt: skip
        return out

    return _measured(("pauses", ram, dirty_rate, max_bandwidth, seed, backend), run)


@_never_raises("which-mode-pauses-least", "Write one of 'normal', 'cpr-reboot', 'cpr-transfer'.")
def check_least_pause(
    answer: Any, ram: str = "256M", dirty_rate: str = "64M", max_bandwidth: str = "256M", seed: int = 1,
    backend: str = "emulated",
) -> Check:  # fmt: skip
    """Which mode pauses a busy guest least? Measured: one migration per mode, same guest, same seed; any
    mode whose pause band overlaps the least one's is right too (the run cannot tell them apart)."""
    mode = _mode(answer)
    m = measure_pauses(ram, dirty_rate, max_bandwidth, seed, backend)
    done = {k: v for k, v in m.items() if v["status"] == "completed" and v["pause_ms"] is not None}
    least = min(done, key=lambda k: done[k]["pause_ms"]) if done else None
    tied = [k for k in done if least and done[k]["band_ms"][0] <= done[least]["band_ms"][1]]
    rows = [
        (k, v["status"], _ms(v["pause_ms"]),
         f"{v['band_ms'][0]:.1f}–{v['band_ms'][1]:.1f} ms" if v["band_ms"] else "n/a",
         _ms(v["total_ms"]), human_size(v["main"] or 0))
        for k, v in m.items()
    ]  # fmt: skip
    table = _table(("mode", "status", "pause (STOP→RESUME)", "band", "total", "main channel"), rows)
    ok = mode in tied
    if least is None:
        lead = "No mode completed on this run: `clear_cache()` and check again."
    elif len(tied) > 1:
        lead = (f"On this run **{least}** paused least, but {', '.join(tied)} overlap within the run's own "
                "spread (band: the lowest to highest of QEMU's downtime, the events' STOP→RESUME and the "
                "guest's own gap), so each of them counts as right.")  # fmt: skip
    else:
        lead = f"On this run **{least}** paused least, clear of the others' bands."
    reasons = {
        "cpr-transfer": "cpr-transfer pauses only to send device state: guest RAM stays in the memfds, which "
        "the new process mapped before the guest stopped.",
        "normal": "normal pre-copy pauses to send the pages the guest dirtied during the last pass, sized to "
        "fit the downtime limit.",
        "cpr-reboot": "cpr-reboot pauses for everything: save RAM to a file, quit, start a new process, "
        "restore.",
    }
    ranked = sorted(done, key=lambda k: done[k]["pause_ms"])
    why = " ".join(reasons[k] for k in ranked) + (
        " (total is query-migrate's total-time on the old process: for cpr-reboot it ends when the file is "
        "written, before the restart that the pause includes.)"
    )
    return Check(
        "which-mode-pauses-least", ok, True,
        f"{lead} A {ram} guest writing {dirty_rate}/s over a {max_bandwidth}/s link, seed {seed}, on "
        f"{_on(backend)}, fastest pause first:\n\n{table}\n\n{why}",
        answer=mode, expected=tied, measured=m,
    )  # fmt: skip


# -- 2. bytes on the main channel --------------------------------------------------------------------------
BYTES_FACTOR = 10  # the question asks for an order of magnitude


def measure_bytes(
    ram: str = "256M", dirty_rate: str = "32M", seed: int = 1, backend: str = "emulated"
) -> dict[str, dict[str, Any]]:
    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in ("cpr-transfer", "normal"):
            # the emulated guest has written all its RAM once, as a guest that has used its memory (and as
            # the real guest soon has): untouched pages would travel as zero-page markers of a few bytes
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, seed=seed, backend=backend,
                        prefill=backend == "emulated")  # fmt: skip
            out[mode] = {"status": r.status, "main": r.bytes["main"], "cpr": r.bytes["cpr"]}
        return out

    return _measured(("bytes", ram, dirty_rate, seed, backend), run)


@_never_raises(
    "main-channel-bytes", "Write {'cpr-transfer': SIZE, 'normal': SIZE}: bytes as a number, or with K, M, G."
)
def check_main_channel_bytes(
    answer: Any, ram: str = "256M", dirty_rate: str = "32M", seed: int = 1, backend: str = "emulated"
) -> Check:
    """How many bytes cross the main channel in each mode? Right within a factor of ten (order of magnitude)
    of what the backend used measured."""
    predicted = {k: _size(v) for k, v in _per_mode(answer, ("cpr-transfer", "normal")).items()}
    m = measure_bytes(ram, dirty_rate, seed, backend)
    rows, ok = [], True
    for mode in ("cpr-transfer", "normal"):
        got, guess = m[mode]["main"] or 0, predicted[mode]
        if got <= 0 or guess <= 0:
            close = got == guess
        else:
            close = abs(math.log10(guess / got)) <= math.log10(BYTES_FACTOR)
        ok = ok and close and m[mode]["status"] == "completed"
        verdict = "✓ same order of magnitude" if close else f"✗ off by {_factor(guess, got)}"
        rows.append((mode, f"{guess:,} B ({human_size(guess)})", f"{got:,} B ({human_size(got)})", verdict))
    table = _table(("mode", "your prediction", "measured", ""), rows)
    cpr, ram_bytes, normal = m["cpr-transfer"]["cpr"], parse_size(ram), m["normal"]["main"] or 0
    why = (
        f"cpr-transfer's main channel carried {m['cpr-transfer']['main']:,} B: a header, a RAM section that "
        f"lists the blocks but carries no pages, and the device state, whatever the RAM size. The RAM itself "
        f"does not move: its fds cross the cpr channel ({cpr} B of CPR state, the fds in SCM_RIGHTS). normal "
        f"pre-copy sent {normal / ram_bytes:.2f}× the guest's {human_size(ram_bytes)}: every page at least "
        "once, plus every page dirtied meanwhile."
    )
    return Check(
        "main-channel-bytes", ok, True,
        f"A {ram} guest writing {dirty_rate}/s, seed {seed}, on {_on(backend)}:\n\n{table}\n\n{why}",
        answer=predicted, expected={k: v["main"] for k, v in m.items()}, measured=m,
    )  # fmt: skip


def _factor(guess: int, got: int) -> str:
    if guess <= 0 or got <= 0:
        return "a zero"
    f = max(guess / got, got / guess)
    return f"a factor of {f:,.0f} ({'too high' if guess > got else 'too low'})"


# -- 3. does a pre-copy converge -------------------------------------------------------------------------
def converge_model(ram: str, dirty_rate: str, max_bandwidth: str, downtime_limit: int) -> dict[str, Any]:
    """The pre-copy model: with r = dirty rate / bandwidth < 1, pass i sends about M·r^i, a shrinking
    series, so what is left soon fits in the downtime limit; with r >= 1 it never shrinks, and pre-copy only
    ends if the whole RAM fits in what the link sends within the limit. `seconds` is how long a converging
    run should take (the series' sum over the bandwidth), which sets how long the check waits."""
    size, dirty, bandwidth = parse_size(ram, "m"), parse_size(dirty_rate), parse_size(max_bandwidth)
    r, budget = dirty / bandwidth, bandwidth * downtime_limit / 1000
    fits = size <= budget
    converges = r < 1 or fits
    seconds = size / bandwidth / (1 - r) if r < 1 else size / bandwidth
    return {"r": r, "budget": budget, "fits": fits, "converges": converges, "seconds": seconds}


@_never_raises("does-it-converge", "Write True (it converges) or False (it never does).")
def check_converges(
    answer: Any, ram: str = "64M", dirty_rate: str = "256M", max_bandwidth: str = "128M",
    downtime_limit: int = 300, passes: int = 6, seed: int = 1, backend: str = "emulated",
) -> Check:  # fmt: skip
    """Does a normal migration of this guest converge? Measured: pre-copy watched until it completes, for
    at least four times as long as the model says a converging run needs, or for `passes` passes when the
    model says it never will; then cancelled."""
    from labkit.measure.sweeps import watch_precopy

    predicted = _yes_no(answer)
    model = converge_model(ram, dirty_rate, max_bandwidth, downtime_limit)
    wait = max(20.0, 4 * model["seconds"] + 5)
    w = _measured(
        ("converge", ram, dirty_rate, max_bandwidth, downtime_limit, passes, seed, backend),
        lambda: watch_precopy(
            ram=ram, dirty_rate=dirty_rate, max_bandwidth=max_bandwidth, downtime_limit=downtime_limit,
            passes=10_000 if model["converges"] else passes, timeout=wait, seed=seed, backend=backend,
        ),
    )  # fmt: skip
    last = w.samples.iloc[-1]
    syncs = int(last["dirty_sync_count"] or 0)
    r, budget = w.ratio, human_size(model["budget"])
    law = f"r = dirty rate / bandwidth = {human_size(w.dirty_rate)}/s ÷ {human_size(w.max_bandwidth)}/s = {r:.2f}"
    if w.converged:
        seen = f"It **converged**: completed after {syncs} dirty-bitmap syncs."
        why = (
            f"{law} < 1: pass i sends about M·r^i, a shrinking series; once what is left fits in the downtime "
            f"limit ({downtime_limit} ms at {human_size(w.max_bandwidth)}/s = {budget}), the guest stops and "
            "the rest is copied."
            if r < 1
            else f"{law} ≥ 1, so the dirty set never shrinks, but the whole {ram} fits in what the link sends "
            f"within the {downtime_limit} ms limit ({budget}): the first pass that ends finds the rest small "
            "enough to stop and copy."
        )
        expected = True
    elif model["converges"] and syncs < passes:
        seen = (
            f"It had **not finished** after {float(last['t_s']):.0f} s ({syncs} syncs, still `{last['status']}`), "
            f"though the model expects about {model['seconds']:.1f} s. That says this machine is busy, not that "
            "pre-copy diverges: `clear_cache()` and check again."
        )  # fmt: skip
        why, expected = law + ".", None
    else:
        seen = (
            f"It did **not converge**: still `{last['status']}` after {syncs} passes, expected-downtime "
            f"{last['expected_downtime_ms']} ms against a limit of {downtime_limit} ms; after `migrate_cancel` "
            f"the source says `{w.after_cancel.get('migration status')}`, runstate "
            f"`{w.after_cancel.get('source runstate')}`, guest memory verified: "
            f"{w.after_cancel.get('guest memory verified')}."
        )
        why = (
            f"{law} ≥ 1: each pass takes as long as the last and the guest dirties at least as much again "
            f"meanwhile, and the whole {ram} is more than the link sends within the limit ({budget}): what is "
            "left never fits, so pre-copy goes on until cancelled."
            if r >= 1
            else f"{law} < 1, yet what was left never fit in the limit ({budget}) here: the guest's pattern "
            "re-dirtied pages faster than the rate suggests."
        )
        expected = False
    return Check(
        "does-it-converge", expected is not None and predicted == expected, True,
        f"A {ram} guest writing {dirty_rate}/s at max-bandwidth {max_bandwidth}/s, downtime limit "
        f"{downtime_limit} ms, on {_on(backend)}: {seen}\n\n{why}",
        answer=predicted, expected=expected, measured={"samples": w.samples, "after_cancel": w.after_cancel},
    )  # fmt: skip


# -- 4. a config cpr-transfer accepts ---------------------------------------------------------------------
_CONFIG_KEYS = ("ram", "memory_backend", "share", "aux_ram_share")


def _config_kwargs(answer: Any, memory_backend: str, ram: str) -> dict[str, Any]:
    if isinstance(answer, VMConfig) or is_dataclass(answer):
        d = asdict(answer)
    elif isinstance(answer, dict):
        d = dict(answer)
    else:
        raise _BadAnswer("write a dict with share= and aux_ram_share= (or a VMConfig(...))")
    unknown = [k for k in d if k not in _CONFIG_KEYS and not isinstance(answer, VMConfig)]
    if unknown:
        raise _BadAnswer(f"unknown key(s) {', '.join(unknown)}; use {', '.join(_CONFIG_KEYS)}")
    out = {k: d[k] for k in _CONFIG_KEYS if k in d}
    if isinstance(answer, dict):
        out.setdefault("memory_backend", memory_backend)
    if out.get("memory_backend") not in ("memfd", "ram", "file", "epc", "none"):
        raise _BadAnswer(f"memory_backend must be memfd, ram, file, epc or none, not {out['memory_backend']!r}")
    if out["memory_backend"] != memory_backend:
        raise _BadAnswer(f"your variant's memory backend is {memory_backend!r}, not {out['memory_backend']!r}")
    if "ram" not in d or isinstance(answer, VMConfig):
        out["ram"] = ram
    if isinstance(out["ram"], int) and not isinstance(out["ram"], bool):
        out["ram"] = format_size(min(out["ram"], 1 << 30))  # the check needs the layout, not a big guest
    for key in ("share", "aux_ram_share"):
        if key in out and out[key] is not None and not isinstance(out[key], bool):
            raise _BadAnswer(f"{key} must be True or False, not {out[key]!r}")
    return out


@_never_raises("config-cpr-transfer-accepts", "Write {'share': True/False, 'aux_ram_share': True/False}.")
def check_cpr_config(
    answer: Any, memory_backend: str = "memfd", ram: str = "64M", seed: int = 1, backend: str = "emulated"
) -> Check:
    """Does cpr-transfer accept this VM (the variant's memory backend, the learner's options)? Measured: a
    real cpr-transfer migration of it."""
    kwargs = _config_kwargs(answer, memory_backend, ram)
    r = migrate(mode="cpr-transfer", seed=seed, backend=backend, **kwargs)
    desc = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    if r.status == "completed":
        ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
        same = "source" in ram0 and "destination" in ram0 and ram0["source"].inode == ram0["destination"].inode
        text = (
            f"`{desc}` on {_on(backend)}: cpr-transfer **completed**, {r.bytes['main']} B on the main channel"
            + (f", ram0 kept inode {ram0['source'].inode} in both processes." if same else ".")
            + "\n\nEvery RAM block is shared and backed by an fd the new process can map: the memory backend "
            "with share=on, the implicit blocks (BIOS, option ROMs, ACPI tables) through `-machine aux-ram-share=on`."
        )
        return Check("config-cpr-transfer-accepts", True, True, text, answer=kwargs, expected="completed")
    reasons = r.query_migrate.get("blocked-reasons") or []
    lines = "\n".join(f"- `{t}`" for t in reasons[:8]) or f"- `{r.error}`"
    names = _blocked_names(reasons)
    culprit = (
        "the memory backend itself (`ram0`): it needs `share=on`"
        if "ram0" in names
        else "QEMU's implicit blocks: they need `-machine aux-ram-share=on`"
    )
    text = (
        f"`{desc}` on {_on(backend)}: refused, the source says\n\n> {r.error}\n\nquery-migrate's "
        f"blocked-reasons:\n\n{lines}\n\nThe blocks named are {culprit}. CPR needs **every** RAM block shared "
        "and backed by an fd."
    )
    return Check("config-cpr-transfer-accepts", False, True, text, answer=kwargs, expected="completed")


# -- 5. QEMU's CPR refusals -------------------------------------------------------------------------------
def refusal(
    memory_backend: str = "memfd", share: bool | None = True, aux_ram_share: bool = True,
    backend: str = "emulated",
) -> str | None:  # fmt: skip
    """The text a cpr-transfer `migrate` is refused with for this VM (None if it is accepted)."""
    return _refusal(memory_backend, share, aux_ram_share, backend)[0]


def _refusal(
    memory_backend: str, share: bool | None, aux_ram_share: bool, backend: str = "emulated"
) -> tuple[str | None, list[str]]:
    def run() -> tuple[str | None, list[str]]:
        r = migrate(mode="cpr-transfer", ram="32M", memory_backend=memory_backend, share=share,
                    aux_ram_share=aux_ram_share, backend=backend)  # fmt: skip
        reasons = r.query_migrate.get("blocked-reasons") or []
        return (None if r.status == "completed" else r.error), list(reasons)

    return _measured(("refusal", memory_backend, share, aux_ram_share, backend), run)


def _blocked_names(reasons: list[str]) -> list[str]:
    return [m.group("block") for m in map(CPR_BLOCKER_RE.match, reasons) if m]


def _norm(text: str) -> str:
    return " ".join(str(text).replace("`", "").strip().strip("'\"").split()).rstrip(".").lower()


def _block_matches(given: str, names: list[str]) -> str | None:
    """The listed block the learner named: its full name, or the part after QEMU's `/rom@` prefix."""
    g = _norm(given)
    for name in names:
        if g in (_norm(name), _norm(name.removeprefix("/rom@"))):
            return name
    return None


_OPTIONS = {
    "share": ("share", "share=on", "share=true", "share=True", "memory-backend share=on"),
    "aux-ram-share": ("aux-ram-share", "aux_ram_share", "aux-ram-share=on", "aux_ram_share=true",
                      "-machine aux-ram-share=on", "aux-ram-share=true"),
}  # fmt: skip


def _option(answer: Any) -> str:
    text = _norm(answer).replace("'", "").replace('"', "")
    for option, spellings in _OPTIONS.items():
        if text in {_norm(s) for s in spellings}:
            return option
    raise _BadAnswer(f"{answer!r}: write 'share' (the memory backend's) or 'aux-ram-share' (the machine's)")


@_never_raises("cpr-error-text", "Write {'block': A BLOCK NAME, 'option': 'share' or 'aux-ram-share'}.")
def check_cpr_error_text(
    answer: Any, memory_backend: str = "memfd", share: bool = False, aux_ram_share: bool = True,
    seed: int = 1, backend: str = "emulated",
) -> Check:  # fmt: skip
    """Reading a refusal: which block does QEMU's cpr-transfer refusal name for this VM, and which option
    fixes it? Any block QEMU lists as a blocker is right."""
    if not isinstance(answer, dict) or set(answer) != {"block", "option"}:
        raise _BadAnswer("write a dict with the keys 'block' and 'option'")
    option = _option(answer["option"])
    text, reasons = _refusal(memory_backend, share, aux_ram_share, backend)
    if text is None:
        return Check("cpr-error-text", False, True, "This VM was accepted, nothing to read: check the variant.")
    names = _blocked_names(reasons) or _blocked_names([text])
    fix = "share" if "ram0" in names else "aux-ram-share"
    block = _block_matches(str(answer["block"]), names)
    ok = block is not None and option == fix
    listed = ", ".join(f"`{n}`" for n in names)
    why = (
        "The memory backend's block is named after its id, `ram0`; only `share=on` on that backend makes it "
        "a shared, fd-backed block."
        if fix == "share"
        else "The blocks named are the ones QEMU creates by itself (BIOS, option ROM, ACPI tables), not the "
        "memory backend: they are private anonymous memory unless `-machine aux-ram-share=on` gives them memfds."
    )
    return Check(
        "cpr-error-text", ok, True,
        f"memory-backend-{memory_backend} share={'on' if share else 'off'}, aux-ram-share="
        f"{'on' if aux_ram_share else 'off'}, on {_on(backend)}: `migrate` says\n\n> {text}\n\nQEMU lists a "
        f"blocker for each of {listed}; the block you named is {'one of them' if block else 'not one'}, and "
        f"the option that fixes them is `{fix}`{'' if option == fix else f', not `{option}`'}. {why} The "
        "sentence states both rules whichever one failed, so the block name is what tells you which.",
        answer={"block": answer["block"], "option": option}, expected={"block": names, "option": fix},
    )  # fmt: skip


@_never_raises("blocked-block", "Write the name of a RAM block, as a string.")
def check_blocked_block(
    answer: Any, memory_backend: str = "memfd", share: bool = True, aux_ram_share: bool = False,
    seed: int = 1, backend: str = "emulated",
) -> Check:  # fmt: skip
    """Name a block QEMU refuses when the RAM backend is fine but aux-ram-share is off: any block in
    query-migrate's blocked-reasons is right, whatever its place in QEMU's list."""
    if not isinstance(answer, str):
        raise _BadAnswer("write the block's name as a string")
    text, reasons = _refusal(memory_backend, share, aux_ram_share, backend)
    names = _blocked_names(reasons) or _blocked_names([text or ""])
    block = _block_matches(answer, names)
    listed = ", ".join(f"`{n}`" for n in names) or "none"
    return Check(
        "blocked-block", block is not None, True,
        f"memory-backend-{memory_backend} share=on without aux-ram-share, on {_on(backend)}: query-migrate's "
        f"blocked-reasons lists {listed}; `{answer.strip()}` is {'one of them' if block else 'not one of them'}."
        "\n\nWithout aux-ram-share the blocks QEMU creates by itself (firmware, option ROM, ACPI tables) are "
        "private anonymous memory that no other process can map: each adds its own blocker as it is created, "
        f"and `migrate` quotes just one of them:\n\n> {text}",
        answer=answer.strip(), expected=names,
    )  # fmt: skip


# -- 6. does ram0 keep its inode -------------------------------------------------------------------------
def measure_inodes(
    ram: str = "64M", seed: int = 1, memory_backend: str = "memfd", dirty_rate: str = "16M",
    backend: str = "emulated",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in ("cpr-transfer", "normal"):
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, seed=seed, memory_backend=memory_backend,
                        share=True, backend=backend)  # fmt: skip
            ram0 = {m.side: m for m in r.mappings if m.block == "ram0"}
            src, dst = ram0.get("source"), ram0.get("destination")
            out[mode] = {
                "status": r.status,
                "source": (src.inode, hex(src.start)) if src else None,
                "destination": (dst.inode, hex(dst.start)) if dst else None,
                "same": bool(src and dst and src.inode == dst.inode),
            }
        return out

    return _measured(("inodes", ram, seed, memory_backend, dirty_rate, backend), run)


@_never_raises(
    "ram0-inode", "Write {'cpr-transfer': 'same' or 'different', 'normal': 'same' or 'different'}."
)
def check_inode(
    answer: Any, ram: str = "64M", seed: int = 1, memory_backend: str = "memfd", dirty_rate: str = "16M",
    backend: str = "emulated",
) -> Check:  # fmt: skip
    """Is ram0 the same file (inode) in source and destination after the migration?"""
    predicted = {k: _same_or_different(v) for k, v in _per_mode(answer, ("cpr-transfer", "normal")).items()}
    m = measure_inodes(ram, seed, memory_backend, dirty_rate, backend)
    rows, ok = [], True
    for mode in ("cpr-transfer", "normal"):
        got = m[mode]["same"]
        ok = ok and predicted[mode] == got and m[mode]["status"] == "completed"
        src, dst = m[mode]["source"], m[mode]["destination"]
        rows.append((mode, "same" if predicted[mode] else "different", "same" if got else "different",
                     f"inode {src[0]} at {src[1]}" if src else "n/a",
                     f"inode {dst[0]} at {dst[1]}" if dst else "n/a"))  # fmt: skip
    table = _table(("mode", "you said", "measured", "source ram0", "destination ram0"), rows)
    why = {
        True: "the new process received the old one's fd (SCM_RIGHTS on the cpr channel) and mapped the same "
        "file: the same inode, the same physical pages, at its own virtual address.",
        False: "the new process created its own memory (a new memfd) and the pages were copied into it: a "
        "different inode.",
    }
    lines = "\n".join(f"- {mode}: {why[m[mode]['same']]}" for mode in ("cpr-transfer", "normal"))
    return Check(
        "ram0-inode", ok, True,
        f"A {ram} memory-backend-{memory_backend} guest, seed {seed}, on {_on(backend)}:\n\n{table}\n\n{lines}",
        answer=predicted, expected={k: v["same"] for k, v in m.items()}, measured=m,
    )  # fmt: skip


# -- 7. cpr-exec: the same PID, and what fills its pause ---------------------------------------------------
def _startup_or_rest(answer: Any) -> str:
    text = str(answer).strip().lower().replace("_", "-")
    if text in ("start-up", "startup", "start up", "new program", "the new program's start-up"):
        return "start-up"
    if text in ("rest", "the rest", "everything else", "state", "saving and loading"):
        return "the rest"
    raise _BadAnswer(f"`{answer!r}`: write 'start-up' or 'the rest'")


def measure_cpr_exec(ram: str = "64M", seed: int = 1, dirty_rate: str = "16M") -> dict[str, Any]:
    """One cpr-exec migration: PIDs, and the pause cut into the new program's start-up and everything else;
    `spread_ms` is how far the run's own pause measures (events, guest) disagree."""
    from labkit.measure.pause_breakdown import new_process_window

    def run() -> dict[str, Any]:
        r = migrate(mode="cpr-exec", ram=ram, dirty_rate=dirty_rate, seed=seed)
        pause = r.pause_ms.get("events")
        window = new_process_window(r)
        inside = None
        if pause is not None and window is not None:
            inside = max(0.0, min(window[1], pause) - max(window[0], 0.0))
        band = _pause_band(r)
        return {
            "status": r.status,
            "pids": dict(r.pids),
            "pause_ms": pause,
            "spread_ms": None if band is None else round(band[1] - band[0], 3),
            "start_up_ms": None if inside is None else round(inside, 3),
            "rest_ms": None if inside is None or pause is None else round(pause - inside, 3),
            "verified": r.guest_verified,
        }

    return _measured(("cpr-exec", ram, seed, dirty_rate), run)


@_never_raises("cpr-exec-pause", "Write {'pid': 'same' or 'different', 'bigger': 'start-up' or 'the rest'}.")
def check_cpr_exec_pause(
    answer: Any, ram: str = "64M", seed: int = 1, dirty_rate: str = "16M", backend: str = "emulated"
) -> Check:
    """cpr-exec: does the guest keep its PID, and is its pause mostly the new program's start-up? When the
    two parts differ by less than the run's own spread, either answer is right."""
    if not isinstance(answer, dict) or set(answer) != {"pid", "bigger"}:
        raise _BadAnswer("write a dict with the keys 'pid' and 'bigger'")
    pid_same = _same_or_different(answer["pid"])
    bigger = _startup_or_rest(answer["bigger"])
    if backend != "emulated":
        from labkit.lab.cpr_exec import qemu_cpr_exec_refusal

        return Check("cpr-exec-pause", False, True, f"Not on real QEMU here: {qemu_cpr_exec_refusal()}")
    m = measure_cpr_exec(ram, seed, dirty_rate)
    if m["status"] != "completed" or m["start_up_ms"] is None:
        return Check("cpr-exec-pause", False, True, f"The migration did not complete here: {m}", measured=m)
    same = m["pids"]["source"] == m["pids"]["destination"]
    gap = m["start_up_ms"] - m["rest_ms"]
    if abs(gap) <= (m["spread_ms"] or 0):
        allowed, measured_bigger = {"start-up", "the rest"}, "too close to call"
    else:
        measured_bigger = "start-up" if gap > 0 else "the rest"
        allowed = {measured_bigger}
    ok = pid_same == same and bigger in allowed
    table = _table(
        ("", "you said", "measured"),
        [
            ("PID", "same" if pid_same else "different", f"{m['pids']['source']} → {m['pids']['destination']}"),
            ("bigger part of the pause", bigger, measured_bigger),
            ("the new program's start-up", "", _ms(m["start_up_ms"])),
            ("everything else (stop, save, load, resume)", "", _ms(m["rest_ms"])),
            ("the run's own spread (events vs guest)", "", _ms(m["spread_ms"])),
        ],
    )
    why = (
        "cpr-exec replaces the program inside the same process (execvp): the PID stays, the fds that hold "
        "guest RAM stay open, and the kernel tears down the old program's mappings. The new program only "
        "starts *after* the guest stopped, so its whole start-up (here a Python interpreter and labkit's "
        "imports; in QEMU, the new binary's initialisation) is inside the pause"
        + (", and here it was the bigger part: saving and loading device state took milliseconds."
           if measured_bigger == "start-up" else
           f"; here the rest ({_ms(m['rest_ms'])}) weighed as much or more, so look at what the guest's "
           "dirty rate and the state saved add.")
        + " cpr-transfer starts the new process before the guest stops."
    )  # fmt: skip
    return Check(
        "cpr-exec-pause", ok, True, f"A {ram} guest writing {dirty_rate}/s, seed {seed}:\n\n{table}\n\n{why}",
        answer={"pid": "same" if pid_same else "different", "bigger": bigger},
        expected={"pid": "same" if same else "different", "bigger": sorted(allowed)}, measured=m,
    )  # fmt: skip
