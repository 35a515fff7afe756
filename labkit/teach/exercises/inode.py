"""Exercise 6 (notebook exercises/06): does ram0 keep its inode across the migration?"""

from __future__ import annotations

from typing import Any

from labkit.lab.engine import migrate
from labkit.teach.exercises.checking import (
    Check,
    _measured,
    _never_raises,
    _on,
    _per_mode,
    _same_or_different,
    _table,
)


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
