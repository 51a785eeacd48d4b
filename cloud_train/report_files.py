"""What every red-team report shares: text and markdown tables, and the three report files
(JSON, markdown, chart) written so a crash leaves each one whole or absent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from roadshield_base.fileio import atomic_write_bytes, atomic_write_json


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as text lines, each column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def md_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as a markdown table, the first row its header."""
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def write_report(out: Path, stem: str, result: dict[str, Any],
                 chart_png: Callable[[dict[str, Any]], bytes],
                 markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out/<stem>.png``, ``.md`` and, last, ``.json`` (which names the other two
    in ``result["files"]``)."""
    result["files"] = {k: str(out / f"{stem}.{k}") for k in ("json", "md", "png")}
    atomic_write_bytes(out / f"{stem}.png", chart_png(result))
    atomic_write_bytes(out / f"{stem}.md", markdown(result).encode())
    atomic_write_json(out / f"{stem}.json", result)
