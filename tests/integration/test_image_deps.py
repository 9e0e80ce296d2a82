"""The exporter image's dependencies: MLflow's client (`mlflow-skinny`), not the full `mlflow`.

The image installs `requirements-image.txt` (hashed lock) and then the project with
`--no-deps`, from the files its Dockerfile COPYs. This test builds the same virtualenv on this
machine (cached under `.venv-image/`, keyed by the lock's hash: the one-time build downloads
from PyPI, about a minute), installs the project the Dockerfile's way on every session, and
runs `exporter generate-sample` and `exporter export-once` with that venv against the
session's real MLflow, Pushgateway and receiver.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.receiver import Receiver
from tests.support.seed import make_run, mlflow_points

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements-image.txt"
CACHE = Path(os.environ.get("IMAGE_VENV_CACHE", REPO / ".venv-image"))
BUILD_TIMEOUT = 900  # the one-time dependency install (downloads); about 40 s measured
# Distributions the full `mlflow` brings and its client does not need: the ML libraries and
# the tracking server's (Flask app, SQL store, migrations, WSGI server).
HEAVY = ("pyarrow", "pandas", "scipy", "scikit-learn", "numpy", "matplotlib")
SERVER = ("mlflow", "flask", "sqlalchemy", "alembic", "gunicorn", "waitress")


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
    """Run `cmd` (bounded); its stdout, or a failure with the output's tail."""
    done = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{shlex.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _builder_copies() -> list[str]:
    """Sources of the Dockerfile's build-stage COPY lines (not COPY --from)."""
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--from"):
            sources += [w.rstrip("/") for w in words[1:-1]]
    return sources


def _dependency_venv() -> Path:
    """A venv with exactly the lock installed, built once per lock (atomic rename into the
    cache, so an interrupted build is never reused)."""
    key = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    venv = CACHE / f"py{sys.version_info.major}.{sys.version_info.minor}-{key}"
    if (venv / "bin" / "python").exists():
        return venv
    CACHE.mkdir(exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE))
    try:
        _run([sys.executable, "-m", "venv", str(building)], 120)
        _run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet"]
            + ["--disable-pip-version-check", "--require-hashes", "-r", str(LOCK)],
            BUILD_TIMEOUT,
        )
        for old in CACHE.glob("py*-*"):
            shutil.rmtree(old, ignore_errors=True)  # superseded locks
        building.rename(venv)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return venv


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's venv: the lock, then the project with --no-deps from the Dockerfile's
    build context (only what it COPYs), as the Dockerfile does."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --no-cache-dir --require-hashes -r requirements-image.txt" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    venv = _dependency_venv()
    context = tmp_path_factory.mktemp("image-context")
    for source in _builder_copies():
        if (REPO / source).is_dir():
            shutil.copytree(
                REPO / source, context / source, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / source, context / source)
    python = str(venv / "bin" / "python")
    _run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["--no-deps", "--force-reinstall", "--no-cache-dir", "."],
        300,
        cwd=context,
    )
    return venv


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _installed(venv: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, re;"
        "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version"
        " for d in m.distributions()}))"
    )
    versions: dict[str, str] = json.loads(_run([str(venv / "bin" / "python"), "-c", code], 60))
    return versions


def test_image_venv_has_the_mlflow_client_and_none_of_the_server(image_venv: Path) -> None:
    installed = _installed(image_venv)
    pinned = _pins(REPO / "requirements.txt")
    assert "mlflow" not in installed, "the full mlflow distribution is in the image"
    assert installed.get("mlflow-skinny") == pinned["mlflow"], (
        f"mlflow-skinny {installed.get('mlflow-skinny')} differs from requirements.txt's "
        f"mlflow=={pinned['mlflow']}"
    )
    drift = {
        name: (version, installed.get(name))
        for name, version in pinned.items()
        if name != "mlflow" and installed.get(name) != version
    }
    assert not drift, f"requirements.txt pin vs image venv: {drift}"

    present = sorted(name for name in (*HEAVY, *SERVER) if name in installed)
    assert not present, f"installed in the image venv: {present}"

    # The client imports that generate-sample needs work; the server's modules do not.
    probe = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        out[name] = None\n"
        "    except ImportError as exc:\n"
        "        out[name] = repr(exc)\n"
        "print(json.dumps(out))\n"
    )
    modules = ["mlflow.tracking", "mlflow.entities", "exporter.cli", "mlflow.server"]
    errors = json.loads(_run([str(image_venv / "bin" / "python"), "-c", probe, *modules], 120))
    assert errors.pop("mlflow.server") is not None, "mlflow.server imports in the image venv"
    assert all(error is None for error in errors.values()), errors


def test_image_venv_dependencies_are_consistent(image_venv: Path) -> None:
    """The Dockerfile runs `pip check` after installing the project with --no-deps: the
    project's declared dependencies must be met by the lock (mlflow-skinny, not mlflow)."""
    done = subprocess.run(
        [str(image_venv / "bin" / "python"), "-m", "pip", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_generate_sample_and_export_once_run_on_the_image_venv(
    image_venv: Path,
    exporter_env: ExporterEnv,
    mlflow_server: servers.Server,
    pushgateway: servers.Server,
    receiver: Receiver,
) -> None:
    exporter = str(image_venv / "bin" / "exporter")
    # generate-sample writes fixed experiment names: one small experiment, with a seed and a
    # model name of this test's own, so other tests' sample runs and models are untouched.
    seed = str(int(uuid.uuid4().hex[:6], 16))
    model = f"{exporter_env.prefix}model"
    sample = subprocess.run(
        [exporter, "generate-sample", "--experiments", "1", "--runs", "2", "--steps", "3"]
        + ["--seed", seed, "--model-name", model],
        env=exporter_env.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert sample.returncode == 0, sample.stdout + sample.stderr
    assert "created 2 runs" in sample.stdout, sample.stdout
    assert exporter_env.client.get_registered_model(model).aliases

    exp_id = exporter_env.experiment()
    run_id = make_run(exporter_env.client, exp_id, {"loss": [0.9, 0.5, 0.3], "acc": [0.2, 0.6]})
    once = subprocess.run(
        [exporter, "export-once"],
        env=exporter_env.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert once.returncode == 0, once.stdout + once.stderr
    assert receiver.received_points() == mlflow_points(exporter_env.client, [run_id])
    groups = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=10).json()["data"]
    pushed = {
        g["labels"].get("experiment_id")
        for g in groups
        if g["labels"].get("job") == exporter_env.job
    }
    assert exp_id in pushed, pushed
