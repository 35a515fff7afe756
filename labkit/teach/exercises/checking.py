"""The exercises' common ground: a Check (the verdict), reading a learner's answer, never raising, the
measurement cache, and `check(exercise_id, answer)` by name."""

from __future__ import annotations

import functools
import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from labkit.host.runners import get_runner
from labkit.lab.engine import MODES
from labkit.qemu_syntax import parse_size
from labkit.teach.exercises.variants import variant

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


def _either(answer: Any, true_words: tuple[str, ...], false_words: tuple[str, ...], how: str) -> bool:
    """A two-way answer: a bool as it is, or one of the words a learner would write for either side."""
    if isinstance(answer, bool):
        return answer
    text = str(answer).strip().lower()
    if text in true_words or text in false_words:
        return text in true_words
    raise _BadAnswer(f"{answer!r}: {how}")


def _yes_no(answer: Any) -> bool:
    return _either(answer, ("yes", "y", "true", "converges"), ("no", "n", "false", "never", "does not converge"),
                   "write True (it converges) or False (it does not)")  # fmt: skip


def _same_or_different(answer: Any) -> bool:
    """True for 'same'."""
    return _either(answer, ("same", "stays", "unchanged", "kept"), ("different", "changes", "new", "changed"),
                   "write 'same' or 'different'")  # fmt: skip


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


def _on(backend: str) -> str:
    return get_runner(backend).description


def _blocked_names(reasons: list[str]) -> list[str]:
    return [m.group("block") for m in map(CPR_BLOCKER_RE.match, reasons) if m]


def _pause_band(r: Any) -> tuple[float, float] | None:
    """The run's own spread of its pause: the lowest and highest of QEMU's downtime, STOP→RESUME from the
    events, and the guest's own gap. A mode whose band reaches into the least one's cannot be told apart."""
    values = [v for v in r.pause_ms.values() if v is not None]
    return (min(values), max(values)) if values else None
