"""The comparison's tables, built from the summaries its runs (:mod:`bench.jobs`) write;
this module knows nothing of attacks or defenses beyond those summary files
(``attack_summary.json``, ``summary.json``).

The table: one row per defense (and "no defense": the backdoored model, from the
record's attack_summary.json), one column group per record with C-Acc, ASR, RA and DER in
percent as mean ± sample standard deviation (ddof 1) over the seeds that finished, and
the run time (``seconds`` of the summaries) with the device. The best value of each
column among the defenses is marked (highest C-Acc, lowest ASR, highest RA, highest
DER; ties at the shown precision are all marked; "no defense" is not a candidate).
It is written as Markdown, CSV and JSON, and printed as a terminal table that fits
100 columns. When a defense run holds a retuning result (``--retune``: summary.json's
``retune``), a column "ASR after retuning" follows DER (issue 22).

The detectors' table (:func:`detection_table`, issue 20): per record, a row per detector
with AUROC, TPR at 5% FPR and the flagged set's F1 (summary.json's ``detection``), the
retrained model's C-Acc and ASR when a run retrained one (``retrained``), and the time.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from bench.jobs import Run, made_by
from utils.config import config_diff  # noqa: F401  (the one config diff; the comparison's callers import it here)

NO_DEFENSE = "no defense"
DIGITS = 2  # decimals of the percentages


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    short: str = ""  # the label in the terminal's narrow columns, when the label is too long


METRICS = (
    Metric("c_acc", "C-Acc", True),
    Metric("asr", "ASR", False),
    Metric("ra", "RA", True),
    Metric("der", "DER", True),
)
# the ASR of the purified model after the retuning attack (summary.json's "retune", written by
# ``--retune``): a column of its own only when some run of the table has it
RETUNE = Metric("retune_asr", "ASR after retuning", False, "ASR retuned")


# -- the table ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    """A column of one row: the values of the seeds that finished, in percent."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        if len(self.values) < 2:
            return None if not self.values else 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    def text(self, digits: int = DIGITS) -> str:
        if not self.values:
            return "—"
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Row:
    record: str
    defense: str  # NO_DEFENSE for the backdoored model
    cells: dict[str, Cell] = field(default_factory=dict)
    seconds: Cell = field(default_factory=Cell)
    devices: list[str] = field(default_factory=list)
    made_by: dict[str, list[str]] = field(default_factory=lambda: {"code": [], "host": [], "node": []})
    seeds: list[int] = field(default_factory=list)  # seeds that finished
    expected: int = 0  # runs asked for
    problems: list[Run] = field(default_factory=list)  # failed, blocked or mismatched runs
    best: set[str] = field(default_factory=set)

    def time_text(self) -> str:
        if not self.seconds.values:
            return "—"
        device = "/".join(sorted(set(self.devices))) or "?"
        return f"{self.seconds.text(1)} s {device}"

    def problem_text(self) -> str:
        if not self.problems:
            return ""
        first = self.problems[0]
        text = f"{first.status}: {first.message}" if first.message else first.status
        return text + first.log_note()


@dataclass
class Table:
    name: str
    records: list[str]
    defenses: list[str]
    seeds: list[int]
    rows: list[Row]
    runs: list[Run]
    purpose: str | None = None  # what the comparison is for (a grid's 'purpose:'), shown with the table
    metrics: tuple[Metric, ...] = METRICS  # the columns shown: METRICS, and RETUNE when a run was retuned
    detectors: bool = False  # the detectors' table (:func:`detection_table`): no "no defense" row

    @property
    def names(self) -> list[str]:
        """The rows of a record: "no defense" and the defenses (the detectors' table: the detectors)."""
        return list(self.defenses) if self.detectors else [NO_DEFENSE, *self.defenses]

    @property
    def columns(self) -> list[str]:
        """The labels of a record's column group: the metrics, then Time."""
        return [*(m.label for m in self.metrics), "Time"]

    def row(self, record: str, defense: str) -> Row:
        return next(r for r in self.rows if r.record == record and r.defense == defense)

    @property
    def failed(self) -> list[Run]:
        """Runs that failed, or did not run because their record failed (not mismatches)."""
        return [
            r
            for r in self.runs
            if r.status == "failed"
            or r.status == "blocked"
            and r.depends_on is not None
            and r.depends_on.status == "failed"
        ]


def _percent(value: Any) -> float | None:
    return None if not isinstance(value, (int, float)) or isinstance(value, bool) else 100.0 * float(value)


