"""The report of one sweep, read back from MLflow: a table, four plots and one HTML page.

    resurgence report EXPERIMENT [--sweep NAME] [--tracking-uri URI] [--out DIR]

Without `--sweep` the report is of the experiment's most recently started sweep (an attacker sweep, run
tag `stage=sweep`, or a defender search, `stage=defense`). It writes into the output folder:

- `trials.parquet`: one row per trial run: ids, status, tags, every searched hyperparameter (column = its
  dotted path), the final value of every curve metric (`final.<m>`, last by step), the once-per-trial
  metrics, and every curve as two list columns (`curve.<m>.step`, `curve.<m>.value`);
- `curves.png`: resurgence over fine-tuning steps, one line per trial, the best trials highlighted;
- `hyperparameters.png`: final resurgence against each searched hyperparameter;
- `importance.png`: fANOVA hyperparameter importance for final resurgence (optuna);
- `pareto.png` (defender searches only): the worst case (presence or resurgence) against retention of the
  defender candidates;
- `samples-<trial>.png` and `curve-<trial>.png` for the best trials: the trial's sample grid (base, erased,
  each evaluation during fine-tuning; small images upscaled without smoothing) and its own curves;
- `index.html`: one self-contained page (the plots are embedded) with counts, the best trials with their
  pictures, what measured them (the evaluator params, with a warning when trials of the sweep, or the
  experiment's other sweeps, were measured differently: their figures are then not comparable), and the
  defender candidates.

Every file is also logged to the sweep's parent run under the artifact path `report/`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from methods.evaluation.intervals import newcombe
from orchestrator.candidates import Candidate, best_candidate, pareto_front
from orchestrator.errors import SpecError
from orchestrator.formatting import finite, fmt, with_interval
from orchestrator.metric_names import CURVE_METRICS
from orchestrator.store import search_all

PARENT_STAGES = ("sweep", "defense")  # tag `stage` of a sweep's parent run: attacker sweep, defender search
HISTORY_THREADS = 8  # get_metric_history is one round trip per (run, metric); overlap them
BEST_SHOWN = 10  # rows of the best-trials table
BEST_HIGHLIGHTED = 3  # trials drawn in colour on curves.png, and whose sample grids the page shows
GRID_WIDTH = 480  # px: a smaller sample grid is upscaled (nearest) to at least this
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
LOG_SPAN = 100  # a numeric hyperparameter spanning max/min >= this is drawn (and modelled) on a log axis
OBJECTIVE = "resurgence"  # what the attacker maximises, and the defender's worst case minimises

FILES = ("trials.parquet", "curves.png", "hyperparameters.png", "importance.png", "pareto.png", "index.html")
PER_TRIAL = ("samples-", "curve-")  # per-trial pictures: samples-<trial>.png, curve-<trial>.png
EVALUATOR = "evaluator."  # the params that say what measured a trial (orchestrator/resolved.py)


def write_report(
    tracking_uri: str, experiment: str, out_dir: Path, sweep: str | None = None, log_to_parent: bool = True
) -> Path:
    """Write the report of one sweep into `out_dir` (created if needed); returns `out_dir / "index.html"`."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SpecError(f"experiment: no MLflow experiment named {experiment!r} at {tracking_uri}")
    exp_id = found.experiment_id
    parent = _find_parent(client, exp_id, experiment, sweep)
    name = parent.data.tags["sweep"]
    is_defense = parent.data.tags.get("stage") == "defense"

    runs = search_all(client, exp_id, f"tags.sweep = {_quote(name)} and tags.stage = 'trial'")
    if not runs:
        raise SpecError(f"--sweep: sweep {name!r} of experiment {experiment!r} has no trial runs yet")
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    candidates = (
        _candidates(search_all(client, exp_id, f"tags.sweep = {_quote(name)} and tags.stage = 'defender-candidate'"))
        if is_defense
        else []
    )

    searched = _searched(runs)
    rows, curve_keys, once_keys = _rows(client, runs, searched)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in FILES:  # a plot skipped this time must not survive from an earlier report in the same folder
        (out_dir / stale).unlink(missing_ok=True)
    for stale in out_dir.glob("*.png"):
        if stale.name.startswith(PER_TRIAL):
            stale.unlink()
    pq.write_table(_table(rows, searched, curve_keys, once_keys), out_dir / "trials.parquet")

    ranked = sorted((r for r in rows if finite(r.get(f"final.{OBJECTIVE}"))), key=lambda r: -r[f"final.{OBJECTIVE}"])
    notes: dict[str, str] = {}  # plot file -> why it was not drawn
    if not _plot_curves(rows, ranked, out_dir / "curves.png"):
        notes["curves.png"] = f"No trial logged a {OBJECTIVE} curve."
    if not _plot_hyperparameters(rows, searched, out_dir / "hyperparameters.png"):
        notes["hyperparameters.png"] = f"No searched hyperparameter has a trial with a final {OBJECTIVE}."
    importance_note = _plot_importance(rows, searched, out_dir / "importance.png")
    if importance_note:
        notes["importance.png"] = importance_note
    if candidates:
        _plot_pareto(candidates, out_dir / "pareto.png")
    pictures = _best_pictures(client, ranked, out_dir)
    measured = _evaluators(client, exp_id, name, runs)

    tail = _pictures_html(pictures, out_dir) + _evaluators_html(measured)
    stage = parent.data.tags.get("stage", "")
    page = _html(experiment, name, stage, rows, ranked, searched, candidates, notes, out_dir, tail)
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")

    if log_to_parent:
        # Only the files written here, not whatever else the folder holds (it may be a user's working folder).
        for file in [*FILES, *(f for pair in pictures for f in pair[1:] if f)]:
            if (out_dir / file).is_file():
                client.log_artifact(parent.info.run_id, str(out_dir / file), "report")
    return index


