"""`generate-sample`: realistic experiments, runs, curves and registry entries in MLflow.

This is the one place that imports the `mlflow` package (slow to import, so only here).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from exporter.config import Settings

EXPERIMENT_NAMES = [
    "churn-prediction",
    "fraud-detection",
    "demand-forecast",
    "image-tagging",
    "search-ranking",
    "sentiment-analysis",
    "price-elasticity",
    "anomaly-watch",
]
RUN_SPACING_MS = 15 * 60_000
STEP_MS = 10_000  # one logged step every 10 s: a 30-step run lasts 5 minutes
# Final statuses in a realistic mix; RUNNING runs are left open on purpose.
STATUS_CYCLE = [
    "FINISHED",
    "FINISHED",
    "FAILED",
    "FINISHED",
    "KILLED",
    "FINISHED",
    "RUNNING",
    "FINISHED",
]


@dataclass(frozen=True)
class SampleSpec:
    experiments: int = 3
    runs: int = 8
    steps: int = 30
    seed: int = 42
    model_name: str = "churn-classifier"
    traces: int = 24  # GenAI traces written once into GENAI_EXPERIMENT


GENAI_EXPERIMENT = "support-chatbot"


def curves(rng: random.Random, steps: int, quality: float) -> dict[str, list[float]]:
    """Training curves that look like a real classifier converging (quality in 0..1)."""
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "accuracy",
            "loss",
            "precision",
            "recall",
            "f1_score",
            "val/loss",
            "val/accuracy",
            "learning_rate",
        )
    }
    for step in range(steps):
        progress = 1 - math.exp(-4 * (step + 1) / steps)
        acc = 0.5 + (0.35 + 0.13 * quality) * progress + rng.gauss(0, 0.008)
        precision = min(0.999, acc + rng.gauss(0.01, 0.01))
        recall = min(0.999, acc - 0.02 + rng.gauss(0, 0.01))
        out["accuracy"].append(min(acc, 0.999))
        out["loss"].append(
            max(0.01, 1.2 * (1 - progress) + 0.15 * (1 - quality) + rng.gauss(0, 0.01))
        )
        out["precision"].append(precision)
        out["recall"].append(recall)
        out["f1_score"].append(2 * precision * recall / (precision + recall))
        out["val/loss"].append(out["loss"][-1] * 1.08 + rng.gauss(0, 0.01))
        out["val/accuracy"].append(out["accuracy"][-1] - 0.015)
        out["learning_rate"].append(1e-3 * (0.95**step))
    return out


def run_name(e: int, r: int, seed: int) -> str:
    """The sample run's name: the key that makes generate-sample idempotent for a seed."""
    return f"run-{e}-{r}-seed{seed}"


def generate(settings: Settings, spec: SampleSpec, progress: bool = False) -> str:
    """Create the sample data, or what of it is missing; returns a one-line summary.

    Idempotent for a given seed: runs are found by their deterministic names (one search per
    experiment), a model version is created only for a run no version points at yet, and
    stages and aliases are set only where they differ.
    """
    # Fail fast on an unreachable server instead of MLflow's default two minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    rng = random.Random(spec.seed)  # noqa: S311 - sample data, not secrets
    now_ms = int(time.time() * 1000)
    finished: list[tuple[float, str, str]] = []  # (accuracy, run_id, artifact_uri)
    total = spec.experiments * spec.runs
    created = 0
    bar_file = sys.stdout if progress else Path(os.devnull).open("w")  # noqa: SIM115
    # MLflow prints a "View run" line per run on stdout; keep stdout for our summary only.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        click.progressbar(length=total, label="generating runs", file=bar_file) as bar,
    ):
        for e in range(spec.experiments):
            base = EXPERIMENT_NAMES[e % len(EXPERIMENT_NAMES)]
            name = base if e < len(EXPERIMENT_NAMES) else f"{base}-{e}"
            # Drawn whether or not the experiment exists: every later draw (and so every run's
            # data, and which runs are best) must not depend on what the server already holds.
            team = rng.choice(["growth", "risk", "platform"])
            existing = client.get_experiment_by_name(name)
            exp_id = (
                existing.experiment_id
                if existing
                else client.create_experiment(name, tags={"team": team})
            )
            present = _sample_runs(client, exp_id, e, spec.seed)
            for r in range(spec.runs):
                best, new = _one_run(
                    client, rng, spec, exp_id, e, r, now_ms, present, Metric, Param, RunTag
                )
                finished.extend(best)
                created += new
                bar.update(1)
    made, kept = _register(client, spec.model_name, sorted(finished, reverse=True)[:3])
    with contextlib.redirect_stdout(io.StringIO()):
        traces = _genai(client, settings.mlflow.tracking_uri, spec)
    return (
        f"created {created} runs ({total - created} already present) in {spec.experiments} "
        f"experiments and {made} versions ({kept} already present) "
        f"of model {spec.model_name!r}, and {traces} traces in GenAI experiment "
        f"{GENAI_EXPERIMENT!r} at {settings.mlflow.tracking_uri}"
    )


