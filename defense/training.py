"""The training-time kind of the defense harness: a defense that trains the model itself
from the poisoned training set (ABL, D-BR, D-ST, DBD, NAB).

What such a defense holds (:class:`TrainingSet`): the training set as the attacker
delivered it (the record's poisoned samples swapped into the clean training split,
uint8 images and labels, on the CPU; no poison indicator, no poison indices, no test
data), the dataset's declared info and train transform, the device, a seed, and the
attack's training recipe (:class:`Recipe`: architecture, epochs, batch size, optimiser,
learning rate, momentum, weight decay, schedule), read from the record's config. A
defense's hyperparameters named like a recipe field (``epochs``, ``batch_size``, ``lr``,
``client_optimizer``, ``sgd_momentum``, ``wd``, ``lr_scheduler``) override it when they are
not None; the architecture is always the record's, so that the result is evaluated and
saved like every other defense's. Where the record's config lacks a field (BackdoorBench's
records), the project's recipe for the dataset (config/attack/prototype/<dataset>.yaml)
fills it, with a log line.

The defense implements ``train(data) -> model`` and trains with :meth:`TrainingSet.train_epoch`,
the attack side's loop (utils.train.train_epoch); the harness (``train_time``, called from
defense.base's ``_defend``) evaluates the returned model with the code every defense's
result goes through (C-Acc, ASR, RA on the record's test sets, DER against the record's
backdoored model) and writes the same files. ``data.report(epoch, model, **losses)`` and
``data.resume(...)`` work as for a mitigation (checkpoints every ``--save_every`` epochs,
``--resume``).

Attacks that control training (WaNet, Input-Aware, BppAttack: the attacker poisons each
batch while the victim trains) leave no training set a defender could receive: their
records keep no poisoned training set and the kind refuses them (:func:`check_trainable`),
as BackdoorBench does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import Defense, DefenseData, HandsOver, Monitor, TrainingData
from utils import config as cfg
from utils.datasets import Dataset, ImageData, train_transform
from utils.errors import UserError
from utils.models import Classifier, create_model
from utils.poison import poisoned_training_set
from utils.records import AttackRecord
from utils.runtime import grad_scaler
from utils.train import Checkpoint, Step, make_optimizer, make_scheduler, predict, train_epoch

log = logging.getLogger("saubench")

# Attacks that poison batches while the victim trains (attack kind "training-controlled"):
# BackdoorBench's names and ours. Any other record without a poisoned training set is refused too.
TRAINING_CONTROLLED = frozenset({"wanet", "inputaware", "input_aware", "bpp"})


@dataclass(frozen=True)
class Recipe:
    """The attack's training recipe, as the attack harness names it (BackdoorBench's names)."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    client_optimizer: str = "sgd"
    sgd_momentum: float = 0.9
    wd: float = 5e-4
    lr_scheduler: str = "CosineAnnealingLR"

    OVERRIDABLE: ClassVar[tuple[str, ...]] = (
        "epochs",
        "batch_size",
        "lr",
        "client_optimizer",
        "sgd_momentum",
        "wd",
        "lr_scheduler",
    )

    @classmethod
    def of_record(cls, record: AttackRecord) -> "Recipe":
        """The recipe in the record's config; fields it lacks from the project's recipe of the
        record's dataset (config/attack/prototype/<dataset>.yaml)."""
        names = [f.name for f in fields(cls) if f.name != "model"]
        values = {k: record.config[k] for k in names if k in record.config}
        missing = [k for k in names if k not in values]
        if missing:
            path = cfg.CONFIG_DIR / "attack" / "prototype" / f"{record.clean_data}.yaml"
            fallback = cfg.read_yaml(path) if path.is_file() else {}
            values.update({k: fallback[k] for k in missing if k in fallback})
            log.info("the record's config lacks %s: taken from %s", ", ".join(missing), cfg.shown(path))
        try:
            return cls(
                model=record.model_name,
                epochs=int(values["epochs"]),
                batch_size=int(values["batch_size"]),
                lr=float(values["lr"]),
                **{k: values[k] for k in cls.OVERRIDABLE[3:] if k in values},
            )
        except KeyError as exc:
            raise UserError(
                f"{record.path}: the record's config has no training recipe ({exc.args[0]} missing) and "
                f"config/attack/prototype/{record.clean_data}.yaml does not give it"
            ) from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{record.path}: the record's training recipe is malformed ({exc})") from None

    def overridden(self, defense: Any) -> "Recipe":
        """This recipe with the defense's hyperparameters named like a recipe field that are not None."""
        changes = {k: getattr(defense, k) for k in self.OVERRIDABLE if getattr(defense, k, None) is not None}
        if changes:
            log.info("training recipe overridden by the defense: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
        return replace(self, **changes)

    def optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``params`` (learning rate ``lr`` if given)."""
        return make_optimizer(params, self.client_optimizer, self.lr if lr is None else lr, self.sgd_momentum, self.wd)

    def scheduler(self, optimizer: torch.optim.Optimizer, epochs: int | None = None):
        """The recipe's per-epoch schedule over ``epochs`` (default: the recipe's), or None."""
        return make_scheduler(optimizer, self.lr_scheduler, self.epochs if epochs is None else epochs)


@dataclass
class TrainingSet(TrainingData):
    """What a training-time defense holds: :class:`defense.base.TrainingData` (the training
    set as delivered, the dataset's info, the device, a seed) and the training recipe, with
    the harness's progress reporting and checkpoints. No poison indicator, no poison indices,
    no test data: the fields are all there is."""

    recipe: Recipe | None = None
    monitor: Monitor | None = field(default=None, repr=False)
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    # the same reporting and checkpointing as a mitigation's data (they use monitor and checkpoint only)
    resume = DefenseData.resume
    report = DefenseData.report

    def check_deferred(self) -> None:
        """Nothing is deferred here (report() asks): utils.train.train_epoch checks each loss as it goes."""

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The dataset's train transform of a float batch."""
        return train_transform(self.info, x)

    def new_model(self) -> Classifier:
        """A freshly initialised model of the recipe's architecture, on the device."""
        info = self.info
        return create_model(self.recipe.model, info.num_classes, info.channels, info.size, info.mean, info.std).to(
            self.device
        )

    def grad_scaler(self) -> torch.amp.GradScaler:
        return grad_scaler(self.device, self.amp)

    def losses(self, model: nn.Module, batch_size: int = 512) -> torch.Tensor:
        """The cross-entropy of every training sample (as delivered, no transform) under
        ``model`` in eval mode, in order: (N,) float32 on the CPU."""
        logits = predict(model, self.train.images, device=self.device, batch_size=batch_size, amp=self.amp)
        return F.cross_entropy(logits, self.train.labels, reduction="none")

    def train_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        *,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        epoch: int = 0,
        augment: bool = True,
        step: Step | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        scaler: torch.amp.GradScaler | None = None,
        desc: str = "train",
    ) -> dict[str, float]:
        """One epoch of the attack side's loop (utils.train.train_epoch) over the training set
        as delivered, or over ``images``/``labels`` (uint8 or float, e.g. a subset), shuffled
        with ``generator``, with the train transform if ``augment``, in batches of the
        recipe's size; ``step(x, y) -> (loss, logits, targets)`` replaces the cross-entropy."""
        return train_epoch(
            model,
            self.train.images if images is None else images,
            self.train.labels if labels is None else labels,
            optimizer,
            batch_size=self.recipe.batch_size if batch_size is None else batch_size,
            device=self.device,
            epoch=epoch,
            augment=self.augment if augment else None,
            step=step,
            scaler=scaler,
            amp=self.amp,
            generator=generator,
            desc=desc,
        )