# --- the best trials' pictures and what measured the trials ------------------------------------------------
def _best_pictures(
    client: Any, ranked: list[dict[str, Any]], out_dir: Path
) -> list[tuple[dict[str, Any], str | None, str | None]]:
    """(row, samples file, curve file) of each of the best trials: its sample grid fetched from its run's
    artifacts, and its own curves drawn."""
    before = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"  # no download progress bars in the command's output
    try:
        return [_best_picture(client, row, out_dir) for row in ranked[:BEST_HIGHLIGHTED]]
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = before


def _best_picture(client: Any, row: dict[str, Any], out_dir: Path) -> tuple[dict[str, Any], str | None, str | None]:
    import tempfile

    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(row["trial_id"]))
    grid: str | None = f"samples-{safe}.png"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            got = client.download_artifacts(row["run_id"], "samples.png", tmp)
            _enlarge(Path(got), out_dir / grid)
    except Exception:  # noqa: BLE001 - a trial without its picture (failed early, or an old run) has none
        grid = None
    curve: str | None = f"curve-{safe}.png"
    if not _plot_trial(row, out_dir / curve):
        curve = None
    return row, grid, curve


def _enlarge(src: Path, dst: Path) -> None:
    """Copy a sample grid, upscaled by an integer factor without smoothing until it is GRID_WIDTH px wide
    (grids of small images, such as the toy world's 16-px ones, from runs that logged them small)."""
    from PIL import Image

    with Image.open(src) as im:
        factor = -(-GRID_WIDTH // im.width) if im.width < GRID_WIDTH else 1
        out = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) if factor > 1 else im
        out.save(dst)