def _genai(client: Any, tracking_uri: str, spec: SampleSpec) -> int:
    """A small GenAI app's traces, once: "answer" (an LLM call with token usage and a cost,
    every fifth timing out) and "retrieve", with latency varying; an LLM judge's boolean
    `correct` on every trace and a human's `helpfulness` (1-5) on a few. Returns how many
    traces were written (0 when the experiment already holds traces)."""
    import mlflow
    from mlflow.entities import AssessmentSource

    existing = client.get_experiment_by_name(GENAI_EXPERIMENT)
    exp_id = existing.experiment_id if existing else client.create_experiment(GENAI_EXPERIMENT)
    if spec.traces <= 0 or client.search_traces(locations=[exp_id], max_results=1):
        return 0
    rng = random.Random(spec.seed)  # noqa: S311 - sample data, not secrets
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=exp_id)

    @mlflow.trace(name="llm", span_type="CHAT_MODEL")
    def llm(question: str) -> str:
        prompt, completion = 40 + rng.randint(0, 200), 10 + rng.randint(0, 120)
        span = mlflow.get_current_active_span()
        if span is not None:
            span.set_attribute(
                "mlflow.chat.tokenUsage",
                {
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            )
            # What a gateway or LiteLLM records: USD per call, from per-token prices.
            cost = {"input_cost": prompt * 3e-6, "output_cost": completion * 15e-6}
            span.set_attribute("mlflow.llm.cost", {**cost, "total_cost": sum(cost.values())})
        time.sleep(rng.uniform(0.005, 0.06))
        return f"an answer to {question}"

    @mlflow.trace(name="answer")
    def answer(i: int) -> str:
        if i % 5 == 4:
            raise TimeoutError("the model did not answer in time")
        return llm(f"question {i}")

    @mlflow.trace(name="retrieve", span_type="RETRIEVER")
    def retrieve(i: int) -> list[str]:
        time.sleep(rng.uniform(0.001, 0.02))
        return [f"doc-{i}", f"doc-{i + 1}"]

    judge = AssessmentSource(source_type="LLM_JUDGE", source_id="sample-judge")
    human = AssessmentSource(source_type="HUMAN", source_id="reviewer@example.com")
    for i in range(spec.traces):
        with contextlib.suppress(TimeoutError):
            (answer if i % 3 else retrieve)(i)
        trace_id = mlflow.get_last_active_trace_id()
        if trace_id is None:
            continue
        mlflow.flush_trace_async_logging()
        mlflow.log_feedback(
            trace_id=trace_id, name="correct", value=rng.random() < 0.8, source=judge
        )
        if i % 4 == 0:
            mlflow.log_feedback(
                trace_id=trace_id, name="helpfulness", value=float(rng.randint(1, 5)), source=human
            )
    mlflow.flush_trace_async_logging()
    _evaluation_run(client, exp_id, spec, rng)
    return spec.traces


def _evaluation_run(client: Any, exp_id: str, spec: SampleSpec, rng: random.Random) -> None:
    """The runs evaluations of the app leave (as `mlflow.genai.evaluate` does): judges'
    aggregate scores over three rounds, and an evaluation that failed part-way."""
    start = int(time.time() * 1000) - 3 * STEP_MS
    run = client.create_run(exp_id, start_time=start, run_name=f"judge-eval-seed{spec.seed}")
    for step in range(3):
        at = start + (step + 1) * STEP_MS
        client.log_metric(run.info.run_id, "correct/mean", 0.7 + rng.uniform(0, 0.2), at, step)
        client.log_metric(run.info.run_id, "helpfulness/mean", 3 + rng.uniform(0, 1.5), at, step)
    client.set_terminated(run.info.run_id, status="FINISHED", end_time=start + 4 * STEP_MS)
    # An evaluation cut short (the judge's API rate-limited it), as happens.
    cut = client.create_run(exp_id, start_time=start, run_name=f"judge-eval-seed{spec.seed}-b")
    client.log_metric(cut.info.run_id, "correct/mean", 0.75, start + STEP_MS, 0)
    client.set_terminated(cut.info.run_id, status="FAILED", end_time=start + 2 * STEP_MS)


def _sample_runs(client: Any, exp_id: str, e: int, seed: int) -> dict[str, Any]:
    """This experiment's sample runs for `seed`, by name: one search (paged), not one per run."""
    found: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs(
            [exp_id],
            # Narrowed server side so an experiment full of other runs costs little.
            filter_string=f"attributes.run_name LIKE 'run-{e}-%-seed{seed}'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            found.setdefault(run.info.run_name, run)
        token = page.token
        if not token:
            return found


def _one_run(
    client: Any,
    rng: random.Random,
    spec: SampleSpec,
    exp_id: str,
    e: int,
    r: int,
    now_ms: int,
    present: dict[str, Any],
    Metric: Any,  # noqa: N803 - the mlflow.entities class, imported lazily
    Param: Any,  # noqa: N803
    RunTag: Any,  # noqa: N803
) -> tuple[list[tuple[float, str, str]], int]:
    """Create run r of experiment e unless it exists; returns ([(accuracy, id, uri)] when it
    is a FINISHED candidate for the registry, 1 if created else 0)."""
    # Runs start every 15 minutes up to now; counted from the newest run, the status cycle
    # puts a FAILED run within the last hour of the first generation.
    ago = (spec.experiments - e) * spec.runs - r  # 1 for the newest run
    status = STATUS_CYCLE[(ago - 1) % len(STATUS_CYCLE)]
    start = now_ms - ago * RUN_SPACING_MS
    # Every random draw happens before the existence check, so the stream stays the same
    # whichever runs already exist.
    lr, batch = rng.choice([1e-2, 3e-3, 1e-3, 3e-4]), rng.choice([32, 64, 128, 256])
    tags = {
        "model_type": rng.choice(["xgboost", "mlp", "logreg"]),
        "dataset": f"v{rng.randint(1, 4)}",
        "owner": "sample",
    }
    series = curves(rng, spec.steps, quality=rng.uniform(0.2, 1.0))
    optimizer = rng.choice(["adam", "sgd", "adamw"])
    # A failed or killed run stops early, like a crash or a cancelled job.
    steps = spec.steps if status in ("FINISHED", "RUNNING") else max(1, spec.steps // 2)
    best = series["accuracy"][steps - 1]

    name = run_name(e, r, spec.seed)
    if name in present:
        info = present[name].info
        return ([(best, info.run_id, info.artifact_uri)] if status == "FINISHED" else []), 0

    run = client.create_run(exp_id, start_time=start, run_name=name, tags=tags)
    run_id = run.info.run_id
    metrics = [
        Metric(key, value, start + (step + 1) * STEP_MS, step)
        for key, values in series.items()
        for step, value in enumerate(values[:steps])
    ]
    params = [
        Param("learning_rate", str(lr)),
        Param("batch_size", str(batch)),
        Param("optimizer", optimizer),
        Param("epochs", str(spec.steps)),
    ]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(
            run_id,
            metrics=metrics[i : i + 1000],
            params=params if i == 0 else [],
            tags=[RunTag("mlflow.note.content", "generated by exporter")] if i == 0 else [],
        )
    if status == "RUNNING":
        return [], 1
    client.set_terminated(run_id, status=status, end_time=start + (steps + 1) * STEP_MS)
    if status != "FINISHED":
        return [], 1
    return [(best, run_id, run.info.artifact_uri)], 1


def _register(client: Any, name: str, best: list[tuple[float, str, str]]) -> tuple[int, int]:
    """Register the best runs as versions; newest gets Staging + challenger, best Production
    + champion (stages are deprecated in MLflow but still used by many registries).

    A version is created only for a run that no version of the model points at yet; stages
    and aliases are changed only where they differ. Returns (created, already present).
    """
    if not best:
        return 0, 0
    if not _exists(client, name):
        client.create_registered_model(name, description="Sample model made by generate-sample")
    existing: dict[str, Any] = {}  # run_id -> its oldest version
    for mv in _versions(client, name):
        if mv.run_id and (
            mv.run_id not in existing or int(mv.version) < int(existing[mv.run_id].version)
        ):
            existing[mv.run_id] = mv
    versions = []
    made = 0
    for _acc, run_id, artifact_uri in best:
        mv = existing.get(run_id)
        if mv is None:
            mv = client.create_model_version(name, source=f"{artifact_uri}/model", run_id=run_id)
            made += 1
        versions.append(mv)
    aliases = dict(client.get_registered_model(name).aliases or {})
    roles = [("Production", "champion"), ("Staging", "challenger")]
    for mv, (stage, alias) in zip(versions, roles, strict=False):
        if mv.current_stage != stage:
            _stage(client, name, mv.version, stage)
        if str(aliases.get(alias)) != str(mv.version):
            client.set_registered_model_alias(name, alias, mv.version)
    return made, len(versions) - made


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of model `name` (paged)."""
    quote = "'" if "'" not in name else '"'
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(
            f"name = {quote}{name}{quote}", max_results=1000, page_token=token
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def _exists(client: Any, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException for a missing model
        return False
    return True


def _stage(client: Any, name: str, version: str, stage: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stage API's deprecation warning
        client.transition_model_version_stage(name, version, stage)
