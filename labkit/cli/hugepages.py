"""`labkit hugepages`: show the host's huge page pools, or set one (`--reserve SIZE`) for `--hugetlb` guests.

Only root may set a pool: the kernel takes the pages out of ordinary memory at once and keeps them for
hugetlb mappings alone until the pool is set back. A plain user is told the exact command to run instead.
"""

from __future__ import annotations

import json

from labkit.host.hugepages import (
    HugePageError,
    HugePagePool,
    pages_for,
    parse_page_size,
    pool_for,
    read_pools,
    reserve_command,
    set_pool,
)
from labkit.qemu_syntax import SizeError, format_size, human_size, parse_size

WHY_ROOT = (
    "the kernel sets huge pages aside only when root writes nr_hugepages, because they leave ordinary memory "
    "for as long as the pool holds them"
)


def format_pools(pools: list[HugePagePool]) -> str:
    """One line per page size; what `labkit doctor` and `labkit hugepages` print."""
    if not pools:
        return "this kernel offers no huge pages (no /sys/kernel/mm/hugepages)"
    return "\n".join(f"{p.describe()} ({human_size(p.total * p.page_size)} in the pool)" for p in pools)


def reserve(size_text: str, page_text: str) -> tuple[int, str]:
    """Set the pool of `page_text` pages to hold `size_text` bytes; (exit status, the line to print)."""
    try:
        size = parse_size(size_text, "m")
    except SizeError as e:
        return 1, f"--reserve: {e}"
    try:
        page = parse_page_size(page_text, "--page-size")
        pool = pool_for(page)
    except HugePageError as e:
        return 1, str(e)
    pages = pages_for(size, page)
    try:
        after = set_pool(page, pages)
    except HugePageError as e:
        if "needs root" not in str(e):
            return 1, str(e)
        return 1, (
            f"reserving {human_size(pages * page)} of {pool.label} pages needs root ({WHY_ROOT}): "
            f"run `{reserve_command(pool, pages)}`"
        )
    if after.total < pages:
        set_pool(page, pool.total)  # leave no half-made pool behind
        return 1, (
            f"the kernel found {after.total} of {pages} {pool.label} pages (free memory too fragmented for "
            f"contiguous huge pages); the pool is back to {pool.total}: try a smaller --reserve, or reserve "
            "early after boot"
        )
    return 0, (
        f"{after.label} pool set to {after.total} pages ({human_size(after.total * page)}): {after.describe()}; "
        f"use it with --hugetlb {format_size(page)}"
    )


def main(reserve_size: str | None, page_size: str, as_json: bool) -> int:
    if reserve_size is not None:
        status, line = reserve(reserve_size, page_size)
        if status:
            import sys

            print(f"labkit hugepages: {line}", file=sys.stderr)
            return status
        print(line)
        return 0
    pools = read_pools()
    print(json.dumps([p.to_dict() for p in pools]) if as_json else format_pools(pools))
    return 0
