"""Grids on a Ray cluster (utils.cluster, utils.lease, utils.attempts, utils.provenance):
a two-node Ray cluster on this host (`ray start --head` and a second `ray start
--address`, a private temp dir, ports of their own, a token of their own), a node lost
during a defense run, the shared-storage check; and the pieces without Ray: leases,
resources per method, code versions in the summaries.

The cluster tests are marked ``ray`` and skipped without Ray; every process they start is
ended by its pid (never `ray stop`, which would end other people's Ray on this host)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench import compare
from utils.attempts import attempts_in
from utils.cluster import parse_memory, parse_resources
from utils.errors import UserError
from utils.lease import Lease, LockHeld, inspect, wait_until_free
from utils.files import StagedFolder

ROOT = Path(__file__).resolve().parents[1]


# -- leases --------------------------------------------------------------------------------------------


def test_a_lease_is_refreshed_while_held_and_an_expired_one_is_taken_over(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAUBENCH_LEASE_SECONDS", "0.4")  # heartbeat every 0.1 s
    lock = tmp_path / ".run.lock"
    lease = Lease(lock)
    lease.acquire(tmp_path / "run")
    old = time.time() - 100
    os.utime(lock, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.stat().st_mtime < 0.4  # the heartbeat touched it
    lease.release()
    assert not lock.exists()

    lock.write_text(f"{os.getppid()} another-host\n")  # another host's run, heartbeat fresh: binds
    with pytest.raises(LockHeld) as held:
        StagedFolder(tmp_path / "run").open()
    assert held.value.lock == lock and f"remove {lock} if that run is gone" in str(held.value)
    assert (
        inspect(lock).remote
        and wait_until_free(lock, timeout=0.1, poll=0.05) == f"process {os.getppid()} on host another-host"
    )
    old = time.time() - 1
    os.utime(lock, (old, old))  # its node was lost: no heartbeat for longer than the lease
    assert wait_until_free(lock, timeout=0.1, poll=0.05) is None
    with caplog.at_level(logging.WARNING, logger="saubench"):
        folder = StagedFolder(tmp_path / "run")
        folder.open()
    assert (
        f"taking over the lock {lock}: the lease of process {os.getppid()} on host another-host expired" in caplog.text
    )
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    folder.discard()
    assert not lock.exists()


def test_the_table_note_names_the_full_path_of_a_lock_that_binds(record_root, monkeypatch):
    monkeypatch.setenv("SAUBENCH_LEASE_SECONDS", "3600")
    lock = record_root / "badnet_digits" / "defense" / ".ft_seed1.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("4242 a-host-far-away-with-a-long-name-" + "x" * 120 + "\n")
    result = compare.run(
        result_file=["badnet_digits"],
        record_root=str(record_root),
        device="cpu",
        smoke=True,
        plots=False,
        quiet=True,
        defenses=["ft"],
        seeds=[1],
    )
    note = next(n for n in result["notes"] if "ft on badnet_digits (seed 1): failed" in n)
    assert f"remove {lock} if that run is gone" in note and len(note) > 300  # not cut


# -- resources per method and what made a result ---------------------------------------------------------------


def test_grid_resources_per_method_are_checked():
    assert parse_resources(
        {"nc": {"cpus": 2, "gpus": 1, "memory": "8G"}, "badnet": {"memory": 1000}}, ["badnet", "nc", "ft"], "g.yaml"
    ) == {"nc": {"cpus": 2.0, "gpus": 1.0, "memory": 8 * 1024**3}, "badnet": {"memory": 1000}}
    assert parse_memory("512MiB", "x") == 512 * 1024**2 and parse_memory("1.5g", "x") == int(1.5 * 1024**3)
    bad = [
        ({"sau": {"cpus": 1}}, "'sau' is not an attack or defense of the grid"),
        ({"nc": {"cpu": 1}}, "unknown key 'cpu'"),
        ({"nc": {"cpus": 0}}, "cpus must be a number > 0"),
        ({"nc": {"gpus": -1}}, "gpus must be a number >= 0"),
        ({"nc": {"memory": "lots"}}, "memory must be"),
        ({"nc": 2}, "must be a mapping"),
        ([1], "'resources' must be a mapping"),
    ]
    for value, message in bad:
        with pytest.raises(UserError, match=message):
            parse_resources(value, ["badnet", "nc", "ft"], "g.yaml")


def test_grid_resources_reach_each_run(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "datasets: [digits]\nattacks: [badnet]\ndefenses: [ft, fp]\n"
        "resources:\n  fp: {cpus: 2, memory: 1G}\n  badnet: {gpus: 0.5}\n"
    )
    values = compare.resolve(["--grid", str(grid)], {})
    spec = compare.load_grid(grid, values)
    assert spec.resources == {"fp": {"cpus": 2.0, "memory": 1024**3}, "badnet": {"gpus": 0.5}}
    grid.write_text("datasets: [digits]\nattacks: [badnet]\ndefenses: [ft]\nresources: {nc: {cpus: 2}}\n")
    with pytest.raises(UserError, match=r"grid.yaml: resources: 'nc' is not an attack or defense of the grid"):
        compare.load_grid(grid, values)


def test_every_summary_names_code_version_host_and_node(record_root):
    result = compare.run(
        result_file=["badnet_digits"],
        record_root=str(record_root),
        device="cpu",
        smoke=True,
        plots=False,
        quiet=True,
        defenses=["ft"],
    )
    summary = json.loads((record_root / "badnet_digits/defense/ft/summary.json").read_text())
    code = summary["code"]
    assert code["package"].startswith("sau-bench ") and len(code["commit"]) == 40 and isinstance(code["dirty"], bool)
    assert summary["host"] == socket.gethostname() and summary["node"] is None  # not on Ray
    attack = json.loads((record_root / "badnet_digits/attack_summary.json").read_text())
    assert {"code", "host", "node"} <= set(attack)
    row = next(r for r in result["rows"] if r["defense"] == "ft")
    assert row["code"] == f"{code['package']} @{code['commit'][:7]}" + ("+dirty" if code["dirty"] else "")
    assert row["host"] == socket.gethostname() and row["node"] is None
    assert "code,host,node" in (record_root / "compare/badnet_digits/table.csv").read_text().splitlines()[0]


# -- the checks on every node, with the nodes played by this process ------------------------------------------------


class Nodes:
    """RayExecutor.on_every_node's stand-in: ``fn`` called here once per pretended node,
    with the environment that node has."""

    def __init__(self, envs: dict[str, dict[str, str]]):
        self.envs = envs

    def on_every_node(self, fn, args):
        out = []
        for node, env in self.envs.items():
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                out.append((node, fn(*args)))
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return out


def test_each_node_must_see_the_record_root_the_datasets_and_the_code(tmp_path, monkeypatch):
    from utils import cluster, provenance

    root = tmp_path / "record"
    assert cluster.check_nodes(Nodes({"a" * 56: {}, "b" * 56: {}}), root, [("digits", "data")]) == 2
    assert not list(root.iterdir())  # the token is removed
    with pytest.raises(UserError, match=rf"^the record root {root} is not shared storage: node bbbbbbbbbbbb \(host "):
        cluster.check_nodes(Nodes({"a" * 56: {}, "b" * 56: {"SAUBENCH_TEST_UNSHARED": str(root)}}), root, [])
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(
        UserError,
        match=rf"^dataset mnist is not on node aaaaaaaaaaaa \(host .*\): no .* under "
        rf"{empty} \(put the files there on every node",
    ):
        cluster.check_nodes(Nodes({"a" * 56: {}}), root, [("mnist", str(empty))])
    other = {"package": "sau-bench 0.0.9", "commit": None, "dirty": None}
    real = cluster.probe
    monkeypatch.setattr(cluster, "probe", lambda *a: {**real(*a), "code": other})
    with pytest.raises(
        UserError,
        match=r"runs sau-bench 0.0.9, the driver sau-bench .*: install the same version on "
        r"every node, or pass --ray_code working_dir",
    ):
        cluster.check_nodes(Nodes({"a" * 56: {}}), root, [])
    assert cluster.check_nodes(Nodes({"a" * 56: {}}), root, [], ray_code="working_dir") == 1
    # a checkout shipped by Ray (no .git) names the driver's version, which the driver put in the environment
    env = cluster.runtime_env("working_dir")
    assert env["working_dir"] == str(ROOT) and ".git" in env["excludes"] and cluster.runtime_env("installed") is None
    shipped = tmp_path / "copy"
    shipped.mkdir()
    monkeypatch.setattr(provenance, "CHECKOUT", shipped)
    monkeypatch.setenv(provenance.CODE_ENV, env["env_vars"][provenance.CODE_ENV])
    provenance.code_version.cache_clear()
    try:
        code = provenance.code_version()
    finally:
        provenance.code_version.cache_clear()
    assert code["shipped_by_driver"] and code["commit"] == json.loads(env["env_vars"][provenance.CODE_ENV])["commit"]


def test_a_failure_names_its_log_only_when_the_log_exists(tmp_path):
    from bench.jobs import Run
    from bench.tables import aggregate, notes_of

    lost = Run(
        "defense",
        "r1",
        "ft",
        0,
        log=tmp_path / "never-written.log",
        status="failed",
        message="Ray: The worker died unexpectedly (tried 2 times)",
    )
    ran = Run("defense", "r1", "ft", 1, log=tmp_path / "ft_seed1.log", status="failed", message="ValueError: x")
    ran.log.write_text("Traceback ...\n")
    notes = notes_of(aggregate("t", ["r1"], ["ft"], [0, 1], [lost, ran]))
    assert notes == [
        "ft on r1 (seed 0): failed: Ray: The worker died unexpectedly (tried 2 times)",
        f"ft on r1 (seed 1): failed: ValueError: x (log: {ran.log})",
    ]


# -- a two-node Ray cluster on this host -----------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out[int(entry)] = (ppid, cmd)
    return out


def _kill_tree(*marks: str) -> list[int]:
    """SIGKILL, by pid, every process whose command line holds one of ``marks`` and its descendants."""
    procs = _processes()
    chosen = {pid for pid, (_, cmd) in procs.items() if pid != os.getpid() and any(m in cmd for m in marks)}
    grown = True
    while grown:
        grown = False
        for pid, (ppid, _) in procs.items():
            if ppid in chosen and pid not in chosen and pid != os.getpid():
                chosen.add(pid)
                grown = True
    for pid in chosen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(chosen)


class Cluster:
    """Two Ray nodes on this host: the head (1 CPU) and node B (1 CPU), which does not
    see the record root ``hidden`` (utils.cluster's test hook)."""

    def __init__(self, hidden: Path):
        pytest.importorskip("ray")
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
        ports = _free_ports(32)  # all at once: distinct
        self.port, self.b_manager_port = ports[0], ports[8]
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            # a lost node is noticed in about a second
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "500",
            "SAUBENCH_NO_PROGRESS": "1",
        }
        common = ["--num-cpus", "1", "--disable-usage-stats", "--object-store-memory", str(80 * 1024**2)]
        head = [
            "--head",
            "--port",
            str(self.port),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(ports[1]),
            "--temp-dir",
            str(self.temp),
            "--node-manager-port",
            str(ports[2]),
            "--object-manager-port",
            str(ports[3]),
            "--runtime-env-agent-port",
            str(ports[4]),
            "--metrics-export-port",
            str(ports[5]),
            "--dashboard-agent-listen-port",
            str(ports[6]),
            "--dashboard-agent-grpc-port",
            str(ports[7]),
            "--worker-port-list",
            ",".join(map(str, ports[16:24])),
        ]
        node_b = [
            "--address",
            self.address,
            "--node-manager-port",
            str(ports[8]),
            "--object-manager-port",
            str(ports[9]),
            "--runtime-env-agent-port",
            str(ports[10]),
            "--metrics-export-port",
            str(ports[11]),
            "--dashboard-agent-listen-port",
            str(ports[12]),
            "--dashboard-agent-grpc-port",
            str(ports[13]),
            "--worker-port-list",
            ",".join(map(str, ports[24:32])),
        ]
        try:
            self._start(head + common, self.env)
            self._start(node_b + common, {**self.env, "SAUBENCH_TEST_UNSHARED": str(hidden)})
        except BaseException:
            self.stop()
            raise
        self.b_node = self._node_id(self.b_manager_port)

    def _start(self, args: list[str], env: dict[str, str]) -> None:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode != 0:
            pytest.fail(f"ray start failed: {proc.stderr[-2000:]}")

    def _node_id(self, manager_port: int) -> str:
        for _, cmd in _processes().values():
            if "raylet/raylet" in cmd and f"--node_manager_port={manager_port} " in cmd:
                return cmd.split("--node_id=", 1)[1].split()[0]
        raise AssertionError(f"no raylet with node manager port {manager_port}")

    def kill_node_b(self) -> list[int]:
        """End node B's raylet and its workers (and its agents) by pid: the node is lost."""
        return _kill_tree(f"--node_id={self.b_node}", f"--node-id={self.b_node}")

    def stop(self) -> None:
        _kill_tree(str(self.temp), f":{self.port} ", f":{self.port}\0")
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    hidden = tmp_path_factory.mktemp("hidden") / "record"
    c = Cluster(hidden)
    c.hidden = hidden
    yield c
    import ray

    if ray.is_initialized():
        ray.shutdown()
    c.stop()