def _plot_trial(row: dict[str, Any], path: Path) -> bool:
    keys = [k for k in ("presence", "resurgence", "retention") if row.get(f"curve.{k}.step")]
    if not keys:
        return False
    fig = _figure(4.2, 3)
    ax = fig.subplots()
    styles = {"presence": "--", "resurgence": "-", "retention": ":"}  # presence = resurgence when erased to 0
    for k in keys:
        ax.plot(row[f"curve.{k}.step"], row[f"curve.{k}.value"], styles[k], marker="o", markersize=3, label=k)
    ax.axhline(0, color="0.4", linewidth=0.6, linestyle=":")
    ax.set(xlabel="fine-tuning step", title=str(row["trial_id"]))
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def _pictures_html(pictures: list[tuple[dict[str, Any], str | None, str | None]], out_dir: Path) -> str:
    if not pictures:
        return ""
    e = html.escape
    parts = [
        "<h2>The best trials' samples</h2>",
        "<p>Rows: the base model, the erased model, then each evaluation during fine-tuning (its step); "
        "columns: the erased concept, then the others. Each cell is the first image of the concept's first "
        "prompt at the evaluation's fixed seed.</p>",
    ]
    for rank, (row, grid, curve) in enumerate(pictures, 1):
        parts.append(f"<h3>#{rank} {e(str(row['trial_id']))} ({e(_fmt(row.get(f'final.{OBJECTIVE}')))})</h3>")
        parts.append('<div class="pair">')
        for file, alt in ((grid, "sample grid"), (curve, "curves")):
            if file is None:
                parts.append(f'<p class="note">No {alt} for this trial.</p>')
            else:
                data = base64.b64encode((out_dir / file).read_bytes()).decode("ascii")
                parts.append(
                    f'<a href="{e(file)}"><img class="{"grid" if alt == "sample grid" else "curve"}" '
                    f'src="data:image/png;base64,{data}" alt="{e(alt)} of {e(str(row["trial_id"]))}"></a>'
                )
        parts.append("</div>")
    return "\n".join(parts) + "\n"


def _evaluator_params(run: Any) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if k.startswith(EVALUATOR)}


def _evaluators(client: Any, exp_id: str, sweep: str, runs: Sequence[Any]) -> dict[str, Any]:
    """What measured the sweep's trials: the values every trial shares, the params whose values differ
    within the sweep, and the experiment's other sweeps measured otherwise (param -> their value)."""
    params = [_evaluator_params(r) for r in runs]
    keys = sorted({k for p in params for k in p})
    values = {k: sorted({p.get(k, "(absent)") for p in params}) for k in keys}
    shared = {k: v[0] for k, v in values.items() if len(v) == 1}
    differ = {k: v for k, v in values.items() if len(v) > 1}
    others: dict[str, dict[str, str]] = {}
    parents = [p for stage in PARENT_STAGES for p in search_all(client, exp_id, f"tags.stage = '{stage}'")]
    for parent in parents:
        name = parent.data.tags.get("sweep")
        if not name or name == sweep:
            continue
        one = client.search_runs([exp_id], f"tags.sweep = {_quote(name)} and tags.stage = 'trial'", max_results=1)
        if not one:
            continue
        theirs = _evaluator_params(one[0])
        changed = {
            k: theirs.get(k, "(absent)")
            for k in sorted(set(theirs) | set(shared))
            if k not in differ and theirs.get(k, "(absent)") != shared.get(k, "(absent)")
        }
        if changed:
            others[name] = changed
    return {"shared": shared, "differ": differ, "others": others}


