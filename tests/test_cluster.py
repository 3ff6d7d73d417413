"""The deployment recipes in cluster/.

Run for real, on loopback: a ``dask scheduler`` and two ``dask worker`` processes driven by
``dmix fit --scheduler`` (cluster/README.md, cluster/hosts.sh), and the SLURM driver script
cluster/slurm/run_on_cluster.py with its LocalCluster stand-in (a fit cut short, then
``dmix resume`` on a new cluster). Both must give the model an in-process fit gives.

Checked for syntax only, as there is no SLURM or Kubernetes here: every YAML file parses (the
DaskJob manifest and the dask-jobqueue config also against the keys those projects define),
every ``dmix ...`` command line in cluster/ parses with dmix's own argument parser, every
``dask scheduler``/``dask worker`` line with distributed's, and the shell scripts with
``bash -n``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from dask.utils import parse_bytes
from distributed import Client, LocalCluster

import dmix
from dmix.cli import build_parser, main
from dmix.io.store import read_model

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"

# Overlapping components (separation 0.3 sd), so that EM runs for a dozen iterations.
N, D, K, DATA_SEED, SEPARATION = 12_000, 4, 3, 1, 0.3
STORED_CHUNK, CHUNK = 1_500, 1_500  # rows per stored chunk; rows per block of the fit
N_BLOCKS = -(-N // CHUNK)
PARAMS = ("weights", "means", "covariances", "precisions_cholesky")


def _command(script: str, module: str) -> list[str]:
    """The console script next to this interpreter, else ``python -m module``."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


DMIX = _command("dmix", "dmix.cli")
DASK = _command("dask", "dask")
# Subprocesses import the dmix under test (the scheduler and workers unpickle its functions).
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(Path(dmix.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))
    if p))


def _run(argv, cwd, timeout=180) -> str:
    """Run ``argv``; return its stdout, failing with both streams if its status is not 0."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, check=False, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (f"{shlex.join(argv)} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout + proc.stderr


def _assert_same_model(path, ref) -> None:
    """The model saved at ``path`` is the fit ``ref`` to 1e-10 relative."""
    family, params, attrs = read_model(path)
    assert family["covariance_type"] == ref.covariance_type
    for name in PARAMS:
        got, want = np.asarray(params[name]), getattr(ref, name + "_")
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max(),
                                   err_msg=name)
    assert attrs["n_iter_"] == ref.n_iter_
    assert attrs["converged_"] == ref.converged_
    np.testing.assert_allclose(attrs["lower_bound_"], ref.lower_bound_, rtol=1e-10)
    np.testing.assert_allclose(attrs["lower_bounds_"], ref.lower_bounds_, rtol=1e-10)


# -- data and the in-process reference fit -----------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-data") / "data.zarr"
    status = main(["make-data", str(path), "-n", str(N), "-d", str(D), "-k", str(K),
                   "--seed", str(DATA_SEED), "--separation", str(SEPARATION),
                   "--chunk-size", str(STORED_CHUNK)])
    assert status == 0
    return path


@pytest.fixture(scope="module")
def reference(data):
    """``GaussianMixture(3, random_state=0)`` on a LocalCluster of 2 single-threaded processes,
    with the blocks of the CLI runs below (``--chunk-size CHUNK``)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        gm = dmix.GaussianMixture(K, random_state=0, chunk_size=CHUNK, client=client)
        gm.fit(str(data))
    assert gm.converged_ and gm.n_iter_ >= 5  # EM had work to do
    return gm


# -- a real CLI cluster: dask scheduler + 2 x dask worker ----------------------------------


