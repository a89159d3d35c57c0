"""The comparison (bench/, also python defense/compare.py) and its pieces: aggregation and
table rendering (bench.tables), runs and executors (bench.jobs, bench.executors), resume,
failures, config mismatches, grids (bench.grid), plots and the HTML page (bench.page)."""

from __future__ import annotations

import base64
import json
import operator
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import defense
from bench import compare
from bench.executors import DependencyFailed, InlineExecutor, ProcessExecutor
from bench.jobs import Run
from bench.tables import NO_DEFENSE, aggregate, config_diff, markdown, to_csv, to_json
from utils.errors import UserError
from utils.files import read_json

ROOT = Path(__file__).resolve().parents[1]


# -- aggregation on hand-made summaries ----------------------------------------------------------------


def _write_summary(folder: Path, acc: float, asr: float, ra: float, der: float, seconds: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "before": {"clean_acc": 0.95, "asr": 1.0, "ra": 0.0},
                "after": {"clean_acc": acc, "asr": asr, "ra": ra},
                "der": der,
                "seconds": seconds,
                "device": "cpu",
            }
        )
    )
    return folder


def _hand_made(tmp_path: Path) -> list[Run]:
    """Record r1: defense a (ASR 10% and 20%), defense b (ASR 5% and 7%); b's C-Acc is lower."""
    att = tmp_path / "r1"
    att.mkdir()
    (att / "attack_summary.json").write_text(
        json.dumps({"clean_acc": 0.95, "asr": 1.0, "ra": 0.0, "seconds": 9.0, "device": "cpu"})
    )
    runs = [Run("attack", "r1", "badnet", 0, status="reused", summary=read_json(att / "attack_summary.json"))]
    values = {
        ("a", 0): (0.90, 0.10, 0.80, 0.90),
        ("a", 1): (0.92, 0.20, 0.70, 0.85),
        ("b", 0): (0.80, 0.05, 0.60, 0.80),
        ("b", 1): (0.84, 0.07, 0.92, 0.80),
    }
    for (d, seed), (acc, asr, ra, der) in values.items():
        folder = _write_summary(att / "defense" / f"{d}_seed{seed}", acc, asr, ra, der, 2.0 + seed)
        runs.append(
            Run("defense", "r1", d, seed, folder=folder, status="reused", summary=read_json(folder / "summary.json"))
        )
    return runs


def test_aggregation_mean_std_and_best_marks(tmp_path):
    table = aggregate("t", ["r1"], ["a", "b"], [0, 1], _hand_made(tmp_path))
    a, b, base = table.row("r1", "a"), table.row("r1", "b"), table.row("r1", NO_DEFENSE)
    assert a.cells["asr"].mean == pytest.approx(15.0) and a.cells["asr"].std == pytest.approx(7.0710678)
    assert a.cells["c_acc"].text() == "91.00 ± 1.41"
    assert a.best == {"c_acc", "der"} and b.best == {"asr", "ra"}  # ASR: lowest wins
    assert base.best == set() and base.cells["c_acc"].text() == "95.00"  # "no defense" is never ranked
    md = markdown(table)
    assert "| a | **91.00 ± 1.41** | 15.00 ± 7.07 | 75.00 ± 7.07 | **87.50 ± 3.54** | 2.5 ± 0.7 s cpu |" in md
    assert "| b | 82.00 ± 2.83 | **6.00 ± 1.41** | **76.00 ± 22.63** | 80.00 ± 0.00 |" in md
    assert "| no defense | 95.00 | 100.00 | 0.00 | — | 9.0 s cpu |" in md
    csv_lines = to_csv(table).splitlines()
    assert csv_lines[0].startswith("record,defense,n,expected,c_acc,c_acc_std,asr,asr_std")
    assert csv_lines[0].endswith(",device,best,problem,code,host,node")  # what made the numbers, when known
    assert "r1,b,2,2,82.0,2.83,6.0,1.41,76.0,22.63,80.0,0.0,2.5,0.71,cpu,asr;ra,,,," in csv_lines
    rows = {r["defense"]: r for r in to_json(table)["rows"]}
    assert rows["a"]["asr_values"] == pytest.approx([10.0, 20.0]) and rows["a"]["best"] == ["c_acc", "der"]


def test_by_record_layout_has_a_row_per_record_and_the_same_cells(tmp_path):
    runs = [r for r in _hand_made(tmp_path) if r.seed == 0]
    runs[0].summary.pop("seconds")  # the attack's time unknown: shown as a dash
    table = aggregate("t", ["r1", "r2"], ["a", "b"], [0], runs)  # r2: asked for, nothing run
    md = markdown(table, rows="records").splitlines()
    assert md[0] == (
        "| Record | no defense C-Acc | ASR | RA | DER | Time | a C-Acc | ASR | RA | DER | Time "
        "| b C-Acc | ASR | RA | DER | Time |"
    )
    assert md[2] == (
        "| r1 | 95.00 | 100.00 | 0.00 | — | — | **90.00** | 10.00 | **80.00** | **90.00** | 2.0 s cpu "
        "| 80.00 | **5.00** | 60.00 | 80.00 | 2.0 s cpu |"
    )
    assert md[3] == "| r2 |" + " — |" * 15
    assert len([line for line in md if line.startswith("| r")]) == 2
    alone = aggregate("t", ["r1"], ["a"], [0], [r for r in runs if r.method != "b"])
    assert alone.row("r1", "a").best == set()  # one defense: nothing to mark


