"""Contributing: `python -m defense|attack new` skeletons pass the contract as written; each
contract rule, broken on purpose by a throwaway method, fails with a message naming it;
`list`, entry-point plugins, the README's generated tables, CONTRIBUTING.md's worked example."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import attack
import defense
from attack.contract import CONTRACT as ATTACK_CONTRACT
from defense.contract import CONTRACT as DEFENSE_CONTRACT
from utils import config as cfg
from tools.contract import RULES, ContractError
from utils.errors import UserError
from utils.registry import load_plugins
from tools.scaffold import check_new_name, listing_text, main

from conftest import import_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "SAUBENCH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


# -- `new`, in a temporary copy of the project ---------------------------------------------------

COPIED = [
    "attack",
    "bench",
    "defense",
    "tools",
    "utils",
    "config",
    "scripts",
    "README.md",
    "pyproject.toml",
    "tests/conftest.py",
    "tests/test_defense_contract.py",
    "tests/test_attack_contract.py",
    "tests/test_attack.py",
    "tests/test_contributing.py",
]


def test_new_skeletons_pass_the_contract_unchanged_in_a_copy_of_the_project(tmp_path):
    for item in COPIED:
        source, target = ROOT / item, tmp_path / item
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for side, name in (("defense", "mydefense"), ("attack", "myattack")):
        proc = subprocess.run(
            [sys.executable, "-m", side, "new", name],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"{side}/{name}.py" in proc.stdout and "README.md: tables updated" in proc.stdout
        for path in (f"{side}/{name}.py", f"config/{side}/{name}/default.yaml", f"tests/test_{name}.py"):
            assert (tmp_path / path).is_file(), path
        ruff = shutil.which("ruff")
        if ruff is not None:  # the skeletons are in the project's style: CI's format check passes with them
            style = subprocess.run(
                [ruff, "format", "--check", f"{side}/{name}.py", f"tests/test_{name}.py"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert style.returncode == 0, style.stdout + style.stderr
    # One run of the copy's tests: the skeletons' own tests, every contract test selecting them,
    # the attack record contract, and the README check (the README now lists both).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "-q",
            "-rA",
            "tests/test_defense_contract.py",
            "tests/test_attack_contract.py",
            "tests/test_attack.py",
            "tests/test_mydefense.py",
            "tests/test_myattack.py",
            "tests/test_contributing.py",
            "-k",
            "mydefense or myattack or readme_tables_match",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = set(re.findall(r"^PASSED (\S+)", proc.stdout, re.M))
    expected = {
        f"tests/test_defense_contract.py::test_static_rules[mydefense-{rule}]"
        for rule in DEFENSE_CONTRACT.static_checks()
    }
    expected |= {
        f"tests/test_attack_contract.py::test_static_rules[myattack-{rule}]" for rule in ATTACK_CONTRACT.static_checks()
    }
    expected |= {
        "tests/test_defense_contract.py::test_runs_on_what_it_is_given_and_writes_a_loadable_result[mydefense]",
        "tests/test_defense_contract.py::test_same_seed_gives_identical_numbers[mydefense]",
        "tests/test_attack_contract.py::test_trigger_and_hooks_use_only_what_they_are_given[myattack]",
        "tests/test_attack.py::test_every_attack_writes_a_record_that_loads[myattack]",
        "tests/test_attack.py::test_every_attack_is_deterministic_given_the_seed[myattack]",
        "tests/test_mydefense.py::test_mydefense_does_not_raise_the_attack_success_rate",
        "tests/test_myattack.py::test_myattack_plants_a_backdoor_on_digits",
        "tests/test_contributing.py::test_readme_tables_match_the_registries",
    }
    assert expected <= passed, sorted(expected - passed)


def test_new_refuses_taken_and_invalid_names_in_one_line(tmp_path, monkeypatch, capsys):
    for name in ("My-Defense", "2fast", "class", "_hidden"):
        with pytest.raises(UserError, match=f"'{name}' is not a valid defense name: use a lowercase Python identifier"):
            check_new_name("defense", name, defense.DEFENSES, ROOT)
    with pytest.raises(UserError, match=r"defense 'ibau' already exists \(defense/ibau.py, class IBAU\)"):
        check_new_name("defense", "ibau", defense.DEFENSES, ROOT)
    with pytest.raises(UserError, match="'contract' is a module of the defense package"):
        check_new_name("defense", "contract", defense.DEFENSES, ROOT)
    with pytest.raises(UserError, match="tests/test_blended.py already exists"):  # an attack's test file
        check_new_name("defense", "blended", defense.DEFENSES, ROOT)
    with pytest.raises(UserError, match="is not the project's folder"):
        check_new_name("defense", "fine", defense.DEFENSES, tmp_path)
    monkeypatch.setattr(sys, "argv", ["python -m defense", "new", "sau"])  # the command line: one line, status 2
    with pytest.raises(SystemExit) as exit_info:
        main("defense", defense.DEFENSES, defense.run)
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and err == "error: defense 'sau' already exists (defense/sau.py, class SAU); choose another name\n"
    )


# -- `list` --------------------------------------------------------------------------------------


def test_list_shows_every_method_with_its_paper_year_kind_and_defaults(capsys):
    main("defense", defense.DEFENSES, defense.run, ["list"])
    out = capsys.readouterr().out
    for name in defense.list_defenses():
        cls = defense.DEFENSES.get(name)
        block = out.split(f"\n{name}  (", 1)[1].split("\n\n", 1)[0]
        assert block.startswith(f"{cls.kind}, {cls.year})") and cls.paper in block and cls.summary() in block
        assert f"source:   defense/{name}.py" in block
    assert "epochs=100 batch_size=256 lr=0.0001 norm_type=L_inf trigger_norm=0.2" in out  # sau's defaults
    assert "aliases:  i-bau" in out
    main("attack", attack.ATTACKS, attack.run, ["list", "--names"])
    assert capsys.readouterr().out.split() == attack.list_attacks()


# -- each rule, broken on purpose ----------------------------------------------------------------

GOOD = '''
class GoodDefense(Defense):
    """GoodDefense: keeps every rule (reports each epoch, returns the model)."""

    paper = "Nobody, Nothing at all, Nowhere 2024"
    year = 2024
    smoke_params = {"epochs": 1}

    def __init__(self, epochs: int = 2, scale: float = 1.0):
        self.epochs, self.scale = epochs, scale

    def mitigate(self, model, data):
        for epoch in range(self.epochs):
            data.report(epoch, model, loss=0.0)
        return model


class GoodAttack(Attack):
    """GoodAttack: keeps every rule (a bright top row, dirty-label)."""

    paper = "Nobody, Nothing at all, Nowhere 2024"
    year = 2024

    def __init__(self, value: float = 1.0):
        self.value = value

    def apply(self, x):
        x = x.clone()
        x[..., 0, :] = self.value
        return x
'''

HEADER = '''"""{what}. Nobody, "Nothing at all", Nowhere 2024: a module docstring long enough to
cite a paper and its year."""
import argparse
import os
from pathlib import Path

import torch

from attack.base import Attack
from defense.base import Defense
from utils.datasets import load_dataset
from utils.metrics import evaluate
from utils.records import load_record
'''

BROKEN = '''
TOUCHED = None  # a file of the record, set by the test


class NoPaper(GoodDefense):
    """No paper."""
    paper = ""


class NoSummary(GoodDefense):
    pass


class WrongYear(GoodDefense):
    """A year the module docstring does not cite."""
    year = 2019


class NoYear(GoodDefense):
    """No year."""
    year = None


class OtherKind(GoodDefense):
    """A kind defenses do not have."""
    kind = "purification"


class NoDefault(GoodDefense):
    """A hyperparameter without a default."""
    def __init__(self, epochs: int, scale: float = 1.0):
        super().__init__(epochs, scale)


class Unannotated(GoodDefense):
    """A hyperparameter without a type."""
    def __init__(self, epochs=2, scale: float = 1.0):
        super().__init__(epochs, scale)


class Rescales(GoodDefense):
    """Stores a hyperparameter changed."""
    def __init__(self, epochs: int = 2, scale: float = 1.0):
        super().__init__(epochs, scale * 2)


class SmokesUnknown(GoodDefense):
    """smoke_params names no hyperparameter."""
    smoke_params = {"rounds": 1}


class LoadsRecord(GoodDefense):
    """Loads the record itself."""
    def mitigate(self, model, data):
        load_record(Path("record") / "badnet_digits")
        return model


class LoadsData(GoodDefense):
    """Loads the dataset (and its test split) itself."""
    def mitigate(self, model, data):
        load_dataset("digits")
        return model


class Evaluates(GoodDefense):
    """Evaluates itself, and hides the error."""
    def mitigate(self, model, data):
        try:
            evaluate(model, None, None, device=data.device)
        except Exception:
            pass
        return model


class ParsesArgv(GoodDefense):
    """Parses the command line in mitigate."""
    def mitigate(self, model, data):
        argparse.ArgumentParser().parse_known_args()
        return model


class ParsesArgvInInit(GoodDefense):
    """Parses the command line in its constructor."""
    def __init__(self, epochs: int = 2, scale: float = 1.0):
        argparse.ArgumentParser().parse_args([])
        super().__init__(epochs, scale)


class Prints(GoodDefense):
    """Prints."""
    def mitigate(self, model, data):
        print("purifying")
        return model


class ReturnsNothing(GoodDefense):
    """Forgets to return the model."""
    def mitigate(self, model, data):
        super().mitigate(model, data)


class TouchesRecord(GoodDefense):
    """Writes into the attack record."""
    def mitigate(self, model, data):
        with open(TOUCHED, "a") as fh:
            fh.write("touched")
        return model


class Unseeded(GoodDefense):
    """Perturbs the weights with unseeded noise."""
    def mitigate(self, model, data):
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=generator))
        return model


class CleanAttack(GoodAttack):
    """Clean training needs no paper year."""
    kind = "clean"
    year = None


class OtherKindAttack(GoodAttack):
    """A kind attacks do not have."""
    kind = "semi-label"


class LoadsRecordAttack(GoodAttack):
    """Loads a record in prepare."""
    def prepare(self, ctx):
        load_record("record/prototype_digits")


class EvaluatesAttack(GoodAttack):
    """Evaluates in its trigger."""
    def apply(self, x):
        evaluate(None, None, None, device=x.device)
        return x


class ParsesArgvAttack(GoodAttack):
    """Parses the command line in its trigger."""
    def apply(self, x):
        argparse.ArgumentParser().parse_args()
        return super().apply(x)


class PrintsAttack(GoodAttack):
    """Prints in prepare."""
    def prepare(self, ctx):
        print("preparing")


class UnseededAttack(GoodAttack):
    """A trigger drawn from unseeded noise."""
    def apply(self, x):
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        return (x + 0.1 * torch.rand(x.shape, generator=generator)).clamp(0, 1)
'''


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory):
    """A module of throwaway methods: GoodDefense and GoodAttack, and one class per broken rule."""
    path = tmp_path_factory.mktemp("throwaway") / "saubench_throwaway.py"
    path.write_text(
        HEADER.format(what="Throwaway methods for the contract tests, each breaking one rule") + GOOD + BROKEN
    )
    yield import_file(path, path.stem)
    sys.modules.pop(path.stem, None)


@pytest.fixture
def good_config(monkeypatch, tmp_path):
    """The project's config folder, copied, with configs for the throwaway good classes."""
    shutil.copytree(cfg.CONFIG_DIR, tmp_path / "config")
    for side, cls in (("defense", "gooddefense"), ("attack", "goodattack")):
        folder = tmp_path / "config" / side / f"contract_{cls}"
        folder.mkdir(parents=True)
        (folder / "default.yaml").write_text("{}\n")
    monkeypatch.setattr(cfg, "CONFIG_DIR", tmp_path / "config")


