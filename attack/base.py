"""The attack harness: the Attack base class, its registry, and ``run``, the one function
behind every ``python attack/<name>.py``.

``run`` resolves the configuration (command line > attack YAML > training-recipe YAML >
defaults), loads the dataset, lets the attack build its trigger, poisons the training
set, trains the victim, evaluates it every ``--eval_every`` epochs and writes
``record/<save_folder_name>/``: attack_result.pt, attack_df.csv, attack_summary.json,
attack.log and attack_plot.png. The folder appears only when the run has finished.

An attack file holds only what is particular to its attack: the trigger (a function of
float [0, 1] images), how poisoned samples are chosen (its ``kind``), and what it keeps
in the record.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

from utils import config as cfg
from utils.cli import entry
from utils.config import Layer, Param
from utils.datasets import Dataset, dataset_info, load_dataset, train_transform
from utils.errors import UserError
from utils.history import History
from utils.metrics import evaluate
from utils.models import create_model, model_spec
from utils.poison import (bd_test_indices, check_target, poisoned_set, poisoned_training_set,
                          select_poison_indices, target_labels)
from utils.records import AttackRecord, PoisonedSet, StagedFolder, record_dir, save_json
from utils.registry import Method, Registry
from utils.runtime import grad_scaler, log_to, resolve_device, seed_everything
from utils.train import BatchHook, make_optimizer, make_scheduler, train_epoch

log = logging.getLogger("saubench")

Kind = Literal["clean", "dirty-label", "clean-label", "training-controlled"]


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


class Attack(Method):
    """Base class. Subclasses set ``kind`` and ``paper``, take their hyperparameters as
    annotated keyword arguments of ``__init__`` (with the paper's defaults) and implement
    :meth:`apply`.

    kind: ``dirty-label`` (poisoned samples get the attacker's label), ``clean-label``
    (poisoned samples are target-class samples and keep their label), ``training-controlled``
    (the attacker poisons batches during training, see :meth:`batch_hook`) or ``clean``
    (no poisoning)."""

    kind: ClassVar[Kind] = "dirty-label"

    def prepare(self, ctx: AttackContext) -> None:
        """Build what the trigger needs (a pattern, a generator); called once before poisoning."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger: float NCHW images in [0, 1] -> poisoned images of the same shape."""
        raise NotImplementedError

    def batch_hook(self, ctx: AttackContext) -> BatchHook | None:
        """For training-controlled attacks: replace each training batch (x, y)."""
        return None

    def extras(self) -> dict[str, torch.Tensor]:
        """Tensors kept in the record (a trigger pattern, a warping field, ...)."""
        return {}


ATTACKS: Registry[Attack] = Registry("attack")
register_attack = ATTACKS.register


def list_attacks() -> list[str]:
    return ATTACKS.names()


def create_attack(name: str, **hyperparameters: Any) -> Attack:
    return ATTACKS.create(name, **hyperparameters)


# -- parameters every attack run takes (BackdoorBench's names) -----------------------------------

COMMON: list[Param] = [
    Param("dataset", str, "digits", "dataset name (digits needs no download)"),
    Param("data_root", str, "data", "folder holding the datasets"),
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
    Param("save_folder_name", str | None, None, "record folder name (default: <attack>_<dataset>)"),
    Param("yaml_path", str | None, None, "training recipe (default: config/attack/prototype/<dataset>.yaml)"),
    Param("bd_yaml_path", str | None, None, "attack parameters (default: config/attack/<attack>/default.yaml)"),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N"),
    Param("amp", bool, True, "mixed precision on CUDA"),
    Param("random_seed", int, 0, "random seed", check=cfg.non_negative),
    Param("eval_every", int, 1, "evaluate every N epochs (and at the end)", check=cfg.positive),
    Param("record_root", str, "record", "folder of the records"),
    Param("img_size", int | None, None, "imagefolder: resize images to this square size"),
    Param("download", bool, True, "download missing datasets where possible"),
    Param("overwrite", bool, False, "replace an existing record"),
    Param("debug", bool, False, "show tracebacks"),
]
# Keys a shipped recipe may hold for BackdoorBench compatibility but that this harness does not use.
IGNORED_KEYS = frozenset({"num_workers", "pin_memory", "non_blocking", "prefetch", "frequency_save", "attack"})


def resolve_config(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters, by precedence: command line > keyword arguments > attack
    YAML > recipe YAML > defaults."""
    cls = ATTACKS.get(name)
    params = [*COMMON, *cls.params()]
    parser = cfg.build_parser(f"attack/{name}.py", params, (cls.__doc__ or "").strip().split("\n")[0])
    cli = cfg.parse_cli(parser, argv)
    first = {**overrides, **cli}
    dataset = first.get("dataset", "digits")
    layers = []
    recipe = first.get("yaml_path") or cfg.CONFIG_DIR / "attack" / "prototype" / f"{dataset}.yaml"
    if first.get("yaml_path") or Path(recipe).is_file():
        layers.append(Layer(cfg.shown(recipe), cfg.read_yaml(Path(recipe)), IGNORED_KEYS))
    bd_yaml = first.get("bd_yaml_path") or cfg.method_yaml("attack", name, dataset)
    if bd_yaml is not None and name != "prototype":
        layers.append(Layer(cfg.shown(bd_yaml), cfg.read_yaml(Path(bd_yaml)), IGNORED_KEYS))
    layers.append(Layer("keyword arguments", overrides))
    values = cfg.resolve(params, layers, cli)
    values["attack"] = name
    if values["save_folder_name"] is None:
        values["save_folder_name"] = f"{name}_{values['dataset']}"
    return values


def run(name: str, argv: Sequence[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run attack ``name``: from a script, ``run("badnet")`` reads the command line; from
    Python, ``run("badnet", dataset="digits", epochs=5)`` returns the summary dict that
    is also written to attack_summary.json."""
    return entry(lambda args, kw: _run(name, args, kw), argv, overrides)


def _run(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    values = resolve_config(name, argv, overrides)
    # Everything that can be checked without data is checked before anything is written.
    device = resolve_device(values["device"])
    info = dataset_info(values["dataset"])
    model_spec(values["model"])
    if info.num_classes > 0:
        check_target(values["attack_target"], info.num_classes)
    hyper = {p.name: values[p.name] for p in ATTACKS.get(name).params()}
    try:
        attack = create_attack(name, **hyper)
    except ValueError as exc:
        raise UserError(f"attack {name}: {exc}") from None
    out = StagedFolder(record_dir(Path(values["record_root"]), values["save_folder_name"]), values["overwrite"])
    folder = out.open()
    try:
        with log_to(folder, "attack.log"):
            log.info("attack %s on %s (%s), record %s", name, values["dataset"], values["model"], out.final)
            log.debug("config: %s", cfg.plain(values))
            summary = _attack(attack, values, device, folder)
        final = out.commit()
    except BaseException:
        out.discard()
        raise
    log.info("record written to %s", final)
    return summary


def _attack(attack: Attack, values: dict[str, Any], device: torch.device, folder: Path) -> dict[str, Any]:
    start = time.perf_counter()
    seed_everything(values["random_seed"])
    data = load_dataset(values["dataset"], values["data_root"], download=values["download"],
                        img_size=values["img_size"])
    info = data.info
    target, label_trans = values["attack_target"], values["attack_label_trans"]
    check_target(target, info.num_classes)
    ctx = AttackContext(data, target, label_trans, device, np.random.default_rng(values["random_seed"]),
                        cfg.plain(values))
    attack.prepare(ctx)

    # Poisoned samples, at rest.
    poison_idx = torch.zeros(0, dtype=torch.long)
    bd_train = None
    if attack.kind in ("dirty-label", "clean-label"):
        poison_idx = select_poison_indices(data.train.labels, values["pratio"], label_trans=label_trans, target=target,
                                           clean_label=attack.kind == "clean-label", rng=ctx.rng)
        labels = data.train.labels[poison_idx]
        if attack.kind == "dirty-label":
            labels = target_labels(labels, label_trans, target, info.num_classes)
        bd_train = poisoned_set(data.train, poison_idx, attack.apply, labels)
        log.info("poisoned %d of %d training samples (%s)", len(poison_idx), len(data.train), attack.kind)
    bd_test = _bd_test(attack, data, label_trans, target)
    train_set, _ = poisoned_training_set(data.train, bd_train)

    # The victim.
    model = create_model(values["model"], info.num_classes, info.channels, info.size, info.mean, info.std).to(device)
    optimizer = make_optimizer(model.parameters(), values["client_optimizer"], values["lr"], values["sgd_momentum"],
                               values["wd"])
    scheduler = make_scheduler(optimizer, values["lr_scheduler"], values["epochs"])
    scaler = grad_scaler(device, values["amp"])
    hook = attack.batch_hook(ctx)
    generator = torch.Generator().manual_seed(values["random_seed"])
    history = History()
    metrics = None
    for epoch in range(values["epochs"]):
        stats = train_epoch(model, train_set.images, train_set.labels, optimizer, batch_size=values["batch_size"],
                            device=device, epoch=epoch, augment=lambda x: train_transform(info, x), batch_hook=hook,
                            scaler=scaler, amp=values["amp"], generator=generator, desc=f"epoch {epoch}")
        if scheduler is not None:
            scheduler.step()
        row = history.add(epoch=epoch, **stats)
        if (epoch + 1) % values["eval_every"] == 0 or epoch + 1 == values["epochs"]:
            metrics = evaluate(model, data.test, bd_test, device=device, amp=values["amp"])
            row.update(metrics.as_row())
            log.info("epoch %d: loss %.4f  C-Acc %.4f  ASR %.4f  RA %.4f", epoch,
                     stats["train_epoch_loss_avg_over_batch"], metrics.clean_acc, metrics.asr, metrics.ra)
    if metrics is None:  # zero epochs
        metrics = evaluate(model, data.test, bd_test, device=device, amp=values["amp"])
    seconds = time.perf_counter() - start

    record = AttackRecord(
        model_name=values["model"], num_classes=info.num_classes, model=model.state_dict(), img_size=info.img_size,
        clean_data=info.name, attack=attack.name, attack_params=cfg.plain(attack.hyperparameters()),
        poison_indices=poison_idx, bd_test=bd_test, bd_train=bd_train, mean=info.mean, std=info.std,
        extras=attack.extras(), config=cfg.plain(values))
    record.save(folder)
    history.save_csv(folder / "attack_df.csv")
    history.save_plot(folder / "attack_plot.png", f"{attack.name} on {info.name} ({values['model']})")
    summary = {**metrics.headline(), "seconds": round(seconds, 2), "attack": attack.name, "dataset": info.name,
               "model": values["model"], "epochs": values["epochs"], "device": str(device),
               "poisoned": int(len(poison_idx))}
    save_json(summary, folder / "attack_summary.json")
    log.info("C-Acc %.4f  ASR %.4f  RA %.4f  (%.1f s)", metrics.clean_acc, metrics.asr, metrics.ra, seconds)
    return summary


def _bd_test(attack: Attack, data: Dataset, label_trans: str, target: int) -> PoisonedSet:
    """Every test sample whose label the attack changes, with the trigger and the
    attacker's label. A clean run has an empty backdoor test set."""
    if attack.kind == "clean":
        empty = torch.zeros(0, dtype=torch.long)
        return PoisonedSet(data.test.images[:0].clone(), empty, empty, empty)
    idx = bd_test_indices(data.test.labels, label_trans, target)
    labels = target_labels(data.test.labels[idx], label_trans, target, data.info.num_classes)
    return poisoned_set(data.test, idx, attack.apply, labels)
