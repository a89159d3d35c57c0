"""Samples per second of attack training and of evaluation, for each registered model at
its dataset's size. A benchmark, not a test.

    python benchmarks/train_speed.py                 # every model, --device auto
    python benchmarks/train_speed.py --models cnn preactresnet18 --device cpu --seconds 2

Each model is measured on synthetic tensors of the shape of the first dataset
(Fashion-MNIST, CIFAR-10, then the others) whose prototype recipe
(config/attack/prototype/<dataset>.yaml) uses it, else CIFAR-10's, at the model's minimum
input size when that is larger. Training: the recipe's batch size (capped
so that a batch is at most about ``--max_gflop`` GFLOP of forward work), SGD with momentum,
cross-entropy, the dataset's train transform, autocast as the harness runs it (``--amp``:
on CUDA only); evaluation: ``utils.metrics.logits_fp32`` (the harness's float32 pass and
batch size, capped the same way). One warm-up batch, then batches for about
``--seconds`` seconds each; FLOPs from torch.utils.flop_counter.FlopCounterMode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import read_yaml  # noqa: E402
from utils.datasets import DatasetInfo, dataset_info, list_datasets, train_transform  # noqa: E402
from utils.metrics import eval_batch_size, logits_fp32  # noqa: E402
from utils.models import create_model, list_models, model_spec  # noqa: E402
from utils.runtime import autocast, resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe_of(model: str) -> tuple[DatasetInfo, int]:
    """The dataset (info) and batch size of the first prototype recipe using ``model``
    (Fashion-MNIST's and CIFAR-10's looked at first)."""
    preferred = ["fashion_mnist", "cifar10"]
    for name in preferred + [n for n in list_datasets() if n not in preferred]:
        path = ROOT / "config" / "attack" / "prototype" / f"{name}.yaml"
        if path.is_file():
            recipe = read_yaml(path)
            if recipe.get("model") == model:
                return dataset_info(name), int(recipe.get("batch_size", 128))
    return dataset_info("cifar10"), 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, batch: int, seconds: float, device: torch.device) -> float:
    """Samples per second of ``step()`` (one batch), after one warm-up call."""
    step()
    sync(device)
    done, start = 0, time.perf_counter()
    while True:
        step()
        done += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seconds", type=float, default=1.5, help="time measured per model and task")
    parser.add_argument("--max_gflop", type=float, default=20.0, help="cap on a batch's forward GFLOP")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    from torch.utils.flop_counter import FlopCounterMode

    print(f"device {device}, torch threads {torch.get_num_threads()}, amp {args.amp and device.type == 'cuda'}")
    print(
        f"{'model':<20} {'dataset':<14} {'input':<10} {'MFLOP/sample':>12} {'batch':>6} {'train/s':>9} "
        f"{'GFLOP/s':>8} {'eval/s':>9} {'GFLOP/s':>8}"
    )
    for name in args.models or list_models():
        info, batch_size = recipe_of(name)
        side = max(min(info.size), model_spec(name).min_size)
        size = (side, side) if side > min(info.size) else info.size
        torch.manual_seed(0)
        model = create_model(name, info.num_classes, info.channels, size, info.mean, info.std).to(device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.rand(1, info.channels, *size, device=device))
        flops = max(counter.get_total_flops(), 1)
        cap = max(2, int(args.max_gflop * 1e9 / flops))
        batch = min(batch_size, cap)
        x = torch.rand(batch, info.channels, *size, device=device)
        y = torch.randint(0, info.num_classes, (batch,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        augmented = info if size == info.size else None

        def train_step() -> None:
            model.train()
            xb = train_transform(augmented, x) if augmented is not None else x
            with autocast(device, args.amp):
                loss = F.cross_entropy(model(xb), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        eval_batch = min(eval_batch_size(device), cap)
        images = (torch.rand(eval_batch, info.channels, *size) * 255).to(torch.uint8)
        train_rate = rate(train_step, batch, args.seconds, device)
        eval_rate = rate(
            lambda: logits_fp32(model, images, device=device, batch_size=eval_batch), eval_batch, args.seconds, device
        )
        print(
            f"{name:<20} {info.name:<14} {'x'.join(map(str, (info.channels, *size))):<10} {flops / 1e6:12.1f} "
            f"{batch:>6} {train_rate:9.1f} {3 * flops * train_rate / 1e9:8.1f} {eval_rate:9.1f} "
            f"{flops * eval_rate / 1e9:8.1f}",
            flush=True,
        )
    print("GFLOP/s: training counts 3 forward passes a sample (forward, input and weight gradients)")


if __name__ == "__main__":
    main()
