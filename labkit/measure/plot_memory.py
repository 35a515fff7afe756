"""Guest RAM as each process maps it: the address space figure (blocks, addresses, sizes, memfd inodes),
where cpr-transfer shows the same inode on both sides."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.patches import Rectangle

from labkit.lab.report import MappingRow
from labkit.measure.plot_style import (
    _human,
)
from labkit.qemu_syntax import SIDES


def plot_address_space(mappings: Iterable[MappingRow], title: str = "guest RAM in each process") -> Figure:
    """Each RAM block at its virtual address in source and destination, coloured by inode (the memory file);
    the blocks sit in the same order on both sides, and a line joins a block whose inode is the same in the
    two processes (cpr-transfer: the same memory at a new address). A caption states what the figure shows."""
    rows = list(mappings)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    inodes = sorted({r.inode for r in rows})
    palette = (
        [f"C{i}" for i in range(10)]
        if len(inodes) <= 10
        else [matplotlib.colormaps["tab20"](i) for i in range(20)]
    )
    colour = {
        ino: palette[i % len(palette)] for i, ino in enumerate(inodes)
    }  # one colour per inode, if <= 20
    centre: dict[tuple[str, str], tuple[float, float, int]] = {}
    x_of = {"source": 0.0, "destination": 2.0}
    # one order for both sides: the source's address order (the destination's own may differ), so a line
    # joining a block to itself never crosses another
    order: list[str] = []
    for side in SIDES:
        order += [
            r.block
            for r in sorted((r for r in rows if r.side == side), key=lambda r: r.start)
            if r.block not in order
        ]
    for side in SIDES:
        by_block = {r.block: r for r in rows if r.side == side}
        # addresses are far apart: stack blocks in one order with heights by log size, labelled with their
        # real addresses, so a 4 KiB ROM and a 1 GiB RAM block are both visible
        y = 0.0
        for block in order:
            r = by_block.get(block)
            h = max(2.6, np.log2(max(r.size if r else 4096, 4096)) - 11)
            if r is not None:
                ax.add_patch(
                    Rectangle(
                        (x_of[side], y), 1.0, h, facecolor=colour[r.inode], edgecolor="black", alpha=0.75
                    )
                )
                if h >= 3:  # room for three lines
                    label = f"{r.block}\n{r.start:#x}\n{_human(r.size)}, inode {r.inode}"
                else:
                    label = f"{r.block}  {_human(r.size)}\n{r.start:#x}  inode {r.inode}"
                ax.text(x_of[side] + 0.5, y + h / 2, label, ha="center", va="center", fontsize=7)
                centre[(side, block)] = (x_of[side], y + h / 2, r.inode)
            y += h + 0.3
        ax.text(x_of[side] + 0.5, -0.6, side, ha="center", va="top", fontsize=10, weight="bold")
    shared = 0
    for block in order:
        src, dst = centre.get(("source", block)), centre.get(("destination", block))
        if src and dst and src[2] == dst[2]:
            shared += 1
            ax.plot([1.0, 2.0], [src[1], dst[1]], color=colour[src[2]], linewidth=2)
    ax.set_xlim(-0.2, 3.2)
    ax.set_ylim(-1.5, max([v[1] for v in centre.values()] + [1]) + 3)
    ax.axis("off")
    ax.set_title(
        f"{title}\n{shared} of {len(order)} block(s) share an inode across the two processes", fontsize=11
    )
    if shared:
        point = (
            "A line joins a block to itself: the same inode on both sides is the same memory, mapped by "
            "the new process at a new address."
        )
    else:
        point = "No line: no block shares an inode; the destination's RAM is new memory, the pages copied in."
    fig.text(
        0.5,
        0.01,
        f"{point}\nColour = inode (one colour per memory file); blocks in the same order on "
        "both sides; height grows with the log of the size.",
        ha="center",
        va="bottom",
        fontsize=8.5,
        wrap=True,
    )
    engine = fig.get_layout_engine()
    assert isinstance(engine, ConstrainedLayoutEngine)  # the Figure above is made with layout="constrained"
    engine.set(h_pad=0.1, rect=(0, 0.08, 1, 0.92))
    return fig
