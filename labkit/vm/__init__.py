"""The emulated VM process: RAM blocks, a guest, devices, run states, a QMP monitor and QEMU's migration."""