def _evaluators_html(measured: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<h2>What measured these trials</h2>"]
    if measured["differ"]:
        parts.append(
            '<p class="warn">The trials of this sweep were not all measured the same way: their presence and '
            "utility figures are not comparable across these values.</p>"
        )
        parts.append(
            _table_html(
                ["evaluator param", "values in this sweep"], [[k, " / ".join(v)] for k, v in measured["differ"].items()]
            )
        )
    for name, changed in measured["others"].items():
        parts.append(
            f'<p class="warn">Sweep <b>{e(name)}</b> of this experiment was measured differently '
            f"({len(changed)} evaluator params differ): do not compare its figures with these.</p>"
        )
        parts.append(
            _table_html(
                ["evaluator param", "this sweep", e(name)],
                [[k, measured["shared"].get(k, "(absent)"), v] for k, v in changed.items()],
            )
        )
    if measured["shared"]:
        body = [[k.removeprefix(EVALUATOR), v] for k, v in measured["shared"].items()]
        parts.append(_table_html(["evaluator param (every trial)", "value"], body))
    else:
        parts.append('<p class="note">These trials logged no evaluator params (runs of an older version).</p>')
    return "\n".join(parts) + "\n"


# --- reading MLflow ---------------------------------------------------------------------------------------


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    if urlparse(tracking_uri).scheme == "sqlite":
        # MLflow would create an empty store for a mistyped path; a report only reads.
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise SpecError(f"--tracking-uri: no MLflow store at {path}")
    return MlflowClient(tracking_uri)


def _quote(value: str) -> str:
    """A value for an MLflow filter string (which has no escapes: pick the quote the value lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise SpecError(f"--sweep: a sweep name cannot hold both quote characters ({value!r})")


def _find_parent(client: Any, exp_id: str, experiment: str, sweep: str | None) -> Any:
    parents = [run for stage in PARENT_STAGES for run in search_all(client, exp_id, f"tags.stage = '{stage}'")]
    parents = [run for run in parents if run.data.tags.get("sweep")]
    parents.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    if sweep is not None:
        named = [run for run in parents if run.data.tags["sweep"] == sweep]
        if not named:
            known = sorted({run.data.tags["sweep"] for run in parents}) or ["none"]
            raise SpecError(
                f"--sweep: experiment {experiment!r} has no sweep named {sweep!r} (known: {', '.join(known)})"
            )
        return named[0]
    if not parents:
        raise SpecError(f"experiment: {experiment!r} has no sweep runs (tag stage=sweep or stage=defense)")
    return parents[0]


def _searched(runs: Sequence[Any]) -> list[str]:
    """The searched dotted paths, in the order the sweep lists them (a union, should trials disagree)."""
    paths: dict[str, None] = {}
    for run in runs:
        for path in json.loads(run.data.tags.get("searched") or "[]"):
            paths.setdefault(str(path), None)
    return list(paths)


def _param(params: dict[str, str], path: str) -> str | None:
    """A searched value as logged. A path whose value is a mapping was flattened into `path.key` params;
    it comes back as one JSON object so that each choice is one category."""
    if path in params:
        return params[path]
    nested = {k[len(path) + 1 :]: v for k, v in params.items() if k.startswith(path + ".")}
    return json.dumps(nested, sort_keys=True) if nested else None


def _histories(client: Any, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(run id, metric) -> [(step, value)] sorted by step, the last value logged at a step winning (a trial
    restored from a checkpoint logs its steps again)."""

    def one(key: tuple[str, str]) -> list[tuple[int, float]]:
        points = sorted(client.get_metric_history(*key), key=lambda m: (m.step, m.timestamp))
        return sorted({m.step: m.value for m in points}.items())

    with ThreadPoolExecutor(HISTORY_THREADS) as pool:
        return dict(zip(wanted, pool.map(one, wanted), strict=True))


def _rows(client: Any, runs: Sequence[Any], searched: list[str]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """One dict per trial run (the Parquet row), the curve metrics found and the once-per-trial metrics found."""
    # Curves are the metrics the tracker logs at every evaluation; every other metric is logged once per trial
    # (at step 0, or at the end for timings) and kept as logged.
    logged = {k for run in runs for k in run.data.metrics}
    curve_keys = [k for k in CURVE_METRICS if k in logged]
    once_keys = sorted(logged - set(CURVE_METRICS))
    histories = _histories(client, [(run.info.run_id, k) for run in runs for k in curve_keys if k in run.data.metrics])
    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "trial_id": tags.get("trial_id", run.info.run_name),
            "status": run.info.status,
            "method": tags.get("method"),
            "concept": tags.get("concept"),
            "model": tags.get("model"),
            "candidate": tags.get("candidate"),
        }
        row.update({path: _param(params, path) for path in searched})
        for k in curve_keys:
            points = histories.get((run.info.run_id, k))
            row[f"final.{k}"] = points[-1][1] if points else None
            row[f"curve.{k}.step"] = [s for s, _ in points] if points else None
            row[f"curve.{k}.value"] = [v for _, v in points] if points else None
        row.update({k: metrics.get(k) for k in once_keys})
        rows.append(row)
    _type_params(rows, searched)
    return rows, curve_keys, once_keys


def _type_params(rows: list[dict[str, Any]], searched: list[str]) -> None:
    """Params are text in MLflow: a hyperparameter whose every value parses as a number becomes a float."""
    for path in searched:
        values = [row[path] for row in rows if row[path] is not None]
        try:
            [float(v) for v in values]
        except ValueError:
            continue
        if values:
            for row in rows:
                row[path] = float(row[path]) if row[path] is not None else None


def _table(rows: list[dict[str, Any]], searched: list[str], curve_keys: list[str], once_keys: list[str]) -> pa.Table:
    fields = [pa.field(name, pa.string()) for name in ("run_id", "trial_id", "status", "method", "concept", "model")]
    fields.append(pa.field("candidate", pa.string()))  # the tag as text, to join with the candidate runs' tag
    for path in searched:
        numeric = any(isinstance(row[path], float) for row in rows)
        fields.append(pa.field(path, pa.float64() if numeric else pa.string()))
    fields += [pa.field(f"final.{k}", pa.float64()) for k in curve_keys]
    fields += [pa.field(k, pa.float64()) for k in once_keys]
    for k in curve_keys:
        fields += [
            pa.field(f"curve.{k}.step", pa.list_(pa.int64())),
            pa.field(f"curve.{k}.value", pa.list_(pa.float64())),
        ]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def _candidates(runs: Iterable[Any]) -> list[Candidate]:
    out = []
    for run in runs:
        metrics = run.data.metrics
        score = run.data.tags.get("score", "resurgence")  # runs of before `defender.score` scored resurgence
        out.append(
            Candidate(
                number=int(run.data.tags.get("candidate", -1)),
                run_id=run.info.run_id,
                params={
                    k.removeprefix("defender."): v
                    for k, v in sorted(run.data.params.items())
                    if k.startswith("defender.")
                },
                worst=metrics.get(f"worst_{score}", math.nan),
                retention=metrics.get("retention", math.nan),
                feasible=metrics.get("feasible", 0.0) == 1.0,
                status=run.info.status,
                score=score,
                utility=run.data.tags.get("utility", "retention"),
            )
        )
    return sorted(out, key=lambda c: c.number)


# --- plots ------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    # A bare Figure on an Agg canvas: no pyplot, so no global figure registry and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_curves(rows: list[dict[str, Any]], ranked: list[dict[str, Any]], path: Path) -> bool:
    from matplotlib.collections import LineCollection

    steps_key, values_key = f"curve.{OBJECTIVE}.step", f"curve.{OBJECTIVE}.value"
    if not any(row.get(steps_key) for row in rows):
        return False
    best = [row["run_id"] for row in ranked[:BEST_HIGHLIGHTED]]
    fig = _figure(8, 5)
    ax = fig.subplots()
    # One collection for the other trials: a thousand separate lines take seconds to draw.
    others = [
        list(zip(r[steps_key], r[values_key], strict=True))
        for r in rows
        if r.get(steps_key) and r["run_id"] not in best
    ]
    ax.add_collection(LineCollection(others, colors="0.75", linewidths=0.8, zorder=1))
    ax.autoscale_view()
    for rank, run_id in enumerate(best, 1):
        row = next(r for r in rows if r["run_id"] == run_id)
        if row.get(steps_key):
            label = f"#{rank} {row['trial_id']} ({row[f'final.{OBJECTIVE}']:.3g})"
            ax.plot(row[steps_key], row[values_key], linewidth=2, marker="o", markersize=3, label=label, zorder=2)
    ax.axhline(0, color="0.4", linewidth=0.6, linestyle=":")
    ax.set(xlabel="fine-tuning step", ylabel=OBJECTIVE, title=f"{OBJECTIVE} over fine-tuning ({len(rows)} trials)")
    if best:
        ax.legend(title="best trials", fontsize="small")
    fig.savefig(path)
    return True


def _categories(values: Iterable[Any]) -> list[str]:
    return sorted({str(v) for v in values})


def _plot_hyperparameters(rows: list[dict[str, Any]], searched: list[str], path: Path) -> bool:
    import numpy as np

    final = f"final.{OBJECTIVE}"
    panels = [
        (p, [(r[p], r[final], r["status"] == "FINISHED") for r in rows if r[p] is not None and finite(r.get(final))])
        for p in searched
    ]
    panels = [(p, points) for p, points in panels if points]
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _figure(4 * cols, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    jitter = np.random.default_rng(0)  # seeded: the same store draws the same picture
    for ax, (param, points) in zip(axes, panels, strict=False):
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        numeric = all(isinstance(x, float) for x in xs)
        if numeric:
            where = xs
            if min(xs) > 0 and max(xs) / min(xs) >= LOG_SPAN:
                ax.set_xscale("log")
        else:  # categorical: a strip plot, one column per value
            names = _categories(xs)
            where = [names.index(str(x)) + jitter.uniform(-0.15, 0.15) for x in xs]
        # A failed or killed trial's last value is not a final one: drawn hollow.
        done = [i for i, (_, _, finished) in enumerate(points) if finished]
        cut = [i for i, (_, _, finished) in enumerate(points) if not finished]
        ax.scatter([where[i] for i in done], [ys[i] for i in done], s=18, alpha=0.8, color="tab:blue")
        if cut:
            ax.scatter([where[i] for i in cut], [ys[i] for i in cut], s=18, facecolors="none", edgecolors="tab:gray")
        if not numeric:
            ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=20 if len(names) > 3 else 0)
            ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set(xlabel=param, ylabel=f"final {OBJECTIVE}")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.savefig(path)
    return True


def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def importances(rows: list[dict[str, Any]], searched: list[str]) -> dict[str, float] | str:
    """fANOVA importance of each varying hyperparameter for final resurgence over the finished trials, or
    the reason it cannot be computed."""
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

    final = f"final.{OBJECTIVE}"
    done = [r for r in rows if r["status"] == "FINISHED" and finite(r.get(final))]
    if len(done) < 2:
        return f"Importance needs at least 2 finished trials with a final {OBJECTIVE} (this sweep has {len(done)})."
    distributions: dict[str, BaseDistribution] = {}
    for path in searched:
        values = [r[path] for r in done if r[path] is not None]
        if len({str(v) for v in values}) < 2:
            continue  # a fixed value explains nothing
        if all(isinstance(v, float) for v in values):
            low, high = min(values), max(values)
            distributions[path] = FloatDistribution(low, high, log=low > 0 and high / low >= LOG_SPAN)
        else:
            distributions[path] = CategoricalDistribution(_categories(values))
    if not distributions:
        return "Importance needs a searched hyperparameter that varies across the finished trials; none does."
    # optuna needs every trial to hold every parameter: trials missing one are left out.
    usable = [r for r in done if all(r[p] is not None for p in distributions)]
    if len(usable) < 2:
        return "Importance needs at least 2 finished trials that hold every varying hyperparameter."
    if len({r[final] for r in usable}) < 2:  # fANOVA has no variance to apportion
        return f"Every finished trial has the same final {OBJECTIVE} ({usable[0][final]:.4g}): nothing to explain."
    trials = [
        optuna.trial.create_trial(
            params={p: r[p] if isinstance(d, FloatDistribution) else str(r[p]) for p, d in distributions.items()},
            distributions=distributions,
            value=r[final],
        )
        for r in usable
    ]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # create_study announces itself at INFO
    try:
        study = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(trials)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: float(value) for name, value in found.items()}


