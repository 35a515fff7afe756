"""labkit: watch, step by step and in numbers, how a VM migrates (normal, cpr-reboot, cpr-transfer).

The public API: VMConfig, GuestConfig, spawn, Lab, migrate, Result, and the modules plots and widgets.
Names load on first use, so the VM process (which imports labkit.vm) does not pay for the lab's imports.
"""

__version__ = "0.1.0"

_LAZY = {
    "VMConfig": ("labkit.host.hardware", "VMConfig"),
    "GuestConfig": ("labkit.qemu_syntax", "GuestConfig"),
    "spawn": ("labkit.host.runners", "spawn"),
    "Scenario": ("labkit.lab.scenario", "Scenario"),
    "Machine": ("labkit.host.machine", "Machine"),
    "Lab": ("labkit.lab.engine", "Lab"),
    "Snapshot": ("labkit.lab.engine", "Snapshot"),
    "migrate": ("labkit.lab.engine", "migrate"),
    "Result": ("labkit.lab.report", "Result"),
    "plots": ("labkit.measure.plots", None),
    "widgets": ("labkit.teach.widgets", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'labkit' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
