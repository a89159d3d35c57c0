"""The defense harness: configuration, the defender's clean subset, outputs, and the
Python and command-line entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import defense
from defense.base import clean_indices
from utils.errors import UserError
from utils.history import read_csv
from utils.records import load_record

ROOT = Path(__file__).resolve().parents[1]


def sau(root, **kw):
    return defense.run("sau", result_file="badnet_digits", record_root=str(root), device="cpu", **kw)


def cli(*args, cwd=ROOT):
    env = {**os.environ, "SAUBENCH_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_python_and_command_line_give_the_same_summary(record_root, tmp_path):
    from_python = sau(record_root, epochs=2, random_seed=1)
    out = record_root / "badnet_digits" / "defense" / "sau"
    os.rename(out, tmp_path / "python_result")
    proc = cli(
        "defense/sau.py",
        "--result_file",
        "badnet_digits",
        "--record_root",
        str(record_root),
        "--epochs",
        "2",
        "--random_seed",
        "1",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    from_cli = json.loads((out / "summary.json").read_text())
    assert from_cli["before"] == from_python["before"] and from_cli["after"] == from_python["after"]
    assert from_cli["config"] == from_python["config"]


@pytest.mark.parametrize("seed", range(5))
def test_clean_subset_with_exclude_poisoned_never_holds_a_poisoned_index(seed):
    labels = torch.arange(200) % 10
    poisoned = torch.from_numpy(np.random.default_rng(seed).choice(200, 60, replace=False))
    idx = clean_indices(labels, poisoned, 0.25, seed, exclude_poisoned=True)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert not set(idx.tolist()) & set(poisoned.tolist())
    assert torch.equal(idx, clean_indices(labels, poisoned, 0.25, seed, exclude_poisoned=True))


def test_clean_subset_is_drawn_from_all_samples_with_int_rounding_by_default():
    """BackdoorBench's choose_index: int(N * ratio) of all N samples, poisoned ones included."""
    labels = torch.arange(200) % 10
    poisoned = torch.arange(0, 200, 2)  # half the training set
    drawn = [set(clean_indices(labels, poisoned, 0.25, seed).tolist()) for seed in range(5)]
    assert all(len(d) == 50 for d in drawn)
    assert all(d & set(poisoned.tolist()) for d in drawn)  # about 25 poisoned indices each
    assert len(clean_indices(labels, poisoned, 0.0549, 0)) == 10  # int(10.98), not round
    assert len(clean_indices(labels, poisoned, 0.0549, 0, exclude_poisoned=True)) == 10


def test_saved_indices_follow_ratio(record_root):
    summary = sau(record_root, epochs=1, ratio=0.1)
    saved = [int(line) for line in (record_root / "badnet_digits/defense/sau/index.txt").read_text().split()]
    assert len(saved) == summary["clean_samples"] == int(0.1 * 1437) == 143
    assert summary["config"]["exclude_poisoned"] is False


def test_mixed_precision_is_opt_in_for_defenses():
    from defense.base import COMMON, DefenseData

    amp = {p.name: p for p in COMMON}["amp"]
    assert amp.default is False and "opt-in; BackdoorBench runs fp32" in amp.help
    assert DefenseData.__dataclass_fields__["amp"].default is False


def test_index_file_is_used_and_checked(record_root, tmp_path):
    record = load_record(record_root / "badnet_digits")
    poisoned = set(record.poison_indices.tolist())
    clean = [i for i in range(1437) if i not in poisoned][:40]
    good = tmp_path / "good.txt"
    good.write_text("\n".join(map(str, clean)) + "\n")
    assert sau(record_root, epochs=1, index=str(good))["clean_samples"] == 40
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n99999\n")
    with pytest.raises(UserError, match=r"--index .*bad.txt: indices must be in 0\.\.1436"):
        sau(record_root, epochs=1, index=str(bad), overwrite=True)
    bad.write_text(f"{clean[0]}\n{sorted(poisoned)[0]}\n")
    with pytest.raises(UserError, match=r"are poisoned training samples \(--exclude_poisoned refuses them\)"):
        sau(record_root, epochs=1, index=str(bad), overwrite=True, exclude_poisoned=True)


