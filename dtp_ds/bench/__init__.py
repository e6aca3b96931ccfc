"""Benchmarks that print ratios measured in one run (the machines are shared and noisy)."""
from __future__ import annotations

from typing import Any


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """``rows`` as a markdown table; ``columns``: (row key, header, format), "-" where a row has none."""
    cells = [[h for _, h, _ in columns]] + [[fmt.format(r[k]) if r.get(k) is not None else "-"
                                              for k, _, fmt in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
