"""teach/after_pause.py, what notebook 08 runs: the figures it reads off its runs, and one real sweep point."""

from __future__ import annotations

import pandas as pd
import pytest

from labkit.lab.report import Result, TimelineRow
from labkit.teach import after_pause as ap


def test_fault_ratio_and_the_page_arithmetic() -> None:
    frame = pd.DataFrame({"ram_mib": [64, 16, 32], "pages_faulted": [16400, 4100, 8200]})
    assert ap.fault_ratio(frame) == 4.0
    assert ap.fault_ratio(frame.head(1)) is None
    assert ap.expected_faults("64M", ap.PAGE_4K) == 16384
    assert ap.expected_faults("64M", ap.PAGE_2M) == 32


def test_migrate_to_stop_reads_the_timeline() -> None:
    r = Result(backend="emulated", mode="cpr-transfer", ram_bytes=16 << 20, status="completed")
    r.timeline = [TimelineRow(10.0, "source", "qmp", "migrate"), TimelineRow(42.5, "source", "STOP", "")]
    assert ap.migrate_to_stop_ms(r) == 32.5
    r.timeline = r.timeline[:1]
    assert ap.migrate_to_stop_ms(r) is None


def test_hugetlb_reason_is_one_line_or_none() -> None:
    why = ap.hugetlb_unavailable("64M")
    assert why is None or (why and "\n" not in why)


@pytest.mark.timeout(180)
def test_one_sweep_point_faults_once_per_page() -> None:
    """A 16 MiB guest that rewrites all its RAM after RESUME: the destination faults about once per page."""
    frame = ap.sweep(("16M",))
    row = frame.iloc[0]
    assert bool(row.guest_verified)
    assert 0.9 <= row.faults_per_ram_page <= 1.5, row.to_dict()
