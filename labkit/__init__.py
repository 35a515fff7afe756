"""labkit: watch, step by step and in numbers, how a VM migrates (normal, cpr-reboot, cpr-transfer)."""

__version__ = "0.1.0"
