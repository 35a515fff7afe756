"""Measurement: benchmarks, sweeps and the plots that read reports."""