def test_throwaway_good_methods_keep_every_rule(throwaway, good_config, record_root, tmp_path):
    """The control: what the breaking tests change is the one thing that breaks them."""
    for contract, cls, root in (
        (DEFENSE_CONTRACT, throwaway.GoodDefense, record_root),
        (ATTACK_CONTRACT, throwaway.GoodAttack, tmp_path / "attacks"),
    ):
        with contract.registered(cls):
            contract.check_static(cls)
            contract.check_run(cls, root)
            contract.check_deterministic(cls, root)
    ATTACK_CONTRACT.check_year_and_kind(throwaway.CleanAttack)


BREAKS = [  # throwaway class, the rule it breaks, the check that catches it
    ("GoodDefense", "registered", "static"),  # not registered
    ("NoPaper", "documented", "static"),
    ("NoSummary", "documented", "static"),
    ("WrongYear", "documented", "static"),
    ("NoYear", "year-and-kind", "static"),
    ("OtherKind", "year-and-kind", "static"),
    ("NoDefault", "hyperparameters", "static"),
    ("Unannotated", "hyperparameters", "static"),
    ("Rescales", "hyperparameters", "static"),
    ("SmokesUnknown", "hyperparameters", "static"),
    ("ParsesArgvInInit", "no-argv", "static"),
    ("GoodDefense", "config", "static"),  # no config/defense/<name>/
    ("LoadsRecord", "no-record-loading", "run"),
    ("LoadsData", "no-record-loading", "run"),
    ("Evaluates", "no-evaluation", "run"),
    ("ParsesArgv", "no-argv", "run"),
    ("ParsesArgvInInit", "no-argv", "run"),
    ("Prints", "no-printing", "run"),
    ("ReturnsNothing", "returns-the-model", "run"),
    ("TouchesRecord", "record-untouched", "run"),
    ("Unseeded", "deterministic", "deterministic"),
    ("GoodAttack", "registered", "static"),
    ("OtherKindAttack", "year-and-kind", "static"),
    ("LoadsRecordAttack", "no-record-loading", "run"),
    ("EvaluatesAttack", "no-evaluation", "run"),
    ("ParsesArgvAttack", "no-argv", "run"),
    ("PrintsAttack", "no-printing", "run"),
    ("UnseededAttack", "deterministic", "deterministic"),
]