def _stop(procs, timeout=20.0) -> None:
    """SIGTERM each process (workers first), then SIGKILL what is left of its process group."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:  # each was started in a session of its own: group id == its pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _log_tails(directory: Path) -> str:
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace")
                                                     .splitlines()[-15:])
                     for log in sorted(directory.glob("*.log")))


class _CLICluster:
    def __init__(self, address, client, directory):
        self.address, self.client, self.directory = address, client, directory


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker --nthreads 1`` processes on 127.0.0.1."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("cli-cluster")
    scheduler_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen] = []

    def spawn(name, *args):
        with open(tmp / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [*DASK, *args], cwd=tmp, env=ENV, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))

    try:
        spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
              "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file))
        deadline = time.monotonic() + 60
        address = None
        while address is None:
            assert procs[0].poll() is None, f"the scheduler exited\n{_log_tails(tmp)}"
            assert time.monotonic() < deadline, f"no scheduler file\n{_log_tails(tmp)}"
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                address = json.loads(scheduler_file.read_text())["address"]
            time.sleep(0.1)
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            spawn(f"worker-{i}", "worker", address, "--name", f"worker-{i}", "--nthreads", "1",
                  "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "1GiB",
                  "--death-timeout", "60", "--local-directory", str(tmp / f"worker-{i}"))
        with Client(address, timeout=30) as client:
            try:
                client.wait_for_workers(2, timeout=60)
            except TimeoutError:
                pytest.fail(f"the workers did not connect\n{_log_tails(tmp)}")
            client.get_task_stream()  # the scheduler records tasks from now on
            yield _CLICluster(address, client, tmp)
    finally:
        _stop(procs)


def test_dmix_fit_on_dask_scheduler_and_workers_equals_in_process_fit(
        cli_cluster, data, reference, tmp_path):
    client = cli_cluster.client
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    assert {w["nthreads"] for w in client.scheduler_info()["workers"].values()} == {1}
    model = tmp_path / "model.zarr"
    start = time.time()
    out = _run([*DMIX, "fit", data, "--scheduler", cli_cluster.address, "-k", K, "--seed", 0,
                "--chunk-size", CHUNK, "--output", model], cwd=tmp_path)

    assert f"Connected to the Dask scheduler at {cli_cluster.address} (2 workers)" in out
    assert f"{N_BLOCKS} block(s) of up to {CHUNK} rows" in out
    _assert_same_model(model, reference)

    # Both workers ran E-steps; each pass over the data is one E-step task per block.
    steps = Counter(rec["worker"] for rec in client.get_task_stream(start=start)
                    if str(rec["key"]).startswith("dmix-estep"))
    assert sorted(steps) == workers
    total = sum(steps.values())
    assert total % N_BLOCKS == 0 and total // N_BLOCKS >= reference.n_iter_
    assert len(client.scheduler_info()["workers"]) == 2  # the driver left the cluster as it was


def test_relative_data_path_with_workers_elsewhere(cli_cluster, data, reference, tmp_path):
    # The driver runs beside the data; the workers run in another directory (dmix makes the
    # path absolute: zarr would read fill values (zeros) for a store it cannot find).
    assert not (cli_cluster.directory / data.name).exists()
    model = tmp_path / "model.zarr"
    _run([*DMIX, "fit", data.name, "--scheduler", cli_cluster.address, "-k", K, "--seed", 0,
          "--chunk-size", CHUNK, "--output", model], cwd=data.parent)
    _assert_same_model(model, reference)


# -- the SLURM driver script, with a LocalCluster instead of SLURM jobs --------------------


def test_slurm_driver_script_then_resume_on_another_cluster(cli_cluster, data, reference,
                                                           tmp_path):
    driver = [sys.executable, CLUSTER / "slurm" / "run_on_cluster.py", "--local", "2",
              "--dashboard-address", "127.0.0.1:0", "--wait-workers", "2", "--"]
    ckpt, model = tmp_path / "ckpt", tmp_path / "model.zarr"

    # A driver job that ends after 3 iterations, leaving its checkpoints ...
    out = _run([*driver, *DMIX, "fit", data, "-k", K, "--seed", 0, "--chunk-size", CHUNK,
                "--scheduler", "{scheduler}", "--checkpoint", ckpt, "--max-iter", 3,
                "--resume"], cwd=tmp_path)
    assert "2 worker(s) connected" in out
    address = re.search(r"Dask scheduler at (tcp://127\.0\.0\.1:\d+),", out)[1]
    assert f"Connected to the Dask scheduler at {address} (2 workers)" in out
    assert "did not converge after 3 iterations" in out
    assert json.loads((ckpt / "LATEST").read_text())  # a committed checkpoint

    # ... continued on another cluster: the model of the uninterrupted fit.
    out = _run([*DMIX, "resume", ckpt, "--max-iter", 100, "--scheduler", cli_cluster.address,
                "--output", model], cwd=tmp_path)
    assert "Resuming from the checkpoint" in out and "after iteration 3" in out
    _assert_same_model(model, reference)


# -- syntax of the recipes ---------------------------------------------------------------

SUBCOMMANDS = ("make-data", "fit", "resume", "info", "quickstart", "score", "predict",
               "sample")
OPERATORS = set("();<>|&")
PLACEHOLDER = "1"  # an unset shell variable: a positive integer, a path, an address


def _files(*suffixes):
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in suffixes)


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of what in ``path`` may hold shell commands: fenced code blocks of
    Markdown, docstrings and comments of Python, every line of anything else."""
    text = path.read_text()
    lines = list(enumerate(text.splitlines(), 1))
    if path.suffix == ".md":
        kept, fenced = [], False
        for number, line in lines:
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced:
                kept.append((number, line))
        return kept
    if path.suffix == ".py":
        kept = [(n, line) for n, line in lines if line.lstrip().startswith("#")]
        for node in ast.walk(ast.parse(text)):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                first = body[0].lineno
                kept += [(first + i, line)
                         for i, line in enumerate(body[0].value.value.splitlines())]
        return kept
    return lines


