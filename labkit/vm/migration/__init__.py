"""Migration inside the VM process, mirroring QEMU's migration/ directory: channels, stream, ram, cpr, migration."""
