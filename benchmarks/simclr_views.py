"""SimCLR views, per image (torchvision.transforms.v2) against batched (defense/simclr.py). A benchmark, not a test.

    python benchmarks/simclr_views.py                      # CPU, one thread
    python benchmarks/simclr_views.py --device cuda --repeats 20

Draws one view of every image of a random batch of ``--batch`` (512) images of Fashion-MNIST's
shape (1x28x28) and of CIFAR-10's (3x32x32), ``--repeats`` times each way, after one warm-up
call each, and prints the median seconds per batch of each path and their ratio (per image /
batched), measured in this run. The per-image path always runs on the CPU (it is a Python loop
over images in BackdoorBench's form); the batched one on ``--device``. ``--threads`` (1) sets
torch's CPU threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defense.simclr import batched_views, simclr_augmentation, simclr_views  # noqa: E402

SHAPES = {"fashion_mnist 1x28x28": (1, 28, 28), "cifar10 3x32x32": (3, 32, 32)}


def timed(fn, repeats: int, sync) -> float:
    """The median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"batch {args.batch}, {args.repeats} repeats (median), {args.threads} CPU thread(s), batched on {device}, "
        f"torch {torch.__version__}"
    )
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        x = torch.rand(args.batch, *shape)
        on_device = x.to(device)
        augmentation = simclr_augmentation(shape[1:])
        generator = torch.Generator().manual_seed(0)
        per_image = timed(lambda: simclr_views(x, augmentation), args.repeats, lambda: None)
        batched = timed(lambda: batched_views(on_device, generator), args.repeats, sync)
        print(
            f"{name}: per image {per_image * 1e3:9.1f} ms/batch  batched {batched * 1e3:8.2f} ms/batch  "
            f"ratio {per_image / batched:7.1f}x"
        )


if __name__ == "__main__":
    main()
