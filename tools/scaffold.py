"""``python -m defense list|new|run`` and ``python -m attack list|new|run``: the registered
methods with their papers, a commented skeleton for a new one, and a run of any of them
(plugins included, which have no script of their own).

    python -m defense list              # name, kind, year, summary, paper, defaults, source
    python -m defense new my_defense    # defense/my_defense.py, config/defense/my_defense/default.yaml,
                                        # tests/test_my_defense.py, and the README's tables
    python -m attack new my_attack
    python -m defense run sau --result_file badnet_digits   # = python defense/sau.py --result_file ...

The skeletons run as written (a defense that returns the model unchanged; an attack that
blends a checkerboard) and pass the contract tests, so a contributor starts from green
and replaces the placeholders: see CONTRIBUTING.md.
"""

from __future__ import annotations

import argparse
import datetime
import keyword
import re
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Any, Callable, NoReturn, Sequence

from utils.cli import entry
from utils.errors import UserError
from utils.registry import MethodInfo, Registry, describe

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESERVED = {"base", "compare", "contract", "tune"}  # modules of the packages that are not methods


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def main(
    side: str,
    registry: Registry[Any],
    run: Callable[..., Any],
    argv: Sequence[str] | None = None,
    show: Callable[[str, str], str] | None = None,
) -> None:
    """The ``python -m <side>`` command: ``list``, ``new NAME``, ``run NAME ARGS`` or
    ``show NAME --dataset D`` (``run`` is the side's harness; ``show(name, dataset)`` the
    text that says which YAML a run reads and the values it will use)."""
    entry(lambda args, kw: _main(side, registry, run, args, show), argv, {})


def _main(
    side: str,
    registry: Registry[Any],
    run: Callable[..., Any],
    argv: Sequence[str],
    show: Callable[[str, str], str] | None = None,
) -> None:
    parser = _Parser(prog=f"python -m {side}", description=f"The registered {side}s, and new ones.")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{list,new,run,show}" if show else "{list,new,run}", parser_class=_Parser
    )
    listing = commands.add_parser(
        "list", parents=[common], help=f"every registered {side}: paper, year, kind, defaults"
    )
    listing.add_argument("--names", action="store_true", help="names only, one a line")
    new = commands.add_parser("new", parents=[common], help=f"write a skeleton {side}, its config and its test")
    new.add_argument("name", help="a lowercase Python identifier, e.g. my_" + side)
    new.add_argument("--root", default=str(PROJECT_ROOT), help="the project's folder")
    running = commands.add_parser(
        "run", help=f"run a {side} with the harness: NAME, then its arguments (python -m {side} run NAME --help)"
    )
    running.add_argument("name")
    running.add_argument("args", nargs=argparse.REMAINDER)
    if show is not None:
        showing = commands.add_parser(
            "show",
            parents=[common],
            help=f"the YAML file(s) a run of a {side} on a "
            "dataset reads and the values it will use (list shows the code's defaults)",
        )
        showing.add_argument("name")
        showing.add_argument(
            "--dataset", default="digits", help="the dataset (a defense: the record's) (default: digits)"
        )
    args = parser.parse_args(list(argv))
    if args.command == "show" and show is not None:
        print(show(registry.canonical(args.name), args.dataset))
        return
    if args.command == "run":
        run(registry.canonical(args.name), args.args)
        return
    if args.command == "list":
        print("\n".join(registry.names()) if args.names else listing_text(side, registry))
        return
    root = Path(args.root)
    written = new_method(side, args.name, registry, root)
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(update_readme(root, side, args.name))
    print(
        f"next: fill in the placeholders <...> and {'mitigate()' if side == 'defense' else 'apply()'}, then\n"
        f"  python -m pytest tests/test_{args.name}.py tests/test_{side}_contract.py -k {args.name}\n"
        f"  python scripts/readme_tables.py   # once the paper is filled in\n"
        f"(CONTRIBUTING.md has the rules, a worked example and what a pull request shows)"
    )


