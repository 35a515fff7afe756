"""Exercise 5 (notebook exercises/05): QEMU's CPR refusals, their text and the block they name."""

from __future__ import annotations

from typing import Any

from labkit.lab.engine import migrate
from labkit.teach.exercises.checking import (
    Check,
    _BadAnswer,
    _blocked_names,
    _measured,
    _never_raises,
    _on,
)


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
