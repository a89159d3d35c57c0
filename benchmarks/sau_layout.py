"""What SAU's memory layout does to its final numbers, over seeds. A benchmark, not a test.

    python benchmarks/sau_layout.py --records badnet_digits badnet_digits_seed1 badnet_digits_seed2
    python benchmarks/sau_layout.py --records badnet_fashion_mnist badnet_fashion_mnist_seed1 \\
        badnet_fashion_mnist_seed2 --epochs 5

SAU's default layout (``memory_format: auto``) runs convolutional models in channels_last on
the CPU: the same function with other floating-point rounding, which the search's sign
steps can turn into other perturbations, so the numbers are not bit for bit those of the
reference layout (``contiguous``). Issue 24 keeps such an option in the defaults only if
the final C-Acc and ASR over 3 seeds stay within one standard deviation of the exact run's.

The k-th record is run with defense seed k (as the comparison grids pair them), once in
each layout, with the record's dataset YAML (the reference recipe; ``--epochs`` shortens
it, and the output says so). Results go to ``<record>/defense/sau_layout_<layout>[_e<N>]``
(reused when finished, resumed when interrupted). Printed: each run's C-Acc/ASR/RA and
seconds, the mean ± std per layout, and for C-Acc and ASR whether the two means differ
by less than the exact layout's standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import defense  # noqa: E402

LAYOUTS = ("contiguous", "auto")
KEYS = (("clean_acc", "C-Acc"), ("asr", "ASR"), ("ra", "RA"))


def result_name(layout: str, epochs: int | None, seed: int) -> str:
    name = f"sau_layout_{layout}" + (f"_e{epochs}" if epochs is not None else "")
    return name if seed == 0 else f"{name}_seed{seed}"


def run_one(record: str, seed: int, layout: str, args: argparse.Namespace) -> dict:
    name = result_name(layout, args.epochs, seed)
    summary_file = Path(args.record_root) / record / "defense" / name / "summary.json"
    options = dict(
        result_file=record,
        record_root=args.record_root,
        random_seed=seed,
        memory_format=layout,
        result_name=name,
        device=args.device,
    )
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    return defense.run("sau", **options, resume=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", nargs="+", required=True, help="the k-th runs with defense seed k")
    parser.add_argument("--record_root", default="record")
    parser.add_argument("--epochs", type=int, default=None, help="rounds (default: the recipe's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    rounds = f"{args.epochs} rounds (shortened)" if args.epochs is not None else "the recipe's rounds"
    print(f"SAU, reference recipe, {rounds}; layouts {', '.join(LAYOUTS)}; record k with defense seed k")
    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    for seed, record in enumerate(args.records):
        for layout in LAYOUTS:
            summary = run_one(record, seed, layout, args)
            results[layout].append(summary)
            after = summary["after"]
            print(
                f"{record:<28} seed {seed}  {layout:<10}  "
                + "  ".join(f"{label} {after[key]:.4f}" for key, label in KEYS)
                + f"  ({summary['seconds']:.1f} s)",
                flush=True,
            )
    print()
    stats = {}
    for layout in LAYOUTS:
        cells = []
        for key, label in KEYS:
            stats[layout, key] = mean_std([100 * s["after"][key] for s in results[layout]])
            cells.append(f"{label} {stats[layout, key][0]:.2f} ± {stats[layout, key][1]:.2f}")
        seconds = mean_std([s["seconds"] for s in results[layout]])
        print(f"{layout:<10}  " + "  ".join(cells) + f"  time {seconds[0]:.1f} ± {seconds[1]:.1f} s")
    for key, label in KEYS[:2]:
        (m_exact, s_exact), (m_auto, _) = stats["contiguous", key], stats["auto", key]
        verdict = "within" if abs(m_auto - m_exact) <= s_exact else "OUTSIDE"
        print(f"{label}: |auto - contiguous| = {abs(m_auto - m_exact):.2f} points, {verdict} one std ({s_exact:.2f})")


if __name__ == "__main__":
    main()
