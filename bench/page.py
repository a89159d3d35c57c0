"""Plots and the HTML page of a comparison (:mod:`bench.tables`), from the summaries and
the per-epoch CSV files (``<defense>_df.csv``) that the runs wrote.

* ``scatter_<record>.png``: C-Acc against ASR, one marker per defense (error bars: std
  over seeds), the backdoored model as a black cross.
* ``curves_<record>.png``: ASR and C-Acc per epoch of each defense (mean over seeds at
  each epoch; rows without test metrics are skipped).
* ``sau_shared_rate.png``: SAU's share of shared adversarial examples per round (the
  ``shared_rate`` column of sau_df.csv), one line per record.
* ``roc_<record>.png``: the detectors' ROC curves on a record, one colour per detector (its
  first seed drawn full, the others light), from each run's summary.json
  (``detection.roc``) or, for a summary without it, its ``<detector>_scores.csv``.
* :func:`html_page`: the table and every plot in one self-contained page (PNG as base64).
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from bench.jobs import Run
from bench.tables import METRICS, NO_DEFENSE, Table, _cells, notes_of, table_note
from utils.files import atomic_write
from utils.history import cell_number, epochs_of, read_csv

MARKERS = "osD^v<>pPXh*"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def MaxNLocator(**kw: Any) -> Any:
    from matplotlib.ticker import MaxNLocator as locator

    return locator(**kw)


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def scatter(table: Table, record: str, path: Path) -> Path | None:
    """C-Acc (y) against ASR (x) of each defense on ``record``; None when nothing finished."""
    rows = [
        r
        for r in table.rows
        if r.record == record and r.cells["c_acc"].mean is not None and r.cells["asr"].mean is not None
    ]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    placed: list[tuple[float, float]] = []
    for row in rows:
        acc, asr = row.cells["c_acc"], row.cells["asr"]
        if row.defense == NO_DEFENSE:
            style = {"marker": "X", "color": "black", "markersize": 10}
        else:
            i = table.defenses.index(row.defense)
            style = {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}", "markersize": 8}
        # hollow-looking markers with a dark outline, and a small sideways step for each
        # marker already drawn within a point of this one, so that none hides another
        x, y = scatter_position(asr.mean, acc.mean, placed)
        placed.append((asr.mean, acc.mean))
        ax.errorbar(
            x,
            y,
            xerr=asr.std or None,
            yerr=acc.std or None,
            linestyle="none",
            capsize=3,
            label=row.defense + ("" if (x, y) == (asr.mean, acc.mean) else " (shifted)"),
            alpha=0.85,
            markeredgecolor="black",
            markeredgewidth=0.8,
            **style,
        )
    ax.set_xlabel("ASR (%)  (lower is better)")
    ax.set_ylabel("C-Acc (%)  (higher is better)")
    ax.set_xlim(-3, 103)
    ax.set_title(f"C-Acc vs ASR on {record}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


OFFSET = 1.2  # percentage points between markers that would otherwise coincide


def scatter_position(x: float, y: float, placed: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Where to draw the marker of (x, y): shifted right by :data:`OFFSET` per marker
    already placed within one percentage point of it (the true values stay in the
    table)."""
    near = sum(abs(x - px) < 1.0 and abs(y - py) < 1.0 for px, py in placed)
    return x + near * OFFSET, y


def _df_rows(run: Run) -> list[dict[str, str]]:
    if run.folder is None:
        return []
    path = Path(run.folder) / f"{run.method}_df.csv"
    try:
        return read_csv(path)
    except (OSError, ValueError):
        return []


def mean_curve(runs: Sequence[Run], column: str) -> list[tuple[float, float]]:
    """(epoch, mean over runs) of ``column`` in the runs' ``<defense>_df.csv``, skipping
    rows where the column is empty. A row without an epoch (the returned model, which the
    last reported epoch did not evaluate: ANP's pruned model) is placed one epoch after
    the run's last one (utils.history.epochs_of), so that the curve ends where the table does."""
    by_epoch: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        rows = _df_rows(run)
        for row, epoch in zip(rows, epochs_of([cell_number(r.get("epoch")) for r in rows])):
            value = cell_number(row.get(column))
            if value is not None:
                by_epoch[epoch].append(value)
    return [(e, sum(v) / len(v)) for e, v in sorted(by_epoch.items())]


def seeds_text(runs: Sequence[Run]) -> str:
    """ "one seed" or "mean over N seeds"."""
    return "one seed" if len(runs) == 1 else f"mean over {len(runs)} seeds"