def test_backdoorbench_index_file_with_poisoned_indices_is_accepted(record_root, tmp_path):
    """BackdoorBench writes its index.txt with np.savetxt(fmt='%d') over all samples,
    poisoned ones included; --index reads such a file as it is."""
    record = load_record(record_root / "badnet_digits")
    poisoned = sorted(set(record.poison_indices.tolist()))
    rng = np.random.default_rng(3)
    chosen = np.concatenate([rng.choice(1437, 30, replace=False), poisoned[:5]])  # unsorted, as random.sample
    path = tmp_path / "index.txt"
    np.savetxt(path, chosen, fmt="%d")  # BackdoorBench's writer
    summary = sau(record_root, epochs=1, index=str(path))
    assert summary["clean_samples"] == len(set(chosen.tolist()))
    saved = [int(line) for line in (record_root / "badnet_digits/defense/sau/index.txt").read_text().split()]
    assert saved == sorted(set(chosen.tolist())) and set(poisoned[:5]) <= set(saved)


def test_existing_result_is_refused_without_overwrite(record_root):
    sau(record_root, epochs=1)
    summary_file = record_root / "badnet_digits/defense/sau/summary.json"
    first = summary_file.read_bytes()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        sau(record_root, epochs=2)
    assert summary_file.read_bytes() == first
    sau(record_root, epochs=2, overwrite=True)
    assert json.loads(summary_file.read_text())["config"]["epochs"] == 2


