"""Side-by-side comparison of defenses on attack records, over seeds, in one table.

Every (record, defense, seed) without a finished result is run; the results are reported
as one table (Markdown on stdout; .md, .csv, .json), plots and an HTML page.

    python defense/compare.py --result_file badnet_digits blended_digits --defenses ft fp nad anp ibau nc sau \
        --seeds 0 1 2
    python defense/compare.py --grid config/grid/digits_smoke.yaml --html
    python defense/compare.py --grid config/grid/cifar10_paper.yaml --jobs 4           # one worker per GPU
    python defense/compare.py --grid config/grid/cifar10_paper.yaml --executor ray --ray_address auto
    python -m bench --grid config/grid/digits_smoke.yaml   # the same command (defense/compare.py is its alias)

What it runs. With ``--result_file``, the records must exist; with ``--grid`` (a YAML file
naming datasets, models, attacks and defenses with their options, and seeds; see
config/grid/), missing records are made first with the attack harness and each defense
run waits only for its own record. A run whose result exists is reused when it names
the identity of the record in place (its summary.json's ``record_identity``, see
utils.records) and the config it recorded matches the requested one (keys that only say
where or how it ran, such as device or record_root, are not compared); a mismatch
(``stale: made on another version of the record``, or the config's differences) is
reported in the table and not re-run unless ``--overwrite``. The "no defense" row comes
from the record's attack_summary.json only when that names the record's identity too.
Records written before identities (digests of the model and bd_test only) keep their
results: summaries that name no identity are reused beside them as before.

BackdoorBench's own results. A record's ``defense/<name>/`` folder written by
BackdoorBench's defenses (its ``<name>_df_summary.csv``, no summary.json of ours) is
listed as the row "<name> (BackdoorBench)" beside ours: its last C-Acc, ASR and RA, and
the DER against the record's "no defense" numbers. Nothing is run for it.

Seeds. A grid's ``seeds`` are the defense seeds; with ``record_seeds: true`` each seed k also
makes its own record with the attack seeded k (``<record>_seed<k>``; seed 0 keeps the name), its
defenses run with seed k on that record only, and a table column is the attack over its seeds'
records (mean ± std: the attack's variation and the defense's together, as issue 18's protocol
asks of every reported table).

Where results go. Seed 0 writes ``record/<record>/defense/<defense>/`` as
``python defense/<defense>.py`` does; seed k writes ``defense/<defense>_seed<k>/`` (the
harness's ``--result_name``). The comparison writes ``record/compare/<name>/``:
table.md (a row per defense, with "ASR after retuning" when a run was made with --retune:
``--option retune=true`` on finished mitigation results made without it adds the retuning
to them, on their saved models, without running the defense again;
detectors, named with --defenses or in the grid, in a table of their own after it: per
record, a row per detector with AUROC, TPR@5%FPR, F1, time and the retrained model's C-Acc
and ASR when one was retrained), table_by_record.md
(a row per record, the SAU paper's
layout; ``--rows records`` prints this one), table.csv, table.json, the plots (PNG),
the detectors' ROC curves (roc_<record>.png), index.html with ``--html``, and
logs/<record>/<run>.log with each run's console output (and traceback on failure).
Every one of these paths is checked before anything runs: one that a symlink leads
outside --record_root stops the comparison with one line (docs/security.md). A grid
file cannot set data_root, record_root or trust_record; without --data_root, runs read
./data, never a record's own data root.

How it runs: ``--jobs 1`` (default) in this process; ``--jobs N`` in N worker processes
(each sees one GPU, round robin, when there are GPUs); ``--executor ray`` as Ray tasks
asking ``--cpus_per_run`` CPUs and ``--gpus_per_run`` GPUs each (default: 1 GPU when
the cluster has GPUs; a grid's ``resources:`` gives an attack or a defense its own
``cpus``, ``gpus`` and ``memory``). On Ray, before anything runs, every node must read
back a file the driver wrote into the record root (shared storage), find the runs'
datasets, and run the driver's code version (``--ray_code installed``) unless the
checkout is shipped (``--ray_code working_dir``); a run lost with its worker or node is
run again ``--retries`` times (default 1), resuming from its checkpoint, after the lost
run's lock stops binding (utils.lease); each finished run is one line on the driver with
its host and node. docs/cluster.md is the recipe. A run that fails is reported as
"failed: reason (log: path)" (the log only when it exists) and the others go on; the
exit status is then 1. Running the same command again reuses what finished; with
``--resume`` the runs left unfinished continue from their checkpoints. Bad input: one
line on stderr, status 2.

Recipes. ``--recipes reference`` (default) runs every defense with its reference recipe
(config/defense/<name>/<dataset>.yaml, BackdoorBench's values or the paper's);
``--recipes tuned`` runs every defense with the recipe ``python -m defense tune`` chose
on a validation split: the record's own study (record/<record>/tune/<name>/recipe.yaml),
else the shipped tuned recipe of the record's dataset (config/defense/<name>/<dataset>_tuned.yaml,
written by scripts/ship_tuned.py from a study, which it names), in ``defense/<name>_tuned/``
(``_tuned_seed<k>`` for seed k). A defense without either is reported as "no tuned recipe",
never run with its reference recipe instead. One family for every defense alike; the table
says which; the default output name gets "_tuned".

``--table_only`` runs nothing: it writes and prints the table of the results that exist
(for example while a long grid runs elsewhere); the runs not yet finished show as
"not run".
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from bench.executors import Resources, make_executor
from bench.grid import RecordSpec, Spec, columns_of, load_grid, spec_from_records
from bench.jobs import Progress, Run, execute, identity_problem
from bench.tables import (
    Table,
    aggregate,
    config_diff,
    detection_json,
    detection_markdown,
    detection_table,
    markdown,
    terminal_table,
    to_csv,
    to_json,
)
from utils import cluster, config as cfg
from utils.cli import entry
from utils.config import Param
from utils.errors import UserError
from utils.files import inside_root, read_json, save_json, save_text
from utils.records import RECORD_FILE, load_record, record_dir

log = logging.getLogger("saubench.compare")

PARAMS: list[Param] = [
    Param("result_file", list[str] | None, None, "attack records (folders of --record_root) to compare on"),
    Param("grid", str | None, None, "a grid file (config/grid/*.yaml): attacks, defenses and seeds"),
    Param(
        "defenses",
        list[str] | None,
        None,
        "defenses; none given: every registered mitigation defense (with "
        "--grid: the grid's); detectors (strip, spectral, ac) get their own table (AUROC, TPR, F1, time) and "
        "ROC curves",
    ),
    Param("seeds", list[int] | None, None, "defense seeds; none given: 0 (with --grid: the grid's)"),
    Param("option", list[str] | None, None, "defense options KEY=VALUE (all defenses) or DEFENSE.KEY=VALUE"),
    Param("smoke", bool, False, "start every method from its smoke_params (seconds-long runs, for trying things)"),
    Param(
        "name",
        str | None,
        None,
        "output folder record/compare/<name>; none given: the grid's name or the records' names",
    ),
    Param("record_root", str, "record", "folder of the records"),
    Param("data_root", str | None, None, "folder holding the datasets; none given: ./data (never a record's own)"),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N, for every run"),
    Param(
        "jobs",
        int,
        1,
        "parallel runs on this machine (worker processes; one GPU each when there are GPUs)",
        check=cfg.positive,
    ),
    Param("executor", Literal["local", "ray"], "local", "local (this machine) or ray"),
    Param("ray_address", str | None, None, "Ray cluster address; none given: start a local instance"),
    Param("cpus_per_run", float, 1.0, "Ray: CPUs each run asks for", check=cfg.positive),
    Param(
        "gpus_per_run",
        float | None,
        None,
        "Ray: GPUs each run asks for; none given: 1 when the cluster has GPUs",
        check=cfg.non_negative,
    ),
    Param(
        "retries",
        int,
        1,
        "Ray: times a run lost with its worker or node is run again (resuming from its "
        "checkpoint); a run that raises is not retried",
        check=cfg.non_negative,
    ),
    Param(
        "ray_code",
        Literal["installed", "working_dir"],
        "installed",
        "Ray: the code the nodes run: installed (each node's install, checked to be the driver's version) or "
        "working_dir (this checkout, shipped to every node by Ray)",
    ),
    Param(
        "rows",
        Literal["defenses", "records"],
        "defenses",
        "layout of the printed table: a row per defense, or a row per record (both are written)",
    ),
    Param("html", bool, False, "also write index.html: the table and the plots in one page"),
    Param("plots", bool, True, "write the plots"),
    Param("quiet", bool, False, "no progress bar: log lines only"),
    Param("overwrite", bool, False, "re-run runs whose result exists with a different config"),
    Param(
        "resume",
        bool,
        False,
        "continue the runs an earlier comparison left unfinished (killed, Ctrl-C) from "
        "their checkpoints; a checkpoint made with other settings fails its run",
    ),
    Param(
        "table_only", bool, False, "run nothing: write the table of the results that exist (the rest show as 'not run')"
    ),
    Param(
        "recipes",
        Literal["reference", "tuned"],
        "reference",
        "recipe family of every defense: reference (config/defense/<name>/<dataset>.yaml) or tuned "
        "(record/<record>/tune/<name>/recipe.yaml, written by python -m defense tune)",
    ),
    Param("debug", bool, False, "show tracebacks"),
]

# -- the command ----------------------------------------------------------------------------------


def run(
    argv: Sequence[str] | None = None,
    *,
    attack_fn: Callable[..., Any] | None = None,
    defense_fn: Callable[..., Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Compare; returns the table as a dict (table.json's content, plus ``markdown`` and
    ``outputs``). ``attack_fn(name, **kw)`` and ``defense_fn(name, **kw)`` replace
    ``attack.run`` and ``defense.run`` (tests); they must be picklable for ``--jobs`` > 1
    and Ray."""
    return entry(lambda args, kw: _compare(args, kw, attack_fn, defense_fn), argv, overrides)


