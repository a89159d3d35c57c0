"""Time SAU rounds on an attack record, split into the shared-adversarial-example search
and the unlearning step, and print samples per second. A benchmark, not a test.

    python benchmarks/sau_round.py --result_file badnet_fashion_mnist --rounds 2
    python benchmarks/sau_round.py --result_file badnet_cifar10 --device cuda

It builds the defender's data exactly as ``defense/sau.py`` does (same YAML, same seeded
clean subset) and times whole rounds, excluding evaluation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from defense.base import DefenseData, clean_indices
from defense.sae import SharedAdversarialExamples
from defense.sau import SAU
from utils.config import method_yaml, read_yaml
from utils.datasets import load_dataset
from utils.records import load_record, record_dir
from utils.runtime import resolve_device, seed_everything
from utils.train import make_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--result_file", required=True)
    parser.add_argument("--record_root", default="record")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    record = load_record(record_dir(Path(args.record_root), args.result_file))
    yaml_path = method_yaml("defense", "sau", record.clean_data)
    options = read_yaml(yaml_path) if yaml_path else {}
    ratio = options.pop("ratio", 0.05)
    sau = SAU(**{k: v for k, v in options.items() if k in SAU().hyperparameters()})
    device = resolve_device(args.device)
    seed_everything(0)
    data = load_dataset(record.clean_data, record.config.get("data_root", "data"))
    idx = clean_indices(data.train.labels, record.poison_indices, ratio, 0)
    defender = DefenseData(data.train.subset(idx), data.info, device, args.amp, 0)
    model = record.build_model().to(device).eval()
    ref = record.build_model().to(device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    sae = SharedAdversarialExamples(
        model,
        ref,
        bound=sau.trigger_norm,
        step_size=sau.adv_lr,
        steps=sau.adv_steps,
        norm=sau.norm_type,
        init=sau.pgd_init,
        beta_1=sau.beta_1,
        beta_2=sau.beta_2,
        amp=args.amp,
    )
    optimizer = make_optimizer(model.parameters(), "adam", sau.lr)
    print(
        f"record {args.result_file}: {record.model_name} on {record.clean_data}, {len(idx)} clean samples "
        f"(ratio {ratio}), batch {sau.batch_size}, device {device}, amp {args.amp and device.type == 'cuda'}, "
        f"torch threads {torch.get_num_threads()}"
    )
    defender.tensors()  # move the subset to the device once, outside the timings
    for r in range(args.rounds):
        t_search = t_unlearn = 0.0
        steps = 0
        for step, (x, y) in enumerate(defender.batches(sau.batch_size, generator=defender.generator(r))):
            sync(device)
            t0 = time.perf_counter()
            found = sae.search(x, y)
            sync(device)
            t1 = time.perf_counter()
            sau.unlearning_step(model, optimizer, defender, x, y, found, r, step)
            sync(device)
            t_search += t1 - t0
            t_unlearn += time.perf_counter() - t1
            steps += found.stats.steps
        n = len(idx)
        total = t_search + t_unlearn
        print(
            f"round {r}: {total:.2f} s = search {t_search:.2f} s + unlearning {t_unlearn:.2f} s; "
            f"{n / total:.0f} samples/s ({n / t_search:.0f} search, {n / t_unlearn:.0f} unlearning); "
            f"PGD steps taken {steps}"
        )


if __name__ == "__main__":
    main()