def _logical_lines(path: Path) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined; comment markers and ``$ `` prompts cut.
    Comments count only from a ``$ `` prompt on (the rest is prose)."""
    out, pending, start = [], "", 0
    for number, line in _text_lines(path):
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith(("#!", "#SBATCH")):
            stripped = stripped.lstrip("#").strip()
            if not pending and not stripped.startswith("$ "):
                continue  # prose: commands in comments are written after a "$ " prompt
        stripped = stripped.removeprefix("$ ")
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((start, pending + stripped))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _shell_defaults(path: Path) -> dict[str, str]:
    """``NAME=${NAME:-default}`` assignments of a script: the values its commands run with."""
    return dict(re.findall(r"^\s*(\w+)=\$\{\1:-([^}]*)\}\s*$", path.read_text(), re.MULTILINE))


def _substitute(line: str, defaults: dict[str, str]) -> str:
    """Shell expansions replaced by the script's defaults or a placeholder."""
    for _ in range(3):  # defaults may refer to other variables
        line = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: defaults.get(m[1], m[2]), line)
        line = re.sub(r"\$\{(\w+)[^}]*\}|\$(\w+)",
                      lambda m: defaults.get(m[1] or m[2], PLACEHOLDER), line)
        line = re.sub(r"\$\([^()]*\)", PLACEHOLDER, line)
    return line


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _commands(program: tuple[str, ...], subcommands=None) -> list[tuple[str, list[str]]]:
    """(where, argv after the program) of every command line ``program ...`` in cluster/."""
    found = []
    for path in _files(".md", ".sh", ".sbatch", ".yaml", ".yml", ".py"):
        defaults = _shell_defaults(path)
        for number, line in _logical_lines(path):
            if program[0] not in line:
                continue
            where = f"{path.relative_to(ROOT)}:{number}"
            try:
                tokens = _tokens(_substitute(line, defaults))
            except ValueError as exc:  # unbalanced quotes: say so if it names the program
                if re.search(rf"(^|[\s/]){program[0]}\s", line):
                    found.append((where, [f"<unparsable line: {exc}>"]))
                continue
            for i, token in enumerate(tokens):
                if token != program[0] and not token.endswith("/" + program[0]):
                    continue
                if tuple(tokens[i:i + len(program)]) != (token, *program[1:]):
                    continue
                rest = tokens[i + len(program):]
                if subcommands is not None and (not rest or rest[0] not in subcommands):
                    continue
                end = next((j for j, t in enumerate(rest) if set(t) <= OPERATORS), len(rest))
                found.append((where, rest[:end]))
    return found


def test_yaml_files_parse():
    paths = _files(".yaml", ".yml")
    assert {p.relative_to(CLUSTER).as_posix() for p in paths} >= {
        "slurm/jobqueue.yaml", "kubernetes/dmix-daskjob.yaml", "kubernetes/dmix-data-pvc.yaml"}
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


# The keys of the slurm section of dask-jobqueue 0.9.0's jobqueue.yaml (its latest release).
JOBQUEUE_SLURM_KEYS = {
    "name", "cores", "memory", "processes", "python", "interface", "death-timeout",
    "local-directory", "shared-temp-directory", "extra", "worker-command",
    "worker-extra-args", "shebang", "queue", "account", "walltime", "env-extra",
    "job-script-prologue", "job-cpu", "job-mem", "job-extra", "job-extra-directives",
    "job-directives-skip", "log-directory", "scheduler-options"}


def test_jobqueue_config_uses_dask_jobqueue_keys_and_one_thread_per_worker():
    config = yaml.safe_load((CLUSTER / "slurm" / "jobqueue.yaml").read_text())
    assert set(config) == {"jobqueue"} and set(config["jobqueue"]) == {"slurm"}
    slurm = config["jobqueue"]["slurm"]
    assert set(slurm) <= JOBQUEUE_SLURM_KEYS, set(slurm) - JOBQUEUE_SLURM_KEYS
    assert slurm["processes"] == slurm["cores"] >= 1  # single-threaded worker processes
    per_process = parse_bytes(slurm["memory"]) / slurm["processes"]
    assert per_process >= 2**30  # at least 1 GiB per worker process
    assert re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", slurm["walltime"])
    assert isinstance(slurm["job-extra-directives"], list)


