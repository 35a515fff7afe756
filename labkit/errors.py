"""The root of every error labkit raises on purpose, on both sides (lab and emulated VM).

A caller catches `LabkitError` to tell a failure the user can act on from a bug; each subclass carries the fact
that caller needs (the QEMU error text, the size asked for, the phase reached). A leaf: imports nothing.
"""


class LabkitError(Exception):
    """Something labkit refused or saw fail, with a message meant for the user (one line, says what to do)."""
