"""What runs and reads a VM from outside: runners, Machine, the QMP client, /proc."""
