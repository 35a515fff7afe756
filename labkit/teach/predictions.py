"""Predict, then reveal: check a learner's prediction against the measurement just taken on this machine.

A prediction committed before the measurement is what turns a notebook from a demonstration into an
experiment. The check must be fair (a tolerance band around a noisy number, any order-preserving answer for an
order) and must never break an unattended run: a cell still holding its placeholder (`...` or None) is "not
answered yet", and the reveal is shown all the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NOT_YET = "not answered yet"
RIGHT = "right"
WRONG = "not quite"


@dataclass
class Verdict:
    """One prediction against one measurement: what was said, what was measured, and why it came out so."""

    question: str
    said: Any
    measured: Any
    verdict: str
    why: str = ""

    @property
    def right(self) -> bool:
        return self.verdict == RIGHT

    def __str__(self) -> str:
        said = "(no prediction yet)" if self.verdict == NOT_YET else repr(self.said)
        lines = [
            f"{self.question}",
            f"  you said: {said}",
            f"  measured: {self.measured!r}",
            f"  -> {self.verdict}",
        ]
        if self.why:
            lines.append(f"  why: {self.why}")
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython shows the text, not the dataclass
        p.text(str(self))


def unanswered(prediction: Any) -> bool:
    """The notebook's placeholder (`...`), None, an empty string or list, or a list still holding `...`. An
    empty set is an answer ("none of them"), not a placeholder."""
    if prediction is ... or prediction is None:
        return True
    if isinstance(prediction, str):
        return not prediction.strip()
    if isinstance(prediction, list | tuple | dict):
        return len(prediction) == 0 or any(p is ... for p in prediction)
    return False


def _normal(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, set | frozenset):
        return {_normal(v) for v in value}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _close(said: float, measured: float, rel: float, abs_tol: float) -> bool:
    return math.isclose(float(said), float(measured), rel_tol=rel, abs_tol=abs_tol)


def check_prediction(
    question: str,
    prediction: Any,
    measured: Any,
    *,
    rel: float = 0.0,
    abs_tol: float = 0.0,
    why: str = "",
) -> Verdict:
    """Compare `prediction` with `measured` and return a Verdict that prints as the reveal.

    Numbers match within `rel` (a fraction of the larger) or `abs_tol`; strings ignore case and surrounding
    space; a set matches as a set (any order), a list or tuple as a sequence (the order is the answer). A
    placeholder is never an error: the verdict is "not answered yet" and the measurement is shown anyway.
    """
    if unanswered(prediction):
        return Verdict(question, prediction, measured, NOT_YET, why)
    try:
        if hasattr(measured, "item") and not isinstance(measured, list | tuple | set | dict | str):
            measured = measured.item()  # a numpy scalar read from a frame: compare and print it as Python's
        if isinstance(measured, bool) or isinstance(prediction, bool):
            ok = bool(prediction) == bool(measured) and isinstance(prediction, bool)
        elif isinstance(measured, int | float) and isinstance(prediction, int | float):
            ok = _close(prediction, measured, rel, abs_tol)
        elif isinstance(measured, set | frozenset):
            said = {prediction} if isinstance(prediction, str) else set(prediction)
            ok = _normal(said) == _normal(set(measured))
        else:
            ok = _normal(prediction) == _normal(measured)
    except (TypeError, ValueError):
        ok = False
    return Verdict(question, prediction, measured, RIGHT if ok else WRONG, why)


def order_of(values: Mapping[str, float | None]) -> list[str]:
    """The names of `values` from the smallest figure to the largest; unmeasured ones (None, NaN) left out."""
    known = {
        k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))
    }
    return sorted(known, key=lambda k: known[k])


# A pause that rises by less than this from the smallest RAM to the largest is not called growth: a single run's
# STOP -> RESUME on a shared 2-core machine moves by a few ms from scheduling alone. Normal's pause in the
# headline rises by tens of ms (its hot set crosses at full speed once the guest is stopped).
PAUSE_NOISE_MS = 10.0


def grows(xs: Iterable[float], ys: Iterable[float], at_least: float = 1.5, min_rise: float = 0.0) -> bool:
    """Whether y at the largest x is at least `at_least` times y at the smallest x, and at least `min_rise`
    above it: "grows with RAM" as a learner would read it off a linear plot. The ratio alone would call
    3 ms -> 6 ms growth; `min_rise` (e.g. 50 ms on a shared machine) keeps scheduling noise out."""
    pairs = sorted((x, y) for x, y in zip(xs, ys, strict=True) if y is not None and not math.isnan(y))
    if len(pairs) < 2 or pairs[0][1] <= 0:
        return False
    first, last = pairs[0][1], pairs[-1][1]
    return bool(last >= at_least * first and last - first >= min_rise)


def check_order(
    question: str, prediction: Any, values: Mapping[str, float | None], *, tie: float = 0.0, why: str = ""
) -> Verdict:
    """Check a predicted order (smallest first) against measured figures. Two figures closer than `tie`
    (their resolution, e.g. 1 ms for QEMU's own downtime) may come in either order, so a right answer does not
    fail on noise. Names may be given with or without a common prefix ("events" or "pause_ms_events")."""
    measured = order_of(values)
    if unanswered(prediction):
        return Verdict(question, prediction, measured, NOT_YET, why)
    names = {_normal(k): k for k in values}
    try:
        said = [
            names.get(_normal(p)) or next(k for n, k in names.items() if _normal(p).endswith(n))
            for p in prediction
        ]
    except (StopIteration, TypeError, AttributeError):
        return Verdict(question, prediction, measured, WRONG, why)
    if sorted(said) != sorted(measured):
        return Verdict(question, prediction, measured, WRONG, why)
    known = {k: v for k, v in values.items() if v is not None}  # every name said is measured (checked above)
    ok = all(known[a] <= known[b] + tie for i, a in enumerate(said) for b in said[i + 1 :])
    return Verdict(question, prediction, measured, RIGHT if ok else WRONG, why)
