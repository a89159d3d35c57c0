"""Config precedence and errors: command line > keyword arguments > method YAML > recipe
YAML > defaults; unknown keys and wrong types stop with one line naming the key and file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml

from utils import config as cfg
from utils.config import Layer, Param
from utils.errors import UserError

PARAMS = [
    Param("epochs", int, 100, check=cfg.non_negative),
    Param("lr", float, 0.01, check=cfg.positive),
    Param("model", str, "preactresnet18"),
    Param("norm", Literal["L_inf", "L2"], "L_inf"),
    Param("train_mode", bool, False),
    Param("index", str | None, None),
    Param("betas", list[float], [0.9, 0.999]),
    Param("rounds", int, 5, aliases=("n_rounds",)),
]


def resolve(*layers, cli=None):
    return cfg.resolve(PARAMS, list(layers), cli or {})


def test_defaults_when_nothing_is_given():
    values = resolve()
    assert values["epochs"] == 100 and values["lr"] == 0.01 and values["index"] is None


def test_precedence_cli_over_yaml_over_recipe():
    recipe = Layer("recipe.yaml", {"epochs": 10, "lr": 0.1, "model": "cnn"})
    method = Layer("method.yaml", {"epochs": 20})
    values = resolve(recipe, method, cli={"epochs": 30})
    assert values["epochs"] == 30 and values["lr"] == 0.1 and values["model"] == "cnn"
    assert resolve(recipe, method)["epochs"] == 20


def test_ints_are_accepted_as_floats_but_not_the_reverse():
    assert resolve(Layer("a.yaml", {"lr": 1}))["lr"] == 1.0
    with pytest.raises(UserError, match=r"a\.yaml: 'epochs' must be int, got 1\.5"):
        resolve(Layer("a.yaml", {"epochs": 1.5}))


def test_unknown_key_names_the_key_and_the_file_and_suggests():
    with pytest.raises(UserError, match=r"config/x\.yaml: unknown key 'epoch'.*did you mean 'epochs'"):
        resolve(Layer("config/x.yaml", {"epoch": 3}))


@pytest.mark.parametrize(
    "key,value",
    [
        ("train_mode", "yes"),
        ("train_mode", 1),
        ("model", 3),
        ("norm", "L1"),
        ("betas", 0.9),
        ("epochs", True),
        ("lr", "fast"),
    ],
)
def test_wrong_types_are_refused(key, value):
    with pytest.raises(UserError, match=f"b.yaml: '{key}' must be"):
        resolve(Layer("b.yaml", {key: value}))


def test_checks_reject_out_of_range_values():
    with pytest.raises(UserError, match="'epochs' must be >= 0"):
        resolve(Layer("c.yaml", {"epochs": -1}))
    with pytest.raises(UserError, match="command line: 'lr' must be > 0"):
        resolve(cli={"lr": 0.0})


def test_aliases_and_ignored_keys():
    assert resolve(Layer("d.yaml", {"n_rounds": 7}))["rounds"] == 7
    assert resolve(Layer("e.yaml", {"num_workers": 4}, ignore=frozenset({"num_workers"})))["epochs"] == 100


def test_required_parameter_missing():
    with pytest.raises(UserError, match="missing required argument.*--result_file"):
        cfg.resolve([Param("result_file", str)], [], {})


def test_command_line_parsing_types_bools_and_lists():
    parser = cfg.build_parser("prog", PARAMS)
    given = cfg.parse_cli(
        parser, ["--epochs", "3", "--train_mode", "--betas", "0.5", "0.6", "--index", "none", "--n_rounds", "2"]
    )
    assert given == {"epochs": 3, "train_mode": True, "betas": [0.5, 0.6], "index": None, "rounds": 2}
    assert cfg.parse_cli(parser, ["--no-train_mode"]) == {"train_mode": False}
    with pytest.raises(UserError, match="invalid int value"):
        cfg.parse_cli(parser, ["--epochs", "three"])
    with pytest.raises(UserError, match="unrecognized arguments: --nope"):
        cfg.parse_cli(parser, ["--nope", "1"])


def test_read_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        cfg.read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        cfg.read_yaml(listing)
    (tmp_path / "empty.yaml").write_text("")
    assert cfg.read_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(UserError, match="config file not found"):
        cfg.read_yaml(tmp_path / "missing.yaml")


def test_params_from_signature_reads_annotations_defaults_and_docstring():
    class Method:
        """A method.

        Args:
            alpha: the trade-off
            steps: how many steps
        """

        def __init__(self, alpha: float = 0.2, steps: int = 5, mode: Literal["a", "b"] = "a"):
            self.alpha, self.steps, self.mode = alpha, steps, mode

    params = {p.name: p for p in cfg.params_from_signature(Method)}
    assert params["alpha"].default == 0.2 and params["alpha"].type is float
    assert params["alpha"].help == "the trade-off" and params["steps"].help == "how many steps"
    assert cfg.hyperparameters_of(Method(alpha=0.5)) == {"alpha": 0.5, "steps": 5, "mode": "a"}


def test_shipped_yaml_files_parse_and_use_known_keys():
    """Every shipped YAML loads, and every key in it is a parameter of its harness."""
    import attack
    import defense
    from attack.base import COMMON as ATTACK_COMMON, IGNORED_KEYS as ATTACK_IGNORED
    from defense.base import COMMON as DEFENSE_COMMON, IGNORED_KEYS as DEFENSE_IGNORED

    attack_keys = {p.name for p in ATTACK_COMMON} | ATTACK_IGNORED
    for name in attack.list_attacks():
        attack_keys |= {p.name for p in attack.ATTACKS.get(name).params()}
    files = sorted((cfg.CONFIG_DIR / "attack").rglob("*.yaml"))
    assert files
    for path in files:
        assert set(cfg.read_yaml(path)) <= attack_keys, path
    for path in sorted((cfg.CONFIG_DIR / "defense").rglob("*.yaml")):
        cls = defense.DEFENSES.get(path.parent.name)
        keys = (
            {p.name for p in DEFENSE_COMMON} | DEFENSE_IGNORED | {a for p in cls.params() for a in (p.name, *p.aliases)}
        )
        assert set(cfg.read_yaml(path)) <= keys | cfg.RECIPE_KEYS, path


def test_every_shipped_defense_recipe_says_where_it_comes_from():
    """Each config/defense yaml is 'reference' (naming its BackdoorBench file or paper) or
    'tuned' (naming the study, or saying it was read off the test set); a default run
    on fashion_mnist uses SAU's reference recipe, not the one chosen on test numbers."""
    for path in sorted((cfg.CONFIG_DIR / "defense").rglob("*.yaml")):
        meta = cfg.recipe_of(cfg.read_yaml(path), str(path))
        assert meta.get("recipe") in cfg.RECIPE_FAMILIES and meta.get("recipe_source"), path
        if meta["recipe"] == "reference":
            assert "BackdoorBench" in meta["recipe_source"] or "paper" in meta["recipe_source"], path
    default = cfg.method_yaml("defense", "sau", "fashion_mnist")
    assert cfg.recipe_of(cfg.read_yaml(default), "x")["recipe"] == "reference"
    for name in ("sau", "ft", "fp", "nad", "anp", "ibau"):  # every default run on digits too
        assert cfg.recipe_of(cfg.read_yaml(cfg.method_yaml("defense", name, "digits")), "x")["recipe"] == "reference"
        on_test = cfg.recipe_of(cfg.read_yaml(cfg.CONFIG_DIR / "defense" / name / "digits_tuned_on_test.yaml"), "x")
        assert on_test["recipe"] == "tuned" and "test" in on_test["recipe_note"]
    on_test = cfg.recipe_of(cfg.read_yaml(default.parent / "fashion_mnist_tuned_on_test.yaml"), "x")
    assert on_test["recipe"] == "tuned" and "test" in on_test["recipe_note"]
    for shipped in sorted((cfg.CONFIG_DIR / "defense").glob(f"*/*{cfg.TUNED_SUFFIX}.yaml")):  # from a study
        meta = cfg.recipe_of(cfg.read_yaml(shipped), str(shipped))
        assert meta["recipe"] == "tuned" and "python -m defense tune" in meta["recipe_source"], shipped
        assert "the test set was not read" in meta["recipe_note"], shipped


