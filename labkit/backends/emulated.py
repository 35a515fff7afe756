"""The emulated backend: `python -m labkit.vm` with QEMU's options, so it runs wherever labkit is installed."""

from __future__ import annotations

import sys

from labkit.config import VMConfig


def emulated_argv(config: VMConfig, qmp_path: str) -> list[str]:
    return [sys.executable, "-m", "labkit.vm", *config.emulated_argv(qmp_path)]
