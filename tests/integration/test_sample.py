"""`exporter generate-sample` against a real MLflow: the same seed twice creates nothing twice.

run-local.sh calls it on every start, so a second call must find the runs and model versions
of the first instead of adding copies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.support import servers

pytestmark = pytest.mark.integration

MODEL = "sample-idempotency-model"
ARGS = ("--experiments", "2", "--runs", "8", "--steps", "5", "--model-name", MODEL)


@pytest.fixture(scope="module")
def own_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    # A server of its own: generate-sample writes fixed experiment names, which other modules'
    # session server also holds.
    server = servers.start_mlflow(tmp_path_factory.mktemp("sample-mlflow"))
    yield server
    server.stop()


def _generate(url: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PRAMATHUS_"))}
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "generate-sample", *ARGS, *extra],
        env={**env, "MLFLOW_TRACKING_URI": url, "LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def _snapshot(
    client: MlflowClient,
) -> tuple[Counter[str], list[tuple[str, str | None, str | None]], dict[str, str]]:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, max_results=5000)
    names = Counter(f"{r.info.experiment_id}/{r.info.run_name}" for r in runs)
    versions = sorted(
        (v.version, v.run_id, v.current_stage)
        for v in client.search_model_versions(f"name = '{MODEL}'")
    )
    return names, versions, dict(client.get_registered_model(MODEL).aliases)


def _genai_traces(client: MlflowClient) -> list[Any]:
    exp = client.get_experiment_by_name("support-chatbot")
    assert exp is not None
    return list(client.search_traces(locations=[exp.experiment_id], include_spans=False))


def test_generate_sample_twice_with_one_seed_creates_nothing_the_second_time(
    own_mlflow: servers.Server, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=own_mlflow.url)

    first = _generate(own_mlflow.url)
    names, versions, aliases = _snapshot(client)
    assert sum(names.values()) == 16 + 2  # and the GenAI experiment's evaluation runs
    assert max(names.values()) == 1, f"duplicate run names: {names}"
    assert len(versions) == 3
    # (a Counter, not sorted(): MLflow types a stage as `str | None`, and None does not sort)
    assert Counter(stage for _, _, stage in versions) == Counter(["None", "Production", "Staging"])
    assert set(aliases) == {"champion", "challenger"}

    traces = _genai_traces(client)
    assert len(traces) == 24
    trace_names = {
        t.info.trace_metadata.get("mlflow.traceName") or t.info.tags.get("mlflow.traceName")
        for t in traces
    }
    assert trace_names == {"answer", "retrieve"}
    assert {str(t.info.state).rsplit(".", 1)[-1] for t in traces} == {"OK", "ERROR"}
    assert sum(bool(t.info.token_usage) for t in traces) > 0
    judged = {a.name for t in traces for a in t.info.assessments}
    assert judged == {"correct", "helpfulness"}
    assert "and 24 traces in GenAI experiment 'support-chatbot'" in first, first

    second = _generate(own_mlflow.url)
    assert len(_genai_traces(client)) == 24
    assert "and 0 traces" in second, second
    # Nothing new and nothing moved: same runs, same versions on the same runs, same stages
    # and aliases.
    assert _snapshot(client) == (names, versions, aliases)
    # ... and the summary says so.
    assert first.startswith("created 16 runs (0 already present)"), first
    assert "and 3 versions (0 already present)" in first, first
    assert second.startswith("created 0 runs (16 already present)"), second
    assert "and 0 versions (3 already present)" in second, second

    # Another seed is other data: its own runs, and model versions only for its own best runs.
    third = _generate(own_mlflow.url, "--seed", "7")
    assert third.startswith("created 16 runs (0 already present)"), third
    names7, _, _ = _snapshot(client)
    assert sum(names7.values()) == 32 + 2  # the GenAI sample is written once, whatever the seed
    assert max(names7.values()) == 1