def _k8s_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity).groups()
    return int(number) * units[unit]


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_daskjob_manifest_runs_the_driver_in_the_cluster_with_checkpoints():
    job = yaml.safe_load((CLUSTER / "kubernetes" / "dmix-daskjob.yaml").read_text())
    assert job["apiVersion"] == "kubernetes.dask.org/v1" and job["kind"] == "DaskJob"
    name = job["metadata"]["name"]
    runner = job["spec"]["job"]["spec"]
    assert runner["restartPolicy"] == "OnFailure"  # a failed driver restarts and resumes
    (container,) = runner["containers"]
    script = " ".join([*container.get("command", []), *container.get("args", [])])
    for needed in ('--scheduler "$DASK_SCHEDULER_ADDRESS"', "--checkpoint ", "--resume"):
        assert needed in script

    cluster = job["spec"]["cluster"]["spec"]
    scheduler = cluster["scheduler"]["spec"]["containers"][0]
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    assert cluster["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    worker = cluster["worker"]["spec"]["containers"][0]
    args = [str(a) for a in worker["args"]]
    assert args[:2] == ["dask", "worker"]
    nworkers, nthreads = int(_option(args, "--nworkers")), int(_option(args, "--nthreads"))
    assert nthreads == 1
    resources = worker["resources"]
    assert nworkers * nthreads == int(resources["requests"]["cpu"])  # one process per core
    limit = _k8s_bytes(resources["limits"]["memory"])
    assert nworkers * parse_bytes(_option(args, "--memory-limit")) <= 0.9 * limit
    # The same image everywhere: the scheduler unpickles the graphs the driver builds.
    assert {container["image"], scheduler["image"], worker["image"]} == {container["image"]}

    claims = {v["persistentVolumeClaim"]["claimName"]
              for spec in (runner, cluster["worker"]["spec"]) for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    pvc = yaml.safe_load((CLUSTER / "kubernetes" / "dmix-data-pvc.yaml").read_text())
    assert claims == {pvc["metadata"]["name"]}
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dmix_command_lines_in_cluster_parse():
    commands = _commands(("dmix",), SUBCOMMANDS)
    files = {where.rsplit(":", 1)[0] for where, _ in commands}
    assert files >= {"cluster/README.md", "cluster/hosts.sh", "cluster/slurm/dmix-fit.sbatch",
                     "cluster/slurm/run_on_cluster.py", "cluster/kubernetes/dmix-daskjob.yaml"}
    parser = build_parser()
    for action in parser._actions:  # recipes spell options in full: no abbreviations
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices[sub], argparse.ArgumentParser):
                action.choices[sub].allow_abbrev = False
    failures = []
    for where, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                message = (err.getvalue().strip().splitlines() or ["?"])[-1]
                failures.append(f"{where}: dmix {shlex.join(argv)}\n    {message}")
    assert not failures, "\n".join(failures)


def test_dask_scheduler_and_worker_command_lines_in_cluster_parse():
    import click
    from distributed.cli import dask_scheduler, dask_worker

    checked, failures = 0, []
    for program, command in ((("dask", "scheduler"), dask_scheduler.main),
                             (("dask", "worker"), dask_worker.main)):
        for where, argv in _commands(program):
            checked += 1
            try:
                command.make_context(" ".join(program), list(argv))
            except click.ClickException as exc:
                failures.append(f"{where}: {' '.join(program)} {shlex.join(argv)}\n"
                                f"    {exc.format_message()}")
    # The manifest's worker and scheduler containers (argument lists, not lines).
    job = yaml.safe_load((CLUSTER / "kubernetes" / "dmix-daskjob.yaml").read_text())
    cluster = job["spec"]["cluster"]["spec"]
    for part, command in (("scheduler", dask_scheduler.main), ("worker", dask_worker.main)):
        args = [str(a) for a in cluster[part]["spec"]["containers"][0]["args"]]
        checked += 1
        try:
            command.make_context(f"dask {part}", args[2:])
        except click.ClickException as exc:
            failures.append(f"dmix-daskjob.yaml {part}: {exc.format_message()}")
    assert checked >= 5
    assert not failures, "\n".join(failures)


def test_shell_scripts_and_python_files_compile():
    scripts = _files(".sh", ".sbatch")
    assert len(scripts) >= 2
    for path in scripts:
        proc = subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"
        assert path.read_text().startswith("#!/usr/bin/env bash\n"), path
    for path in _files(".py"):
        compile(path.read_text(), str(path), "exec")
    sbatch = (CLUSTER / "slurm" / "dmix-fit.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", sbatch, re.MULTILINE)
    assert "--requeue" in directives  # the job comes back after preemption ...
    assert any(d.startswith("--signal=B:USR1@") for d in directives)  # ... or its time limit


def test_data_path_missing_on_the_workers_is_refused(tmp_path):
    """A path the driver sees but the workers do not (here: removed after opening) is named
    with the workers, instead of being read as zeros."""
    import zarr

    from dmix.io.source import check_visible_to_workers

    path = tmp_path / "data.zarr"
    zarr.create_array(str(path), data=np.ones((100, 2)))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        check_visible_to_workers(str(path), client)  # seen: no error
        with pytest.raises(dmix.DataError, match="does not exist on 1 of 1 Dask worker"):
            check_visible_to_workers(str(tmp_path / "elsewhere.zarr"), client)
