"""The `labkit` command line: doctor, migrate, demo, bench, inspectors, vm, lab."""