def test_ties_are_all_marked_and_one_seed_has_no_std(tmp_path):
    runs = [r for r in _hand_made(tmp_path) if r.seed == 0]
    runs[2].summary["der"] = runs[1].summary["der"] = 0.9  # a and b tie on DER
    table = aggregate("t", ["r1"], ["a", "b"], [0], runs)
    assert "der" in table.row("r1", "a").best and "der" in table.row("r1", "b").best
    assert table.row("r1", "a").cells["asr"].text() == "10.00"


def test_config_diff_ignores_where_and_how():
    from defense.base import CONTROL_KEYS

    stored = {"epochs": 3, "lr": 0.1, "device": "cuda", "record_root": "/a", "result_name": None, "eval_every": 5}
    requested = {"epochs": 3, "lr": 0.1, "device": "cpu", "record_root": "/b", "eval_every": 1}
    assert config_diff(requested, stored, CONTROL_KEYS) == []
    assert config_diff(requested, stored) == [
        "device: result 'cuda', requested 'cpu'",
        "eval_every: result 5, requested 1",
        "record_root: result '/a', requested '/b'",
        "result_name: result None, requested (absent)",
    ]
    assert config_diff({"epochs": 2, "lr": 0.1}, stored, CONTROL_KEYS) == ["epochs: result 3, requested 2"]
    assert config_diff({"epochs": 3, "lr": 0.1, "new": 1}, stored, CONTROL_KEYS) == [
        "new: result (absent), requested 1"
    ]
    # a parameter marked absent_is_default, added after the run was made: its absence is its default
    unset = {"retune": False}
    assert config_diff({"epochs": 3, "lr": 0.1, "retune": False}, stored, CONTROL_KEYS, defaults=unset) == []
    assert config_diff({"epochs": 3, "lr": 0.1, "retune": True}, stored, CONTROL_KEYS, defaults=unset) == [
        "retune: result False, requested True"
    ]
    assert config_diff({"epochs": 3, "lr": 0.1, "other": None}, stored, CONTROL_KEYS, defaults=unset) == [
        "other: result (absent), requested None"
    ]  # not marked: a new parameter may change what runs compute
    from defense.base import COMMON
    from utils.config import absent_defaults

    assert absent_defaults(COMMON) == {"retune": False, "retrain": None}


# -- executors ---------------------------------------------------------------------------------