def metrics_of(run: Run) -> dict[str, float | None]:
    """C-Acc, ASR, RA, DER in percent from an attack summary (DER None) or a defense summary."""
    s = run.summary or {}
    if run.side == "attack":
        return {
            "c_acc": _percent(s.get("clean_acc")),
            "asr": _percent(s.get("asr")),
            "ra": _percent(s.get("ra")),
            "der": None,
            RETUNE.key: None,
        }
    after = s.get("after") or {}
    return {
        "c_acc": _percent(after.get("clean_acc")),
        "asr": _percent(after.get("asr")),
        "ra": _percent(after.get("ra")),
        "der": _percent(s.get("der")),
        RETUNE.key: _percent((s.get("retune") or {}).get("asr")) if isinstance(s.get("retune"), dict) else None,
    }


def retuned(runs: Sequence[Run]) -> bool:
    """Whether any finished defense run of ``runs`` holds a retuning result (``--retune``)."""
    return any(r.side == "defense" and r.ok and isinstance((r.summary or {}).get("retune"), dict) for r in runs)


def aggregate(
    name: str, records: Sequence[str], defenses: Sequence[str], seeds: Sequence[int], runs: Sequence[Run]
) -> Table:
    """The table of ``runs``: attack runs give the "no defense" rows, defense runs the
    others (mean ± std over the seeds that finished); best values are marked where at
    least two defenses have one."""
    shown = (*METRICS, RETUNE) if retuned(runs) else METRICS
    rows = []
    for record in records:
        for defense in [NO_DEFENSE, *defenses]:
            mine = [
                r
                for r in runs
                if r.group == record
                and (r.side == "attack" if defense == NO_DEFENSE else r.side == "defense" and r.method == defense)
            ]
            rows.append(_row(record, defense, mine, shown, metrics_of))
    for record in records:
        _mark_best([r for r in rows if r.record == record and r.defense != NO_DEFENSE], shown)
    return Table(name, list(records), list(defenses), list(seeds), rows, list(runs), metrics=shown)


def _row(
    record: str,
    name: str,
    mine: Sequence[Run],
    metrics: Sequence[Metric],
    values_of: Callable[[Run], dict[str, float | None]],
) -> Row:
    """The row of ``name`` on ``record`` from its runs ``mine``: ``metrics`` (read by
    ``values_of``), time, devices and provenance of those that finished; the others as problems."""
    row = Row(record, name, {m.key: Cell() for m in metrics})
    row.expected = len(mine)
    for run in sorted(mine, key=lambda r: r.seed):
        if not run.ok:
            if run.status != "todo":
                row.problems.append(run)
            continue
        for key, value in values_of(run).items():
            if value is not None and key in row.cells:
                row.cells[key].values.append(value)
        seconds = (run.summary or {}).get("seconds")
        if isinstance(seconds, (int, float)):
            row.seconds.values.append(float(seconds))
        row.devices.append(str((run.summary or {}).get("device", "?")))
        for key, value in made_by(run.summary or {}).items():
            if value and value not in row.made_by[key]:
                row.made_by[key].append(value)
        row.seeds.append(run.seed)
    return row


def _mark_best(candidates: Sequence[Row], metrics: Sequence[Metric]) -> None:
    """Mark the best mean of each metric among ``candidates`` (ties at the shown precision
    all), where at least two have one."""
    for metric in metrics:
        means = {
            id(r): round(r.cells[metric.key].mean, DIGITS) for r in candidates if r.cells[metric.key].mean is not None
        }
        if len(means) < 2:  # nothing to compare with
            continue
        best = max(means.values()) if metric.higher_is_better else min(means.values())
        for r in candidates:
            if means.get(id(r)) == best:
                r.best.add(metric.key)


COLUMNS = [*(m.label for m in METRICS), "Time"]  # without a retuning result (Table.columns: the shown ones)


def _cells(row: Row, bold: Callable[[str], str], metrics: Sequence[Metric] = METRICS) -> list[str]:
    """The texts of one row's column group: ``metrics``, then Time."""
    if not row.seeds:
        text = row.problem_text() or ("not run" if row.expected else "—")
        return [text, *["—"] * len(metrics)]
    out = []
    for metric in metrics:
        cell = row.cells[metric.key]
        text = cell.text()
        out.append(bold(text) if metric.key in row.best else text)
    out.append(row.time_text())
    if row.problems or len(row.seeds) < row.expected:
        out[0] += f" (n={len(row.seeds)}/{row.expected})"
    return out