def test_a_shipped_tuned_recipe_is_found_by_dataset_and_only_a_plain_name(tmp_path, monkeypatch):
    (tmp_path / "defense" / "ft").mkdir(parents=True)
    (tmp_path / "defense" / "ft" / "digits_tuned.yaml").write_text('recipe: tuned\nrecipe_source: "study s"\n')
    monkeypatch.setattr(cfg, "CONFIG_DIR", tmp_path)
    assert cfg.tuned_yaml("defense", "ft", "digits") == tmp_path / "defense" / "ft" / "digits_tuned.yaml"
    assert cfg.tuned_yaml("defense", "ft", "mnist") is None
    assert cfg.tuned_yaml("defense", "ft", "../ft/digits") is None and cfg.tuned_yaml("defense", "ft", "") is None


def test_recipe_metadata_is_checked_and_kept_out_of_the_values(tmp_path):
    params = [cfg.Param("lr", float, 0.1)]
    values = cfg.resolve(params, [cfg.Layer("f.yaml", {"lr": 0.5, "recipe": "tuned", "recipe_source": "study x"})])
    assert values == {"lr": 0.5}
    with pytest.raises(UserError, match="'recipe' must be one of reference, tuned"):
        cfg.resolve(params, [cfg.Layer("f.yaml", {"recipe": "best"})])
    with pytest.raises(UserError, match="'recipe_source' must be a non-empty string"):
        cfg.resolve(params, [cfg.Layer("f.yaml", {"recipe": "tuned", "recipe_source": 3})])