def _check_dependencies(ex, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    slow = ex.submit(
        subprocess.run,
        (["sh", "-c", f"sleep 1 && echo x > {first}"],),
    )
    after = ex.submit(shutil.copyfile, (str(first), str(second)), deps=[slow])  # fails if run before `slow`
    bad = ex.submit(operator.truediv, (1, 0))
    blocked = ex.submit(operator.add, (1, 2), deps=[bad])
    fine = ex.submit(operator.add, (2, 3))
    results = ex.gather([slow, after, bad, blocked, fine])
    assert results[1] == str(second) and second.read_text() == "x\n"
    assert isinstance(results[2], ZeroDivisionError)
    assert isinstance(results[3], DependencyFailed) and isinstance(results[3].cause, ZeroDivisionError)
    assert results[4] == 5


def test_inline_executor_runs_in_order_and_blocks_dependents(tmp_path):
    _check_dependencies(InlineExecutor(), tmp_path)


def test_process_executor_runs_dependents_after_their_dependencies(tmp_path):
    with ProcessExecutor(2) as ex:
        _check_dependencies(ex, tmp_path)


# -- the command on the session's digits record ------------------------------------------------------


def _compare(root, **kw):
    kw.setdefault("defense_fn", None)
    return compare.run(
        result_file=["badnet_digits"], record_root=str(root), device="cpu", smoke=True, plots=False, quiet=True, **kw
    )


class Counting:
    """defense.run, counting its calls; raises ``exc`` at call number ``fail_at``."""

    def __init__(self, fail_at: int | None = None, exc: BaseException | None = None, fail_for: str | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail_at, self.exc, self.fail_for = fail_at, exc, fail_for

    def __call__(self, name, **kw):
        self.calls.append((name, kw["random_seed"]))
        if len(self.calls) == self.fail_at or name == self.fail_for:
            raise self.exc
        return defense.run(name, **kw)


def test_seed_layout_and_resume_after_an_interruption(record_root):
    interrupted = Counting(fail_at=3, exc=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _compare(record_root, defenses=["ft", "sau"], seeds=[0, 1], defense_fn=interrupted)
    out = record_root / "badnet_digits" / "defense"
    assert sorted(p.name for p in out.iterdir()) == ["ft", "ft_seed1"]  # seed 0 in BackdoorBench's place
    assert json.loads((out / "ft_seed1" / "summary.json").read_text())["config"]["random_seed"] == 1

    resumed = Counting()
    first = _compare(record_root, defenses=["ft", "sau"], seeds=[0, 1], defense_fn=resumed)
    assert resumed.calls == [("sau", 0), ("sau", 1)]
    assert {(r["method"], r["seed"]): r["status"] for r in first["runs"] if r["side"] == "defense"} == {
        ("ft", 0): "reused",
        ("ft", 1): "reused",
        ("sau", 0): "done",
        ("sau", 1): "done",
    }
    assert sorted(p.name for p in out.iterdir()) == ["ft", "ft_seed1", "sau", "sau_seed1"]

    again = Counting()
    second = _compare(record_root, defenses=["ft", "sau"], seeds=[0, 1], defense_fn=again)
    assert again.calls == [] and second["markdown"] == first["markdown"]
    assert (record_root / "compare" / "badnet_digits" / "table.md").read_text() == first["markdown"]


def test_report_runs_nothing_and_shows_what_exists(record_root):
    _compare(record_root, defenses=["ft"], seeds=[0])
    calls = Counting()
    result = _compare(record_root, defenses=["ft", "sau"], seeds=[0], table_only=True, defense_fn=calls)
    assert calls.calls == [] and not (record_root / "badnet_digits" / "defense" / "sau").exists()
    assert {r["method"]: r["status"] for r in result["runs"] if r["side"] == "defense"} == {
        "ft": "reused",
        "sau": "todo",
    }
    rows = {r["defense"]: r for r in result["rows"]}
    assert rows["ft"]["n"] == 1 and rows["sau"]["n"] == 0
    assert "| sau | not run | — |" in result["markdown"] and result["failed"] == 0


def test_a_failed_run_is_reported_and_the_others_finish(record_root):
    failing = Counting(fail_for="nad", exc=RuntimeError("boom"))
    result = _compare(record_root, defenses=["ft", "nad", "sau"], seeds=[0], defense_fn=failing)
    assert [c[0] for c in failing.calls] == ["ft", "nad", "sau"] and result["failed"] == 1
    log = record_root / "compare" / "badnet_digits" / "logs" / "badnet_digits" / "nad.log"
    assert f"| nad | failed: RuntimeError: boom (log: {log}) | — |" in result["markdown"]
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    rows = {r["defense"]: r for r in result["rows"]}
    assert rows["ft"]["n"] == 1 and rows["sau"]["n"] == 1 and rows["nad"]["n"] == 0
    assert not (record_root / "badnet_digits" / "defense" / "nad").exists()


def test_a_result_with_another_config_is_reported_not_reused(record_root):
    _compare(record_root, defenses=["sau"], option=["epochs=1"])
    calls = Counting()
    result = _compare(record_root, defenses=["sau"], option=["sau.epochs=2"], defense_fn=calls)
    assert calls.calls == []
    run = next(r for r in result["runs"] if r["side"] == "defense")
    assert run["status"] == "mismatch" and "epochs: result 1, requested 2" in run["message"]
    assert "| sau | mismatch: config differs: epochs: result 1, requested 2" in result["markdown"]
    redone = _compare(record_root, defenses=["sau"], option=["sau.epochs=2"], overwrite=True, defense_fn=calls)
    assert calls.calls == [("sau", 0)] and redone["rows"][1]["n"] == 1
    summary = json.loads((record_root / "badnet_digits/defense/sau/summary.json").read_text())
    assert summary["config"]["epochs"] == 2


def test_retune_asked_of_a_finished_result_adds_the_retuning_without_running_the_defense_again(record_root):
    first = _compare(record_root, defenses=["fst"], option=["epochs=1"])
    folder = record_root / "badnet_digits/defense/fst"
    weights = (folder / "defense_result.pt").read_bytes()
    result = _compare(record_root, defenses=["fst"], option=["epochs=1", "retune=true"])
    run = next(r for r in result["runs"] if r["side"] == "defense")
    assert run["status"] == "done" and run["seconds"] == first["runs"][1]["seconds"]
    assert (folder / "defense_result.pt").read_bytes() == weights  # the same purified model, not a new run
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["config"]["retune"] is True and 0 <= summary["retune"]["asr"] <= 1
    assert "ASR after retuning" in result["markdown"]


def test_bad_input_is_one_user_error(record_root, tmp_path):
    with pytest.raises(UserError, match="unknown defense 'saux'; did you mean sau"):
        _compare(record_root, defenses=["saux"])
    with pytest.raises(UserError, match="no attack record named 'nope'"):
        compare.run(result_file=["nope"], record_root=str(record_root))
    with pytest.raises(UserError, match="either --result_file"):
        compare.run(record_root=str(record_root))
    with pytest.raises(UserError, match="unknown option 'epoch' \\(did you mean 'epochs'\\?\\)"):
        _compare(record_root, defenses=["sau"], option=["epoch=1"])
    with pytest.raises(UserError, match="must be a plain folder name"):
        defense.run("ft", result_file="badnet_digits", record_root=str(record_root), result_name="../x")


# -- grids ------------------------------------------------------------------------------------------


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


TINY_GRID = """
datasets: [digits]
attack_options: {epochs: 2}
attacks: [badnet]
defenses:
  ft: {smoke: true}
seeds: [0, 1]
"""


def test_grid_makes_missing_records_then_defends(tmp_path):
    from attack import run as attack_run

    calls: list[str] = []

    def attack_fn(name, **kw):
        calls.append(f"attack {name}")
        return attack_run(name, **kw)

    def defense_fn(name, **kw):
        assert (tmp_path / "rec" / "badnet_digits" / "attack_result.pt").exists()
        calls.append(f"{name} {kw['random_seed']}")
        return defense.run(name, **kw)

    grid = _grid(tmp_path, TINY_GRID)
    kw = dict(
        grid=str(grid),
        record_root=str(tmp_path / "rec"),
        device="cpu",
        quiet=True,
        plots=False,
        attack_fn=attack_fn,
        defense_fn=defense_fn,
    )
    result = compare.run(**kw)
    assert calls == ["attack badnet", "ft 0", "ft 1"] and result["name"] == "grid"
    assert [r["defense"] for r in result["rows"]] == [NO_DEFENSE, "ft"] and result["rows"][1]["n"] == 2
    calls.clear()
    again = compare.run(**kw)
    assert calls == [] and again["markdown"] == result["markdown"]
    # The record is checked against the grid too: another attack config is reported, its defenses blocked.
    _grid(tmp_path, TINY_GRID.replace("epochs: 2", "epochs: 3"))
    changed = compare.run(**kw)
    assert calls == [] and [r["status"] for r in changed["runs"]] == ["mismatch", "blocked", "blocked"]
    assert "epochs: result 2, requested 3" in changed["markdown"]


def test_record_seeds_make_a_record_per_seed_and_a_column_per_attack(tmp_path):
    """record_seeds: seed k seeds the attack's record k and only its defense runs; the table
    column is the attack over its seeds' records, the "no defense" row over the records."""
    from attack import run as attack_run

    calls: list[str] = []

    def attack_fn(name, **kw):
        calls.append(f"attack {kw['save_folder_name']} {kw['random_seed']}")
        return attack_run(name, **kw)

    def defense_fn(name, **kw):
        calls.append(f"{name} {kw['result_file']} {kw['random_seed']}")
        return defense.run(name, **kw)

    grid = _grid(tmp_path, TINY_GRID + "record_seeds: true\n")
    result = compare.run(
        grid=str(grid),
        record_root=str(tmp_path / "rec"),
        device="cpu",
        quiet=True,
        plots=False,
        attack_fn=attack_fn,
        defense_fn=defense_fn,
    )
    assert sorted(calls) == [
        "attack badnet_digits 0",
        "attack badnet_digits_seed1 1",
        "ft badnet_digits 0",
        "ft badnet_digits_seed1 1",
    ]
    assert result["records"] == ["badnet_digits"]
    baseline, ft = result["rows"]
    assert baseline["n"] == 2 and ft["n"] == 2 and ft["seeds"] == [0, 1]
    accs = [
        json.loads((tmp_path / "rec" / r / "attack_summary.json").read_text())["clean_acc"]
        for r in ("badnet_digits", "badnet_digits_seed1")
    ]
    assert accs[0] != accs[1]  # two records, trained with two seeds
    assert "the attack's record and the defense both made with seed k" in result["markdown"]
    with pytest.raises(UserError, match="'record_seeds' must be true or false"):
        compare.run(grid=str(_grid(tmp_path, TINY_GRID + "record_seeds: 2\n")), record_root=str(tmp_path / "rec"))


def test_grid_names_are_checked_against_the_registries(tmp_path):
    for text, message in [
        (TINY_GRID.replace("[badnet]", "[badnett]"), "unknown attack 'badnett'; did you mean badnet"),
        (TINY_GRID.replace("ft: {smoke: true}", "fx: {}"), "unknown defense 'fx'"),
        (TINY_GRID.replace("[digits]", "[digitz]"), "unknown dataset 'digitz'"),
        (TINY_GRID + "models: [cnnn]\n", "unknown model 'cnnn'"),
        (TINY_GRID + "seed: [1]\n", "unknown key 'seed'"),
        (TINY_GRID.replace("{epochs: 2}", "{epoch: 2}"), "attack badnet: keyword arguments: unknown key 'epoch'"),
        (TINY_GRID.replace("{smoke: true}", "{lrr: 0.1}"), "defense ft: unknown option 'lrr'"),
    ]:
        with pytest.raises(UserError, match=message):
            compare.run(grid=str(_grid(tmp_path, text)), record_root=str(tmp_path / "rec"))


@pytest.mark.parametrize("path", sorted((ROOT / "config/grid").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_grid_loads(path):
    """Every shipped grid names registered methods and known options only."""
    grid = compare.load_grid(path, compare.resolve([], {"grid": "x"}))
    assert grid.records and grid.defenses and grid.seeds


def test_shipped_grids_ask_for_what_they_say():
    values = compare.resolve([], {"grid": "x"})
    smoke = compare.load_grid(ROOT / "config/grid/digits_smoke.yaml", values)
    assert [r.record_name for r in smoke.records] == ["badnet_digits_smoke", "blended_digits_smoke"]
    assert list(smoke.defenses) == ["ft", "nad", "anp", "sau"] and smoke.seeds == [0, 1]
    assert smoke.defenses["anp"]["nb_iter"] == 20  # ANP's smoke_params
    paper = compare.load_grid(ROOT / "config/grid/cifar10_paper.yaml", values)
    assert len(paper.records) == 6 and len(paper.defenses) == 7 and paper.defenses["sau"]["ratio"] == 0.05
    assert all(r.options["model"] == "preactresnet18" for r in paper.records)
    assert all(r.options.get("pratio") == 0.1 for r in paper.records if r.attack != "sig")
    attacks = compare.load_grid(ROOT / "config/grid/fashion_mnist_attacks.yaml", values)
    assert {r.options.get("clean_model") for r in attacks.records if r.attack in ("lf", "trojannn")} == {
        "prototype_fashion_mnist"
    }
    assert list(attacks.defenses) == ["sau"] and attacks.defenses["sau"]["eval_every"] == 5


def test_python_m_bench_and_the_defense_compare_alias_are_one_command(record_root, tmp_path):
    import defense.compare

    assert defense.compare.run is compare.run and defense.compare.main is compare.main
    assert "compare" not in defense.DEFENSES.names()  # the alias is no defense
    env = {**os.environ, "SAUBENCH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--grid",
            str(_grid(tmp_path, TINY_GRID.replace("[badnet]", "[badnett]"))),
            "--record_root",
            str(record_root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "unknown attack 'badnett'" in bad.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m bench")


def test_command_line_prints_the_table_and_exits_2_on_bad_input(record_root, tmp_path):
    env = {**os.environ, "SAUBENCH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(
        [
            sys.executable,
            "defense/compare.py",
            "--grid",
            str(_grid(tmp_path, TINY_GRID.replace("[badnet]", "[badnett]"))),
            "--record_root",
            str(record_root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "unknown attack 'badnett'" in bad.stderr
    _compare(record_root, defenses=["ft"])
    ok = subprocess.run(
        [
            sys.executable,
            "defense/compare.py",
            "--result_file",
            "badnet_digits",
            "--defenses",
            "ft",
            "--smoke",
            "--device",
            "cpu",
            "--record_root",
            str(record_root),
            "--no-plots",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    # the terminal gets a table that fits 100 columns and the name of the full markdown file
    table_md = record_root / "compare" / "badnet_digits" / "table.md"
    table_lines = ok.stdout.splitlines()[:-1]  # the last names the file: a path, as long as it is
    assert max(len(line) for line in table_lines) <= 100 < max(len(line) for line in table_md.read_text().splitlines())
    assert ok.stdout.rstrip().endswith(f"The full table (markdown): {table_md}")
    ft_line = next(line for line in ok.stdout.splitlines() if line.startswith("ft "))
    assert ft_line.split()[1] == table_md.read_text().split("| ft | ")[1].split(" |")[0].strip("*")
    assert "0 to run, 2 reused" in ok.stderr


# -- plots and the HTML page -------------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.rows, self.bold, self.external = [], [], 0, 0, []
        self._in_table = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id"))
        elif tag == "tr":
            self.rows += 1
        elif tag == "b":
            self.bold += 1
        elif tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])


@pytest.fixture
def html_result(record_root):
    return _compare(record_root, defenses=["ft", "sau"], seeds=[0, 1], html=True)


def test_html_page_holds_the_table_and_embedded_plots(html_result, record_root):
    out = record_root / "compare" / "badnet_digits"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "curves_badnet_digits.png",
        "sau_shared_rate.png",
        "scatter_badnet_digits.png",
    ]
    page = _Page()
    page.feed((out / "index.html").read_text())
    assert page.tables == ["compare"] and page.rows == 2 + 3  # two header rows; no defense, ft, sau
    # the only links: the table's own data files, beside the page
    assert page.bold >= 4 and page.external == ["table.md", "table_by_record.md", "table.csv", "table.json"]
    assert all((out / name).is_file() for name in page.external)
    text = (out / "index.html").read_text()
    for key in ("command", "config", "date", "machine"):
        assert f"<dt>{key}</dt>" in text
    assert "records badnet_digits" in text and "the attack&#x27;s training time" in text
    assert len(page.images) == 3
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_html_page_renders_in_headless_chromium(html_result, record_root, tmp_path):
    page = record_root / "compare" / "badnet_digits" / "index.html"
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert '<table id="compare">' in dom and "no defense" in dom and ">sau</td>" in dom
    assert dom.count('src="data:image/png;base64,') == 3


# -- Ray ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not another test's cluster
    yield ray
    ray.shutdown()


def test_ray_executor_runs_dependents_after_their_dependencies(local_ray, tmp_path):
    from bench.executors import RayExecutor

    _check_dependencies(RayExecutor(), tmp_path)


def test_ray_compare_writes_to_the_shared_record_root(local_ray, record_root):
    result = _compare(record_root, defenses=["ft"], seeds=[0, 1], executor="ray")
    assert [r["status"] for r in result["runs"]] == ["reused", "done", "done"]
    assert (record_root / "badnet_digits/defense/ft_seed1/summary.json").exists()
    assert _compare(record_root, defenses=["ft"], seeds=[0, 1], executor="ray")["markdown"] == result["markdown"]


# -- what a newcomer reads ---------------------------------------------------------------------------


def _table(purpose=None, defenses=("ft", "a_defense_with_a_very_long_name_indeed"), record="r" * 60):
    runs = [
        Run(
            "attack",
            record,
            "badnet",
            0,
            {},
            None,
            status="reused",
            summary={"clean_acc": 0.99, "asr": 0.97, "ra": 0.03, "seconds": 33.7, "device": "cpu"},
        )
    ]
    for seed in (0, 1):
        for i, d in enumerate(defenses):
            runs.append(
                Run(
                    "defense",
                    record,
                    d,
                    seed,
                    {},
                    None,
                    status="done",
                    summary={
                        "after": {"clean_acc": 0.981 - 0.01 * i, "asr": 0.1234 + 0.01 * seed, "ra": 0.8},
                        "der": 0.9123,
                        "seconds": 1234.5,
                        "device": "cuda:0",
                    },
                )
            )
    runs.append(Run("defense", record, "broken", 0, {}, None, status="failed", message="x" * 300))
    table = aggregate("t", [record], [*defenses, "broken"], [0, 1], runs)
    table.purpose = purpose
    return table


def test_terminal_table_fits_100_columns_and_keeps_the_numbers():
    from bench.tables import terminal_table

    table = _table(purpose="smoke test: a few epochs, numbers are not results")
    wide = markdown(table)
    assert max(len(line) for line in wide.splitlines()) > 100
    for rows in ("defenses", "records"):
        text = terminal_table(table, rows)
        assert max(len(line) for line in text.splitlines()) <= 100, text
        assert text.startswith("Purpose: smoke test")
    text = terminal_table(table)
    ft = next(line for line in text.splitlines() if line.startswith("ft "))
    assert "98.10 ± 0.00" in ft and "12.84 ± 0.71" in ft and "1234.5" in ft
    assert any(line.startswith("broken") and "failed" in line for line in text.splitlines())
    assert "the attack's training time" in text


def test_purpose_and_time_note_in_markdown_and_page():
    from bench.page import html_page

    table = _table(purpose="smoke test: a few epochs, numbers are not results")
    md = markdown(table)
    assert md.startswith("> **Purpose:** smoke test: a few epochs, numbers are not results")
    assert 'for "no defense": the attack\'s training time' in md
    page = html_page(table, [])
    assert '<p id="purpose" class="purpose"><b>Purpose:</b> smoke test' in page
    assert "Purpose" not in markdown(_table()) and 'id="purpose"' not in html_page(_table(), [])


def test_smoke_grid_says_its_numbers_are_not_results():
    from bench import compare

    values = compare.resolve(["--grid", str(ROOT / "config/grid/digits_smoke.yaml")], {})
    spec = compare.load_grid(ROOT / "config/grid/digits_smoke.yaml", values)
    assert spec.purpose and "not results" in spec.purpose


def test_curves_end_with_the_returned_models_row(tmp_path):
    """ANP's <name>_df.csv ends with a row without an epoch (the pruned model): the curve
    ends with it, as the table does."""
    from bench.page import mean_curve, seeds_text

    folder = tmp_path / "anp"
    folder.mkdir()
    (folder / "anp_df.csv").write_text(",epoch,test_asr,test_acc\n0,0,0.9,0.95\n1,499,0.8,0.95\n2,,0.05,0.9\n")
    run = Run("defense", "r", "anp", 0, {}, folder, status="done")
    assert mean_curve([run], "test_asr") == [(0.0, 0.9), (499.0, 0.8), (500.0, 0.05)]
    assert seeds_text([run]) == "one seed" and seeds_text([run, run]) == "mean over 2 seeds"


def test_history_plot_keeps_the_row_without_an_epoch():
    from utils.history import epochs_of

    assert epochs_of([0, 4, 9, None]) == [0, 4, 9, 10]
    assert epochs_of([None]) == [0]


def test_scatter_shifts_markers_that_would_hide_each_other():
    from bench.page import OFFSET, scatter_position

    assert scatter_position(10.0, 90.0, []) == (10.0, 90.0)
    assert scatter_position(10.0, 90.0, [(10.2, 90.1)]) == (10.0 + OFFSET, 90.0)
    assert scatter_position(10.0, 90.0, [(10.0, 90.0), (10.5, 89.5)]) == (10.0 + 2 * OFFSET, 90.0)
    assert scatter_position(10.0, 90.0, [(30.0, 90.0)]) == (10.0, 90.0)


def test_the_recipe_line_names_defenses_whose_shipped_yaml_is_not_a_reference_recipe(record_root):
    """--recipes reference: a run that read FT's digits_tuned_on_test.yaml (`recipe: tuned`) is
    named under the table, one that read NC's digits yaml (`reference`) is not; the line comes
    from the yamls the runs read."""
    from bench.compare import recipe_line

    result = _compare(record_root, defenses=["ft"], seeds=[0])
    assert "Recipes: reference, for every defense" in result["markdown"] and "Except" not in result["markdown"]
    on_test = Run(
        "defense", "r", "ft", 0, summary={"config": {"yaml_path": "config/defense/ft/digits_tuned_on_test.yaml"}}
    )
    assert recipe_line("reference", [on_test]).endswith(
        "Except where the shipped yaml says otherwise: ft (tuned: see the yaml's recipe_note)."
    )
    run = Run("defense", "r", "nc", 0, summary={"config": {"yaml_path": "config/defense/nc/digits.yaml"}})
    foreign = Run("defense", "r", "x", 0, summary={"config": {"yaml_path": "../../etc/passwd"}})
    assert recipe_line("reference", [run, foreign]).endswith("or the paper's).")  # nothing to except
    assert recipe_line("tuned", [run]).startswith("Recipes: tuned, for every defense")


# -- issue 22: the retuning attack's column ------------------------------------------------------------


def test_retune_results_get_a_column_with_their_mean_and_a_note(tmp_path):
    from bench.page import html_table
    from bench.tables import terminal_table

    runs = _hand_made(tmp_path)
    for run, asr in zip([r for r in runs if r.method == "a"], (0.40, 0.60)):  # a retuned (seeds 0, 1); b not
        run.summary["retune"] = {"clean_acc": 0.9, "asr": asr, "ra": 0.3, "poisoned_samples": 5, "clean_samples": 45}
    table = aggregate("t", ["r1"], ["a", "b"], [0, 1], runs)
    assert table.columns == ["C-Acc", "ASR", "RA", "DER", "ASR after retuning", "Time"]
    a = table.row("r1", "a")
    assert a.cells["retune_asr"].mean == pytest.approx(50.0) and a.cells["retune_asr"].text() == "50.00 ± 14.14"
    md = markdown(table)
    assert "| Defense | r1 C-Acc | ASR | RA | DER | ASR after retuning | Time |" in md
    assert (
        "| a | **91.00 ± 1.41** | 15.00 ± 7.07 | 75.00 ± 7.07 | **87.50 ± 3.54** | 50.00 ± 14.14 | 2.5 ± 0.7 s cpu |"
    ) in md
    assert ("| b | 82.00 ± 2.83 | **6.00 ± 1.41** | **76.00 ± 22.63** | 80.00 ± 0.00 | — | 2.5 ± 0.7 s cpu |") in md
    assert "| no defense | 95.00 | 100.00 | 0.00 | — | — | 9.0 s cpu |" in md
    assert "retuning attack of Min et al. (NeurIPS 2024" in md and "5 poisoned + 45 clean samples" in md
    csv_lines = to_csv(table).splitlines()
    assert ",der,der_std,retune_asr,retune_asr_std,seconds," in csv_lines[0]
    assert csv_lines[2].startswith("r1,a,2,2,91.0,1.41,15.0,7.07,75.0,7.07,87.5,3.54,50.0,14.14,")
    rows = {r["defense"]: r for r in to_json(table)["rows"]}
    assert rows["a"]["retune_asr_values"] == pytest.approx([40.0, 60.0]) and rows["b"]["retune_asr"] is None
    text = terminal_table(table)
    assert max(len(line) for line in text.splitlines()) <= 100, text
    a_line = next(line for line in text.splitlines() if line.startswith("a "))
    assert "50.00 ± 14.14" in a_line and "ASR retuned" in text and "no defense " in text
    page = html_table(table)
    assert (
        '<th colspan="6">r1</th>' in page and "<th>ASR after retuning</th>" in page and "<td>50.00 ± 14.14</td>" in page
    )


def test_without_retune_results_the_table_is_unchanged(tmp_path):
    from bench.page import html_table
    from bench.tables import terminal_table

    table = aggregate("t", ["r1"], ["a", "b"], [0, 1], _hand_made(tmp_path))
    assert table.columns == ["C-Acc", "ASR", "RA", "DER", "Time"]
    for text in (markdown(table), to_csv(table), terminal_table(table), html_table(table)):
        assert "retun" not in text.lower()
    assert "retune_asr" not in to_json(table)["rows"][0]


# -- issue 20: the detectors' table ----------------------------------------------------------------------


def _detector_runs() -> list[Run]:
    """Two detectors on record r1, seeds 0 and 1: ``ac`` retrained a model, ``strip`` (input
    detection) flags nothing of its own on seed 1; ``spectral`` failed."""

    def summary(auroc, tpr, f1, seconds, retrained=None):
        out = {
            "detection": {"auroc": auroc, "tpr_at_5fpr": tpr, "f1": f1, "positives": 10, "negatives": 90},
            "seconds": seconds,
            "device": "cpu",
        }
        return {**out, "retrained": retrained} if retrained is not None else out

    return [
        Run(
            "defense",
            "r1",
            "ac",
            0,
            status="done",
            summary=summary(0.90, 0.50, 0.60, 4.0, {"clean_acc": 0.95, "asr": 0.02, "ra": 0.9, "removed": 12}),
        ),
        Run(
            "defense",
            "r1",
            "ac",
            1,
            status="done",
            summary=summary(0.80, 0.40, 0.50, 6.0, {"clean_acc": 0.93, "asr": 0.04, "ra": 0.9, "removed": 11}),
        ),
        Run("defense", "r1", "strip", 0, status="done", summary=summary(0.99, 0.95, 0.70, 1.0)),
        Run("defense", "r1", "strip", 1, status="done", summary=summary(0.97, 0.93, None, 1.0)),
        Run("defense", "r1", "spectral", 0, status="failed", message="boom"),
    ]


def test_detector_table_has_tpr_f1_time_and_retrained_numbers():
    from bench.tables import detection_json, detection_markdown, detection_table, terminal_table

    table = detection_table(["r1"], ["ac", "strip", "spectral"], _detector_runs())
    assert table.columns == ["AUROC", "TPR@5%FPR", "F1", "Retrained C-Acc", "Retrained ASR", "Time"]
    ac, strip = table.row("r1", "ac"), table.row("r1", "strip")
    assert ac.cells["auroc"].text() == "85.00 ± 7.07" and ac.cells["f1"].mean == pytest.approx(55.0)
    assert ac.cells["retrained_asr"].mean == pytest.approx(3.0) and strip.cells["retrained_asr"].mean is None
    assert strip.cells["f1"].values == pytest.approx([70.0])  # seed 1 flags nothing: no F1
    assert strip.best == {"auroc", "tpr_at_5fpr", "f1"} and ac.best == set()  # one retrained model: unranked
    md = detection_markdown(table)
    assert "| Detector | AUROC | TPR@5%FPR | F1 | Retrained C-Acc | Retrained ASR | Time |" in md
    assert "| ac | 85.00 ± 7.07 | 45.00 ± 7.07 | 55.00 ± 7.07 | 94.00 ± 1.41 | 3.00 ± 1.41 | 5.0 ± 1.4 s cpu |" in md
    assert "| strip | **98.00 ± 1.41** | **94.00 ± 1.41** | **70.00** | — | — | 1.0 ± 0.0 s cpu |" in md
    assert "| spectral | failed: boom | — |" in md and "TPR at 5% FPR" in md and "retrained from scratch" in md
    text = terminal_table(table)
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert text.startswith("detectors on record r1") and "Retr. C-Acc" in text
    assert "85.00 ± 7.07" in next(line for line in text.splitlines() if line.startswith("ac "))
    data = detection_json(table)
    cell = data["rows"][0]["cells"]["r1"]
    assert cell["auroc"] == pytest.approx(85.0) and cell["std"] == pytest.approx(7.0710678)
    assert cell["tpr_at_5fpr_values"] == pytest.approx([50.0, 40.0]) and cell["seconds"] == pytest.approx(5.0)
    assert data["rows"][2]["cells"]["r1"]["problem"] == "failed: boom" and data["metrics"][-1] == "retrained_asr"


def test_detector_table_without_retraining_has_no_retrained_columns():
    from bench.tables import detection_table

    runs = [r for r in _detector_runs() if r.method != "ac"]
    table = detection_table(["r1"], ["strip", "spectral"], runs)
    assert table.columns == ["AUROC", "TPR@5%FPR", "F1", "Time"]


def test_html_page_shows_the_detectors_table():
    from bench.page import html_page
    from bench.tables import detection_table

    detection = detection_table(["r1"], ["ac", "strip", "spectral"], _detector_runs())
    page = html_page(_table(), [], detection=detection)
    parsed = _Page()
    parsed.feed(page)
    assert parsed.tables == ["compare", "detection"]
    assert '<th rowspan="2">Detector</th><th colspan="6">r1</th>' in page and "<td><b>98.00 ± 1.41</b></td>" in page
    assert "spectral on r1 (seed 0): failed: boom" in page
    assert 'id="detection"' not in html_page(_table(), [])


def test_roc_plot_per_record_from_stored_points_or_the_scores_csv(tmp_path):
    import torch

    from bench.page import make_plots, roc_of
    from bench.tables import detection_table
    from utils.metrics import roc_points

    runs = _detector_runs()
    for run in runs[:3]:
        run.summary["detection"]["roc"] = {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.8, 1.0]}
    folder = tmp_path / "strip_seed1"  # an older summary without points: read from its scores csv
    folder.mkdir()
    (folder / "strip_scores.csv").write_text(
        "set,index,poisoned,score,flagged\nclean_test,0,0,0.1,\n"
        "clean_test,1,0,0.7,\nbd_test,0,1,0.9,\nbd_test,1,1,0.4,\n"
    )
    runs[3].folder = folder
    assert roc_of(runs[0]) == {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.8, 1.0]}
    assert roc_of(runs[3]) == roc_points(torch.tensor([0.1, 0.7, 0.9, 0.4]), torch.tensor([0, 0, 1, 1]))
    assert roc_of(Run("defense", "r1", "strip", 2, status="done", summary={"detection": {}})) is None
    detection = detection_table(["r1"], ["ac", "strip", "spectral"], runs)
    table = aggregate("t", ["r1"], [], [0], [])
    plots = make_plots(table, tmp_path, detection)
    assert [(title, path.name) for title, path in plots] == [("Detectors' ROC curves on r1", "roc_r1.png")]
    assert (tmp_path / "roc_r1.png").read_bytes().startswith(b"\x89PNG")
    assert make_plots(table, tmp_path / "none", detection_table(["r1"], ["spectral"], runs)) == []


def test_written_outputs_hold_the_detectors_and_count_their_failures(tmp_path):
    from bench.compare import write_outputs
    from bench.tables import detection_table

    detection = detection_table(["r1"], ["ac", "strip", "spectral"], _detector_runs())
    values = {
        "plots": False,
        "html": True,
        "rows": "defenses",
        "recipes": "reference",
        "grid": None,
        "result_file": ["r1"],
    }
    result = write_outputs(_table(record="r1"), tmp_path, values, detection)
    assert result["failed"] == 2  # the mitigation table's "broken" and the detector "spectral"
    assert result["detection"]["rows"][0]["cells"]["r1"]["f1"] == pytest.approx(55.0)
    assert "**Detectors on r1**" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "table.json").read_text())["detection"]["metrics"][:3] == [
        "auroc",
        "tpr_at_5fpr",
        "f1",
    ]
    terminal = result["terminal"].splitlines()[:-1]  # the last line names the markdown file
    assert max(len(line) for line in terminal) <= 100 and "detectors on record r1" in terminal
    assert 'id="detection"' in (tmp_path / "index.html").read_text()
