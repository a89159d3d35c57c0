"""Per-epoch history of a run: rows of numbers, written as BackdoorBench's CSV (an unnamed
index column first) and as a plot of the accuracy-like curves."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from utils.records import atomic_write, save_text

CURVES = {"test_acc": "C-Acc", "test_asr": "ASR", "test_ra": "RA"}


class History:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, **values: Any) -> dict[str, Any]:
        self.rows.append(dict(values))
        return self.rows[-1]

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cols = self.columns
        writer.writerow(["", *cols])
        for i, row in enumerate(self.rows):
            writer.writerow([i, *(_cell(row.get(c)) for c in cols)])
        return buf.getvalue()

    def save_csv(self, path: Path) -> None:
        save_text(self.to_csv(), path)

    def save_plot(self, path: Path, title: str) -> None:
        """C-Acc, ASR and RA against the epoch (rows without them are skipped)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in CURVES.items():
            points = [(r["epoch"], r[key]) for r in self.rows if _number(r.get(key))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :class:`History` (the index column dropped)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("", None)
    return rows