# -- the run controls: one mark, every list derived from it --------------------------------------------


def test_run_controls_are_marked_once_and_every_list_derives_from_the_marks():
    from attack import base as attack_base
    from defense import base as defense_base

    for module in (attack_base, defense_base):
        marked = {p.name for p in module.COMMON if p.control}
        assert module.CONTROL_KEYS == marked == cfg.control_keys(module.COMMON)
        assert set(module.APART_KEYS) == {p.name for p in module.COMMON if p.control == "apart"} <= marked
        assert {
            "device",
            "record_root",
            "data_root",
            "overwrite",
            "debug",
            "download",
            "resume",
            "save_every",
        } <= marked
        assert not marked & {"epochs", "lr", "random_seed", "ratio", "pratio", "model", "amp"}
    assert set(defense_base.APART_KEYS) == {"resume", "save_every", "trust_record"}
    assert set(attack_base.APART_KEYS) == {"resume", "save_every", "export_backdoorbench"}
    # --eval_every: only the rows of a defense's curve; an attack may train differently with it
    assert "eval_every" in defense_base.CONTROL_KEYS and "eval_every" not in attack_base.CONTROL_KEYS
    import bench.tables
    import utils.train

    assert not hasattr(utils.train, "RESUME_IGNORES") and not hasattr(bench.tables, "IGNORED_CONFIG_KEYS")
    assert bench.tables.config_diff is cfg.config_diff


def test_config_diff_skips_the_given_keys_and_near_equal_floats():
    stored = {"lr": 0.1, "epochs": 3, "device": "cuda"}
    assert cfg.config_diff({"lr": 0.1 + 1e-12, "epochs": 3, "device": "cpu"}, stored, {"device"}) == []
    assert cfg.config_diff({"lr": 0.2, "epochs": 3}, stored, {"device"}) == ["lr: result 0.1, requested 0.2"]
    assert cfg.config_diff({"epochs": 4}, {"epochs": 3}, labels=("checkpoint", "now")) == [
        "epochs: checkpoint 3, now 4"
    ]


