"""Ship a study's tuned recipe: copy what ``python -m defense tune NAME`` chose on a record
into ``config/defense/NAME/<dataset>_tuned.yaml``, beside the reference recipe, naming the
study, so that ``compare --recipes tuned`` runs it on every record of that dataset that has
no study of its own.

    python scripts/ship_tuned.py --result_file badnet_digits --defenses sau ft fp

The shipped file holds the recipe metadata (``recipe: tuned``, the study as
``recipe_source``, how it was chosen as ``recipe_note``) and only the values that differ
from the default.yaml beside it (it is read over it, like a dataset's file); its header
gives the study's budget, objective, best validation numbers and the commit that ran it.
Nothing here reads the test set: a study only ever saw the validation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, installed or not

from utils import config as cfg  # noqa: E402
from utils.provenance import describe  # noqa: E402
from utils.records import load_record, record_dir  # noqa: E402


def shipped_text(tune_folder: Path, defense: str, record: str, dataset: str) -> str:
    """The text of ``config/defense/<defense>/<dataset>_tuned.yaml`` for the study in ``tune_folder``."""
    recipe = cfg.read_yaml(tune_folder / "recipe.yaml")
    summary = json.loads((tune_folder / "summary.json").read_text())
    default = cfg.read_yaml(cfg.CONFIG_DIR / "defense" / defense / cfg.DEFAULT_YAML)
    meta = {k: recipe[k] for k in ("recipe", "recipe_source", "recipe_note") if k in recipe}
    meta["recipe_source"] = meta["recipe_source"].replace(f"{record}/tune", f"record/{record}/tune", 1)
    values = {k: v for k, v in recipe.items() if k not in cfg.RECIPE_KEYS and default.get(k, object()) != v}
    best = summary.get("best_val") or {}
    budget = summary.get("budget") or {}
    split = summary.get("validation") or {}
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, (int, float)))
    header = [
        f"# {defense} on {dataset}: the tuned recipe, chosen by python -m defense tune on the validation split of",
        f"# {record} ({split.get('val_ratio')} of the defender's clean subset held out for C-Acc, up to "
        f"{split.get('val_backdoor')} poisoned",
        "# *training* images for ASR; the test set was never read), shipped by scripts/ship_tuned.py.",
        f"# Study: {summary.get('trials')} trials (budget {budget.get('trials')}, max_epochs "
        f"{budget.get('max_epochs')}), objective {summary.get('objective')}, seed {summary.get('seed')};",
        f"# searched: {', '.join(summary.get('space') or {})}.",
        f"# Best trial {summary.get('best_trial')}: value {summary.get('best_value'):.4f} ({numbers}).",
        f"# Made by {describe(summary.get('code'))}. Read over default.yaml beside it: only what differs is here.",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump({**meta, **cfg.plain(values)}, sort_keys=False, width=1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--result_file", required=True, help="the record whose studies are shipped")
    parser.add_argument("--defenses", nargs="+", required=True)
    parser.add_argument("--record_root", default="record")
    args = parser.parse_args(argv)
    root = Path(args.record_root)
    dataset = load_record(record_dir(root, args.result_file)).clean_data
    for defense in args.defenses:
        folder = record_dir(root, args.result_file) / "tune" / defense
        if not (folder / "recipe.yaml").is_file():
            print(
                f"{defense}: no study in {folder} (python -m defense tune {defense} --result_file {args.result_file})",
                file=sys.stderr,
            )
            return 2
        text = shipped_text(folder, defense, args.result_file, dataset)
        target = cfg.CONFIG_DIR / "defense" / defense / f"{dataset}{cfg.TUNED_SUFFIX}.yaml"
        target.write_text(text)
        print(f"{defense}: {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
