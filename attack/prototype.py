"""Clean training with the attack harness (no poisoning): the clean reference model that
some attacks (LF, TrojanNN) and defenses need, and the baseline accuracy of a recipe.

    python attack/prototype.py --dataset cifar10 --save_folder_name prototype_cifar10
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import torch

from attack.base import Attack, main, register_attack


@register_attack("prototype")
class Prototype(Attack):
    """Clean training: the dataset's recipe with no trigger and no poisoned sample."""

    kind = "clean"
    paper = "none (clean training)"

    def __init__(self) -> None:
        pass

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x


if __name__ == "__main__":
    main("prototype")
