"""Seeded variants, the OSTEP way: each exercise's parameters drawn from the seed, so neighbours get their own
numbers and must apply the method."""

from __future__ import annotations

import getpass
import os
import random
import zlib
from collections.abc import Callable
from typing import Any

from labkit.qemu_syntax import format_size


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
