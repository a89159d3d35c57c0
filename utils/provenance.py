"""Where a result was made: the code version, the host and the Ray node, for every
summary.json (attack_summary.json, a defense's summary.json).

    {"code": {"package": "sau-bench 0.1.0", "commit": "b1aff7e…", "dirty": false},
     "host": "node07", "node": "5f1c…"}        # node: the Ray node id, None outside Ray

* ``package``: the installed distribution's version (``importlib.metadata``), or the
  version in the checkout's setup.cfg when the code runs from a checkout that is not
  installed.
* ``commit`` and ``dirty``: ``git rev-parse HEAD`` and whether tracked files differ from
  it, when the code lives in a git checkout; None otherwise (an installed wheel).
* A copy of the driver's checkout shipped by Ray (``runtime_env`` ``working_dir``, which
  leaves ``.git`` behind) says what the driver said: the driver puts its own code version
  into the environment variable :data:`CODE_ENV` (JSON) of the tasks, and that is used
  when the copy has no git metadata of its own.
"""

from __future__ import annotations

import configparser
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

CODE_ENV = "SAUBENCH_CODE"  # the driver's code version, for copies of its checkout shipped by Ray
DISTRIBUTION = "sau-bench"
CHECKOUT = Path(__file__).resolve().parents[1]  # the folder that holds utils/ (a checkout, or site-packages)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _package_version() -> str | None:
    """The version of the code that is running: setup.cfg's in a checkout, else the installed distribution's."""
    setup = CHECKOUT / "setup.cfg"
    if setup.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(setup, encoding="utf-8")
            return parser.get("metadata", "version", fallback=None)
        except configparser.Error:
            return None
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(DISTRIBUTION)
    except (ImportError, PackageNotFoundError):
        return None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"package": "sau-bench X.Y.Z", "commit": sha or None, "dirty": bool or None}``
    (computed once per process)."""
    version = _package_version()
    code: dict[str, Any] = {"package": f"{DISTRIBUTION} {version}" if version else None, "commit": None, "dirty": None}
    head = _git("rev-parse", "HEAD") if (CHECKOUT / ".git").exists() else None
    if head:
        status = _git("status", "--porcelain", "--untracked-files=no")
        code.update(commit=head.strip(), dirty=None if status is None else bool(status.strip()))
        return code
    shipped = os.environ.get(CODE_ENV)
    if shipped:
        try:
            driver = json.loads(shipped)
        except ValueError:
            driver = None
        if isinstance(driver, dict):
            code.update({k: driver.get(k) for k in ("package", "commit", "dirty")}, shipped_by_driver=True)
    return code


def ray_node_id() -> str | None:
    """The id of the Ray node this process runs on (a Ray task or driver), else None."""
    ray = sys.modules.get("ray")  # never imports Ray: a process that did not is not on a Ray node
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_node_id()
    except Exception:  # an old or partial Ray: the node is unknown, the result still counts
        return None


def provenance() -> dict[str, Any]:
    """The keys every summary.json carries: ``code``, ``host``, ``node``."""
    return {"code": dict(code_version()), "host": socket.gethostname(), "node": ray_node_id()}


def describe(code: dict[str, Any] | None) -> str:
    """One short text of a code version: ``sau-bench 0.1.0 @b1aff7e+dirty``."""
    if not isinstance(code, dict):
        return "?"
    text = str(code.get("package") or "?")
    if code.get("commit"):
        text += f" @{str(code['commit'])[:7]}" + ("+dirty" if code.get("dirty") else "")
    return text