def main() -> None:
    result = run()
    sys.stdout.write(result["terminal"])
    sys.exit(1 if result["failed"] else 0)


def resolve(argv: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    prog = "python -m bench" if _invocation() == "python -m bench" else "defense/compare.py"
    parser = cfg.build_parser(prog, PARAMS, (__doc__ or "").strip().split("\n")[0])
    cli = cfg.parse_cli(parser, argv)
    values = cfg.resolve(PARAMS, [cfg.Layer("keyword arguments", overrides)], cli)
    if (values["grid"] is None) == (values["result_file"] is None):
        raise UserError("give either --result_file RECORD [RECORD ...] or --grid FILE")
    if values["seeds"] is not None and any(s < 0 for s in values["seeds"]):
        raise UserError(f"--seeds must be >= 0, got {values['seeds']}")
    if values["executor"] == "ray" and values["jobs"] != 1:
        raise UserError(
            "--jobs is for the local executor; with --executor ray, Ray runs as many runs at once as "
            "the cluster's resources allow (--cpus_per_run, --gpus_per_run)"
        )
    return values


def _compare(
    argv: Sequence[str],
    overrides: dict[str, Any],
    attack_fn: Callable[..., Any] | None,
    defense_fn: Callable[..., Any] | None,
) -> dict[str, Any]:
    values = resolve(argv, overrides)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return _main(values, attack_fn, defense_fn)
    finally:
        log.removeHandler(handler)


def _main(
    values: dict[str, Any], attack_fn: Callable[..., Any] | None, defense_fn: Callable[..., Any] | None
) -> dict[str, Any]:
    import attack
    import defense

    root = Path(values["record_root"]).resolve()
    spec = load_grid(Path(values["grid"]), values) if values["grid"] else spec_from_records(values)
    if values["name"] is not None:
        spec.name = values["name"]
    elif values["recipes"] == "tuned":
        spec.name += "_tuned"
    out_dir = inside_root(root, record_dir(root / "compare", spec.name))  # checked before anything runs
    runs = plan(spec, values, root, inside_root(root, out_dir / "logs"))
    for run in runs:
        if run.log is not None:
            inside_root(root, run.log)
    todo = [r for r in runs if r.status == "todo"]
    counts = {s: sum(r.status == s for r in runs) for s in ("reused", "mismatch", "blocked", "failed", "unavailable")}
    log.info(
        "compare %s: %d runs: %d to run, %d reused%s",
        spec.name,
        len(runs),
        len(todo),
        counts["reused"],
        "".join(f", {n} {s}" for s, n in counts.items() if n and s != "reused"),
    )

    if todo and values["table_only"]:
        log.info("--table_only: %d runs not run", len(todo))
    elif todo:
        on_ray = values["executor"] == "ray"
        executor = make_executor(
            values["executor"],
            jobs=values["jobs"],
            gpus=_local_gpus(values),
            ray_address=values["ray_address"],
            retries=values["retries"],
            runtime_env=cluster.runtime_env(values["ray_code"]) if on_ray else None,
        )
        progress = None
        try:
            if on_ray:  # shared record root, datasets and code on every node, before anything runs
                nodes = cluster.check_nodes(executor, root, datasets_needed(todo), values["ray_code"])
                log.info("Ray: %d node(s) see the record root %s and the datasets", nodes, root)
            gpus = values["gpus_per_run"]
            if gpus is None:
                gpus = 1.0 if on_ray and values["device"] != "cpu" and executor.cluster_gpus() > 0 else 0.0  # type: ignore[attr-defined]
            default = Resources(values["cpus_per_run"], gpus)
            for run in todo:
                run.resources = replace(default, **spec.resources.get(run.method, {}))
                if values["resume"]:  # the harness's --resume: from the checkpoint in its staging folder, if any
                    run.options = {**run.options, "resume": True}
            functions = {"attack": attack_fn or attack.run, "defense": defense_fn or defense.run}
            progress = Progress(len(todo), values["quiet"], log.info)
            execute(runs, executor, functions, default, progress.finished)
        except BaseException:
            if progress is not None:
                progress.close()
            executor.close(cancel=True)
            raise
        progress.close()
        executor.close()

    _fill_missing_baselines(runs)
    found = backdoorbench_runs(spec, root, runs)
    names = list(dict.fromkeys(r.method for r in found))
    # training-time defenses end with a model, as mitigations do: the same table (Time includes the training)
    detectors = [d for d in spec.defenses if defense.DEFENSES.get(d).kind not in ("mitigation", "training_time")]
    mitigations = [d for d in spec.defenses if d not in detectors]
    table = aggregate(
        spec.name,
        columns_of(spec),
        [*mitigations, *names],
        spec.seeds,
        [r for r in [*runs, *found] if r.method not in detectors],
    )
    table.purpose = spec.purpose
    detection = detection_table(columns_of(spec), detectors, runs) if detectors else None
    return write_outputs(table, out_dir, values, detection)


BACKDOORBENCH_MARK = " (BackdoorBench)"


def backdoorbench_runs(spec: Spec, root: Path, runs: Sequence[Run]) -> list[Run]:
    """BackdoorBench's own results found in the compared records' ``defense/`` folders,
    as finished runs named "<folder> (BackdoorBench)", with the DER against the
    record's "no defense" numbers where those are known."""
    from utils.backdoorbench import defense_results
    from utils.metrics import der

    out = []
    for rec in spec.records:
        folder = record_dir(root, rec.record_name)
        base = next((r for r in runs if r.side == "attack" and r.record == rec.record_name), None)
        before = (base.summary or {}) if base is not None else {}
        for name, after in defense_results(folder):
            numbers = [before.get("asr"), after["asr"], before.get("clean_acc"), after["clean_acc"]]
            known = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
            summary = {"after": after, "der": der(*numbers) if known else None, "device": "BackdoorBench"}
            out.append(
                Run(
                    "defense",
                    rec.record_name,
                    name + BACKDOORBENCH_MARK,
                    0,
                    {},
                    folder / "defense" / name,
                    status="reused",
                    summary=summary,
                )
            )
    return out


RECIPE_LINES = {
    "reference": "Recipes: reference, for every defense (config/defense/<name>/<dataset>.yaml: BackdoorBench's values "
    "or the paper's).",
    "tuned": "Recipes: tuned, for every defense (record/<record>/tune/<name>/recipe.yaml, else the shipped "
    "config/defense/<name>/<dataset>_tuned.yaml: chosen by python -m defense tune on a validation split; a "
    "defense without one is reported, not run).",
}


def recipe_line(family: str, runs: Sequence[Run]) -> str:
    """The table's recipe line: the family asked for, and, for the reference family, the
    defenses whose shipped yaml says otherwise (``recipe: tuned``, e.g. a small dataset's
    recipe adapted by hand), read from the recipe metadata of each finished run's yaml."""
    if family != "reference":
        return RECIPE_LINES[family]
    config_dir = cfg.CONFIG_DIR.resolve()
    said: dict[str, set[str]] = {}
    for run in runs:
        path = ((run.summary or {}).get("config") or {}).get("yaml_path") if run.side == "defense" else None
        if not isinstance(path, str):
            continue
        file = (config_dir.parent / path).resolve()
        if not file.is_relative_to(config_dir) or not file.is_file():  # a result's own claim: only shipped yamls
            continue
        try:
            recipe = cfg.recipe_of(cfg.read_yaml(file), path).get("recipe", "unstated")
        except UserError:
            recipe = "unstated"
        if recipe != "reference":
            said.setdefault(recipe, set()).add(run.method)
    if not said:
        return RECIPE_LINES[family]
    exceptions = "; ".join(
        f"{', '.join(sorted(names))} ({kind}: see the yaml's recipe_note)" for kind, names in sorted(said.items())
    )
    return f"{RECIPE_LINES[family]} Except where the shipped yaml says otherwise: {exceptions}."


def write_outputs(
    table: Table, out_dir: Path, values: dict[str, Any], detection: Table | None = None
) -> dict[str, Any]:
    """The tables (mitigation defenses; detectors, when any, in their own table after it:
    ``detection`` of :func:`bench.tables.detection_table`), their files and plots."""
    family = values.get("recipes", "reference")
    after = "" if detection is None else "\n" + detection_markdown(detection) + "\n"
    recipes = recipe_line(family, table.runs)
    texts = {rows: markdown(table, rows) + "\n" + recipes + "\n" + after for rows in ("defenses", "records")}
    data = {**to_json(table), "recipes": family}
    if detection is not None:
        data["detection"] = detection_json(detection)
    save_text(texts["defenses"], out_dir / "table.md")
    save_text(texts["records"], out_dir / "table_by_record.md")
    save_text(to_csv(table), out_dir / "table.csv")
    save_json(data, out_dir / "table.json")
    outputs = [out_dir / n for n in ("table.md", "table_by_record.md", "table.csv", "table.json")]
    plots: list[tuple[str, Path]] = []
    if values["plots"] or values["html"]:
        from bench.page import make_plots

        plots = make_plots(table, out_dir, detection)
        outputs += [p for _, p in plots]
    if values["html"]:
        from bench.page import html_page

        import html

        line = f'<p id="recipes">{html.escape(recipe_line(family, table.runs))}</p>'
        page = html_page(
            table, plots, about(values), links=[p.name for p in outputs if p.suffix != ".png"], detection=detection
        )
        page = page.replace("</h1>", "</h1>" + line, 1)
        save_text(page, out_dir / "index.html")
        outputs.append(out_dir / "index.html")
    log.info("written to %s", out_dir)
    shown = out_dir / ("table.md" if values["rows"] == "defenses" else "table_by_record.md")
    terminal = (
        terminal_table(table, values["rows"])
        + ("" if detection is None else "\n" + terminal_table(detection))
        + f"\nThe full table (markdown): {shown}\n"
    )
    failed = len(table.failed) + (0 if detection is None else len(detection.failed))  # detectors' failures too
    return {
        **data,
        "markdown": texts[values["rows"]],
        "terminal": terminal,
        "failed": failed,
        "outputs": [str(p) for p in outputs],
    }


def _invocation() -> str | None:
    """How the command was started: ``python -m bench``, ``python defense/compare.py``, or
    None (from Python)."""
    return {"compare.py": "python defense/compare.py", "__main__.py": "python -m bench"}.get(Path(sys.argv[0]).name)


def about(values: dict[str, Any]) -> list[tuple[str, str]]:
    """What the HTML page says of how it was made: the command, the config, the date and
    the machine."""
    import datetime
    import os
    import platform

    script = _invocation()
    command = f"{script} {' '.join(sys.argv[1:])}" if script is not None else "bench.compare.run(...) from Python"
    config = f"grid {values['grid']}" if values.get("grid") else "records " + " ".join(values.get("result_file") or [])
    options = {
        k: v
        for k, v in values.items()
        if k in ("seeds", "defenses", "smoke", "recipes", "device", "option") and v not in (None, False, [])
    }
    if options:
        config += "; " + ", ".join(f"{k}={v}" for k, v in options.items())
    machine = (
        f"{platform.node() or '?'} ({platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()})"
    )
    return [
        ("command", command),
        ("config", config),
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("machine", machine),
    ]


def _data_root(values: dict[str, Any]) -> str | None:
    """The data root every run is given, absolute (worker processes and Ray tasks may start
    elsewhere): --data_root, else ./data when it exists here; None: each run's own ./data
    (where it starts), as the harnesses' default."""
    if values["data_root"] is not None:
        return str(Path(values["data_root"]).resolve())
    default = Path("data").resolve()
    return str(default) if default.is_dir() else None


def datasets_needed(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(dataset, data root) of each run: an attack's own, a defense's from its record
    (the attack it waits for, or the record's attack_summary.json); a run without a data
    root reads ./data where it runs ("data")."""
    out = set()
    for run in runs:
        base = run if run.side == "attack" else run.depends_on
        dataset = None if base is None else base.options.get("dataset") or (base.summary or {}).get("dataset")
        if isinstance(dataset, str):
            out.add((dataset, str(run.options.get("data_root") or "data")))
    return sorted(out)


def _local_gpus(values: dict[str, Any]) -> list[int]:
    """GPU indices for the local pool's workers: every visible GPU, unless the runs are
    on the CPU or on one named GPU."""
    if values["executor"] != "local" or values["jobs"] == 1 or values["device"] not in ("auto", "cuda"):
        return []
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _fill_missing_baselines(runs: list[Run]) -> None:
    """A record without attack_summary.json: its "no defense" numbers from the "before"
    of a finished defense run on it."""
    for run in runs:
        if run.side == "attack" and run.status == "reused" and run.summary is None:
            for other in runs:
                if (
                    other.side == "defense"
                    and other.record == run.record
                    and other.ok
                    and (other.summary or {}).get("before")
                ):  # a detector's summary has none
                    before = (other.summary or {}).get("before") or {}
                    run.summary = {**before, "device": other.summary.get("device")}
                    break


# -- the plan: what exists, what to run ---------------------------------------------------------------


def plan(spec: Spec, values: dict[str, Any], root: Path, logs: Path) -> list[Run]:
    """One attack run per record (reused, mismatched or to run) and one defense run per
    (record, defense, seed), each checked against what already exists."""
    runs: list[Run] = []
    data_root = _data_root(values)
    for rec in spec.records:
        folder = record_dir(root, rec.record_name)
        base = (
            _attack_run(rec, folder, values, root, data_root, logs)
            if rec.attack is not None
            else _existing_record(rec, folder, values, root)
        )
        if rec.seed is not None:
            base.seed, base.column = rec.seed, rec.column
        runs.append(base)
        for defense_name, options in spec.defenses.items():
            resolved: dict[str, Any] = {}
            for seed in spec.seeds if rec.seed is None else [rec.seed]:
                runs.append(_defense_run(base, defense_name, options, seed, values, root, data_root, logs, resolved))
    return runs


def _existing_record(rec: RecordSpec, folder: Path, values: dict[str, Any], root: Path) -> Run:
    record = load_record(folder)  # one line naming what is wrong, listing the records there
    run = Run(
        "attack",
        rec.record_name,
        record.attack,
        0,
        {},
        folder,
        None,
        "reused",
        identity=record.identity,
        legacy=record.legacy,
        dataset=record.clean_data,
    )
    problem = _baseline(run, folder)
    if problem is not None:
        run.status, run.message = "mismatch", problem
    return run


def _baseline(run: Run, folder: Path) -> str | None:
    """Set ``run.summary`` from the record's attack_summary.json when it names the record
    in place (``run.identity``), or names none beside a record as old as it
    (``run.legacy``); a summary without an identity beside a newer record is left out (the
    "no defense" numbers then come from a defense's "before"); returns the problem of a
    summary made on another record."""
    summary = read_json(folder / "attack_summary.json")
    if summary is None:
        return None
    if "record_identity" not in summary and not run.legacy:
        log.info("%s: attack_summary.json names no record identity: its numbers are not used", folder)
        return None
    problem = identity_problem(summary, run.identity, run.legacy)
    if problem is None:
        run.summary = summary
        return None
    return f"attack_summary.json is {problem}"


def _attack_run(
    rec: RecordSpec, folder: Path, values: dict[str, Any], root: Path, data_root: str | None, logs: Path
) -> Run:
    from attack.base import CONTROL_KEYS as ATTACK_CONTROLS, resolve_config as resolve_attack

    # Absolute paths: worker processes and Ray tasks may start elsewhere.
    options = {**rec.options, "record_root": str(root), "device": values["device"]}
    if data_root is not None:
        options["data_root"] = data_root
    run = Run(
        "attack",
        rec.record_name,
        rec.attack or "",
        0,
        options,
        folder,
        logs / rec.record_name / "attack.log",
        dataset=str(options.get("dataset", "")),
    )
    if not (folder / RECORD_FILE).exists():
        if folder.exists():
            return _mismatch(run, values, f"{folder} exists but holds no {RECORD_FILE}")
        return run
    try:
        record = load_record(folder)
    except UserError as exc:
        return _mismatch(run, values, str(exc))
    requested = cfg.plain(resolve_attack(rec.attack, [], options))
    diff = config_diff(requested, record.config, ATTACK_CONTROLS, defaults=_defaults("attack", rec.attack))
    if diff:
        return _mismatch(run, values, "record config differs: " + "; ".join(diff))
    run.status, run.identity, run.legacy = "reused", record.identity, record.legacy
    problem = _baseline(run, folder)
    if problem is not None:
        return _mismatch(run, values, problem)
    return run


def _defaults(side: str, name: str) -> dict[str, Any]:
    """What a result of method ``name`` made before some of its parameters existed is taken
    to hold for them (:func:`utils.config.absent_defaults`, the harness's common ones included)."""
    if side == "attack":
        from attack import ATTACKS as registry
        from attack.base import COMMON
    else:
        from defense import DEFENSES as registry
        from defense.base import COMMON
    return cfg.absent_defaults((*COMMON, *registry.get(name).params()))


def _mismatch(run: Run, values: dict[str, Any], message: str) -> Run:
    if values["overwrite"]:
        run.options = {**run.options, "overwrite": True}
        return run
    run.status, run.message = "mismatch", f"{message} (not reused; --overwrite re-runs it)"
    return run


def result_name(defense: str, seed: int, recipes: str = "reference") -> str:
    """The seed layout: seed 0 in BackdoorBench's place (``defense/<name>/``), seed k in
    ``defense/<name>_seed<k>/``; tuned recipes in ``defense/<name>_tuned[_seed<k>]/``."""
    stem = defense if recipes == "reference" else f"{defense}_tuned"
    return stem if seed == 0 else f"{stem}_seed{seed}"


def tuned_recipe(root: Path, record: str, defense: str, dataset: str = "") -> tuple[Path | None, str]:
    """The tuned recipe of ``defense`` for ``record``, marked ``recipe: tuned``: the record's
    own study (``record/<record>/tune/<defense>/recipe.yaml``), else the shipped one of its
    ``dataset`` (:func:`utils.config.tuned_yaml`); or None and why not."""
    path = record_dir(root, record) / "tune" / defense / "recipe.yaml"
    if not path.is_file():
        shipped = cfg.tuned_yaml("defense", defense, dataset)
        if shipped is None:
            return None, (
                f"no tuned recipe (python -m defense tune {defense} --result_file {record}; "
                f"none shipped for {dataset or 'its dataset'} either)"
            )
        path = shipped
    elif not path.resolve().is_relative_to(root.resolve()):
        return None, f"no tuned recipe: {path} leads outside {root}"
    try:
        family = cfg.recipe_of(cfg.read_yaml(path), str(path)).get("recipe")
    except UserError as exc:
        return None, f"no tuned recipe: {exc}"
    if family != "tuned":
        return None, f"no tuned recipe: {path} is not marked 'recipe: tuned'"
    return path, ""


def _defense_run(
    base: Run,
    name: str,
    options: dict[str, Any],
    seed: int,
    values: dict[str, Any],
    root: Path,
    data_root: str | None,
    logs: Path,
    resolved: dict[str, Any],
) -> Run:
    """``resolved``: the resolved config of this (record, defense), shared by its seeds:
    resolved once (which checks every option's value before anything runs), then only
    the seed and the result folder change."""
    from defense import DEFENSES
    from defense.base import CONTROL_KEYS as DEFENSE_CONTROLS, resolve_config as resolve_defense

    recipes = values.get("recipes", "reference")
    folder_name = result_name(name, seed, recipes)
    opts = {
        **options,
        "result_file": base.record,
        "record_root": str(root),
        "random_seed": seed,
        "result_name": folder_name,
        "device": values["device"],
    }
    if data_root is not None:
        opts["data_root"] = data_root
    folder = record_dir(root, base.record) / "defense" / folder_name
    run = Run(
        "defense",
        base.record,
        name,
        seed,
        opts,
        folder,
        logs / base.record / f"{folder_name}.log",
        depends_on=base,
        column=base.column,
    )
    if recipes == "tuned":
        if "yaml_path" in options:
            raise UserError(f"defense {name}: 'yaml_path' and --recipes tuned both choose the recipe; give one")
        recipe, why = tuned_recipe(root, base.record, name, base.dataset)
        if recipe is None:
            run.status, run.message = "unavailable", why
            return run
        opts["yaml_path"] = str(recipe)
    if base.status == "todo":
        return run  # a new record: nothing below it yet
    if base.identity is None:
        run.status, run.message = "blocked", f"record {base.record} not usable ({base.status})"
        return run
    if not resolved:
        try:
            config, _ = resolve_defense(name, [], opts)
        except UserError as exc:
            raise UserError(f"defense {name} on {base.record}: {exc}") from None
        resolved.update(cfg.plain({k: v for k, v in config.items() if k != "debug"}))
    if not folder.exists():
        return run
    summary = read_json(folder / "summary.json")
    if summary is None:
        return _mismatch(run, values, f"{folder} holds no readable summary.json")
    requested = {**resolved, "random_seed": seed, "result_name": folder_name}
    problem = identity_problem(summary, base.identity, base.legacy)
    if problem is not None:
        return _mismatch(run, values, problem)
    stored, defaults = summary.get("config") or {}, _defaults("defense", name)
    diff = config_diff(requested, stored, DEFENSE_CONTROLS, defaults=defaults)
    mitigation = DEFENSES.get(name).kind == "mitigation"
    if diff and requested.get("retune") and "retune" not in summary and mitigation:
        if not config_diff({**requested, "retune": False}, stored, DEFENSE_CONTROLS, defaults=defaults):
            return run  # made without --retune: the harness adds the retuning to it (defense.base.add_retune)
    if diff:
        return _mismatch(run, values, "config differs: " + "; ".join(diff))
    run.status, run.summary = "reused", summary
    return run


if __name__ == "__main__":
    # Run as the package's module so that worker processes and Ray find its functions by name.
    from bench.compare import main as _package_main

    _package_main()
