"""The attack contract (see tools.contract for the rules): the checks that read the class,
and the checks that run it through the harness on digits.

    from attack.contract import CONTRACT
    CONTRACT.check_static(MyAttack)                  # registered, documented, ...
    CONTRACT.check_run(MyAttack, tmp_path)           # its hooks load, evaluate, parse, print nothing
    CONTRACT.check_deterministic(MyAttack, tmp_path) # same seed, same record

A class that is not registered (a throwaway class in a test) runs under a temporary name.
tests/test_attack_contract.py applies the checks to every registered attack;
tests/test_attack.py checks the records the harness writes for each.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import torch

from attack.base import ATTACKS, Attack, Kind, run
from tools.contract import Contract, Guard, in_window

# What an attack's own code may run in: the trigger and every optional hook of the harness.
HOOKS = (
    "__init__",
    "prepare",
    "apply",
    "poison_training",
    "cross",
    "batch_hook",
    "before_training",
    "train_step",
    "extras",
)


def _guard_batch_hook(guard: Guard, name: str, args: tuple, result: Any) -> Any:
    """The per-batch function that batch_hook returns runs in the guard's window too."""
    if name == "batch_hook" and callable(result):
        return in_window(guard, result, f"{type(args[0]).__qualname__}.batch_hook's hook")
    return result


class AttackContract(Contract):
    def _run(self, name: str, cls: type[Attack], root: Path, **options: Any) -> dict[str, Any]:
        return run(
            name,
            dataset="digits",
            record_root=str(root),
            save_folder_name=name,
            device="cpu",
            overwrite=True,
            **{"epochs": 1, **cls.smoke_params, **options},
        )

    def check_run(self, cls: type[Attack], root: Path, **options: Any) -> dict[str, Any]:
        """Run ``cls`` once through the harness on digits (1 epoch, its smoke_params, on
        the CPU, record under ``root``) with the guards on in its own code (the trigger and
        the hooks): rules no-record-loading, no-evaluation, no-argv and no-printing. The
        harness itself may load a clean model's record (``ctx.clean_model``) and evaluate
        the victim. Returns the run's summary."""
        with self.registered(cls) as name, self.guarded_methods(cls, HOOKS, _guard_batch_hook) as guard:
            try:
                summary = self._run(name, cls, root, **options)
            except Exception:
                guard.raise_first()
                raise
        guard.raise_first()
        return summary

    def check_deterministic(self, cls: type[Attack], root: Path, seed: int = 3, **options: Any) -> None:
        """Two runs with the same seed write the same record (its SHA-256 digests)."""
        runs = []
        with self.registered(cls) as name:
            for part in ("a", "b"):
                summary = self._run(name, cls, Path(root) / part, random_seed=seed, **options)
                saved = torch.load(Path(root) / part / name / "attack_result.pt", weights_only=True)
                runs.append(({k: v for k, v in summary.items() if k != "seconds"}, saved["sha256"]))
        (first, digest_first), (second, digest_second) = runs
        if first != second:
            differ = sorted(k for k in first if first[k] != second.get(k))
            self.fail(cls, "deterministic", f"two runs with seed {seed} gave different {', '.join(differ)}")
        if digest_first != digest_second:
            differ = sorted(k for k in digest_first if digest_first[k] != digest_second.get(k))
            self.fail(cls, "deterministic", f"two runs with seed {seed} wrote different {', '.join(differ)}")


CONTRACT = AttackContract(
    side="attack",
    base=Attack,
    registry=ATTACKS,
    decorator="register_attack",
    harness="attack.base",
    kinds=typing.get_args(Kind),
    yearless_kinds=("clean",),
    hints={
        "context": "the images given to apply and the AttackContext given to prepare, with ctx.clean_model()",
        "evaluation": "the harness evaluates the victim every --eval_every epochs",
        "seeding": "ctx.rng, ctx.seed(); the harness seeds torch before the run",
    },
)