@pytest.mark.parametrize("cls_name, rule, check", BREAKS, ids=[f"{rule}-{cls}" for cls, rule, _ in BREAKS])
def test_breaking_a_rule_fails_with_a_message_naming_it(cls_name, rule, check, throwaway, record_root, tmp_path):
    cls = getattr(throwaway, cls_name)
    side, contract, root = (
        ("attack", ATTACK_CONTRACT, tmp_path)
        if issubclass(cls, attack.Attack)
        else ("defense", DEFENSE_CONTRACT, record_root)
    )
    throwaway.TOUCHED = record_root / "badnet_digits" / "attack_df.csv"
    with pytest.raises(ContractError) as info:
        if check == "static":
            with contract.registered(cls) if rule != "registered" else contextlib.nullcontext():
                contract.static_checks()["hyperparameters" if rule == "no-argv" else rule](cls)
        elif check == "run":
            contract.check_run(cls, root)
        else:
            contract.check_deterministic(cls, root)
    message = str(info.value)
    assert info.value.rule == rule, message
    assert f"breaks the contract rule '{rule}' ({RULES[rule][0]})" in message and "How to fix: " in message
    assert message.startswith(f"{side} ")


# -- entry-point plugins --------------------------------------------------------------------------

ENTRY_POINTS = """[saubench.defenses]
smoothing = saubench_demo_plugin:GoodDefense
broken = saubench_demo_missing_module:Nothing

[saubench.attacks]
stripes = saubench_demo_plugin:GoodAttack
"""