def check_trainable(name: str, record: AttackRecord) -> None:
    """Refuse, with one line, a record whose attack controlled the victim's training: the
    defender would have no training set to receive."""
    attack = str(record.attack).lower().replace("-", "")
    if attack in TRAINING_CONTROLLED or record.bd_train is None or len(record.bd_train) == 0:
        raise UserError(
            f"{record.path}: the attack ({record.attack}) controlled the victim's training (it poisons "
            f"batches on the fly, and its record keeps no poisoned training set): a training-time "
            f"defense ({name}) cannot retrain it"
        )


def delivered_set(
    record: AttackRecord,
    data: Dataset,
    device: torch.device,
    amp: bool = False,
    seed: int = 0,
    recipe: Recipe | None = None,
    monitor: Monitor | None = None,
    checkpoint: Checkpoint | None = None,
) -> TrainingSet:
    """What a training-time defender holds on ``record``: the record's poisoned samples in
    place of their clean versions in ``data.train`` (the poison indicator stays here), and the
    record's recipe unless ``recipe``."""
    delivered, _ = poisoned_training_set(data.train, record.bd_train)
    return TrainingSet(
        ImageData(delivered.images, delivered.labels),
        data.info,
        device,
        amp,
        seed,
        Recipe.of_record(record) if recipe is None else recipe,
        monitor,
        checkpoint,
    )