def test_checkpoint_resumes_across_control_changes_but_not_across_others(tmp_path):
    from torch import nn

    from utils.train import Checkpoint

    path = tmp_path / "checkpoint.pt"
    controls = {"device", "eval_every"}
    model = nn.Linear(2, 2)
    first = Checkpoint(path, 1, False, {"lr": 0.1, "device": "cuda", "eval_every": 5}, controls)
    first.track(model=model)
    first.save(0, history=[])
    again = Checkpoint(path, 1, True, {"lr": 0.1, "device": "cpu", "eval_every": 1}, controls)
    again.track(model=nn.Linear(2, 2))
    assert again.restore()["epoch"] == 0
    other = Checkpoint(path, 1, True, {"lr": 0.2, "device": "cpu", "eval_every": 1}, controls)
    other.track(model=nn.Linear(2, 2))
    with pytest.raises(UserError, match=r"other settings \(lr: checkpoint 0.1, now 0.2\)"):
        other.restore()
    # a parameter added after the checkpoint was made (absent_is_default), at its default: resumes
    newer = {"lr": 0.1, "device": "cpu", "eval_every": 1, "retune": False}
    later = Checkpoint(path, 1, True, newer, controls, defaults={"retune": False})
    later.track(model=nn.Linear(2, 2))
    assert later.restore()["epoch"] == 0
    asked = Checkpoint(path, 1, True, {**newer, "retune": True}, controls, defaults={"retune": False})
    asked.track(model=nn.Linear(2, 2))
    with pytest.raises(UserError, match=r"other settings \(retune: checkpoint False, now True\)"):
        asked.restore()


# -- --help and `show` -------------------------------------------------------------------------------------


def test_help_shows_each_default_once():
    from defense.base import COMMON

    flat = " ".join(cfg.build_parser("prog", COMMON).format_help().split())
    assert flat.count("(default:") == sum(1 for p in COMMON if not p.required)
    assert "<dataset>.yaml) (default" not in flat and "(default: required)" not in flat
    assert "(required)" in flat


def _shown_values(text: str) -> dict[str, str]:
    """name -> the rest of its line, from `show`'s "  name = value ..." lines."""
    out = {}
    for line in text.splitlines()[1:]:
        name, eq, rest = line.strip().partition(" = ")
        if eq:
            out[name.strip()] = rest
    return out


def test_show_names_the_dataset_yaml_its_recipe_and_the_values_it_sets():
    from attack.base import show_config as show_attack
    from defense.base import COMMON, DEFENSES, show_config as show_defense

    text = show_defense("sau", "digits")
    assert "reads config/defense/sau/digits.yaml" in text and "(recipe: " in text
    digits = cfg.read_yaml(cfg.CONFIG_DIR / "defense" / "sau" / "digits.yaml")
    defaults = {p.name: p.default for p in [*COMMON, *DEFENSES.get("sau").params()]}
    changed = [k for k, v in digits.items() if k in defaults and v != defaults[k]]
    shown = _shown_values(text)
    assert changed and all(shown[k] == f"{digits[k]!r}   (code default {defaults[k]!r})" for k in changed)
    assert shown["epochs"].split()[0] == repr(digits.get("epochs", defaults["epochs"]))
    attack = _shown_values(show_attack("badnet", "digits"))
    assert "reads config/attack/prototype/digits.yaml" in show_attack("badnet", "digits")
    assert attack["model"].startswith("'cnn'") and "code default 'preactresnet18'" in attack["model"]


def test_show_on_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "SAUBENCH_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "defense", "show", "sau", "--dataset", "digits"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("defense sau on digits:") and "config/defense/sau/digits.yaml" in proc.stdout


