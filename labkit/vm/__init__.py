"""The emulated VM process: RAM blocks, a guest, devices, run states, a QMP monitor and QEMU's migration."""

import time

# When this program's Python code first ran (CLOCK_MONOTONIC, ns): after a cpr-exec, the time from the old
# program's execvp to here is the new interpreter's own start-up, which falls inside the guest's pause.
T_ENTERED_NS = time.monotonic_ns()
