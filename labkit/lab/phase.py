"""Phase: one step of a migration as the Lab runs it, its label and its action in one value.

A mode is one list of Phases, so a label can never drift from the action it names (guestperf's engine keeps
its steps the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    """name: a short id for code; label: what the learner reads; action: the Lab's method that runs it."""

    name: str
    label: str
    action: Callable[[Any], None]