@pytest.fixture
def plugin_site(tmp_path):
    """A folder that, on sys.path, holds an installed distribution declaring the entry points."""
    site = tmp_path / "site"
    info = site / "saubench_demo_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: saubench-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (site / "saubench_demo_plugin.py").write_text(
        HEADER.format(
            what="A third-party defense and attack, published as a package and registered through entry points"
        )
        + GOOD
    )
    return site


def test_plugin_shows_up_in_list_on_the_command_line(plugin_site):
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "defense", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("\nsmoothing  (", 1)[1].split("\n\n", 1)[0]
    assert block.startswith("mitigation, 2024)") and "GoodDefense: keeps every rule" in block
    assert "defaults: epochs=2 scale=1.0" in block
    assert "source:   plugin saubench-demo-plugin (saubench_demo_plugin)" in block
    assert (
        "defense plugin 'broken' (saubench_demo_missing_module:Nothing, from saubench-demo-plugin) was not "
        "loaded: ModuleNotFoundError" in proc.stderr
    )


def test_plugin_registers_runs_through_the_harness_and_keeps_the_contract(
    plugin_site, record_root, monkeypatch, tmp_path
):
    monkeypatch.syspath_prepend(str(plugin_site))
    try:
        with pytest.warns(RuntimeWarning, match="defense plugin 'broken' .* was not loaded"):
            assert load_plugins(defense.DEFENSES, defense.PLUGIN_GROUP, defense.Defense) == ["smoothing"]
        assert load_plugins(attack.ATTACKS, attack.PLUGIN_GROUP, attack.Attack) == ["stripes"]
        assert "plugin saubench-demo-plugin" in listing_text("attack", attack.ATTACKS)
        summary = defense.run("smoothing", result_file="badnet_digits", record_root=str(record_root), device="cpu")
        assert summary["defense"] == "smoothing" and summary["after"] == summary["before"]
        assert (record_root / "badnet_digits" / "defense" / "smoothing" / "smoothing_df.csv").is_file()
        smoothing = defense.DEFENSES.get("smoothing")
        DEFENSE_CONTRACT.check_static(smoothing)  # a plugin ships no config here: that rule does not apply
        DEFENSE_CONTRACT.check_run(smoothing, record_root)
        summary = attack.run("stripes", dataset="digits", epochs=1, record_root=str(tmp_path), device="cpu")
        assert summary["attack"] == "stripes"
    finally:
        defense.DEFENSES.unregister("smoothing")
        attack.ATTACKS.unregister("stripes")
        sys.modules.pop("saubench_demo_plugin", None)