def test_eval_every_evaluates_on_multiples_and_the_last_epoch(record_root):
    sau(record_root, epochs=5, eval_every=2)
    rows = read_csv(record_root / "badnet_digits/defense/sau/sau_df.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [bool(r["test_asr"]) for r in rows] == [False, True, False, True, True]
    assert {"loss", "loss_sar", "shared_rate", "test_acc", "test_ra", "bd_test_loss_avg_over_batch"} <= set(rows[0])


def test_summary_matches_the_last_row_and_der(record_root):
    s = sau(record_root, epochs=2)
    last = read_csv(record_root / "badnet_digits/defense/sau/sau_df.csv")[-1]
    assert float(last["test_asr"]) == pytest.approx(s["after"]["asr"])
    assert float(last["test_acc"]) == pytest.approx(s["after"]["clean_acc"])
    b, a = s["before"], s["after"]
    assert s["der"] == pytest.approx((max(0, b["asr"] - a["asr"]) - max(0, b["clean_acc"] - a["clean_acc"]) + 1) / 2)


def test_yaml_is_looked_up_by_dataset_and_overridden_by_arguments(record_root):
    s = sau(record_root, epochs=1)
    assert s["config"]["yaml_path"] == "config/defense/sau/digits.yaml"
    assert s["config"]["trigger_norm"] == 0.2 and s["config"]["ratio"] == 0.2  # from digits.yaml
    assert sau(record_root, epochs=1, trigger_norm=0.1, overwrite=True)["config"]["trigger_norm"] == 0.1
    assert (
        sau(record_root, epochs=1, overwrite=True, yaml_path="config/defense/sau/digits_tuned_on_test.yaml")["config"][
            "ratio"
        ]
        == 0.3
    )  # read over default.yaml


def test_bad_yaml_key_names_the_file(record_root, tmp_path):
    bad = tmp_path / "sau.yaml"
    bad.write_text("epochs: 1\nadv_step: 3\n")
    with pytest.raises(UserError, match=r"sau.yaml: unknown key 'adv_step' \(did you mean 'adv_steps'\?\)"):
        sau(record_root, yaml_path=str(bad))
    assert not (record_root / "badnet_digits/defense/sau").exists()


def test_n_rounds_is_an_alias_of_epochs(record_root):
    assert (
        defense.run(
            "sau",
            ["--result_file", "badnet_digits", "--record_root", str(record_root), "--n_rounds", "1", "--device", "cpu"],
        )["config"]["epochs"]
        == 1
    )


def test_command_line_errors_are_one_line_and_exit_2(record_root):
    proc = cli("defense/sau.py", "--result_file", "nope", "--record_root", str(record_root))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "records there: badnet_digits" in proc.stderr
    proc = cli("defense/sau.py", "--result_file", "badnet_digits", "--record_root", str(record_root), "--epochs", "-3")
    assert proc.returncode == 2 and "'epochs' must be >= 0" in proc.stderr
    proc = cli("defense/sau.py", "--record_root", str(record_root))
    assert proc.returncode == 2 and "--result_file" in proc.stderr
    assert not (record_root / "badnet_digits/defense/sau").exists()


def test_unknown_defense_name_suggests():
    with pytest.raises(UserError, match="unknown defense 'saw'.*did you mean sau"):
        defense.run("saw", result_file="x")


@pytest.mark.parametrize("hooks", [("extras",), ("report",), ("extras", "report")])
def test_a_defense_defining_the_retired_hooks_is_refused_at_registration(hooks):
    """A method written against the old API (extras() / report() on the defense) fails loudly
    at registration, with one line naming data.add_extras / data.add_summary, instead of
    silently losing what it hands over."""
    from defense.base import DEFENSES, Defense

    methods = {"mitigate": lambda self, model, data: model}
    methods.update({hook: lambda self: {} for hook in hooks})
    old = type("OldStyle", (Defense,), {"paper": "none", **methods})
    with pytest.raises(TypeError) as info:
        DEFENSES.register("old_style_test")(old)
    message = str(info.value)
    assert "\n" not in message and "defense 'old_style_test'" in message
    assert all(f"{hook}()" in message for hook in hooks)
    assert "data.add_extras(...)" in message and "data.add_summary(...)" in message
    assert "old_style_test" not in DEFENSES.names()
    inherited = type("Inherits", (old,), {})  # a subclass of one inherits the refusal
    with pytest.raises(TypeError, match="data.add_summary"):
        DEFENSES.register("inherits_test")(inherited)


def test_image_extras_are_written_as_png(record_root):
    import cv2

    from defense.base import DEFENSES, Defense

    class Painter(Defense):
        """Returns the model unchanged and two images as extras (a test of the harness)."""

        paper = "none"
        image_extras = ("pictures",)

        def __init__(self, epochs: int = 0):
            self.epochs = epochs

        def mitigate(self, model, data):
            grey = torch.zeros(2, 1, 8, 8)
            grey[1, 0, 2, 3] = 1.0
            data.add_extras(pictures=grey)
            return model

    DEFENSES.register("painter_test")(Painter)
    try:
        defense.run("painter_test", result_file="badnet_digits", record_root=str(record_root), device="cpu")
    finally:
        DEFENSES.unregister("painter_test")
    folder = record_root / "badnet_digits/defense/painter_test/pictures"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
    second = cv2.imread(str(folder / "1.png"), cv2.IMREAD_UNCHANGED)
    assert second.shape == (8, 8) and second[2, 3] == 255 and second.sum() == 255


# -- what a newcomer meets ---------------------------------------------------------------------------


def test_result_file_may_be_the_path_of_a_record_folder(record_root, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working directory, where ./record holds nothing
    folder = record_root / "badnet_digits"
    summary = defense.run("sau", result_file=str(folder), device="cpu", epochs=1)
    assert summary["result_file"] == "badnet_digits"
    assert summary["config"]["record_root"] == str(record_root)
    assert (folder / "defense" / "sau" / "summary.json").is_file()
    assert not (elsewhere / "record").exists()
    relative = os.path.relpath(folder, elsewhere)
    assert "/" in relative
    again = defense.run("sau", result_file=relative, device="cpu", epochs=1, result_name="again")
    assert again["record_identity"] == summary["record_identity"]
    assert (folder / "defense" / "again" / "summary.json").is_file()


def test_record_not_found_names_the_resolved_path_and_the_record_root_hint(record_root, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError) as info:
        defense.run("sau", result_file="badnet_digits", device="cpu")
    message = str(info.value)
    assert str(elsewhere / "record" / "badnet_digits") in message and "--record_root" in message
    assert "path/to/badnet_digits" in message and "\n" not in message
    with pytest.raises(UserError, match="also takes the path of a record folder"):
        defense.run("sau", result_file=str(tmp_path / "nowhere"), device="cpu")


def test_a_run_ends_with_one_line_of_its_numbers_and_folder(record_root):
    proc = cli(
        "defense/sau.py",
        "--result_file",
        "badnet_digits",
        "--record_root",
        str(record_root),
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    summary = json.loads((record_root / "badnet_digits/defense/sau/summary.json").read_text())
    assert "sau on badnet_digits done:" in last and str(record_root / "badnet_digits/defense/sau") in last
    assert f"ASR {summary['before']['asr']:.4f} -> {summary['after']['asr']:.4f}" in last
    assert f"DER {summary['der']:.4f}" in last and f"({summary['seconds']:.1f} s)" in last


def test_an_attack_run_ends_with_one_line_of_its_numbers_and_record(tmp_path):
    proc = cli(
        "attack/badnet.py",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--record_root",
        str(tmp_path / "record"),
        "--save_folder_name",
        "one_epoch",
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "record/one_epoch/attack_summary.json").read_text())
    assert "badnet on digits done:" in last and str(tmp_path / "record" / "one_epoch") in last
    assert f"C-Acc {summary['clean_acc']:.4f}  ASR {summary['asr']:.4f}  RA {summary['ra']:.4f}" in last
    assert f"({summary['seconds']:.1f} s)" in last


def test_run_from_python_never_reads_sys_argv(record_root, monkeypatch):
    """run("sau") alone is a Python call without arguments: the process's argv (a notebook
    kernel's, pytest's) is not read; only main("sau"), a script's entry point, reads it."""
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "defense/sau.py",
            "--result_file",
            "badnet_digits",
            "--record_root",
            str(record_root),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    with pytest.raises(UserError, match="missing required argument --result_file"):
        defense.run("sau")
    assert not (record_root / "badnet_digits" / "defense" / "sau").exists()


@pytest.mark.parametrize("route", ["class", "create_defense", "create_attack"])
def test_hyperparameters_are_checked_in_the_constructor_on_every_route(route):
    """The value checks (param_checks) run however a method is built, not only when the
    harness resolves a config."""
    import attack
    from defense.sau import SAU

    build = {
        "class": lambda: SAU(lr=-1.0),
        "create_defense": lambda: defense.create_defense("sau", lr=-1.0),
        "create_attack": lambda: attack.create_attack("wanet", k=0),
    }[route]
    with pytest.raises(ValueError, match=r"(lr must be > 0, got -1\.0|k must be > 0, got 0)"):
        build()
    assert defense.create_defense("sau", lr=1e-3).lr == 1e-3  # valid values pass


def test_a_method_file_written_before_main_still_reads_its_command_line(tmp_path):
    """Deprecated but kept: run("sau") alone at the top level of the script Python runs
    forwards to main("sau") (method files written before main())."""
    script = tmp_path / "legacy_defense.py"
    script.write_text('import defense\n\nif __name__ == "__main__":\n    defense.run("sau")\n')
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), "--result_file", "no_such_record", "--record_root", str(tmp_path / "record")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 2 and "no_such_record" in done.stderr and "Traceback" not in done.stderr, done.stderr
