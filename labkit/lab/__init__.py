"""The lab: one migration between two VM processes, run phase by phase, and its report."""
