"""Migration's QAPI enums (qapi/migration.json) as Literal types: the statuses, modes and capabilities that QMP
passes as strings, named once so that a misspelt one is a type error rather than a silent mismatch."""

from __future__ import annotations

from typing import Literal, get_args

#: QEMU 10.0's MigrationStatus (15 values), what query-migrate's status and the MIGRATION event carry.
MigrationStatus = Literal[
    "none",
    "setup",
    "cancelling",
    "cancelled",
    "active",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "completed",
    "failed",
    "colo",
    "pre-switchover",
    "device",
    "wait-unplug",
]
#: MigMode: QEMU 10.0's three, and 10.2's cpr-exec.
MigMode = Literal["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
MIG_MODES: tuple[MigMode, ...] = get_args(MigMode)
#: migration_is_running(): the statuses in which a new migration or a capability change is refused.
ACTIVE: tuple[MigrationStatus, ...] = ("setup", "active", "device", "pre-switchover", "cancelling")
#: The MigrationCapability values labkit accepts (it models events, pause-before-switchover, x-ignore-shared).
CAPABILITIES = (
    "events",
    "pause-before-switchover",
    "x-ignore-shared",
    "postcopy-ram",
    "background-snapshot",
    "x-colo",
    "return-path",
    "multifd",
    "zero-copy-send",
)
