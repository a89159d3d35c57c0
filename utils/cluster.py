"""What a grid on a Ray cluster needs from every node, checked before anything runs, and
the options that say what each run asks of the cluster (docs/cluster.md).

* :func:`check_nodes`: one probe task on every live node (``num_cpus=0``, pinned to the
  node) reads back a token the driver wrote into the record root (the record root must
  be storage every node sees at the same path: defense runs read records another node's
  attack wrote, and the driver reads every result), looks for the grid's datasets
  under the runs' data root (a node without the files would otherwise try to download
  them itself, or fail in the middle of the grid), and reports its code version (with
  ``--ray_code installed`` every node must run the driver's version). The first problem
  is one line (a :class:`UserError`) naming the node, its host and what to do.
* :func:`runtime_env`: ``--ray_code working_dir`` ships the driver's checkout to every
  node (Ray's ``runtime_env`` ``working_dir``, without records, data or git metadata),
  with the driver's code version in the tasks' environment (:mod:`utils.provenance`).
* :func:`parse_resources`: a grid's ``resources:``, what each attack or defense asks for
  (``cpus``, ``gpus``, ``memory``), checked.

Tests only: a node whose environment has ``SAUBENCH_TEST_UNSHARED=<record root>`` looks
for the token of that record root in another folder, as a node that does not see it would.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils.errors import UserError
from utils.provenance import CHECKOUT, CODE_ENV, code_version, describe

TOKEN_PREFIX = ".saubench_shared_"
TEST_UNSHARED_ENV = "SAUBENCH_TEST_UNSHARED"  # tests: this node does not see that record root
DOCS = "docs/cluster.md"
RESOURCE_KEYS = ("cpus", "gpus", "memory")


# -- code shipped to the nodes -----------------------------------------------------------------------------


def runtime_env(code: str) -> dict[str, Any] | None:
    """Ray's runtime_env for ``--ray_code``: ``installed`` (None: each node's installed
    code, checked by :func:`check_nodes`) or ``working_dir`` (this checkout, shipped)."""
    if code == "installed":
        return None
    if code != "working_dir":
        raise UserError(f"--ray_code must be installed or working_dir, got {code!r}")
    if not (CHECKOUT / "setup.cfg").is_file():
        raise UserError(
            f"--ray_code working_dir ships a checkout, but the code runs from {CHECKOUT} (an installed "
            "package): run from a checkout, or use --ray_code installed"
        )
    return {
        "working_dir": str(CHECKOUT),
        "excludes": [".git", "record/", "data/", "**/__pycache__"],
        "env_vars": {CODE_ENV: json.dumps(code_version())},
    }


# -- the probe on each node ----------------------------------------------------------------------------------


def probe(root: str, token_name: str, needs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Runs on one node: the token it reads in ``root`` (None: not there), the datasets of
    ``needs`` ((dataset, data_root) pairs) it does not find, its host and code version."""
    from utils.datasets import dataset_entry, find_files

    where = Path(root)
    if os.environ.get(TEST_UNSHARED_ENV) and Path(os.environ[TEST_UNSHARED_ENV]) == where:
        where = where.with_name(where.name + ".not-shared")  # tests: this node's view of that root differs
    try:
        token: str | None = (where / token_name).read_text(encoding="utf-8")
    except OSError:
        token = None
    missing = []
    for dataset, data_root in needs:
        entry = dataset_entry(dataset)
        if not entry.bundled and find_files(dataset, Path(data_root)) is None:
            missing.append([dataset, data_root, entry.info.files])
    return {"token": token, "missing": missing, "host": socket.gethostname(), "code": code_version()}


def check_nodes(executor: Any, root: Path, needs: Iterable[tuple[str, str]], ray_code: str = "installed") -> int:
    """Run :func:`probe` on every live node of ``executor`` (a RayExecutor) and raise one
    line for the first problem; returns the number of nodes checked."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    token_name = TOKEN_PREFIX + secrets.token_hex(8)
    token = secrets.token_hex(16)
    (root / token_name).write_text(token, encoding="utf-8")
    try:
        answers = executor.on_every_node(probe, (str(root), token_name, sorted(set(needs))))
    finally:
        (root / token_name).unlink(missing_ok=True)
    mine = code_version()
    for node, answer in answers:
        name = f"node {node[:12]} (host {answer['host']})"
        if answer["token"] != token:
            raise UserError(
                f"the record root {root} is not shared storage: {name} cannot read back the file the "
                f"driver wrote there; every node must see the record root at the same path (a shared "
                f"file system such as NFS, mounted alike on every node: {DOCS})"
            )
    for node, answer in answers:
        name = f"node {node[:12]} (host {answer['host']})"
        if answer["missing"]:
            dataset, data_root, files = answer["missing"][0]
            raise UserError(
                f"dataset {dataset} is not on {name}: no {files} under {data_root} (put the files there "
                f"on every node, or keep --data_root on shared storage: {DOCS})"
            )
    if ray_code == "installed":
        for node, answer in answers:
            if not same_code(mine, answer["code"]):
                raise UserError(
                    f"node {node[:12]} (host {answer['host']}) runs {describe(answer['code'])}, the "
                    f"driver {describe(mine)}: install the same version on every node, or pass "
                    f"--ray_code working_dir to ship this checkout ({DOCS})"
                )
    return len(answers)


def same_code(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same package version and, where both know theirs, the same commit."""
    if a.get("package") != b.get("package"):
        return False
    return not (a.get("commit") and b.get("commit")) or a.get("commit") == b.get("commit")


# -- resources per method --------------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(value: Any, where: str) -> int:
    """Bytes from an integer or a text such as ``512M``, ``8G``, ``8GiB``, ``8GB`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = (
        re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if isinstance(value, str)
        else None
    )
    if match is None or float(match.group(1)) <= 0:
        raise UserError(
            f"{where}: memory must be a positive number of bytes or a size such as 512M or 8G, got {value!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_resources(value: Any, methods: Sequence[str], where: str) -> dict[str, dict[str, float | int]]:
    """A grid's ``resources:``: a mapping of attack or defense names (of the grid) to
    ``{cpus, gpus, memory}`` (each optional; cpus > 0, gpus >= 0, memory in bytes or
    with a unit). Returns name -> the keys given, checked."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'resources' must be a mapping of attack or defense names to {{cpus, gpus, memory}}")
    out: dict[str, dict[str, float | int]] = {}
    for name, spec in value.items():
        if name not in methods:
            raise UserError(
                f"{where}: resources: '{name}' is not an attack or defense of the grid ({', '.join(methods)})"
            )
        if not isinstance(spec, dict) or not spec:
            raise UserError(f"{where}: resources: {name} must be a mapping such as {{cpus: 2, gpus: 1, memory: 8G}}")
        unknown = sorted(set(map(str, spec)) - set(RESOURCE_KEYS))
        if unknown:
            raise UserError(f"{where}: resources: {name}: unknown key '{unknown[0]}' (known: cpus, gpus, memory)")
        checked: dict[str, float | int] = {}
        for key in ("cpus", "gpus"):
            if key in spec:
                number = spec[key]
                ok = (
                    isinstance(number, (int, float))
                    and not isinstance(number, bool)
                    and (number > 0 if key == "cpus" else number >= 0)
                )
                if not ok:
                    raise UserError(
                        f"{where}: resources: {name}: {key} must be a number "
                        f"{'> 0' if key == 'cpus' else '>= 0'}, got {number!r}"
                    )
                checked[key] = float(number)
        if "memory" in spec:
            checked["memory"] = parse_memory(spec["memory"], f"{where}: resources: {name}")
        out[str(name)] = checked
    return out