def train_time(
    defense: Any,
    record: AttackRecord,
    data: Dataset,
    values: dict[str, Any],
    device: torch.device,
    monitor: Monitor,
    checkpoint: Checkpoint | None,
    handed: HandsOver,
) -> nn.Module:
    """The defense's ``train`` on what a training-time defender holds (:func:`delivered_set`);
    returns its model. What it hands over (``data.add_extras``, ``data.add_summary``) goes to
    ``handed.outputs``."""
    recipe = Recipe.of_record(record).overridden(defense)
    held = delivered_set(record, data, device, values["amp"], values["random_seed"], recipe, monitor, checkpoint)
    held.outputs = handed.outputs
    monitor.last_epoch = defense.total_epochs(recipe) - 1
    log.info(
        "training-time defense on the training set as delivered: %d samples; recipe %s",
        len(held),
        ", ".join(f"{f.name}={getattr(recipe, f.name)}" for f in fields(recipe)),
    )
    return defense.train(held)


class TrainingDefense(Defense):
    """Base class of the training-time kind: implement :meth:`train`. Hyperparameters named
    like a :class:`Recipe` field override the record's recipe when not None."""

    kind: ClassVar[str] = "training_time"

    def total_epochs(self, recipe: Recipe) -> int:
        """The epochs the defense reports (``data.report``) in all: the last one is evaluated."""
        epochs = getattr(self, "epochs", None)
        return int(recipe.epochs if epochs is None else epochs)


class Held:
    """Tensors a training-time defense computes mid-run (an isolated subset's indices), kept
    in its checkpoint: :meth:`Checkpoint.track` takes it as it takes a model (``state_dict``)."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = dict(tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: torch.as_tensor(v) for k, v in state.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> torch.Tensor:
        """The tensor held under ``key``, or an empty long tensor when the run never computed it (no
        epoch ran that far)."""
        return self.tensors.get(key, torch.zeros(0, dtype=torch.long))

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value


class Phases:
    """A training-time defense's run as named phases of so many epochs, numbered as one
    sequence of run epochs (what ``data.report`` and the checkpoints count)."""

    def __init__(self, *phases: tuple[str, int]):
        self.phases = [(name, int(n)) for name, n in phases]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.phases)

    def of(self, epoch: int) -> tuple[str, int]:
        """The phase of run epoch ``epoch`` and the epoch within that phase."""
        for name, n in self.phases:
            if epoch < n:
                return name, epoch
            epoch -= n
        raise ValueError(f"epoch {epoch} is past the last phase")
