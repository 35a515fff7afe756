"""Exercise 4 (notebook exercises/04): a configuration cpr-transfer accepts, asked of a real VM."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.lab.engine import migrate
from labkit.qemu_syntax import format_size
from labkit.teach.exercises.checking import (
    Check,
    _BadAnswer,
    _blocked_names,
    _never_raises,
    _on,
)

_CONFIG_KEYS = ("ram", "memory_backend", "share", "aux_ram_share")


def _config_kwargs(answer: Any, memory_backend: str, ram: str) -> dict[str, Any]:
    if isinstance(answer, VMConfig) or (is_dataclass(answer) and not isinstance(answer, type)):
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
