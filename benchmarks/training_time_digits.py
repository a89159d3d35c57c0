"""Run the training-time defenses on digits BadNets and Blended and print their C-Acc, ASR,
RA and DER against the attack's own clean model (attack/prototype.py). A benchmark, not a
test (minutes on a CPU).

    python benchmarks/training_time_digits.py --record_root /tmp/training_rec
    python benchmarks/training_time_digits.py --defenses abl dbr --seeds 0 1

The records (badnet_digits, blended_digits, prototype_digits, attack seed 0) are made in
--record_root when missing; each defense runs with its digits YAML and the given defense
seeds (results in <record>/defense/<name> for seed 0, <name>_seed<k> otherwise). The
target of issue 21: ASR <= 0.1 at a C-Acc drop <= 0.05 against the clean model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import attack
import defense
from utils.datasets import load_dataset
from utils.metrics import evaluate
from utils.records import load_record

RECORDS = {"badnet_digits": "badnet", "blended_digits": "blended"}


def make_records(root: Path) -> None:
    for folder, name in {**RECORDS, "prototype_digits": "prototype"}.items():
        if not (root / folder / "attack_result.pt").exists():
            attack.run(name, dataset="digits", save_folder_name=folder, record_root=str(root), device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record_root", default="/tmp/training_rec")
    parser.add_argument(
        "--defenses",
        nargs="+",
        default=[n for n in defense.list_defenses() if defense.DEFENSES.get(n).kind == "training_time"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    root = Path(args.record_root)
    make_records(root)
    data = load_dataset("digits")
    clean_model = load_record(root / "prototype_digits").build_model().eval()
    rows = [
        "| record | defense | seed | C-Acc | ASR | RA | DER | s | C-Acc drop | target met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in RECORDS:
        clean = evaluate(clean_model, data.test, load_record(root / record).bd_test, device=torch.device("cpu"))
        rows.append(
            f"| {record} | clean model | 0 | {clean.clean_acc:.4f} | {clean.asr:.4f} | {clean.ra:.4f} | | | | |"
        )
        for name in args.defenses:
            for seed in args.seeds:
                result_name = name if seed == 0 else f"{name}_seed{seed}"
                summary = defense.run(
                    name,
                    result_file=record,
                    record_root=str(root),
                    device=args.device,
                    random_seed=seed,
                    result_name=result_name,
                    overwrite=True,
                )
                after = summary["after"]
                drop = clean.clean_acc - after["clean_acc"]
                met = after["asr"] <= 0.1 and drop <= 0.05
                rows.append(
                    f"| {record} | {name} | {seed} | {after['clean_acc']:.4f} | {after['asr']:.4f} | "
                    f"{after['ra']:.4f} | {summary['der']:.4f} | {summary['seconds']:.0f} | {drop:.4f} | "
                    f"{'yes' if met else 'no'} |"
                )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
