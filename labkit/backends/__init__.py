"""Backends: what program runs a VM. "emulated" is labkit-vm; "qemu" is qemu-system-x86_64 10.x."""