def _plot_importance(rows: list[dict[str, Any]], searched: list[str], path: Path) -> str | None:
    """Draws importance.png; returns why not when it cannot."""
    found = importances(rows, searched)
    if isinstance(found, str):
        return found
    names = list(found)[::-1]  # most important on top
    fig = _figure(7, max(3.0, 1.2 + 0.5 * len(names)))
    ax = fig.subplots()
    ax.barh(range(len(names)), [found[n] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel=f"fANOVA importance for final {OBJECTIVE}", xlim=(0, 1), title="hyperparameter importance")
    fig.savefig(path)
    return None


def _plot_pareto(candidates: list[Candidate], path: Path) -> None:
    front = pareto_front(candidates)
    on_front = {c.run_id for c in front}
    fig = _figure(7, 5)
    ax = fig.subplots()
    shown = [c for c in candidates if finite(c.worst) and finite(c.retention)]
    feasible = [c for c in shown if c.feasible and c.run_id not in on_front]
    infeasible = [c for c in shown if not c.feasible]
    if feasible:
        ax.scatter([c.worst for c in feasible], [c.retention for c in feasible], color="tab:blue", label="feasible")
    if infeasible:
        ax.scatter(
            [c.worst for c in infeasible],
            [c.retention for c in infeasible],
            facecolors="none",
            edgecolors="tab:gray",
            label="infeasible",
        )
    if front:
        xs, ys = [c.worst for c in front], [c.retention for c in front]
        ax.plot(xs, ys, color="tab:red", marker="o", markersize=8, linewidth=1.5, label="Pareto front", zorder=3)
    for c in shown:
        ax.annotate(str(c.number), (c.worst, c.retention), textcoords="offset points", xytext=(5, 4))
    ax.set(
        xlabel=f"worst {candidates[0].score if candidates else 'presence'} (lower is better)",
        ylabel=f"{candidates[0].utility if candidates else 'retention'} after erasure (higher is better)",
        title=f"defender candidates ({len(candidates)})",
    )
    ax.legend(fontsize="small")
    fig.savefig(path)


# --- the page ---------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; }
img.grid { image-rendering: pixelated; min-width: 24em; max-width: 100%; }
.pair { display: flex; gap: 1em; align-items: flex-start; flex-wrap: wrap; }
.note { color: #666; font-style: italic; }
.warn { color: #a40; font-weight: bold; }
"""


def _fmt(value: Any) -> str:
    return fmt(value, missing="–")


def _with_intervals(row: dict[str, Any], each: list[str]) -> list[str]:
    """A trial row's final resurgence and presence with their 95% intervals, n, then each erased concept's final
    resurgence with its interval (over its own share of the n images)."""
    n = row.get("presence_images")
    resurgence = row.get(f"final.{OBJECTIVE}")
    presence = row.get("final.presence")
    out = [
        with_interval(resurgence, row.get("final.resurgence_lo"), row.get("final.resurgence_hi"), signed=True),
        with_interval(presence, row.get("final.presence_lo"), row.get("final.presence_hi")),
        fmt(n, missing="–"),
    ]
    for key in each:  # resurgence.<name>: its presence now and right after erasure over n / (concepts) images
        name = key.removeprefix("resurgence.")
        now, rise = row.get(f"presence.{name}"), row.get(key)  # logged per evaluation; MLflow keeps the last
        per = n / len(each) if finite(n) else math.nan
        low, high = newcombe(now, per, now - rise, per) if finite(now) and finite(rise) else (math.nan, math.nan)
        out.append(with_interval(rise, low, high, signed=True))
    return out


def _table_html(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        kind = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
        return f"<td{kind}>{html.escape(_fmt(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>\n" for row in body)
    return f"<table>\n<tr>{head}</tr>\n{rows}</table>"


def _image(out_dir: Path, file: str, alt: str, notes: dict[str, str]) -> str:
    if file in notes:
        return f'<p class="note">{html.escape(notes[file])}</p>'
    # Embedded, so the page stands alone (MLflow's artifact viewer shows an HTML file without its folder);
    # the link opens the file next to it.
    data = base64.b64encode((out_dir / file).read_bytes()).decode("ascii")
    return f'<p><a href="{html.escape(file)}"><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></a></p>'


def _html(
    experiment: str,
    sweep: str,
    stage: str,
    rows: list[dict[str, Any]],
    ranked: list[dict[str, Any]],
    searched: list[str],
    candidates: list[Candidate],
    notes: dict[str, str],
    out_dir: Path,
    tail: str = "",
) -> str:
    title = f"resurgence report: {experiment} / {sweep}"
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    others = ", ".join(f"{n} {s.lower()}" for s, n in sorted(statuses.items()) if s not in ("FINISHED", "FAILED"))
    kind = "defender search" if stage == "defense" else "attacker sweep"
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Experiment <b>{e(experiment)}</b>, {e(kind)} <b>{e(sweep)}</b>; generated "
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
        f"<p>{len(rows)} trials: {statuses.get('FINISHED', 0)} finished, {statuses.get('FAILED', 0)} failed"
        f"{e(', ' + others) if others else ''}.</p>",
        "<p>Every trial with its hyperparameters, final metrics and curves: "
        '<a href="trials.parquet">trials.parquet</a>.</p>',
        f"<h2>Best trials by final {e(OBJECTIVE)}</h2>",
    ]
    if ranked:
        with_candidate = any(r["candidate"] is not None for r in rows)
        # several erased concepts: each one's own final resurgence beside the mean
        each = sorted({k for r in rows for k, v in r.items() if k.startswith("resurgence.") and v is not None})
        header = (
            ["#", "trial", "status", f"final {OBJECTIVE} [95% CI]", "final presence [95% CI]", "n images"]
            + [f"final {k} [95% CI]" for k in each]
            + (["candidate"] if with_candidate else [])
            + searched
        )
        body = [
            [i, r["trial_id"], r["status"], *_with_intervals(r, each)]
            + ([r["candidate"]] if with_candidate else [])
            + [r[p] for p in searched]
            for i, r in enumerate(ranked[:BEST_SHOWN], 1)
        ]
        parts.append(_table_html(header, body))
        parts.append(
            '<p class="note">Presence is a proportion over the n images of the erased concepts (each concept its '
            "share of them); its interval is Wilson's, resurgence's Newcombe's hybrid score interval of the "
            "difference from presence right after erasure (methods/evaluation/intervals.py).</p>"
        )
    else:
        parts.append(f'<p class="note">No trial logged a {e(OBJECTIVE)} value.</p>')
    parts += [
        f"<h2>{e(OBJECTIVE.capitalize())} over fine-tuning</h2>",
        _image(out_dir, "curves.png", f"{OBJECTIVE} over fine-tuning steps, one line per trial", notes),
        "<h2>Hyperparameters</h2>",
        _image(out_dir, "hyperparameters.png", f"final {OBJECTIVE} against each searched hyperparameter", notes),
        "<h2>Hyperparameter importance (fANOVA)</h2>",
        _image(out_dir, "importance.png", f"fANOVA importance of each hyperparameter for final {OBJECTIVE}", notes),
    ]
    if candidates:
        front = {c.run_id for c in pareto_front(candidates)}
        best = best_candidate(candidates)
        params = sorted({k for c in candidates for k in c.params})
        parts += [
            "<h2>Defender candidates</h2>",
            _image(out_dir, "pareto.png", "worst case against retention of the defender candidates", notes),
        ]
        if best is None:
            parts.append('<p class="note">No candidate is feasible.</p>')
        else:
            parts.append(
                f"<p>Best feasible candidate: <b>{best.number}</b> (worst {best.score} {e(_fmt(best.worst))},"
                f" {e(best.utility)} {e(_fmt(best.retention))}).</p>"
            )
        worst = f"worst {candidates[0].score}"
        header = ["candidate", "status", *params, worst, candidates[0].utility, "feasible", "Pareto front"]
        body = [
            [c.number, c.status, *[c.params.get(p) for p in params]]
            + [c.worst, c.retention, "yes" if c.feasible else "no", "yes" if c.run_id in front else ""]
            for c in candidates
        ]
        parts.append(_table_html(header, body))
    parts += [tail, "</body></html>\n"]
    return "\n".join(parts)