def markdown(table: Table, rows: Literal["defenses", "records"] = "defenses") -> str:
    """The table as GitHub Markdown (best values in bold), with notes on runs that did
    not finish below it. ``rows="defenses"``: one row per defense, a column group per
    record; ``rows="records"``: one row per record (attack), a column group per defense,
    as the SAU paper and BackdoorBench lay out their tables."""
    defenses = [NO_DEFENSE, *table.defenses]
    outer, inner = (defenses, table.records) if rows == "defenses" else (table.records, defenses)
    header = ["Defense" if rows == "defenses" else "Record"]
    for name in inner:
        header += [f"{name} {table.columns[0]}", *table.columns[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for name in outer:
        cells = [name]
        for other in inner:
            record, defense = (other, name) if rows == "defenses" else (name, other)
            cells += _cells(table.row(record, defense), lambda t: f"**{t}**", table.metrics)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(table_note(table) + "; best of each metric and record in bold (among the defenses).")
    if table.purpose:
        lines[:0] = [f"> **Purpose:** {table.purpose}", ""]
    notes = notes_of(table)
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def table_note(table: Table) -> str:
    """What the numbers are: units, seeds, and what Time measures."""
    if table.detectors:
        return detection_note(table)
    which = (
        "seeds"
        if not any(r.column for r in table.runs)
        else "seeds (seed k: the attack's record and the defense both made with seed k)"
    )
    text = (
        f"C-Acc, ASR, RA, DER in %, mean ± std over {which} {', '.join(map(str, table.seeds))}; Time: each run's "
        f'wall time and device (for "{NO_DEFENSE}": the attack\'s training time)'
    )
    return text + (f"; {retune_note(table.runs)}" if RETUNE in table.metrics else "")


def retune_note(runs: Sequence[Run]) -> str:
    """What the "ASR after retuning" column is, with the retuning sets the runs' summaries name."""
    sets = sorted(
        {
            (s["retune"].get("poisoned_samples"), s["retune"].get("clean_samples"))
            for r in runs
            if r.side == "defense" and r.ok
            for s in [r.summary or {}]
            if isinstance(s.get("retune"), dict)
        },
        key=str,
    )
    said = ", ".join(f"{p} poisoned + {c} clean" for p, c in sets)
    return (
        f"ASR after retuning: the ASR (%) of the purified model after the retuning attack of Min et al. "
        f"(NeurIPS 2024: a few epochs of fine-tuning on a small set of clean and poisoned training samples; "
        f'the settings come from each run\'s summary.json "retune", here {said} samples); '
        f'"—": a run made without --retune'
    )


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters (an ellipsis at the end when cut)."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


CELLS_WIDTH = 14  # "99.99 ± 99.99*"
TIME_WIDTH = 16  # the mean only: "1234.5 s cuda:0"
NAME_WIDTH = 10  # at least: "no defense"


def _widths(n_cells: int, longest: int, width: int) -> tuple[int, int]:
    """(name width, time width) of a terminal line of ``n_cells`` number cells and a time
    that fits ``width``: the name as long as the longest (at least :data:`NAME_WIDTH`), the
    time narrower when nothing else is left."""
    fixed = n_cells * (CELLS_WIDTH + 1) + 1
    name = max(NAME_WIDTH, min(longest, width - fixed - TIME_WIDTH))
    return name, max(0, min(TIME_WIDTH, width - fixed - name))


def _took(seconds: Cell, devices: Sequence[str], width: int) -> str:
    """The mean time and the device, or the time only when both do not fit ``width``."""
    if seconds.mean is None:
        return "—"
    text = f"{seconds.mean:.1f} s {'/'.join(sorted(set(devices))) or '?'}"
    return text if len(text) <= width else f"{seconds.mean:.1f} s"


def _terminal_header(labels: Sequence[str], name_width: int, time_width: int) -> str:
    return (
        f"{'':<{name_width}} "
        + " ".join(f"{_fit(c, CELLS_WIDTH):>{CELLS_WIDTH}}" for c in labels)
        + f" {'Time':>{time_width}}"
    )


def terminal_table(table: Table, rows: Literal["defenses", "records"] = "defenses", width: int = 100) -> str:
    """The table for a terminal, at most ``width`` characters wide: one line per (record,
    defense) with C-Acc, ASR, RA, DER (and ASR after retuning, when shown) and Time (names
    abbreviated, a run that did not finish as its reason, cut), records in blocks
    (``rows="records"``: defenses in blocks; Time: the mean only, without the device when
    it does not fit). The full table is the markdown written to the files."""
    outer, inner = (table.records, table.names) if rows == "defenses" else (table.names, table.records)
    n = len(table.metrics)
    name_width, time_width = _widths(n, max((len(x) for x in inner), default=NAME_WIDTH), width)
    header = _terminal_header([m.short or m.label for m in table.metrics], name_width, time_width)
    lines = []
    if table.purpose:
        lines += [_fit(f"Purpose: {table.purpose}", width), ""]
    for block in outer:
        kind = ("detectors on record" if table.detectors else "record") if rows == "defenses" else "defense"
        lines.append(_fit(f"{kind} {block}", width))
        lines.append(_fit(header, width))
        for name in inner:
            record, defense = (block, name) if rows == "defenses" else (name, block)
            row = table.row(record, defense)
            texts = _cells(row, lambda t: t + "*", table.metrics)
            shown_name = name
            if " (n=" in texts[0]:  # some seeds did not finish: said after the name
                texts[0], count = texts[0].split(" (n=", 1)
                shown_name = f"{name} (n={count}"
            label = _fit(shown_name, name_width).ljust(name_width)
            if not row.seeds:
                lines.append(_fit(f"{label} {texts[0]}", width))
                continue
            numbers = " ".join(_fit(t, CELLS_WIDTH).rjust(CELLS_WIDTH) for t in texts[:n])
            took = _fit(_took(row.seconds, row.devices, time_width), time_width).rjust(time_width)
            lines.append(_fit(f"{label} {numbers} {took}", width))
        lines.append("")
    note = table_note(table) + "; * best among the defenses."
    lines += textwrap.wrap(note, width)
    notes = notes_of(table)
    if notes:
        lines.append("")
        lines += [_fit(f"- {n}", width) for n in notes]
    return "\n".join(lines) + "\n"


def notes_of(table: Table) -> list[str]:
    out = []
    for run in table.runs:
        if run.status in ("failed", "blocked", "mismatch", "unavailable"):
            text = f"{run.label}: {run.status}"
            if run.message:
                text += f": {run.message}"
            out.append(text + run.log_note())
    return out


def to_records(table: Table) -> list[dict[str, Any]]:
    """One plain dict per (record, defense): the numbers of the table, in percent."""
    out = []
    for row in table.rows:
        item: dict[str, Any] = {
            "record": row.record,
            "defense": row.defense,
            "n": len(row.seeds),
            "expected": row.expected,
            "seeds": row.seeds,
        }
        for metric in table.metrics:
            cell = row.cells[metric.key]
            item[metric.key] = cell.mean
            item[f"{metric.key}_std"] = cell.std
            item[f"{metric.key}_values"] = cell.values
        item["seconds"] = row.seconds.mean
        item["seconds_std"] = row.seconds.std
        item["device"] = "/".join(sorted(set(row.devices))) or None
        item["best"] = [m.key for m in table.metrics if m.key in row.best]
        item["problem"] = row.problem_text() or None
        for key, values in row.made_by.items():  # what made the numbers: code versions, hosts, Ray nodes
            item[key] = ";".join(values) or None
        out.append(item)
    return out


def to_csv(table: Table) -> str:
    """The table's numbers, one line per (record, defense), percentages rounded as shown."""
    fields = ["record", "defense", "n", "expected"]
    for metric in table.metrics:
        fields += [metric.key, f"{metric.key}_std"]
    fields += ["seconds", "seconds_std", "device", "best", "problem", "code", "host", "node"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for item in to_records(table):
        row = {k: ("" if v is None else v) for k, v in item.items()}
        for key in fields:
            if isinstance(item.get(key), float):
                row[key] = round(item[key], DIGITS)
        row["best"] = ";".join(item["best"])
        writer.writerow(row)
    return buf.getvalue()


def to_json(table: Table) -> dict[str, Any]:
    return {
        "name": table.name,
        "records": table.records,
        "defenses": table.defenses,
        "seeds": table.seeds,
        "rows": to_records(table),
        "runs": [r.as_dict() for r in table.runs],
        "notes": notes_of(table),
    }


# -- detectors ------------------------------------------------------------------------------------------

DETECTION_METRICS = (Metric("auroc", "AUROC", True), Metric("tpr_at_5fpr", "TPR@5%FPR", True), Metric("f1", "F1", True))
# the model retrained without the flagged samples (data detectors, --retrain): shown when some run has it
RETRAINED = (
    Metric("retrained_c_acc", "Retrained C-Acc", True, "Retr. C-Acc"),
    Metric("retrained_asr", "Retrained ASR", False, "Retr. ASR"),
)


def detection_values(run: Run) -> dict[str, float | None]:
    """AUROC, TPR at 5% FPR and the flagged set's F1 (summary.json's ``detection``), and the
    retrained model's C-Acc and ASR (``retrained``), in percent; None where absent."""
    s = run.summary or {}
    found = s.get("detection") if isinstance(s.get("detection"), dict) else {}
    retrained = s.get("retrained") if isinstance(s.get("retrained"), dict) else {}
    return {
        **{m.key: _percent(found.get(m.key)) for m in DETECTION_METRICS},
        "retrained_c_acc": _percent(retrained.get("clean_acc")),
        "retrained_asr": _percent(retrained.get("asr")),
    }


def detection_table(records: Sequence[str], detectors: Sequence[str], runs: Sequence[Run]) -> Table:
    """The detectors' table: per record, a row per detector with AUROC, TPR@5%FPR and F1
    in percent (and the retrained model's C-Acc and ASR when some run retrained one), mean
    ± std over the seeds that finished, and the run time; a row names its first problem when
    a run failed. Best of each metric and record marked. Rendered one block per record
    (:func:`detection_markdown`, :func:`terminal_table`): six numbers per record and
    detector do not fit 100 columns beside another record's."""
    mine = [r for r in runs if r.side == "defense" and r.method in detectors]
    metrics = DETECTION_METRICS + (
        RETRAINED if any(isinstance((r.summary or {}).get("retrained"), dict) for r in mine if r.ok) else ()
    )
    rows = [
        _row(record, d, [r for r in mine if r.method == d and r.group == record], metrics, detection_values)
        for record in records
        for d in detectors
    ]
    for record in records:
        _mark_best([r for r in rows if r.record == record], metrics)
    seeds = sorted({r.seed for r in mine})
    return Table("detectors", list(records), list(detectors), seeds, rows, mine, metrics=metrics, detectors=True)


def detection_note(table: Table) -> str:
    text = (
        f"Detectors, in %, mean ± std over seeds {', '.join(map(str, table.seeds))}: AUROC of the suspicion "
        "scores, TPR at 5% FPR (the largest TPR of a threshold whose FPR is at most 5%), F1 of the set the "
        'detector flags ("—": it flags none of its own); positives: the training set\'s poisoned samples (data '
        "detection) or the backdoor test set against the clean test set (input detection)"
    )
    if RETRAINED[0] in table.metrics:
        text += "; Retrained C-Acc/ASR: the model retrained from scratch without the flagged samples (--retrain)"
    return text + "; Time: each run's wall time and device"


def detection_markdown(table: Table) -> str:
    """The detectors' table as GitHub Markdown: a table per record (a row per detector),
    best of each column in bold, the note below."""
    lines = []
    for record in table.records:
        lines += [
            f"**Detectors on {record}**",
            "",
            "| Detector | " + " | ".join(table.columns) + " |",
            "|---|" + ":---:|" * len(table.columns),
        ]
        for detector in table.defenses:
            cells = [detector, *_cells(table.row(record, detector), lambda t: f"**{t}**", table.metrics)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines.append(detection_note(table) + "; best of each column in bold.")
    notes = notes_of(table)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def detection_json(table: Table) -> dict[str, Any]:
    """The detectors' table as plain data: per detector and record, every metric's mean,
    std and values (``auroc``, ``auroc_std``, ``auroc_values``, ...; ``std`` and ``text``:
    AUROC's), the time, the seeds and the first problem."""
    rows = []
    for detector in table.defenses:
        cells = {}
        for record in table.records:
            row = table.row(record, detector)
            cell: dict[str, Any] = {
                "n": len(row.seeds),
                "expected": row.expected,
                "seeds": row.seeds,
                "problem": row.problem_text() or None,
            }
            for metric in table.metrics:
                c = row.cells[metric.key]
                cell.update({metric.key: c.mean, f"{metric.key}_std": c.std, f"{metric.key}_values": c.values})
            cell.update(
                {
                    "std": row.cells["auroc"].std,
                    "text": row.cells["auroc"].text(),
                    "seconds": row.seconds.mean,
                    "seconds_std": row.seconds.std,
                    "device": "/".join(sorted(set(row.devices))) or None,
                    "best": [m.key for m in table.metrics if m.key in row.best],
                }
            )
            cells[record] = cell
        rows.append({"detector": detector, "cells": cells})
    return {
        "records": table.records,
        "detectors": table.defenses,
        "metrics": [m.key for m in table.metrics],
        "seeds": table.seeds,
        "rows": rows,
        "notes": notes_of(table),
    }
