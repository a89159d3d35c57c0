"""The attack harness: the Attack base class, its registry, and ``run``, the one function
behind every ``python attack/<name>.py``.

``run`` resolves the configuration (command line > attack YAML > training-recipe YAML >
defaults), loads the dataset, lets the attack build its trigger, poisons the training
set, trains the victim, evaluates it every ``--eval_every`` epochs and writes
``record/<save_folder_name>/``: attack_result.pt, attack_df.csv, attack_summary.json,
attack.log and attack_plot.png. The folder appears only when the run has finished.
With ``--export_backdoorbench`` it also holds ``backdoorbench/``: the same record in
BackdoorBench's layout (its attack_result.pt dict and PNG folders, utils/backdoorbench.py),
for BackdoorBench's defenses; our defenses read it too (``--result_file <name>/backdoorbench``).

The victim's training saves a checkpoint every ``--save_every`` epochs (and after the
last) in the run's staging folder, ``record/.<save_folder_name>.partial/checkpoint.pt``:
the model, every optimizer and scheduler of :class:`Training`, the gradient scaler, the
shuffling generator, the attack's own modules and generators (:meth:`Attack.state`), the
global random states and the history. ``--resume`` continues from it; on the same device
with the same seed the resumed run ends with exactly the weights of an uninterrupted
one. What comes before the victim's training (the trigger, a clean model to craft it on,
Input-Aware's mask pre-training) is computed again, from the same seed, on resume.

An attack file holds only what is particular to its attack: the trigger (a function of
float [0, 1] images), how poisoned samples are chosen (its ``kind``), and what it keeps
in the record. Attacks that need more than a trigger use optional hooks of the same
harness: :meth:`AttackContext.clean_model` (a clean model to craft the trigger on: LF,
TrojanNN), :meth:`Attack.poison_training` (training images poisoned unlike test images:
LC), :meth:`Attack.batch_hook` (poison each batch on the fly: WaNet),
:meth:`Attack.before_training` and :meth:`Attack.train_step` (train something together
with the victim: Input-Aware's generators), :meth:`Attack.cross` (a "noise mode" test set
with true labels, saved as the record's ``cross_test``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn

from utils import config as cfg
from utils.cli import entry, guarded, python_call
from utils.config import Layer, Param
from utils.datasets import Dataset, DatasetInfo, ImageData, dataset_info, load_dataset, train_transform
from utils.errors import UserError
from utils.history import History
from utils.metrics import Metrics, accuracy, closing_text, evaluate, mean_loss
from utils.models import Classifier, create_model, model_spec
from utils.files import StagedFolder, save_json
from utils.poison import (
    PoisonedSet,
    batch_poison_count,
    bd_test_indices,
    check_target,
    poisoned_set,
    poisoned_training_set,
    select_poison_indices,
    target_labels,
    to_float,
    to_uint8,
)
from utils.provenance import provenance
from utils.records import AttackRecord, live_defense_locks, load_record, record_dir, split_digest
from utils.registry import Method, Registry
from utils.runtime import (
    autocast,
    check_data_root,
    check_record_root,
    grad_scaler,
    held_logs,
    log_to,
    progress,
    replay,
    resolve_device,
    seed_everything,
)
from utils.train import BatchHook, Checkpoint, Step, make_optimizer, make_scheduler, predict, train_epoch

log = logging.getLogger("saubench")

Kind = Literal["clean", "dirty-label", "clean-label", "training-controlled"]


@dataclass(frozen=True)
class PoisonPolicy:
    """How the run poisons, as the harness resolved it (--pratio, --attack_target,
    --attack_label_trans and the dataset's classes). An attack that poisons batches itself
    (training-controlled) applies it through :meth:`count` and :meth:`relabel` (from
    ``ctx.policy`` or ``training.policy``) instead of reading the config."""

    pratio: float
    target: int
    label_trans: str
    num_classes: int

    def count(self, batch_size: int, generator: torch.Generator | None = None) -> int:
        """How many samples of a batch of ``batch_size`` to poison (utils.poison.batch_poison_count)."""
        return batch_poison_count(self.pratio, batch_size, generator)

    def relabel(self, labels: torch.Tensor) -> torch.Tensor:
        """The attacker's labels for poisoned samples whose true labels are ``labels``."""
        return target_labels(labels, self.label_trans, self.target, self.num_classes)


@dataclass
class AttackContext:
    """What an attack may use to build its trigger: the dataset, the attack's target,
    the device, a seeded NumPy generator and the resolved config."""

    dataset: Dataset
    target: int
    label_trans: str
    device: torch.device
    rng: np.random.Generator
    config: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return self.dataset.info.num_classes

    @property
    def pratio(self) -> float:
        return float(self.config["pratio"])

    @property
    def policy(self) -> PoisonPolicy:
        """The run's poisoning ratio, target and label transform (:class:`PoisonPolicy`)."""
        return PoisonPolicy(self.pratio, self.target, self.label_trans, self.num_classes)

    def seed(self) -> int:
        """A fresh seed drawn from the run's generator (for an attack's own torch.Generator)."""
        return int(self.rng.integers(2**31 - 1))

    def clean_model(self, record: str | None = None) -> Classifier:
        """A clean model of this dataset, in eval mode on the device, to craft a trigger
        on: the prototype record ``record`` (a folder under --record_root, made by
        attack/prototype.py), or, when None, one trained here with the dataset's recipe,
        by the same training as attack/prototype.py."""
        info = self.dataset.info
        if record is None:
            log.info(
                "training a clean model (%s, %d epochs) to craft the trigger on",
                self.config["model"],
                self.config["epochs"],
            )
            model, _ = fit(self.config, info, self.dataset.train, self.device, desc="clean model")
            model.eval()
            acc = accuracy(
                predict(model, self.dataset.test.images, device=self.device, amp=self.config["amp"]),
                self.dataset.test.labels,
            )
            log.info("clean model: C-Acc %.4f", acc)
            return model
        rec = load_record(record_dir(Path(self.config["record_root"]), record))
        if rec.attack != "prototype":
            raise UserError(
                f"clean_model '{record}' is a {rec.attack} record, not a clean model "
                "(make one with attack/prototype.py)"
            )
        if rec.clean_data != info.name or tuple(rec.img_size) != info.img_size or rec.num_classes != info.num_classes:
            raise UserError(
                f"clean_model '{record}' was trained on {rec.clean_data} {tuple(rec.img_size)} with "
                f"{rec.num_classes} classes, not on {info.name} {info.img_size} with {info.num_classes}"
            )
        log.info("clean model: record %s (%s)", rec.path, rec.model_name)
        return rec.build_model().to(self.device).eval()


class Training:
    """The victim's training as the harness set it up: the model, the split it trains on,
    the optimizers (the victim's first) and per-epoch schedulers the harness steps, the
    gradient scaler, the shuffling generator and the epoch under way. Attacks that train something together
    with the victim receive it in :meth:`Attack.before_training` and
    :meth:`Attack.train_step`; they may append their own optimizers and schedulers."""

    def __init__(
        self, model: nn.Module, data: ImageData, info: DatasetInfo, device: torch.device, values: dict[str, Any]
    ):
        self.model, self.data, self.info, self.device = model, data, info, device
        self.amp = bool(values["amp"])
        self.batch_size = int(values["batch_size"])
        self.epochs = int(values["epochs"])
        optimizer = make_optimizer(
            model.parameters(), values["client_optimizer"], values["lr"], values["sgd_momentum"], values["wd"]
        )
        scheduler = make_scheduler(optimizer, values["lr_scheduler"], values["epochs"])
        self.optimizers: list[torch.optim.Optimizer] = [optimizer]
        self.schedulers: list[Any] = [] if scheduler is None else [scheduler]
        self.scaler = grad_scaler(device, self.amp)
        self.generator = torch.Generator().manual_seed(int(values["random_seed"]))
        self.policy = PoisonPolicy(
            float(values["pratio"]), int(values["attack_target"]), str(values["attack_label_trans"]), info.num_classes
        )
        self.epoch = 0  # the epoch under way (set by the harness before each)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The dataset's train transform."""
        return train_transform(self.info, x)

    def autocast(self):
        return autocast(self.device, self.amp)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` training images drawn at random (no repeats), augmented, float on the device."""
        idx = torch.randperm(len(self.data), generator=self.generator)[:n]
        return self.augment(self.data.images[idx].to(self.device).float().div_(255.0))

    def run_epoch(
        self,
        step: Step,
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        *,
        epoch: int = 0,
        desc: str = "train",
    ) -> dict[str, float]:
        """One pass over the training split (shuffled, augmented) minimising ``step``'s loss
        with ``optimizers`` (default: all of :attr:`optimizers`); see utils.train.train_epoch."""
        return train_epoch(
            self.model,
            self.data.images,
            self.data.labels,
            self.optimizers if optimizers is None else optimizers,
            batch_size=self.batch_size,
            device=self.device,
            epoch=epoch,
            augment=self.augment,
            step=step,
            scaler=self.scaler,
            amp=self.amp,
            generator=self.generator,
            desc=desc,
        )


class Attack(Method):
    """Base class. Subclasses set ``kind`` and ``paper``, take their hyperparameters as
    annotated keyword arguments of ``__init__`` (with the paper's defaults) and implement
    :meth:`apply`.

    kind: ``dirty-label`` (poisoned samples get the attacker's label), ``clean-label``
    (poisoned samples are target-class samples and keep their label), ``training-controlled``
    (the attacker poisons batches during training, see :meth:`batch_hook` and
    :meth:`train_step`) or ``clean`` (no poisoning). ``trigger_trained``: the trigger
    changes during training (a generator trained with the victim), so the harness
    rebuilds the backdoor test sets at every evaluation."""

    kind: ClassVar[Kind] = "dirty-label"
    trigger_trained: ClassVar[bool] = False

    def prepare(self, ctx: AttackContext) -> None:
        """Build what the trigger needs (a pattern, a generator); called once before poisoning."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger: float NCHW images in [0, 1] -> poisoned images of the same shape."""
        raise NotImplementedError

    def poison_training(self, ctx: AttackContext, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The poisoned training images, made once at poison time (dirty- and clean-label
        attacks): ``x`` holds the selected training images (float NCHW in [0, 1]) and
        ``indices`` their indices in the training split. The result is kept in the record
        (``bd_train``). By default every image gets the trigger (:meth:`apply`); an attack
        whose training images differ from its test-time trigger (LC's adversarial
        perturbation) overrides it, and keeps any further product in :meth:`extras`."""
        return torch.cat([self.apply(x[start : start + 1024]) for start in range(0, len(x), 1024)]) if len(x) else x

    def cross(self, x: torch.Tensor) -> torch.Tensor:
        """Optional "noise mode" (WaNet, Input-Aware): images that carry a perturbed
        trigger and keep their true label. When an attack defines it, the harness saves
        every test sample through it as the record's ``cross_test`` and reports its
        accuracy (``test_cross_acc``)."""
        raise NotImplementedError

    def batch_hook(self, ctx: AttackContext) -> BatchHook | None:
        """For training-controlled attacks: replace each (augmented) training batch (x, y)."""
        return None

    def before_training(self, training: Training) -> None:
        """Optional: called once the victim and its optimizer exist, before its first epoch
        (pre-train a generator, add optimizers to ``training``)."""

    def train_step(
        self, training: Training, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Optional: the loss of one augmented training batch, for attacks that train
        something with the victim; returns (loss, logits, targets). When an attack defines
        it, the harness minimises that loss with all of ``training.optimizers`` instead of
        the victim's cross-entropy (and ignores :meth:`batch_hook`)."""
        raise NotImplementedError

    def extras(self) -> dict[str, torch.Tensor]:
        """Tensors kept in the record (a trigger pattern, a warping field, ...)."""
        return {}

    def state(self) -> dict[str, Any]:
        """What of the attack changes while the victim trains, for checkpoints: by default
        every module (a generator trained with the victim) and every torch.Generator
        (per-batch poisoning draws) held as an attribute. Override to add or leave out."""
        return {
            name: value for name, value in sorted(vars(self).items()) if isinstance(value, (nn.Module, torch.Generator))
        }

    @classmethod
    def defines(cls, hook: str) -> bool:
        """Does this attack define the optional hook ``hook`` (``cross``, ``train_step``)?"""
        return getattr(cls, hook) is not getattr(Attack, hook)


ATTACKS: Registry[Attack] = Registry("attack")
register_attack = ATTACKS.register


def list_attacks() -> list[str]:
    return ATTACKS.names()


def create_attack(name: str, **hyperparameters: Any) -> Attack:
    return ATTACKS.create(name, **hyperparameters)


# -- parameters every attack run takes (BackdoorBench's names) -----------------------------------

COMMON: list[Param] = [
    Param("dataset", str, "digits", "dataset name (digits needs no download)"),
    Param("data_root", str, "data", "folder holding the datasets", control=True),
    Param("model", str, "preactresnet18", "architecture"),
    Param("epochs", int, 100, "training epochs", check=cfg.non_negative),
    Param("batch_size", int, 128, "batch size", check=cfg.positive),
    Param("lr", float, 0.01, "learning rate", check=cfg.positive),
    Param("client_optimizer", Literal["sgd", "adam"], "sgd", "optimizer"),
    Param("sgd_momentum", float, 0.9, "SGD momentum", check=cfg.non_negative),
    Param("wd", float, 5e-4, "weight decay", check=cfg.non_negative),
    Param("lr_scheduler", Literal["CosineAnnealingLR", "none"], "CosineAnnealingLR", "learning-rate schedule"),
    Param("pratio", float, 0.1, "poisoning ratio (of the whole training set)", check=cfg.fraction),
    Param("attack_target", int, 0, "target label (all2one)", check=cfg.non_negative),
    Param("attack_label_trans", Literal["all2one", "all2all"], "all2one", "label transform"),
    Param(
        "exclude_target_class",
        bool,
        False,
        "dirty-label all2one: draw the poisoned training samples from the "
        "non-target classes only (off: from all samples, as BackdoorBench; a target-class sample drawn keeps "
        "its label)",
    ),
    Param("save_folder_name", str | None, None, "record folder name (default: <attack>_<dataset>)", control=True),
    Param("yaml_path", str | None, None, "training recipe (default: config/attack/prototype/<dataset>.yaml)"),
    Param("bd_yaml_path", str | None, None, "attack parameters (default: config/attack/<attack>/default.yaml)"),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N", control=True),
    Param("amp", bool, False, "mixed precision (bf16/fp16) on CUDA: opt-in; BackdoorBench runs fp32"),
    Param("random_seed", int, 0, "random seed", check=cfg.seed),
    Param("eval_every", int, 1, "evaluate every N epochs (and at the end)", check=cfg.positive),
    Param("record_root", str, "record", "folder of the records", control=True),
    Param("img_size", int | None, None, "imagefolder: resize images to this square size", check=cfg.positive),
    Param("download", bool, True, "download missing datasets where possible", control=True),
    Param("overwrite", bool, False, "replace an existing record", control=True),
    Param("resume", bool, False, "continue an interrupted run from its checkpoint", control="apart"),
    Param(
        "save_every",
        int,
        1,
        "save a checkpoint every N epochs (and after the last; 0: never)",
        check=cfg.non_negative,
        control="apart",
    ),
    Param(
        "export_backdoorbench",
        bool,
        False,
        "also write the record in BackdoorBench's layout, in "
        "<record>/backdoorbench/ (attack_result.pt and PNG folders)",
        control="apart",
    ),
    Param("debug", bool, False, "show tracebacks", control=True),
]
# How or where a run is made, not what it computes (the ``control`` marks above): skipped when
# a record (compare's reuse) or a checkpoint (--resume) is checked against a request.
# --eval_every is not one: an attack whose noise mode draws from the generator that also
# poisons the batches (Input-Aware) trains differently with another --eval_every.
CONTROL_KEYS = cfg.control_keys(COMMON)
# The controls handed over apart from the config, kept out of the record's config.
APART_KEYS = cfg.apart_keys(COMMON)
# Keys a shipped recipe may hold for BackdoorBench compatibility but that this harness does not use.
IGNORED_KEYS = frozenset({"num_workers", "pin_memory", "non_blocking", "prefetch", "frequency_save", "attack"})


def resolve_config(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters, by precedence: command line > keyword arguments > attack
    YAML > recipe YAML > defaults (without the run controls --resume and --save_every)."""
    return _resolve(name, argv, overrides)[0]


def show_config(name: str, dataset: str) -> str:
    """What ``python -m attack show NAME --dataset D`` prints: the YAML files a run of
    attack ``name`` on ``dataset`` reads (the training recipe, then the attack's; with
    their recipe lines), then every parameter's resolved value, those a file sets marked
    with the code's default."""
    cls = ATTACKS.get(name)
    params = [p for p in (*COMMON, *cls.params()) if p.name not in ("yaml_path", "bd_yaml_path")]
    layers = []
    recipe = cfg.CONFIG_DIR / "attack" / "prototype" / f"{dataset}.yaml"
    if Path(dataset).name == dataset and recipe.is_file():
        layers.append(Layer(cfg.shown(recipe), cfg.read_yaml(recipe), IGNORED_KEYS | {"yaml_path", "bd_yaml_path"}))
    bd_yaml = cfg.method_yaml("attack", cls.name, dataset)
    if bd_yaml is not None and cls.name != "prototype":
        layers.extend(cfg.yaml_layers(bd_yaml, IGNORED_KEYS | {"yaml_path", "bd_yaml_path"}))
    layers.append(Layer("--dataset", {"dataset": dataset}))
    return cfg.resolved_text(f"attack {cls.name} on {dataset}", params, layers)


def _resolve(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's parameters and, apart, the controls kept out of its config (APART_KEYS)."""
    cls = ATTACKS.get(name)
    params = [*COMMON, *cls.params()]
    parser = cfg.build_parser(
        f"attack/{name}.py",
        params,
        (cls.__doc__ or "").strip().split("\n")[0],
        "The defaults above are the code's; a run reads config/attack/prototype/<dataset>.yaml "
        f"and config/attack/{name}/<dataset or default>.yaml over them.\nThe values a run will "
        f"use: python -m attack show {name} --dataset <dataset>",
    )
    cli = cfg.parse_cli(parser, argv)
    cfg.check_early(params, overrides, ("dataset", "yaml_path", "bd_yaml_path"))
    first = {**overrides, **cli}
    dataset = first.get("dataset", "digits")
    layers = []
    recipe = first.get("yaml_path") or cfg.CONFIG_DIR / "attack" / "prototype" / f"{dataset}.yaml"
    if first.get("yaml_path") or Path(recipe).is_file():
        layers.append(Layer(cfg.shown(recipe), cfg.read_yaml(Path(recipe)), IGNORED_KEYS))
    bd_yaml = first.get("bd_yaml_path") or cfg.method_yaml("attack", name, dataset)
    if bd_yaml is not None and name != "prototype":
        layers.extend(cfg.yaml_layers(bd_yaml, IGNORED_KEYS))  # a dataset's file over default.yaml
    layers.append(Layer("keyword arguments", overrides))
    cfg.refuse_user_only(layers, ("data_root", "record_root"))  # never from a YAML file
    values = cfg.resolve(params, layers, cli)
    values["attack"] = name
    if values["save_folder_name"] is None:
        values["save_folder_name"] = f"{name}_{values['dataset']}"
    if cfg.given("data_root", layers, cli):
        check_data_root(values["data_root"])
    control = {key: values.pop(key) for key in APART_KEYS}
    return values, control


def run(name: str, argv: Sequence[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run attack ``name`` from Python: ``run("badnet", dataset="digits", epochs=5)``
    returns the summary dict that is also written to attack_summary.json; ``argv`` is a list of
    command-line arguments. It never reads ``sys.argv``: a script calls :func:`main`.
    (Deprecated: ``run("badnet")`` alone at the top level of the file Python runs as its
    script, as method files did before :func:`main`, still forwards to :func:`main`.)"""
    return python_call(lambda args, kw: _run(name, args, kw), argv, overrides)


def main(name: str) -> dict[str, Any]:
    """The command line of attack ``name`` (``python attack/badnet.py ARGS``: the last line
    of a method file is ``main("badnet")``): arguments from ``sys.argv``; a bad one ends
    the process with one line on stderr and status 2."""
    return entry(lambda args, kw: _run(name, args, kw), None, {})


def setup(
    name: str, argv: Sequence[str], overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], Attack, torch.device]:
    """Everything that can be checked without data, checked before anything is written:
    the config, the run controls, the attack and the device."""
    values, control = _resolve(name, argv, overrides)
    device = resolve_device(values["device"])
    info = dataset_info(values["dataset"])
    model_spec(values["model"])
    if info.num_classes > 0:
        check_target(values["attack_target"], info.num_classes)
    if ATTACKS.get(name).kind == "clean-label" and values["attack_label_trans"] != "all2one":
        raise UserError(
            f"attack {name} is clean-label: it poisons target-class samples only, so "
            "--attack_label_trans must be all2one"
        )
    hyper = {p.name: values[p.name] for p in ATTACKS.get(name).params()}
    try:
        attack = create_attack(name, **hyper)
    except ValueError as exc:
        raise UserError(f"attack {name}: {exc}") from None
    check_record_root(values["record_root"])
    record_dir(Path(values["record_root"]), values["save_folder_name"])
    return values, control, attack, device


def load_data(values: dict[str, Any]) -> Dataset:
    """The run's dataset, checked against the attack's target, before anything is written."""
    data = load_dataset(
        values["dataset"], values["data_root"], download=values["download"], img_size=values["img_size"]
    )
    check_target(values["attack_target"], data.info.num_classes)
    return data


def _run(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    values, control, attack, device = setup(name, argv, overrides)
    with held_logs() as loading:
        data = load_data(values)
    out = StagedFolder(
        record_dir(Path(values["record_root"]), values["save_folder_name"]),
        values["overwrite"],
        root=Path(values["record_root"]),
    )
    if values["overwrite"]:
        check_no_defense_running(out.final)
    folder = out.open(resume=control["resume"])
    checkpoint = Checkpoint(out.checkpoint, control["save_every"], control["resume"], values, CONTROL_KEYS)
    with guarded(out):
        with log_to(folder, "attack.log"):
            log.info("attack %s on %s (%s), record %s", name, values["dataset"], values["model"], out.final)
            replay(loading)
            log.debug("config: %s", cfg.plain(values))
            summary = _attack(attack, values, device, folder, checkpoint, data, control["export_backdoorbench"])
        check_no_defense_running(out.final)  # a defense may have started on the old record meanwhile
        final = out.commit()
    with log_to(None):  # the run's log is closed: the closing line goes to the console
        log.info(
            "%s on %s done: %s  (%.1f s); record in %s",
            name,
            values["dataset"],
            closing_text(summary),
            summary["seconds"],
            final,
        )
    return summary


def check_no_defense_running(record: Path) -> None:
    """UserError while a defense run writes a result into the existing record ``record``
    (its lock in ``record/defense/``, holder alive): replacing the record under it would
    leave that result on the wrong record."""
    busy = live_defense_locks(record)
    if busy:
        lock, holder = busy[0]
        raise UserError(
            f"{record} is in use by a defense run ({holder}, lock {lock}): wait for it to finish "
            "before replacing the record, or remove the lock if that run is gone"
        )


def _attack(
    attack: Attack,
    values: dict[str, Any],
    device: torch.device,
    folder: Path,
    checkpoint: Checkpoint | None = None,
    data: Dataset | None = None,
    export_backdoorbench: bool = False,
) -> dict[str, Any]:
    start = time.perf_counter()
    if checkpoint is not None:
        checkpoint.start_clock()
    seed_everything(values["random_seed"])
    if data is None:
        data = load_data(values)
    info = data.info
    target, label_trans = values["attack_target"], values["attack_label_trans"]
    ctx = AttackContext(
        data, target, label_trans, device, np.random.default_rng(values["random_seed"]), cfg.plain(values)
    )
    attack.prepare(ctx)

    # Poisoned samples, at rest.
    poison_idx = torch.zeros(0, dtype=torch.long)
    bd_train = None
    if attack.kind in ("dirty-label", "clean-label"):
        poison_idx = select_poison_indices(
            data.train.labels,
            values["pratio"],
            label_trans=label_trans,
            target=target,
            clean_label=attack.kind == "clean-label",
            rng=ctx.rng,
            exclude_target_class=values["exclude_target_class"],
        )
        labels = data.train.labels[poison_idx]
        if attack.kind == "dirty-label":
            labels = target_labels(labels, label_trans, target, info.num_classes)
        images = attack.poison_training(ctx, to_float(data.train.images[poison_idx]), poison_idx)
        bd_train = PoisonedSet(to_uint8(images), labels.long(), data.train.labels[poison_idx].clone(), poison_idx)
        log.info("poisoned %d of %d training samples (%s)", len(poison_idx), len(data.train), attack.kind)
    test_sets = _TestSets(attack, data, label_trans, target, device, values["amp"])
    train_set, _ = poisoned_training_set(data.train, bd_train)

    # The victim.
    model, history = fit(
        values, info, train_set, device, attack=attack, ctx=ctx, on_eval=test_sets.evaluate, checkpoint=checkpoint
    )
    if test_sets.metrics is None:  # zero epochs
        test_sets.evaluate(model)
    metrics = test_sets.metrics
    # a resumed run: the time of every part (stored in the checkpoint), not this part's only
    seconds = checkpoint.elapsed() if checkpoint is not None else time.perf_counter() - start

    record = AttackRecord(
        model_name=values["model"],
        num_classes=info.num_classes,
        model=model.state_dict(),
        img_size=info.img_size,
        clean_data=info.name,
        attack=attack.name,
        attack_params=cfg.plain(attack.hyperparameters()),
        poison_indices=poison_idx,
        bd_test=test_sets.bd_test,
        bd_train=bd_train,
        cross_test=test_sets.cross_test,
        mean=info.mean,
        std=info.std,
        extras=attack.extras(),
        config=cfg.plain(values),
        clean_train=split_digest(data.train.images, data.train.labels),
    )
    record.save(folder)
    identity = record.compute_identity()
    if export_backdoorbench:
        from utils.backdoorbench import EXPORT_FOLDER, export_record

        where = export_record(
            record,
            folder / EXPORT_FOLDER,
            f"{values['save_folder_name']}/{EXPORT_FOLDER}",
            len(data.train),
            len(data.test),
        )
        log.info(
            "BackdoorBench's layout of the record written to %s",
            Path(values["record_root"]) / values["save_folder_name"] / where.name,
        )
    history.save_csv(folder / "attack_df.csv")
    history.save_plot(folder / "attack_plot.png", f"{attack.name} on {info.name} ({values['model']})")
    summary = {
        **metrics.headline(),
        "seconds": round(seconds, 2),
        "attack": attack.name,
        "dataset": info.name,
        "model": values["model"],
        "epochs": values["epochs"],
        "device": str(device),
        "poisoned": int(len(poison_idx)),
        "record_identity": identity,
        **provenance(),
    }
    if test_sets.cross_acc is not None:
        summary["cross_acc"] = test_sets.cross_acc
    save_json(summary, folder / "attack_summary.json")
    log.info("C-Acc %.4f  ASR %.4f  RA %.4f  (%.1f s)", metrics.clean_acc, metrics.asr, metrics.ra, seconds)
    return summary


def fit(
    values: dict[str, Any],
    info: DatasetInfo,
    train: ImageData,
    device: torch.device,
    *,
    attack: Attack | None = None,
    ctx: AttackContext | None = None,
    on_eval: Callable[[nn.Module], dict[str, float]] | None = None,
    desc: str = "epoch",
    checkpoint: Checkpoint | None = None,
) -> tuple[Classifier, History]:
    """Train a fresh ``values["model"]`` on ``train`` with the run's recipe: every
    training of the harness (victims and clean models alike) goes through here. ``attack`` may poison
    batches (:meth:`Attack.batch_hook`) or take over the loss (:meth:`Attack.train_step`);
    ``on_eval(model)`` is called every ``eval_every`` epochs and after the last, and its
    numbers join that epoch's row of the history. With ``checkpoint``, the training state
    is saved after every due epoch (before that epoch's evaluation) and, on resume,
    restored, and the training goes on after the saved epoch."""
    model = create_model(values["model"], info.num_classes, info.channels, info.size, info.mean, info.std).to(device)
    training = Training(model, train, info, device, values)
    step, hook = None, None
    if attack is not None:
        attack.before_training(training)
        if attack.defines("train_step"):
            step = partial(attack.train_step, training)
        hook = attack.batch_hook(ctx)
    history = History()
    epochs = int(values["epochs"])

    def evaluate(epoch: int, row: dict[str, Any]) -> None:
        if on_eval is not None and ((epoch + 1) % values["eval_every"] == 0 or epoch + 1 == epochs):
            row.update(on_eval(model))
            log.info(
                "epoch %d: loss %.4f  %s",
                epoch,
                row["train_epoch_loss_avg_over_batch"],
                "  ".join(f"{name} {row[key]:.4f}" for key, name in _SHOWN.items() if key in row),
            )

    start = 0
    if checkpoint is not None:
        checkpoint.track(
            model=model,
            optimizers=training.optimizers,
            schedulers=training.schedulers,
            scaler=training.scaler,
            generator=training.generator,
            attack=attack.state() if attack is not None else {},
        )
        restored = checkpoint.restore()
        if restored is not None:
            history.rows = [dict(row) for row in restored["history"]]
            start = restored["epoch"] + 1
            if history.rows:
                evaluate(restored["epoch"], history.rows[-1])  # the evaluation that followed the checkpoint
    for epoch in progress(range(start, epochs), desc="epochs" if desc == "epoch" else desc, unit="epoch", delay=0.0):
        training.epoch = epoch
        if step is not None:
            stats = training.run_epoch(step, epoch=epoch, desc=f"{desc} {epoch}")
        else:
            stats = train_epoch(
                model,
                train.images,
                train.labels,
                training.optimizers,
                batch_size=training.batch_size,
                device=device,
                epoch=epoch,
                augment=training.augment,
                batch_hook=hook,
                scaler=training.scaler,
                amp=training.amp,
                generator=training.generator,
                desc=f"{desc} {epoch}",
            )
        for scheduler in training.schedulers:
            scheduler.step()
        row = history.add(epoch=epoch, **stats)
        if checkpoint is not None and checkpoint.due(epoch, epochs - 1):
            checkpoint.save(epoch, history=history.rows)
        evaluate(epoch, row)
    return model, history


_SHOWN = {"test_acc": "C-Acc", "test_asr": "ASR", "test_ra": "RA", "test_cross_acc": "cross-Acc"}


class _TestSets:
    """The attack's test sets and the one evaluation of the victim: the backdoor test set
    (every test sample whose label the attack changes, with the trigger and the attacker's
    label) and, for attacks with a noise mode, the cross test set (every test sample
    through :meth:`Attack.cross`, true labels). Built once, or at every evaluation when the
    trigger is trained with the victim."""

    def __init__(self, attack: Attack, data: Dataset, label_trans: str, target: int, device: torch.device, amp: bool):
        self.attack, self.data, self.label_trans, self.target = attack, data, label_trans, target
        self.device, self.amp = device, amp
        self.metrics: Metrics | None = None
        self.cross_acc: float | None = None
        self._build()

    def _build(self) -> None:
        attack, test = self.attack, self.data.test
        if attack.kind == "clean":
            empty = torch.zeros(0, dtype=torch.long)
            self.bd_test = PoisonedSet(test.images[:0].clone(), empty, empty, empty)
        else:
            idx = bd_test_indices(test.labels, self.label_trans, self.target)
            labels = target_labels(test.labels[idx], self.label_trans, self.target, self.data.info.num_classes)
            self.bd_test = poisoned_set(test, idx, attack.apply, labels)
        self.cross_test = None
        if attack.defines("cross"):
            self.cross_test = poisoned_set(test, torch.arange(len(test)), attack.cross, test.labels)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """C-Acc, ASR, RA (and the cross accuracy) as columns of the history."""
        if self.attack.trigger_trained:
            self._build()
        self.metrics = evaluate(model, self.data.test, self.bd_test, device=self.device, amp=self.amp)
        row = self.metrics.as_row()
        if self.cross_test is not None:
            logits = predict(model, self.cross_test.images, device=self.device, amp=self.amp)
            self.cross_acc = accuracy(logits, self.cross_test.labels)
            row.update(
                {
                    "cross_test_loss_avg_over_batch": mean_loss(logits, self.cross_test.labels),
                    "test_cross_acc": self.cross_acc,
                }
            )
        return row