def _compare_cli(cluster: Cluster, grid: Path, root: Path, *extra: str) -> subprocess.Popen:
    """defense/compare.py on the cluster, in a process of its own (Ray reads its token from
    the environment when it is first imported)."""
    return subprocess.Popen(
        [
            sys.executable,
            "defense/compare.py",
            "--grid",
            str(grid),
            "--record_root",
            str(root),
            "--device",
            "cpu",
            "--no-plots",
            "--quiet",
            "--executor",
            "ray",
            "--ray_address",
            cluster.address,
            *extra,
        ],
        cwd=ROOT,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


CLUSTER_GRID = """
datasets: [digits]
attack_options: {epochs: 2}
attacks: [badnet]
defenses:
  ft: {epochs: 20, eval_every: 1, save_every: 1}
seeds: [0, 1]
resources:
  ft: {cpus: 1, memory: 64M}
"""


@pytest.mark.ray  # first: the next test loses node B
@pytest.mark.xdist_group("ray_cluster")
def test_a_node_that_cannot_see_the_record_root_stops_the_grid_with_one_line(cluster, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(CLUSTER_GRID)
    proc = _compare_cli(cluster, grid, cluster.hidden)
    out, err = proc.communicate(timeout=240)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and out == "" and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(
        f"error: the record root {cluster.hidden} is not shared storage: node "
        f"{cluster.b_node[:12]} (host {socket.gethostname()}) cannot read back"
    )
    assert "docs/cluster.md" in lines[0]
    assert not (cluster.hidden / "badnet_digits").exists()  # nothing ran


@pytest.mark.ray
@pytest.mark.xdist_group("ray_cluster")
def test_a_lost_node_costs_a_retry_that_resumes_on_the_other_node(cluster, tmp_path):
    root = tmp_path / "record"
    grid = tmp_path / "grid.yaml"
    grid.write_text(CLUSTER_GRID)
    proc = _compare_cli(cluster, grid, root, "--retries", "1")
    logs = root / "compare" / "grid" / "logs" / "badnet_digits"
    killed, deadline = None, time.monotonic() + 600  # a loaded CI machine starts Ray slowly
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for name in ("ft", "ft_seed1"):
            first = attempts_in(logs / f"{name}.log")
            checkpoint = root / "badnet_digits" / "defense" / f".{name}.partial" / "checkpoint.pt"
            if first and first[0]["node"] == cluster.b_node and checkpoint.is_file():
                assert cluster.kill_node_b(), "node B's processes were not found"
                killed = name
                break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=240)
    assert killed is not None, f"no defense run was seen on node B with a checkpoint: {err[-3000:]}"
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((root / "compare" / "grid" / "table.json").read_text())
    assert [r["status"] for r in result["runs"]] == ["done", "done", "done"]
    tries = attempts_in(logs / f"{killed}.log")
    assert [t["number"] for t in tries] == [1, 2] and tries[0]["node"] == cluster.b_node != tries[1]["node"]
    log = (logs / f"{killed}.log").read_text()
    assert "resuming after epoch" in log and "a retry: resuming" in log
    summary = json.loads((root / "badnet_digits" / "defense" / killed / "summary.json").read_text())
    assert summary["node"] == tries[1]["node"] and summary["host"] == socket.gethostname()
    assert summary["code"]["package"].startswith("sau-bench")
    ft_row = next(r for r in result["rows"] if r["defense"] == "ft")
    assert ft_row["n"] == 2 and tries[1]["node"][:12] in ft_row["node"].split(";")
    # one short line per finished run, with its host and node, on the driver's stderr
    seed = 1 if killed == "ft_seed1" else 0
    line = next(x for x in err.splitlines() if f"ft on badnet_digits (seed {seed}): done (in " in x)
    assert line.endswith(f" s on {socket.gethostname()}, node {tries[1]['node'][:8]})")


@pytest.mark.ray
def test_ray_code_working_dir_ships_this_checkout_with_its_version(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    from utils.cluster import runtime_env
    from bench.executors import RayExecutor
    from utils.provenance import code_version

    with RayExecutor(None, 1, runtime_env=runtime_env("working_dir")) as ex:
        ((node, shipped),) = ex.on_every_node(code_version)
    assert shipped["shipped_by_driver"] and {k: shipped[k] for k in ("package", "commit", "dirty")} == code_version()


def test_compare_resume_continues_a_run_left_unfinished(record_root, monkeypatch):
    import defense
    import utils.train

    real = utils.train.Checkpoint.save

    def save_then_interrupt(self, epoch, **extra):
        real(self, epoch, **extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.train.Checkpoint, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):  # a comparison's run, killed after its first epoch
        defense.run("ft", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2)
    monkeypatch.setattr(utils.train.Checkpoint, "save", real)
    result = compare.run(
        result_file=["badnet_digits"],
        record_root=str(record_root),
        device="cpu",
        smoke=True,
        plots=False,
        quiet=True,
        defenses=["ft"],
        resume=True,
    )
    assert [r["status"] for r in result["runs"]] == ["reused", "done"]
    log = (record_root / "compare/badnet_digits/logs/badnet_digits/ft.log").read_text()
    assert "resuming after epoch 0" in log
