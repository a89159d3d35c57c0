"""Per-epoch history of a run: rows of numbers, written as BackdoorBench's CSV (an unnamed
index column first), as its summary CSV (``<name>_df_summary.csv``: per column the last
value, the largest number and whether a value was NaN) and as a plot of the
accuracy-like curves."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from utils.files import atomic_write, save_text

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

    def ordered(self, leading: Sequence[str] = ()) -> list[str]:
        """The columns, ``leading`` first (present or not), then the others as they came."""
        return [*leading, *(c for c in self.columns if c not in leading)]

    def to_csv(self, leading: Sequence[str] = ()) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cols = self.ordered(leading)
        writer.writerow(["", *cols])
        for i, row in enumerate(self.rows):
            writer.writerow([i, *(_cell(row.get(c)) for c in cols)])
        return buf.getvalue()

    def save_csv(self, path: Path, leading: Sequence[str] = ()) -> None:
        save_text(self.to_csv(leading), path)

    def summary_csv(self, leading: Sequence[str] = ()) -> str:
        """BackdoorBench's summary of the history (its Metric_Aggregator.summary): rows
        ``last`` (the last value given; a NaN reads ``nan_value``), ``valid_max`` (the
        largest number, NaN left out) and ``exist_nan_value``, one column per column of
        the CSV."""
        cols = self.ordered(leading)
        last, top, nan = ["last"], ["valid_max"], ["exist_nan_value"]
        for c in cols:
            given = [row[c] for row in self.rows if row.get(c) is not None]
            numbers = [v for v in given if _number(v) and not isinstance(v, bool)]
            last.append("nan_value" if given and _is_nan(given[-1]) else (given[-1] if given else ""))
            top.append(max(numbers) if numbers else "")
            nan.append(any(_is_nan(v) for v in given))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for line in (["", *cols], last, top, nan):
            writer.writerow(line)
        return buf.getvalue()

    def save_plot(self, path: Path, title: str) -> None:
        """C-Acc, ASR and RA against the epoch (rows without them are skipped)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = epochs_of([r.get("epoch") if _number(r.get("epoch")) else None for r in self.rows])
        for key, label in CURVES.items():
            points = [(e, r[key]) for r, e in zip(self.rows, epochs) if _number(r.get(key))]
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


def epochs_of(epochs: Sequence[float | None]) -> list[float]:
    """The x position of each row: its epoch, or, for a row without one (the returned
    model's row that a defense's <name>_df.csv ends with when its last reported epoch did
    not evaluate that model), one more than the largest epoch before it (0 when none)."""
    out: list[float] = []
    last: float | None = None
    for epoch in epochs:
        if epoch is None:
            out.append(0.0 if last is None else last + 1)
        else:
            out.append(epoch)
            last = epoch if last is None else max(last, epoch)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def cell_number(text: Any) -> float | None:
    """A CSV cell as a number; None for an empty, non-numeric or NaN cell."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :class:`History` (the index column dropped)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("", None)
    return rows
