# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The one fixed-width text table formatter of the bundle's reports (training, slide evaluation) and scripts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Column", "format_table"]


@dataclass(frozen=True)
class Column:
    """One column: its title, width (None: as wide as its widest cell), alignment and the format of its floats."""

    title: str
    width: int | None = None
    align: str = ">"
    float_format: str = ""


def _spec(value: Any, column: Column) -> str:
    """The format spec of one cell without its width: floats take the column's ``float_format``."""
    return column.float_format if isinstance(value, float) else ""


def _width(column: Column, cells: Sequence[Any]) -> int:
    """The column's width, or the widest of its title and its formatted cells."""
    if column.width is not None:
        return column.width
    return max([len(column.title), *(len(format(cell, _spec(cell, column))) for cell in cells)])


def format_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]], sep: str = "", strip: bool = False) -> str:
    """A header line and one line per row; a None cell shows as ``-``; ``strip`` drops trailing blanks of each line."""
    rows = [["-" if cell is None else cell for cell in row] for row in rows]
    widths = [_width(column, [row[i] for row in rows]) for i, column in enumerate(columns)]
    lines = [sep.join(f"{c.title:{c.align}{w}}" for c, w in zip(columns, widths))]
    for row in rows:
        cells = (format(cell, f"{c.align}{w}{_spec(cell, c)}") for cell, c, w in zip(row, columns, widths))
        lines.append(sep.join(cells))
    return "\n".join(line.rstrip() if strip else line for line in lines)