# -- the README's tables ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readme_tables():
    return import_file(ROOT / "scripts" / "readme_tables.py", "saubench_readme_tables")


def test_readme_tables_match_the_registries(readme_tables, capsys):
    status = readme_tables.main(["--check"])
    assert status == 0, capsys.readouterr().err
    readme = (ROOT / "README.md").read_text()
    block = readme.split(readme_tables.BEGIN)[1].split(readme_tables.END)[0]
    for registry in (attack.ATTACKS, defense.DEFENSES):
        for name in registry.names():
            assert f"[`{name}`](" in block
    assert "| `vit_b_16` | any | torchvision's ViT-B/16" in block and "| `digits` | 8x8x1 | 10 |" in block


def test_readme_check_fails_when_out_of_date_and_the_generator_fixes_it(readme_tables, tmp_path, capsys):
    stale = tmp_path / "README.md"
    current = (ROOT / "README.md").read_text()
    stale.write_text(re.sub(r"^\| \[`sau`\].*\n", "", current, flags=re.M))
    assert readme_tables.main(["--check", "--readme", str(stale)]) == 1
    assert "out of date with the registries: run python scripts/readme_tables.py" in capsys.readouterr().err
    assert readme_tables.main(["--readme", str(stale)]) == 0
    assert stale.read_text() == current
    stale.write_text("# no markers\n")
    assert readme_tables.main(["--check", "--readme", str(stale)]) == 2


# -- CONTRIBUTING.md's worked example --------------------------------------------------------------


def test_the_worked_example_in_contributing_keeps_the_contract(tmp_path, record_root, digits_defender):
    text = (ROOT / "CONTRIBUTING.md").read_text()
    example = text.split("## A worked example", 1)[1].split("\n## ", 1)[0]
    code, test_code = re.findall(r"```python\n(.*?)```", example, re.S)
    config = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", example, re.S)[0])
    (tmp_path / "fst.py").write_text(code)
    shipped, shipped_module = defense.DEFENSES.get("fst"), sys.modules.pop("defense.fst")  # the example's grown-up form
    defense.DEFENSES.unregister("fst")
    try:
        module = import_file(tmp_path / "fst.py", "defense.fst")
        fst = defense.DEFENSES.get("fst")
        assert fst is module.FST
        assert set(config) - {"ratio"} == set(fst.defaults()) and all(config[k] == v for k, v in fst.defaults().items())
        DEFENSE_CONTRACT.check_static(fst, config=False)  # its config is in the text, not in config/
        recipe = tmp_path / "fst.yaml"  # its config as the text gives it (config/defense/fst/ is the shipped one's)
        recipe.write_text(yaml.safe_dump(config))
        DEFENSE_CONTRACT.check_run(fst, record_root, yaml_path=str(recipe))
        namespace: dict = {}
        exec(compile(test_code, "CONTRIBUTING.md", "exec"), namespace)
        namespace["test_fst_moves_the_head_away_from_the_backdoored_one"](digits_defender)
    finally:
        defense.DEFENSES.unregister("fst")
        defense.DEFENSES.register("fst")(shipped)
        sys.modules["defense.fst"] = shipped_module
