"""Compare finished runs: metrics over seeds, training efficiency, plots, a verdict.

``compare(run_dirs, output_dir)`` reads each run directory (``config.yaml``,
``metrics.json``, ``history.jsonl``; see :mod:`vlmtune.history`), groups the runs whose
resolved configs differ only in the top-level ``seed``, and writes to ``output_dir``:

- ``report.md`` and ``report.html`` (self-contained: inline CSS, plots as data URIs),
  built from one list of blocks so the two always say the same thing;
- ``comparison.json`` with every number in the reports;
- ``losses.png``, ``val_curve.png``, ``recall_at_k.png``, ``reliability.png`` (the count
  head's, pooled over seeds) (each only when there is data), and for counting runs a
  table of accuracy per true count.

Which metrics are ranked, and which way, the tasks declare (``Task.ranked_metrics``,
read through :func:`direction`); every other number is shown and never ranked. With
enough seeds, a best mean inside Welch's interval of another group's is no difference.
Efficiency rows of groups that ran with other threads, device or batch are flagged not
comparable and name no winner. Chance levels and
baselines (keys holding ``chance`` or ``baseline``) are rows of their own, placed under
the metric they belong to and never marked best. The verdict gives Welch's t 95%
interval of the difference between the best group and each other (scipy.stats) and
calls two groups apart only when it excludes 0, with at least three seeds in each;
with fewer it says there are too few seeds to tell.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmtune.errors import DataError, VlmtuneError, first_line
from vlmtune.history import EpochRecord, Record, StageRecord, StepRecord, epochs_from_one, read_history
from vlmtune.tasks import metric_direction, report_sections
from vlmtune.utils import flatten

__all__ = ["compare", "direction", "group_runs", "is_reference", "load_run", "order_metrics", "run_efficiency", "Run"]

# Sections of metrics.json in report order: the registered tasks' own (declared on each
# task class, vlmtune.tasks.report_sections()); anything unknown goes between those and TAIL.
TAIL = ("train", "params")
_SEED_SUFFIX = re.compile(r"(?:[-_.](?:seed|s)[-_]?|seed[-_]?)\d+$", re.IGNORECASE)
_TIE_SPAN = re.compile(r"_tie_(min|max|mean)$")  # a recall's tie span, shown under the recall
_RECALL = re.compile(r"^retrieval/(i2t|t2i)_r(\d+)$")


# --------------------------------------------------------------------------- rules


def is_reference(key: str) -> bool:
    """A chance level or baseline: shown beside the metrics, never compared."""
    return "chance" in key or "baseline" in key


def direction(key: str) -> str | None:
    """``"max"`` when higher is better, ``"min"`` when lower is, ``None`` when the key is
    no rankable metric: the tasks declare theirs (``Task.ranked_metrics``); chance
    levels, baselines, counts, settings, thread counts and train/* or params/* numbers
    are shown and never ranked."""
    if is_reference(key):
        return None
    return metric_direction(key)


def order_metrics(keys: list[str]) -> list[str]:
    """Report order: retrieval, grounding, spatial, count, answer, text, others, train,
    params; first-seen order inside a section; each chance/baseline row right under the
    metric it refers to (``retrieval/chance_i2t_r1`` under ``retrieval/i2t_r1``)."""

    sections = report_sections()

    def rank(k: str) -> int:
        section = k.split("/", 1)[0]
        if section in sections:
            return sections.index(section)
        if section in TAIL:
            return len(sections) + 1 + TAIL.index(section)
        return len(sections)

    first = {k: i for i, k in enumerate(keys)}
    refs: dict[str, list[str]] = {}
    main = []
    for k in keys:
        target = _TIE_SPAN.sub("", k.replace("chance_", "").replace("baseline_", ""))
        if (is_reference(k) or _TIE_SPAN.search(k)) and target != k and target in first:
            refs.setdefault(target, []).append(k)
        else:
            main.append(k)
    out = []
    for k in sorted(main, key=lambda k: (rank(k), first[k])):
        out.append(k)
        out.extend(refs.get(k, []))
    return out


# --------------------------------------------------------------------------- reading


@dataclass
class Run:
    """One finished run directory, read at the edge into plain values."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[Record]  # checked against vlmtune.history's schema when read

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def train_setting(self, key: str, default: Any = None) -> Any:
        """``train.<key>`` of the resolved config."""
        train = self.config.get("train") or {}
        return train.get(key, default) if isinstance(train, dict) else default

    @property
    def es_metric(self) -> str | None:
        es = self.train_setting("early_stopping") or {}
        return es.get("metric") if isinstance(es, dict) else None

    @property
    def es_mode(self) -> str | None:
        es = self.train_setting("early_stopping") or {}
        return es.get("mode") if isinstance(es, dict) else None

    @property
    def stages(self) -> list[StageRecord]:
        return [h for h in self.history if isinstance(h, StageRecord)]

    @property
    def steps(self) -> list[StepRecord]:
        return [h for h in self.history if isinstance(h, StepRecord)]

    @property
    def epochs(self) -> list[EpochRecord]:
        return [h for h in self.history if isinstance(h, EpochRecord)]


def load_run(path: str | Path) -> Run:
    """Read a finished run; a missing or unreadable file is a :class:`DataError` naming it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file, not a run folder (name the folder train wrote, e.g. runs/NAME)")
    if not folder.is_dir():
        raise DataError(f"{folder}: no such run directory")
    files = {name: folder / name for name in ("config.yaml", "metrics.json", "history.jsonl")}
    for name, f in files.items():
        if not f.is_file():
            hint = " (the run has not finished, or this is not a run directory)" if name == "metrics.json" else ""
            raise DataError(f"{f}: missing{hint}")
    try:
        config = yaml.safe_load(files["config.yaml"].read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{files['config.yaml']}: not valid YAML ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise DataError(f"{files['config.yaml']}: not a mapping of config sections")
    try:
        metrics = json.loads(files["metrics.json"].read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{files['metrics.json']}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(metrics, dict):
        raise DataError(f"{files['metrics.json']}: not a JSON object of metrics")
    return Run(folder, config, metrics, epochs_from_one(read_history(files["history.jsonl"])))


def _number(v: Any) -> int | float | None:
    """A finite number (ints stay ints, so counts print without decimals); else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------- grouping


@dataclass
class Group:
    name: str
    runs: list[Run]
    differs: dict[str, Any]  # the config keys (dotted) that differ between groups, with this group's values


def _without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """The config a group shares: without ``seed``, and without the folders that only say
    where a sweep kept what its seeds share (``train --seeds`` sets ``cache.dir``, whose
    features are keyed by content, and the synthetic set's ``data.synthetic_dir``, whose
    contents ``data.synthetic`` decides): two sweeps of one config are one group."""
    out = {k: v for k, v in config.items() if k != "seed"}
    for section, key in (("cache", "dir"), ("data", "synthetic_dir")):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def _stem(path: Path) -> str:
    """``runs/abl_seed0`` -> ``abl``; ``runs/abl/seed_0`` -> ``abl``."""
    stem = _SEED_SUFFIX.sub("", path.name)
    return stem or path.resolve().parent.name or path.name


def _short(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def group_runs(runs: list[Run], labels: list[str] | None = None) -> list[Group]:
    """Runs whose configs are equal but for ``seed`` form a group, in order of first appearance."""
    buckets: dict[str, list[Run]] = {}
    for r in runs:
        buckets.setdefault(json.dumps(_without_seed(r.config), sort_keys=True, default=str), []).append(r)
    members = list(buckets.values())
    flat = [flatten(_without_seed(m[0].config)) for m in members]
    all_keys = list(dict.fromkeys(k for f in flat for k in f))
    differing = [k for k in all_keys if len({json.dumps(f.get(k, "<absent>"), default=str) for f in flat}) > 1]
    differs = [{k: f.get(k, "<absent>") for k in differing} for f in flat]

    if labels is not None:
        if len(labels) != len(members):
            raise VlmtuneError(
                f"labels: {len(labels)} given for {len(members)} groups of runs "
                f"(first runs: {', '.join(str(m[0].path) for m in members)})"
            )
        if len(set(labels)) != len(labels):
            raise VlmtuneError(f"labels: must be distinct, got {', '.join(labels)}")
        names = list(labels)
    else:
        names = _names(members, differs)
    return [Group(n, m, d) for n, m, d in zip(names, members, differs)]


def _names(members: list[list[Run]], differs: list[dict[str, Any]]) -> list[str]:
    stems = [{_stem(r.path) for r in m} for m in members]
    if all(len(s) == 1 for s in stems) and len({next(iter(s)) for s in stems}) == len(members):
        return [next(iter(s)) for s in stems]
    by_diff = [", ".join(f"{k}={_short(v)}" for k, v in d.items()) for d in differs]
    if all(by_diff) and len(set(by_diff)) == len(by_diff) and max(map(len, by_diff)) <= 48:
        return by_diff
    return [f"G{i + 1}" for i in range(len(members))]


# --------------------------------------------------------------------------- numbers


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    return {
        "mean": statistics.fmean(values) if n else None,
        "std": statistics.stdev(values) if n >= 2 else None,
        "n": n,
        "values": values,
    }


def _best(stats: dict[str, dict[str, Any]], way: str | None) -> list[str]:
    """Names of the groups with the best mean (ties all win); none when under two groups
    have one. When every group has MIN_SEEDS runs or more, the best must also be
    separated from each other group (Welch's interval of the difference excludes 0):
    means within the interval are no difference, and nothing is marked."""
    have = {g: s for g, s in stats.items() if s["n"] > 0}
    if way is None or len(have) < 2:
        return []
    means = {g: s["mean"] for g, s in have.items()}
    top = max(means.values()) if way == "max" else min(means.values())
    best = [g for g, m in means.items() if math.isclose(m, top, rel_tol=1e-12, abs_tol=1e-12)]
    if all(s["n"] >= MIN_SEEDS for s in have.values()):
        for b in best:
            for g in have:
                if g not in best:
                    ci = difference_interval(have[b]["values"], have[g]["values"])
                    if ci["low"] <= 0 <= ci["high"]:
                        return []
        if len(best) > 1:
            return []
    return best


def run_efficiency(run: Run, metric: str, mode: str, tolerance: float) -> dict[str, Any]:
    """Per-run efficiency: epochs and wall time to come within ``tolerance`` of the run's
    best validation ``metric``, total wall time, training samples/s, memory, parameters."""
    # A validation metric may be missing from some epochs (or only be a test metric).
    curve = [(h, v) for h in run.epochs if (v := _number(h.val.get(metric))) is not None]
    out: dict[str, Any] = {"epochs_to_target": None, "wall_to_target_s": None, "best_val": None}
    if curve:
        values = [v for _, v in curve]
        best = max(values) if mode == "max" else min(values)
        first = next(h for h, v in curve if (v >= best - tolerance if mode == "max" else v <= best + tolerance))
        out.update(best_val=best, epochs_to_target=first.epoch, wall_to_target_s=first.wall_s)
    last = run.epochs[-1] if run.epochs else None
    wall = _number(run.metrics.get("train/wall_s"))
    if wall is None and last is not None:
        wall = last.wall_s
    # Samples over training time alone (validation left out), both cumulative in the last epoch line.
    samples = last.samples if last is not None else None
    seconds = last.train_wall_s if last is not None else None
    out.update(
        wall_s=wall,
        samples=samples,
        samples_per_s=samples / seconds if samples is not None and seconds else None,
        peak_mem_mb=_number(run.metrics.get("train/peak_mem_mb")),
        trainable_params=_number(run.metrics.get("params/trainable")),
        total_params=_number(run.metrics.get("params/total")),
    )
    return out


# (key, row label, better side); "target" resolves to the target metric's mode.
EFFICIENCY = (
    ("epochs_to_target", "epochs to target", "min"),
    ("wall_to_target_s", "wall time to target (s)", "min"),
    ("best_val", "best validation value", "target"),
    ("wall_s", "total wall time (s)", "min"),
    ("samples_per_s", "training samples / s", "max"),
    ("peak_mem_mb", "peak memory (MB)", "min"),
    ("trainable_params", "trainable parameters", None),
    ("total_params", "total parameters", None),
)


def _choose_target(runs: list[Run], target_metric: str | None) -> tuple[str, str, list[str]]:
    notes = []
    if target_metric:
        metric = target_metric.removeprefix("val/")
    else:
        found = list(dict.fromkeys(r.es_metric for r in runs if r.es_metric))
        if not found:
            raise VlmtuneError("target metric: no run's config.yaml names train.early_stopping.metric; pass one")
        metric = found[0]
        if len(found) > 1:
            notes.append(
                f"The runs stop early on different metrics ({', '.join(found)}); compared on {metric}, "
                "the first run's. Pass a target metric to choose another."
            )
    logged = {k for r in runs for h in r.epochs for k in h.val}
    if metric not in logged and metric not in {k for r in runs for k in r.metrics}:
        raise VlmtuneError(
            f"target metric: '{metric}' is neither a validation metric in history.jsonl nor a key of "
            f"metrics.json in any run (validation metrics: {', '.join(sorted(logged)) or 'none'})"
        )
    modes = {r.es_mode for r in runs if r.es_metric == metric and r.es_mode in ("max", "min")}
    mode = modes.pop() if len(modes) == 1 else (direction(metric) or "max")
    return metric, mode, notes


# Seeds per group below which compare does not call a difference either way.
MIN_SEEDS = 3
CONFIDENCE = 0.95


def difference_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Welch's t confidence interval of mean(a) - mean(b) (scipy.stats.ttest_ind with
    unequal variances): {"low", "high", "df", "confidence", "method"}. Two groups with
    no spread at all give the point interval [diff, diff]."""
    from scipy import stats as sps

    diff = statistics.fmean(a) - statistics.fmean(b)
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return {"low": diff, "high": diff, "df": float(len(a) + len(b) - 2), "confidence": confidence, "method": "welch_t"}
    res = sps.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=confidence)
    return {"low": float(ci.low), "high": float(ci.high), "df": float(res.df), "confidence": confidence, "method": "welch_t"}


def _verdict(metric: str, mode: str, stats: dict[str, dict[str, Any]], source: str) -> dict[str, Any]:
    """Best group by mean; against each other group, Welch's t interval of the difference.
    The data separate two groups only when the interval excludes 0, with at least
    MIN_SEEDS runs in each; fewer, and the verdict says there are too few seeds to tell."""
    have = {g: s for g, s in stats.items() if s["n"] > 0}
    better = "higher" if mode == "max" else "lower"
    if len(have) < 2:
        return {
            "best": next(iter(have), None),
            "separated": False,
            "comparisons": [],
            "text": f"Only {len(have)} group has {source} {metric}; there is nothing to compare.",
        }
    ranked = sorted(have, key=lambda g: have[g]["mean"], reverse=mode == "max")
    best, b = ranked[0], have[ranked[0]]
    d = _decimals(b["mean"])
    text: list[str] = []
    comparisons = []
    for g in ranked[1:]:
        o = have[g]
        diff = b["mean"] - o["mean"]
        rel = 100 * diff / abs(o["mean"]) if o["mean"] else None
        interval = None
        if b["n"] < MIN_SEEDS or o["n"] < MIN_SEEDS:
            sep = False
            why = f"too few seeds to tell (n={b['n']} and {o['n']}; at least {MIN_SEEDS} per group are needed for an interval)"
        else:
            interval = difference_interval(b["values"], o["values"])
            lo, hi = interval["low"], interval["high"]
            sep = lo > 0 or hi < 0
            ci = f"{100 * interval['confidence']:.0f}% interval [{lo:+.{d}f}, {hi:+.{d}f}] (Welch's t)"
            why = f"{ci} excludes 0, so the data separate them" if sep else f"{ci} includes 0, so the data do not separate them"
        rel_text = f", {rel:+.1f}%" if rel is not None else ""
        text.append(f"Against {g} ({_pm(o, d, True)}, n={o['n']}) the difference is {diff:+.{d}f}{rel_text}: {why}.")
        comparisons.append({"group": g, "difference": diff, "relative_pct": rel, "separated": sep, "interval": interval})
    separated = all(c["separated"] for c in comparisons)
    tested = [c for c in comparisons if c["interval"] is not None]
    if separated:
        head = f"On {source} {metric} ({better} is better), {best} is best with {_pm(b, d, True)} (n={b['n']})."
    elif tested and len(tested) == len(comparisons) and not any(c["separated"] for c in comparisons):
        head = (
            f"On {source} {metric} ({better} is better), the data show no difference between the groups: "
            f"{best} has the {'highest' if mode == 'max' else 'lowest'} mean, {_pm(b, d, True)} (n={b['n']}), "
            "within the interval of every other group's."
        )
    else:
        head = (
            f"On {source} {metric} ({better} is better), {best} has the {'highest' if mode == 'max' else 'lowest'} "
            f"mean, {_pm(b, d, True)} (n={b['n']}), but it is not separated from every other group."
        )
    return {"best": best, "separated": separated, "comparisons": comparisons, "text": " ".join([head, *text])}


# --------------------------------------------------------------------------- formatting


def _decimals(x: float | None, values: list[float] | None = None) -> int:
    """Digits after the point: none for counts (all values ints and equal) and for
    magnitudes of 1000 and up, 2 from 1, 4 below."""
    if x is None:
        return 2
    if values and all(isinstance(v, int) for v in values) and len(set(values)) == 1:
        return 0
    return 0 if abs(x) >= 1000 else 2 if abs(x) >= 1 else 4


def _pm(s: dict[str, Any], d: int | None = None, prose: bool = False) -> str:
    """``mean ± std`` with the mean's precision; std is ``—`` for a single value (left
    out in prose)."""
    if not s["n"]:
        return "n/a"
    d = _decimals(s["mean"], s["values"]) if d is None else d
    if s["std"] is None:
        return f"{s['mean']:.{d}f}" if prose else f"{s['mean']:.{d}f} ± —"
    return f"{s['mean']:.{d}f} ± {s['std']:.{d}f}"


@dataclass
class Cell:
    text: str
    bold: bool = False
    italic: bool = False


# Blocks: ("h1"|"h2"|"h3"|"p", text), ("ul", [text]), ("table", header, rows), ("img", file, alt).
Block = tuple


def _render_md(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {t}" for t in b[1]))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "table":

            def cell(c: Cell | str) -> str:
                c = c if isinstance(c, Cell) else Cell(c)
                t = c.text.replace("|", "\\|")
                t = f"**{t}**" if c.bold else t
                return f"*{t}*" if c.italic else t

            header, rows = b[1], b[2]
            lines = [
                "| " + " | ".join(cell(h) for h in header) + " |",
                "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            ]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}
tr.ref td{color:#666;font-style:italic;background:#fafafa}
td.best{font-weight:bold;background:#e8f5e9}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
code{background:#f3f3f3;padding:0 3px}
"""


def _render_html(blocks: list[Block], folder: Path, title: str) -> str:
    e = html.escape
    out = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head><body>']
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(t)}</li>" for t in b[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((folder / b[1]).read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}"><figcaption>{e(b[2])}</figcaption></figure>'
            )
        elif kind == "table":
            header, rows = b[1], b[2]
            t = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
            for row in rows:
                cells = [c if isinstance(c, Cell) else Cell(c) for c in row]
                ref = any(c.italic for c in cells)
                t.append('<tr class="ref">' if ref else "<tr>")
                t.extend(f'<td class="best">{e(c.text)}</td>' if c.bold else f"<td>{e(c.text)}</td>" for c in cells)
                t.append("</tr>")
            t.append("</tbody></table>")
            out.append("".join(t))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots


def _colors(groups: list[Group]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {g.name: cmap(i % 10) for i, g in enumerate(groups)}


def _describe(fig: Figure, file: str) -> dict[str, Any]:
    axes = []
    for ax in fig.axes:
        leg = ax.get_legend()
        axes.append(
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "legend": [t.get_text() for t in leg.get_texts()] if leg else [],
            }
        )
    return {"file": file, "title": fig.get_suptitle(), "axes": axes}


def _save(fig: Figure, folder: Path, file: str) -> dict[str, Any]:
    from vlmtune.runfolder import write_atomic  # never through a symbolic link

    write_atomic(folder / file, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return _describe(fig, file)


def _stage_marks(ax: Any, marks: dict[float, set[str]]) -> None:
    """Dashed vertical line per stage start, labelled with the stage name(s)."""
    for x, names in sorted(marks.items()):
        ax.axvline(x, color="0.35", linestyle="--", linewidth=1)
        ax.text(
            x,
            0.98,
            " " + " / ".join(sorted(names)),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="left",
            fontsize=7,
            color="0.25",
        )


def _losses(h: StepRecord) -> dict[str, float]:
    """A step line's total loss (``"loss"``, when the window had a finite step) and terms (``"loss/<term>"``)."""
    total = {"loss": h.loss} if h.loss is not None else {}
    return total | {f"loss/{k}": v for k, v in h.terms.items()}


def _plot_losses(groups: list[Group], colors: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    terms: list[str] = []
    for g in groups:
        for r in g.runs:
            for h in r.steps:
                terms.extend(k for k in _losses(h) if k not in terms)
    if not terms:
        return None
    terms.sort(key=lambda k: k != "loss")  # the total first
    marks: dict[float, set[str]] = {}
    for g in groups:
        for r in g.runs:
            for st in r.stages:
                marks.setdefault(float(st.step), set()).add(st.name)
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, term in zip(axes, terms):
        for g in groups:
            for i, r in enumerate(g.runs):
                pts = [(h.step, y) for h in r.steps if (y := _number(_losses(h).get(term))) is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colors[g.name], linewidth=1.2, alpha=0.85, label=g.name if i == 0 else None)
        _stage_marks(ax, marks)
        ax.set_title("total loss" if term == "loss" else term)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean over logging window)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="group", fontsize=8)
    for ax in axes[len(terms) :]:
        ax.remove()
    fig.suptitle("Training loss terms per step (one line per run, coloured by group; dashed: stage starts)")
    return _save(fig, folder, "losses.png")


def _plot_val_curve(groups: list[Group], colors: dict[str, Any], metric: str, folder: Path) -> dict[str, Any] | None:
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    marks: dict[float, set[str]] = {}
    drawn = False
    for g in groups:
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for h in r.epochs:
                if (v := _number(h.val.get(metric))) is not None:
                    per_epoch.setdefault(h.epoch, []).append(v)
            for st in r.stages:
                marks.setdefault(st.epoch - 0.5, set()).add(st.name)  # before the stage's first epoch
        if not per_epoch:
            continue
        xs = sorted(per_epoch)
        ax.plot(
            xs,
            [statistics.fmean(per_epoch[x]) for x in xs],
            marker="o",
            markersize=3,
            color=colors[g.name],
            label=f"{g.name} (n={len(g.runs)})",
        )
        ax.fill_between(
            xs, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs], color=colors[g.name], alpha=0.2, linewidth=0
        )
        drawn = True
    if not drawn:
        return None
    _stage_marks(ax, marks)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Validation {metric} per epoch (line: mean over seeds; band: min–max)")
    ax.grid(alpha=0.3)
    ax.legend(title="group", fontsize=8)
    return _save(fig, folder, "val_curve.png")


def _plot_recall(
    groups: list[Group], colors: dict[str, Any], stats: dict[str, dict[str, dict[str, Any]]], folder: Path
) -> dict[str, Any] | None:
    keys = [k for k in stats if _RECALL.match(k)]

    def order(k: str) -> tuple[bool, int]:
        m = _RECALL.match(k)
        assert m is not None  # keys holds only names that match
        return (m[1] != "i2t", int(m[2]))

    keys.sort(key=order)
    if not keys:
        return None
    fig = Figure(figsize=(min(14.0, max(6.0, len(keys) * (0.6 + 0.35 * len(groups)))), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        xs, ys, err = [], [], []
        for j, k in enumerate(keys):
            s = stats[k][g.name]
            if s["n"]:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(s["mean"])
                err.append(s["std"])
        ax.bar(xs, ys, width, color=colors[g.name], label=f"{g.name} (n={len(g.runs)})")
        with_std = [(x, y, e) for x, y, e in zip(xs, ys, err) if e is not None]
        if with_std:
            ex, ey, ee = zip(*with_std)
            ax.errorbar(ex, ey, ee, fmt="none", ecolor="black", capsize=3, linewidth=1)
    chance_stats = [(j, stats.get(k.replace("retrieval/", "retrieval/chance_"))) for j, k in enumerate(keys)]
    chance = [
        (j, statistics.fmean([v for s in c.values() for v in s["values"]]))
        for j, c in chance_stats
        if c and any(s["n"] for s in c.values())
    ]
    if chance:
        ax.hlines(
            [c for _, c in chance],
            [j - 0.45 for j, _ in chance],
            [j + 0.45 for j, _ in chance],
            colors="black",
            linestyles=":",
            label="chance",
            zorder=3,
        )
    ax.set_xticks(range(len(keys)), [k.removeprefix("retrieval/").replace("_r", " R@") for k in keys])
    ax.set_xlabel("direction and K")
    ax.set_ylabel("recall (%)")
    ax.set_title("Test retrieval recall@K by group (mean; error bars: std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "recall_at_k.png")


# --------------------------------------------------------------------------- compare


def _load_runs(run_dirs: list[str | Path], tolerance: float) -> list[Run]:
    """The runs to compare, each given once."""
    if not run_dirs:
        raise VlmtuneError("compare: no run directories given")
    if not (tolerance >= 0):
        raise VlmtuneError(f"tolerance: must be >= 0, got {tolerance}")
    seen: dict[Path, str] = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            raise VlmtuneError(f"{d}: given twice")
        seen[key] = str(d)
    return [load_run(d) for d in run_dirs]


def compare(
    run_dirs: list[str | Path],
    output_dir: str | Path,
    *,
    target_metric: str | None = None,
    tolerance: float = 1.0,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """Compare finished runs and write ``report.md``, ``report.html``, ``comparison.json``
    and the plots to ``output_dir``; returns what ``comparison.json`` holds.

    Runs whose ``config.yaml`` differ only in the top-level ``seed`` form a group; each
    group is reported as mean ± sample std over its runs. ``target_metric`` (default: the
    runs' ``train.early_stopping.metric``) drives the efficiency numbers and the verdict;
    a run reaches it at the first epoch whose validation value is within ``tolerance``
    (absolute, in the metric's units) of that run's best. ``labels`` name the groups, one
    per group in order of first appearance.
    """
    runs = _load_runs(run_dirs, tolerance)
    groups = group_runs(runs, labels)
    metric, mode, notes = _choose_target(runs, target_metric)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    stats, metrics_json = _metric_stats(runs, groups)
    per_run = {str(r.path): run_efficiency(r, metric, mode, tolerance) for r in runs}
    apart = efficiency_settings(groups)
    efficiency = _efficiency(groups, per_run, mode, comparable=not apart)
    notes.extend(_run_notes(runs, groups, per_run, metric))

    # The verdict uses the test metric when metrics.json has it, else the best validation value.
    if metric in stats:
        verdict = _verdict(metric, mode, stats[metric], "test")
    else:
        verdict = _verdict(metric, mode, efficiency["best_val"]["groups"], "best validation")
    plots = _plots(groups, stats, metric, out)

    result = {
        "target_metric": metric,
        "mode": mode,
        "tolerance": tolerance,
        "groups": _group_rows(groups),
        "metrics": metrics_json,
        "efficiency": efficiency,
        "efficiency_runs": per_run,
        "efficiency_settings": apart,
        "verdict": verdict,
        "plots": plots,
        "notes": notes,
        "files": {"markdown": "report.md", "html": "report.html", "json": "comparison.json"},
    }
    blocks = _blocks(result, groups)
    from vlmtune.runfolder import write_file  # atomic, never through a symbolic link

    write_file(out / "report.md", _render_md(blocks))
    write_file(out / "report.html", _render_html(blocks, out, "vlmtune run comparison"))
    write_file(out / "comparison.json", json.dumps(result, indent=2, default=str))
    return result


def _group_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """The ``groups`` section of comparison.json: each group's name, runs, seeds, size and what sets it apart."""
    return [
        {
            "name": g.name,
            "runs": [str(r.path) for r in g.runs],
            "seeds": [r.seed for r in g.runs],
            "n": len(g.runs),
            "differs": g.differs,
        }
        for g in groups
    ]


def _metric_stats(runs: list[Run], groups: list[Group]) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """Per metric of metrics.json and per group, the stats of its runs' values; and the
    ``metrics`` section of comparison.json (direction, reference, stats, best groups)."""
    # Metrics of metrics.json: every finite number (not lists such as confusion matrices).
    keys = order_metrics(list(dict.fromkeys(k for r in runs for k, v in r.metrics.items() if _number(v) is not None)))
    stats = {
        k: {g.name: _stats([v for r in g.runs if (v := _number(r.metrics.get(k))) is not None]) for g in groups} for k in keys
    }
    metrics_json = {
        k: {"direction": direction(k), "reference": is_reference(k), "groups": stats[k], "best": _best(stats[k], direction(k))}
        for k in keys
    }
    return stats, metrics_json


def _efficiency(
    groups: list[Group], per_run: dict[str, dict[str, Any]], mode: str, comparable: bool = True
) -> dict[str, dict[str, Any]]:
    """The ``efficiency`` section: per EFFICIENCY key, its better side and each group's
    stats; the timed rows (:data:`TIMED`) name no best when not ``comparable``."""
    efficiency: dict[str, dict[str, Any]] = {}
    for key, _, way in EFFICIENCY:
        way = mode if way == "target" else way
        st = {g.name: _stats([v for r in g.runs if (v := per_run[str(r.path)][key]) is not None]) for g in groups}
        ok = comparable or key not in TIMED
        efficiency[key] = {"direction": way, "groups": st, "best": _best(st, way) if ok else [], "comparable": ok}
    return efficiency


# Efficiency rows that time or weigh a run: comparable only between runs with the same
# threads, device and batch (EFFICIENCY_SETTINGS).
TIMED = ("wall_to_target_s", "wall_s", "samples_per_s", "peak_mem_mb")
# What makes timings comparable: (label, where a run records it).
EFFICIENCY_SETTINGS: tuple[tuple[str, Callable[[Run], Any]], ...] = (
    ("threads (train/num_threads)", lambda r: r.metrics.get("train/num_threads")),
    ("device (train/device)", lambda r: r.metrics.get("train/device")),
    ("batch (train.batch_size x train.grad_accum)", lambda r: (r.train_setting("batch_size"), r.train_setting("grad_accum"))),
)


def efficiency_settings(groups: list[Group]) -> dict[str, dict[str, Any]]:
    """The settings (threads, device, batch) whose values differ between the runs being
    compared: {label: {group: its value, or the values of its runs when they differ}}.
    Empty when every run used the same (a setting no run records is left out)."""
    out: dict[str, dict[str, Any]] = {}
    for label, read in EFFICIENCY_SETTINGS:
        per_group = {g.name: list(dict.fromkeys(json.dumps(read(r), default=str) for r in g.runs)) for g in groups}
        values = {v for vs in per_group.values() for v in vs}
        if len(values) > 1:
            out[label] = {g: json.loads(vs[0]) if len(vs) == 1 else [json.loads(v) for v in vs] for g, vs in per_group.items()}
    return out


def _run_notes(runs: list[Run], groups: list[Group], per_run: dict[str, dict[str, Any]], metric: str) -> list[str]:
    """Notes on the runs: those without a validation curve of ``metric``, groups whose runs share a seed."""
    notes = []
    no_curve = [str(r.path) for r in runs if per_run[str(r.path)]["epochs_to_target"] is None]
    if no_curve:
        notes.append(f"history.jsonl has no val/{metric}, so no time to target, in: {', '.join(no_curve)}.")
    for g in groups:
        seeds = [r.seed for r in g.runs]
        if len(set(map(str, seeds))) < len(seeds):
            notes.append(
                f"{g.name}: some runs share a seed ({', '.join(map(str, seeds))}); the spread understates seed variance."
            )
    return notes


def _plots(groups: list[Group], stats: dict[str, dict[str, dict[str, Any]]], metric: str, out: Path) -> dict[str, Any]:
    """Draw the loss, validation-curve and recall@K plots into ``out``: those there is data for."""
    colors = _colors(groups)
    plots = {}
    for name, info in (
        ("losses", _plot_losses(groups, colors, out)),
        ("val_curve", _plot_val_curve(groups, colors, metric, out)),
        ("recall_at_k", _plot_recall(groups, colors, stats, out)),
        ("reliability", _plot_reliability(groups, colors, out)),
    ):
        if info is not None:
            plots[name] = info
    return plots


def _blocks(result: dict[str, Any], groups: list[Group]) -> list[Block]:
    metric, mode, tol = result["target_metric"], result["mode"], result["tolerance"]
    names = [g.name for g in groups]
    header = ["metric"] + [f"{g.name} (n={len(g.runs)})" for g in groups]
    b: list[Block] = [
        ("h1", "Run comparison"),
        (
            "p",
            f"Target metric: {metric} ({'higher' if mode == 'max' else 'lower'} is better); "
            f"time-to-target tolerance: {tol:g} (absolute, in the metric's units).",
        ),
        ("h2", "Verdict"),
        ("p", result["verdict"]["text"]),
        ("h2", "Groups"),
        ("p", "Runs whose resolved config.yaml differ only in the top-level seed form a group."),
        (
            "table",
            ["group", "runs", "seeds"],
            [[g["name"], ", ".join(g["runs"]), ", ".join(map(str, g["seeds"]))] for g in result["groups"]],
        ),
    ]
    differing = list(dict.fromkeys(k for g in groups for k in g.differs))
    if differing:
        b += [
            ("h3", "What differs between groups"),
            ("table", ["config key"] + names, [[k] + [_short(g.differs.get(k)) for g in groups] for k in differing]),
        ]

    rows = []
    for k, m in result["metrics"].items():
        row: list[Cell | str] = [Cell(k + (" (reference)" if m["reference"] else ""), italic=m["reference"])]
        for g in names:
            row.append(Cell(_pm(m["groups"][g]) + _n_note(m["groups"][g], groups, g), bold=g in m["best"], italic=m["reference"]))
        rows.append(row)
    b += [
        ("h2", "Metrics (test split, mean ± sample std over seeds)"),
        (
            "p",
            "Bold: the best group's mean, on the metrics the tasks declare rankable (each with its better "
            "side); counts, settings, thread counts, tie spans and the train/* and params/* numbers are shown, "
            f"never ranked. With {MIN_SEEDS} or more seeds in every group, a best mean within Welch's 95% interval "
            "of another group's is no difference, and nothing is bold. Italic rows are chance levels or "
            "baselines, shown under their metric and never marked. A std of — means a single run.",
        ),
        ("table", header, rows),
    ]

    b += _efficiency_blocks(result, groups)

    captions = {
        "losses": "Loss terms per optimizer step",
        "val_curve": f"Validation {metric} per epoch",
        "recall_at_k": "Test recall@K by group",
        "reliability": "Count head reliability by group (test split, bins pooled over seeds)",
    }
    b += _per_count_blocks(groups)
    if result["plots"]:
        b.append(("h2", "Plots"))
        for name, info in result["plots"].items():
            b.append(("img", info["file"], captions[name]))
    if result["notes"]:
        b += [("h2", "Notes"), ("ul", result["notes"])]
    return b


def _efficiency_blocks(result: dict[str, Any], groups: list[Group]) -> list[Block]:
    """The training-efficiency table, with the settings that make its timings not comparable."""
    metric, tol = result["target_metric"], result["tolerance"]
    names = [g.name for g in groups]
    rows = []
    apart = result["efficiency_settings"]
    for key, label, _ in EFFICIENCY:
        e = result["efficiency"][key]
        lab = f"best validation {metric}" if key == "best_val" else label
        if key in TIMED and apart:
            lab += " (not comparable)"
        rows.append([lab] + [Cell(_pm(e["groups"][g]) + _n_note(e["groups"][g], groups, g), bold=g in e["best"]) for g in names])
    if apart:
        for k, v in apart.items():
            rows.append([f"setting: {k}", *(_short(v.get(g)) for g in names)])
    return [
        ("h2", "Training efficiency (mean ± sample std over seeds)"),
        (
            "p",
            f"Epochs and wall time to target: the first epoch whose validation {metric} is within {tol:g} of "
            "that run's best validation value. Total wall time is train/wall_s (training and validation). "
            "Samples/s: training samples processed over training wall time (validation left out), both "
            "from history.jsonl's last epoch line."
            + (
                " The groups ran with different "
                + ", ".join(result["efficiency_settings"])
                + " (rows below), so their times, speeds and memory are not comparable and no winner is marked."
                if result["efficiency_settings"]
                else ""
            ),
        ),
        ("table", ["quantity"] + [f"{g.name} (n={len(g.runs)})" for g in groups], rows),
    ]


def _per_count_blocks(groups: list[Group]) -> list[Block]:
    """The counting head's test accuracy per true count (``count/per_count``), one
    column per group (mean ± std over its runs), when any run has it."""
    per: dict[str, dict[str, list[float]]] = {}
    support: dict[str, dict[str, int]] = {}
    for g in groups:
        for r in g.runs:
            for row in r.metrics.get("count/per_count") or []:
                if isinstance(row, dict) and row.get("accuracy") is not None:
                    per.setdefault(str(row["count"]), {}).setdefault(g.name, []).append(float(row["accuracy"]))
                    support.setdefault(str(row["count"]), {})[g.name] = int(row.get("n", 0))
    if not per:
        return []
    rows = [[c, *(_pm(_stats(per[c].get(g.name, []))) + f" (n={support[c].get(g.name, 0)})" for g in groups)] for c in per]
    return [
        ("h2", "Counting: accuracy per true count (test split, mean ± std over seeds)"),
        ("p", "Each cell: the count head's accuracy on the test records of that true count (n: those records, per run)."),
        ("table", ["true count"] + [f"{g.name} (n={len(g.runs)})" for g in groups], rows),
    ]


def _plot_reliability(groups: list[Group], colors: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """Accuracy against confidence of the count head's bins (``count/reliability``), pooled over each group's runs."""
    fig = Figure(figsize=(5.5, 4.8), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for g in groups:
        pooled: dict[float, list[float]] = {}  # bin low -> [n, n * confidence, n * accuracy]
        for r in g.runs:
            for b in r.metrics.get("count/reliability") or []:
                acc = pooled.setdefault(float(b["low"]), [0.0, 0.0, 0.0])
                acc[0] += b["n"]
                acc[1] += b["n"] * b["confidence"]
                acc[2] += b["n"] * b["accuracy"]
        if not pooled:
            continue
        pts = [(c / n, a / n) for _, (n, c, a) in sorted(pooled.items()) if n]
        ax.plot(*zip(*pts), marker="o", color=colors[g.name], label=f"{g.name} (n={len(g.runs)})")
        drawn = True
    if not drawn:
        return None
    ax.plot([0, 100], [0, 100], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_xlabel("count head's confidence (bin mean, %)")
    ax.set_ylabel("accuracy in the bin (%)")
    ax.set_title("Count head reliability (test split, bins pooled over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "reliability.png")


def _n_note(s: dict[str, Any], groups: list[Group], name: str) -> str:
    """Flag a cell whose n is smaller than its group (a key missing from some runs)."""
    size = next(len(g.runs) for g in groups if g.name == name)
    return f" (n={s['n']})" if 0 < s["n"] < size else ""
