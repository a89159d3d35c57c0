"""The README's tables of datasets, models, attacks and defenses, generated from the
registries (and the methods' docstrings), so that they cannot drift from the code.

    python scripts/readme_tables.py            # rewrite README.md between the markers
    python scripts/readme_tables.py --check    # exit 1 when README.md is out of date

Only the project's own methods are listed, not plugins installed beside it.
tests/test_contributing.py runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, installed or not

import attack  # noqa: E402
import defense  # noqa: E402
from utils.datasets import dataset_entry, list_datasets  # noqa: E402
from utils.models import list_models, model_spec  # noqa: E402
from utils.registry import Registry, describe  # noqa: E402

BEGIN = "<!-- tables:begin -->"
END = "<!-- tables:end -->"
NOTE = (
    "<!-- Generated from the registries by scripts/readme_tables.py: edit the code (docstrings, "
    "`paper`, `year`, `kind`), then run it. -->"
)


_ESCAPES = {"|": "\\|", "<": "&lt;", ">": "&gt;", "*": "\\*", "\n": " "}  # Markdown inside a table cell


def _cell(text: Any) -> str:
    return "".join(_ESCAPES.get(c, c) for c in str(text))


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip()


def datasets_table() -> str:
    rows = []
    for name in list_datasets():
        entry = dataset_entry(name)
        info = entry.info
        size = "any" if info.size == (0, 0) else f"{info.size[0]}x{info.size[1]}x{info.channels}"
        files = [info.files]
        if entry.download is not None:
            files.append("downloaded when missing")
        files += [f"also read from `{folder}`" for folder in entry.fallbacks]
        rows.append((f"`{name}`", size, info.num_classes or "any", "; ".join(files)))
    return _table(("name", "size (HxWxC)", "classes", "files"), rows)


def models_table() -> str:
    rows = []
    for name in list_models():
        spec = model_spec(name)
        notes = _first_line(spec.build.__doc__)
        if spec.feature_layer is None:
            notes += " No feature layer, so FP does not apply."
        smallest = "any" if spec.min_size <= 1 else f"{spec.min_size}x{spec.min_size}"
        rows.append((f"`{name}`", smallest, notes.strip()))
    return _table(("name", "smallest input", "notes"), rows)


def methods_table(registry: Registry[Any]) -> str:
    rows = []
    for name in registry.names():
        info = describe(registry, name)
        if info.plugin:
            continue
        shown = f"[`{name}`]({info.source})" + "".join(f" (`{a}`)" for a in info.aliases)
        rows.append((shown, info.kind, info.year if info.year is not None else "", info.paper, info.summary))
    return _table(("name", "kind", "year", "paper", "summary"), rows)


def tables() -> str:
    """The generated block, markers included."""
    parts = [
        BEGIN,
        NOTE,
        "",
        "#### Datasets",
        "",
        datasets_table(),
        "",
        "#### Models",
        "",
        models_table(),
        "",
        "#### Attacks",
        "",
        methods_table(attack.ATTACKS),
        "",
        "#### Defenses",
        "",
        methods_table(defense.DEFENSES),
        END,
    ]
    return "\n".join(parts)


def render(readme: str) -> str:
    """``readme`` with its generated block replaced; ValueError when the markers are missing."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} block")
    return readme[:start] + tables() + readme[end + len(END) :]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/readme_tables.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README is out of date; write nothing")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the README to rewrite or check")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    current = path.read_text(encoding="utf-8")
    try:
        wanted = render(current)
    except ValueError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if wanted != current:
            print(f"{path} is out of date with the registries: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        path.write_text(wanted, encoding="utf-8")
        print(f"rewrote the tables in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