def curves(table: Table, record: str, path: Path) -> Path | None:
    """ASR and C-Acc (%) per epoch of each defense on ``record``."""
    series = {}
    counts = {}
    for defense in table.defenses:
        runs = [r for r in table.runs if r.side == "defense" and r.group == record and r.method == defense and r.ok]
        asr, acc = mean_curve(runs, "test_asr"), mean_curve(runs, "test_acc")
        if asr or acc:
            series[defense] = (asr, acc)
            counts[defense] = seeds_text(runs)
    if not series:
        return None
    same = len(set(counts.values())) == 1
    plt = _pyplot()
    fig, (ax_asr, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for defense, (asr, acc) in series.items():
        i = table.defenses.index(defense)
        label = defense if same else f"{defense} ({counts[defense]})"
        style = {"marker": MARKERS[i % len(MARKERS)], "markersize": 3, "color": f"C{i % 10}", "label": label}
        if asr:
            ax_asr.plot([e for e, _ in asr], [100 * v for _, v in asr], **style)
        if acc:
            ax_acc.plot([e for e, _ in acc], [100 * v for _, v in acc], **style)
    for ax, name in ((ax_asr, "ASR"), (ax_acc, "C-Acc")):
        ax.set_xlabel("epoch (as each defense reports it; last point: the returned model)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name} (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(
            f"{name} per epoch on {record}" + (f" ({next(iter(counts.values()))})" if same else ""), fontsize=10
        )
    ax_acc.legend(fontsize=8, loc="best")
    return _save(fig, path)


def shared_rate(table: Table, path: Path, defense: str = "sau") -> Path | None:
    """SAU's share of shared adversarial examples per round (of the clean samples seen
    in the round), one line per record."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for i, record in enumerate(table.records):
        runs = [r for r in table.runs if r.side == "defense" and r.group == record and r.method == defense and r.ok]
        points = mean_curve(runs, "shared_rate")
        if points:
            ax.plot(
                [e for e, _ in points],
                [100 * v for _, v in points],
                marker=MARKERS[i % len(MARKERS)],
                markersize=3,
                label=f"{record} ({seeds_text(runs)})",
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel("shared adversarial examples (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-2, 102)
    ax.set_title("SAU: share of shared adversarial examples per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_of(run: Run) -> dict[str, list[float]] | None:
    """The ROC curve's points of a detector's run: its summary's ``detection.roc``, else
    computed from its ``<detector>_scores.csv`` (``poisoned`` and ``score`` columns); None
    when neither holds one."""
    from utils.metrics import roc_points

    stored = ((run.summary or {}).get("detection") or {}).get("roc")
    if isinstance(stored, dict) and isinstance(stored.get("fpr"), list) and isinstance(stored.get("tpr"), list):
        return stored
    if run.folder is None:
        return None
    try:
        rows = read_csv(Path(run.folder) / f"{run.method}_scores.csv")
        scores = [float(r["score"]) for r in rows]
        labels = [int(r["poisoned"]) for r in rows]
        import torch

        return roc_points(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels))
    except (OSError, KeyError, ValueError):
        return None


def roc_curves(detection: Table, record: str, path: Path) -> Path | None:
    """The ROC curves of the detectors on ``record``: a colour per detector, its first
    seed's curve drawn full (labelled with its mean AUROC), the other seeds' light; None
    when no run has one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = False
    for i, detector in enumerate(detection.defenses):
        runs = sorted(
            (r for r in detection.runs if r.group == record and r.method == detector and r.ok), key=lambda r: r.seed
        )
        curves_drawn = [(run, points) for run in runs for points in [roc_of(run)] if points is not None]
        for k, (run, points) in enumerate(curves_drawn):
            auroc = detection.row(record, detector).cells["auroc"]
            others = ", other seeds light" if len(curves_drawn) > 1 else ""
            label = f"{detector} (AUROC {auroc.text()}; seed {run.seed}{others})" if k == 0 else None
            ax.plot(
                points["fpr"],
                points["tpr"],
                color=f"C{i % 10}",
                linewidth=1.8 if k == 0 else 0.8,
                alpha=1.0 if k == 0 else 0.35,
                label=label,
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"Detectors' ROC on {record}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def make_plots(table: Table, folder: Path, detection: Table | None = None) -> list[tuple[str, Path]]:
    """Every plot of the table (and of the detectors' table ``detection``, when any), written
    in ``folder``: (title, path) pairs."""
    out = []
    for record in table.records:
        for title, fn in ((f"C-Acc vs ASR on {record}", scatter), (f"Per-epoch curves on {record}", curves)):
            prefix = "scatter" if fn is scatter else "curves"
            path = fn(table, record, Path(folder) / f"{prefix}_{_safe(record)}.png")
            if path is not None:
                out.append((title, path))
        if detection is not None:
            path = roc_curves(detection, record, Path(folder) / f"roc_{_safe(record)}.png")
            if path is not None:
                out.append((f"Detectors' ROC curves on {record}", path))
    if "sau" in table.defenses:
        path = shared_rate(table, Path(folder) / "sau_shared_rate.png")
        if path is not None:
            out.append(("SAU: shared adversarial examples per round", path))
    return out


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: center; white-space: nowrap; }
th { background: #f2f2f2; }
td.defense { text-align: left; font-weight: 600; }
td.problem { color: #a00; white-space: normal; max-width: 22em; }
figure { display: inline-block; margin: 1em; vertical-align: top; }
p.purpose { background: #fff4d6; border-left: 4px solid #e0a800; padding: 6px 10px; }
dl#about { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 13px; }
dl#about dt { font-weight: 600; }
dl#about dd { margin: 0; }
figcaption { text-align: center; font-size: 13px; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def html_table(table: Table, table_id: str = "compare") -> str:
    """The table with a two-level header (record, then metric); best values in <b>. The
    detectors' table (``table.detectors``) has a row per detector."""
    e = html.escape
    first = "Detector" if table.detectors else "Defense"
    head1 = [f'<th rowspan="2">{first}</th>'] + [
        f'<th colspan="{len(table.columns)}">{e(r)}</th>' for r in table.records
    ]
    head2 = [f"<th>{e(c)}</th>" for _ in table.records for c in table.columns]
    body = []
    for defense in table.names:
        cells = [f'<td class="defense">{e(defense)}</td>']
        for record in table.records:
            row = table.row(record, defense)
            texts = _cells(row, lambda t: f"\0{t}\1", table.metrics)
            for i, text in enumerate(texts):
                safe = e(text).replace("\0", "<b>").replace("\1", "</b>")
                cls = ' class="problem"' if i == 0 and not row.seeds and row.problems else ""
                cells.append(f"<td{cls}>{safe}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="{e(table_id, quote=True)}">\n<thead><tr>'
        + "".join(head1)
        + "</tr>\n<tr>"
        + "".join(head2)
        + "</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>"
    )


def html_page(
    table: Table,
    plots: Sequence[tuple[str, Path]],
    about: Sequence[tuple[str, str]] = (),
    links: Sequence[str] = (),
    detection: Table | None = None,
) -> str:
    """One self-contained page: the table's purpose (when it has one), how it was made
    (``about``: command, config, date, machine), links to its data files (``links``,
    names relative to the page), the table, the notes, the detectors' table (``detection``,
    when any) and every plot as a base64 PNG."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>SAU-Bench comparison: {e(table.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Comparison: {e(table.name)}</h1>",
    ]
    if table.purpose:
        parts.append(f'<p id="purpose" class="purpose"><b>Purpose:</b> {e(table.purpose)}</p>')
    if about:
        parts.append(
            '<dl id="about">' + "".join(f"<dt>{e(k)}</dt><dd><code>{e(v)}</code></dd>" for k, v in about) + "</dl>"
        )
    if links:
        parts.append(
            '<p id="files">Data: '
            + ", ".join(f'<a href="{e(name, quote=True)}">{e(name)}</a>' for name in links)
            + "</p>"
        )
    parts += [
        f"<p>{e(table_note(table))}; the best value of each column among the defenses in bold.</p>",
        html_table(table),
    ]
    notes = notes_of(table)
    if notes:
        parts.append(
            '<h2>Runs that did not finish</h2><ul id="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"
        )
    if detection is not None:
        parts += [
            "<h2>Detectors</h2>",
            f"<p>{e(table_note(detection))}; the best value of each column in bold.</p>",
            html_table(detection, "detection"),
        ]
        notes = notes_of(detection)
        if notes:
            parts.append('<ul id="detection_notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
    for title, path in plots:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(title)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


__all__ = [
    "METRICS",
    "curves",
    "html_page",
    "html_table",
    "make_plots",
    "mean_curve",
    "roc_curves",
    "roc_of",
    "scatter",
    "scatter_position",
    "seeds_text",
    "shared_rate",
]
