"""`labkit-vm` / `python -m labkit.vm`: one emulated VM per process, started with QEMU's options."""

from __future__ import annotations

import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    sys.setswitchinterval(0.0002)  # hand the GIL over quickly: the migration thread must not wait 5 ms for it
    from labkit.vm.startup import qemu_init

    args = sys.argv[1:] if argv is None else argv
    vm = qemu_init(args)
    if isinstance(vm, int):
        return vm
    try:
        return asyncio.run(vm.run())
    finally:
        vm.ram.close()


if __name__ == "__main__":
    sys.exit(main())