def update_readme(root: Path, side: str, name: str) -> str:
    """Regenerate the README's tables with root/scripts/readme_tables.py, in a process of its
    own (which imports the packages afresh, the new method ``name`` of ``side`` included;
    this module imports neither side); returns what happened, in a line."""
    script = root / "scripts" / "readme_tables.py"
    if not script.is_file() or not (root / "README.md").is_file() or not (root / side / f"{name}.py").is_file():
        return "README.md: tables not updated (run python scripts/readme_tables.py in the project's folder)"
    proc = subprocess.run(
        [sys.executable, str(script), "--readme", str(root / "README.md")], cwd=root, capture_output=True, text=True
    )
    if proc.returncode == 0:
        return "README.md: tables updated"
    reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
    return f"README.md: tables not updated ({reason})"


# -- list ----------------------------------------------------------------------------------------


def _value(value: Any) -> str:
    return str(value) if not isinstance(value, (list, tuple)) else ",".join(map(str, value))


def listing_text(side: str, registry: Registry[Any]) -> str:
    """Every registered method: name, kind and year, summary, paper, defaults, aliases, source."""
    blocks = [f"{len(registry.names())} {side}s (python -m {side} new NAME adds one; see CONTRIBUTING.md)"]
    for name in registry.names():
        info: MethodInfo = describe(registry, name)
        lines = [
            f"{info.name}  ({info.kind}, {info.year if info.year is not None else 'no paper'})",
            f"    {info.summary}",
            f"    paper:    {info.paper}",
        ]
        defaults = " ".join(f"{k}={_value(v)}" for k, v in info.defaults.items())
        lines.append(f"    defaults: {defaults or '(none)'}")
        if info.aliases:
            lines.append(f"    aliases:  {', '.join(info.aliases)}")
        lines.append(f"    source:   {info.source}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# -- new ----------------------------------------------------------------------------------------


def check_new_name(side: str, name: str, registry: Registry[Any], root: Path) -> list[Path]:
    """The files ``new`` would write, relative to ``root``; UserError when ``name`` is not
    a lowercase identifier or is taken."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise UserError(
            f"'{name}' is not a valid {side} name: use a lowercase Python identifier (letters, digits "
            f"and underscores, starting with a letter), e.g. my_{side}"
        )
    if name in registry:
        cls = registry.get(name)
        raise UserError(
            f"{side} '{name}' already exists ({describe(registry, registry.canonical(name)).source}, "
            f"class {cls.__qualname__}); choose another name"
        )
    if name in RESERVED:
        raise UserError(f"'{name}' is a module of the {side} package that is not a {side}; choose another name")
    if not (root / side).is_dir() or not (root / "config").is_dir():
        raise UserError(
            f"{root} is not the project's folder (no {side}/ and config/ in it); run `python -m {side} "
            "new` in a clone of the project, or pass --root"
        )
    files = [
        Path(side) / f"{name}.py",
        Path("config") / side / name / "default.yaml",
        Path("tests") / f"test_{name}.py",
    ]
    for path in files:
        if (root / path).exists():
            raise UserError(f"{path} already exists in {root}; choose another name")
    return files


def new_method(side: str, name: str, registry: Registry[Any], root: Path = PROJECT_ROOT) -> list[Path]:
    """Write the skeleton of ``name`` (method file, config, test) under ``root``; returns the
    paths written, relative to ``root``."""
    files = check_new_name(side, name, registry, root)
    fields = {
        "name": name,
        "Class": "".join(part.capitalize() for part in name.split("_")),
        "year": str(datetime.date.today().year),
    }
    for path, template in zip(files, TEMPLATES[side]):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(Template(template).substitute(fields), encoding="utf-8")
    return files


# The templates: ${name}, ${Class} and ${year} are filled in; <...> is for the contributor.

DEFENSE = '''"""${Class}: <what the defense does, in one line>. <Authors>, "<Title of the paper>",
<Venue> ${year} (<arXiv id or DOI>).

Idea: <what the defense assumes about the backdoor, what it changes in the model, and why
that removes the backdoor, in a few sentences; the paper's equations where they help>.
As written, this skeleton is a no-op: mitigate() reports each epoch and returns the model
unchanged.

Hyperparameters (the paper's defaults; say where each value comes from):
    epochs: passes over the defender's clean subset (10)
    batch_size: batch size (128)
    lr: learning rate (0.01)

Deviations from the paper or from BackdoorBench: <none yet>.

    python defense/${name}.py --result_file badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from torch import nn

from defense.base import Defense, DefenseData, register_defense, run
from utils import config as cfg


@register_defense("${name}")
class ${Class}(Defense):
    """${Class}: <what the defense does, in one line: --help and `python -m defense list` show it>.

    Args:
        epochs: passes over the defender's clean subset
        batch_size: batch size
        lr: learning rate
    """

    paper = "<Authors>, <Title of the paper>, <Venue> ${year}"
    year = ${year}
    kind = "mitigation"  # or "data_detection" / "input_detection" (detect() / fit(): defense/spectral.py, strip.py),
    # or "training_time" (subclass defense.training.TrainingDefense, train(): defense/abl.py)
    param_checks = {"epochs": cfg.non_negative, "batch_size": cfg.positive, "lr": cfg.positive}
    smoke_params = {"epochs": 1}  # a seconds-long run on digits (contract tests, smoke grids)
    # what `python -m defense tune ${name}` searches (on a validation split, never the test set)
    search_space = {"lr": ("float_log", 1e-3, 1e-1), "epochs": ("int", 1, 20)}

    def __init__(self, epochs: int = 10, batch_size: int = 128, lr: float = 0.01):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        # The defender's clean subset: data.batches(self.batch_size, augment=True, generator=data.generator())
        # yields (x, y) on data.device, x float N x C x H x W in [0, 1]. Optimisers: utils.train.make_optimizer;
        # mixed precision: data.autocast(). A fine-tuning loop is defense/finetune.py; CONTRIBUTING.md has a
        # worked example.
        # data.resume(...) makes the loop resumable (--resume, --save_every): pass it everything that changes
        # from epoch to epoch (model, optimizer=..., scheduler=..., generator=...); it returns the epoch to start at.
        start = data.resume(model=model)
        for epoch in range(start, self.epochs):
            # <one pass over the clean subset>
            data.report(epoch, model)  # add the epoch's losses as keywords: data.report(epoch, model, loss=...)
        # What the result keeps besides the model, handed over through data (the one way; a defense that defines
        # extras() or report() methods is refused at registration): tensors for defense_result.pt with
        # data.add_extras(mask=...), plain values for summary.json with data.add_summary(pruned=...).
        return model.eval()


if __name__ == "__main__":
    run("${name}")
'''

DEFENSE_CONFIG = """# ${Class}: the configuration for every dataset (add <dataset>.yaml beside this file for a
# dataset that needs other values). Keys: the harness's (ratio: the defender's clean share of
# the training set) and the hyperparameters of defense/${name}.py, with the paper's values.
recipe: reference
recipe_source: "<the paper, or BackdoorBench's config/defense/<name>/<dataset>.yaml: where these values come from>"
ratio: 0.05
epochs: 10
batch_size: 128
lr: 0.01
"""

DEFENSE_TEST = '''"""defense/${name}.py. tests/test_defense_contract.py already holds ${name} to the contract
(it is registered); this file tests what the method itself does."""

from __future__ import annotations

from defense import DEFENSES, create_defense
from utils.datasets import load_dataset
from utils.metrics import evaluate


def test_${name}_does_not_raise_the_attack_success_rate(digits_defender):
    record, data = digits_defender  # the session's BadNets record on digits, and a defender's clean subset
    test = load_dataset("digits").test
    model = record.build_model().eval()
    before = evaluate(model, test, record.bd_test, device=data.device)
    defense = create_defense("${name}", **DEFENSES.get("${name}").smoke_params)
    after = evaluate(defense.mitigate(model, data), test, record.bd_test, device=data.device)
    # <Say what the method achieves on this record (ASR about 0.95 before), e.g.
    #  assert after.asr < 0.5 and after.clean_acc > before.clean_acc - 0.05>
    assert after.asr <= before.asr
'''

ATTACK = '''"""${Class}: <what the trigger is, in one line>. <Authors>, "<Title of the paper>",
<Venue> ${year} (<arXiv id or DOI>).

Idea: <what the trigger looks like, which training samples are poisoned and with which
labels (the class's ``kind``), and why the model learns it, in a few sentences>. As
written, this skeleton blends a fixed checkerboard into the image with weight ``alpha``,
dirty-label: replace apply() with the attack's trigger.

Hyperparameters (the paper's defaults; say where each value comes from):
    alpha: blend weight of the pattern (0.2)

Deviations from the paper or from BackdoorBench: <none yet>.

    python attack/${name}.py --dataset digits --save_folder_name ${name}_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import torch

from attack.base import Attack, AttackContext, register_attack, run
from utils.config import unit_interval


@register_attack("${name}")
class ${Class}(Attack):
    """${Class}: <what the trigger is, in one line: --help and `python -m attack list` show it>.

    Args:
        alpha: blend weight of the pattern
    """

    kind = "dirty-label"  # or "clean-label", "training-controlled" (attack/base.py says what each means)
    paper = "<Authors>, <Title of the paper>, <Venue> ${year}"
    year = ${year}
    param_checks = {"alpha": unit_interval}

    def __init__(self, alpha: float = 0.2):
        self.check_params(locals())
        self.alpha = alpha

    def prepare(self, ctx: AttackContext) -> None:
        # Build what the trigger needs, once, before poisoning: ctx.dataset.info has the image shape,
        # ctx.rng and ctx.seed() seeded randomness, ctx.clean_model() a clean model to craft a trigger on.
        pass

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # x: float N x C x H x W in [0, 1]; return the poisoned images, same shape, in [0, 1].
        rows = torch.arange(x.shape[-2], device=x.device)[:, None]
        cols = torch.arange(x.shape[-1], device=x.device)[None, :]
        pattern = ((rows + cols) % 2).to(x.dtype)  # a checkerboard, H x W
        return (1 - self.alpha) * x + self.alpha * pattern


if __name__ == "__main__":
    run("${name}")
'''

ATTACK_CONFIG = """# ${Class}: the attack's parameters (the harness's default --bd_yaml_path). Keys: the
# harness's poisoning parameters and the hyperparameters of attack/${name}.py.
attack_label_trans: all2one
attack_target: 0
pratio: 0.1
alpha: 0.2
"""

ATTACK_TEST = '''"""attack/${name}.py. tests/test_attack_contract.py and tests/test_attack.py already hold
${name} to the contract and check its record (it is registered); this file tests what the
attack itself does."""

from __future__ import annotations

import attack


def test_${name}_plants_a_backdoor_on_digits(tmp_path):
    summary = attack.run("${name}", dataset="digits", epochs=5, record_root=str(tmp_path), device="cpu")
    # <Say what the attack achieves (the skeleton's checkerboard: ASR 1.0, C-Acc 0.98), e.g.
    #  assert summary["asr"] > 0.9 and summary["clean_acc"] > 0.9>
    assert summary["asr"] > 0.8 and summary["clean_acc"] > 0.8
'''

TEMPLATES = {"defense": (DEFENSE, DEFENSE_CONFIG, DEFENSE_TEST), "attack": (ATTACK, ATTACK_CONFIG, ATTACK_TEST)}