def test_progress_bars_are_off_under_ci_and_with_saubench_no_progress(monkeypatch):
    from utils.runtime import progress, tqdm_disable

    monkeypatch.delenv("SAUBENCH_NO_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert tqdm_disable() is None  # tqdm decides by the stream: bars on a terminal only
    monkeypatch.setenv("CI", "false")
    assert tqdm_disable() is None
    monkeypatch.setenv("CI", "true")
    assert tqdm_disable() is True and progress(range(3), desc="x").disable
    monkeypatch.delenv("CI")
    monkeypatch.setenv("SAUBENCH_NO_PROGRESS", "1")
    assert tqdm_disable() is True


def test_a_dataset_yaml_is_read_over_the_default_beside_it(tmp_path):
    """A method's <dataset>.yaml holds only what differs from the default.yaml beside it;
    each file keeps its own recipe lines, and the dataset's are the ones shown."""
    folder = tmp_path / "sau"
    folder.mkdir()
    (folder / "default.yaml").write_text('recipe: reference\nrecipe_source: "BackdoorBench x"\nlr: 0.1\nepochs: 5\n')
    (folder / "tiny.yaml").write_text('recipe: tuned\nrecipe_source: "study y"\nepochs: 7\n')
    params = [cfg.Param("lr", float, 1.0), cfg.Param("epochs", int, 1)]
    layers = cfg.yaml_layers(folder / "tiny.yaml")
    assert [Path(layer.source).name for layer in layers] == ["default.yaml", "tiny.yaml"]
    assert cfg.resolve(params, layers) == {"lr": 0.1, "epochs": 7}
    assert [Path(layer.source).name for layer in cfg.yaml_layers(folder / "default.yaml")] == ["default.yaml"]
    text = cfg.resolved_text("sau on tiny", params, layers)
    assert "recipe: tuned; source: study y" in text and "BackdoorBench x" not in text
    alone = tmp_path / "elsewhere.yaml"  # no default.yaml beside it: read alone, over the code's defaults
    alone.write_text("epochs: 3\n")
    assert cfg.resolve(params, cfg.yaml_layers(alone)) == {"lr": 1.0, "epochs": 3}


def test_shipped_dataset_yamls_hold_only_what_differs_from_their_default():
    for side in ("defense", "attack"):
        for default in sorted((cfg.CONFIG_DIR / side).glob("*/default.yaml")):
            base = cfg.read_yaml(default)
            for path in sorted(default.parent.glob("*.yaml")):
                repeated = [
                    k
                    for k, v in cfg.read_yaml(path).items()
                    if path != default and k not in cfg.RECIPE_KEYS and k in base and base[k] == v
                ]
                assert not repeated, f"{path} repeats {repeated} of {default.name}"


def test_layered_shipped_yamls_resolve_to_the_reference_and_dataset_values():
    """A few resolved values the full per-dataset files gave before they were layered
    (every (method, dataset) pair was compared when they were reduced)."""
    import re

    from defense.base import show_config

    def value(text: str, name: str) -> str:
        return re.search(rf"^  {name} +=\s(\S+)", text, re.M).group(1)

    tiny = show_config("sau", "tiny")
    assert "reads config/defense/sau/default.yaml, then the dataset's file over it:" in tiny
    assert (value(tiny, "epochs"), value(tiny, "lr"), value(tiny, "ratio")) == ("20", "0.0001", "0.05")
    digits = show_config("sau", "digits")
    assert "recipe: reference" in digits and (value(digits, "ratio"), value(digits, "lr")) == ("0.2", "0.0001")
    gtsrb = show_config("ft_sam", "gtsrb")
    assert (value(gtsrb, "rho"), value(gtsrb, "epochs"), value(gtsrb, "label_smoothing")) == ("8.0", "50", "0.0")


@pytest.mark.parametrize(("grid", "share"), [("digits_seeds.yaml", "0.2"), ("fashion_mnist_badnet.yaml", "0.05")])
def test_every_mitigation_of_a_shipped_grid_gets_the_same_clean_share(grid, share):
    """The protocol: on one dataset every compared defense holds the same clean subset."""
    import re

    from defense import DEFENSES
    from defense.base import show_config

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/grid" / grid).read_text())
    names = [d if isinstance(d, str) else next(iter(d)) for d in spec["defenses"]]
    mitigations = [n for n in names if DEFENSES.get(n).kind == "mitigation"]
    assert len(mitigations) >= 9
    for name in mitigations:
        text = show_config(name, spec["datasets"][0])
        assert re.search(r"^  ratio +=\s(\S+)", text, re.M).group(1) == share, name
