"""A study's report: ``study.json`` (everything), ``study.md`` (the tables) and ``study.png``.

:func:`build_report` turns the runs' records into per-arm intervals, paired differences and
verdicts (:mod:`dualdiff.study.stats`, rule :data:`~dualdiff.study.stats.VERDICT_RULE`);
:func:`write_report` writes the three files. Every arm and every seed the study planned is in
the report: a failed run is listed with its error, and a claim that misses one of its runs is
judged inconclusive.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dualdiff.study.runner import RunRecord, Study, atomic_write_json
from dualdiff.study.stats import (LEVEL, VERDICT_RULE, Interval, paired_differences,
                                  paired_interval, t_interval, verdict)

__all__ = ["build_report", "write_report", "format_markdown", "plot_report"]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}"
    return str(v)


def _ci(iv: Mapping[str, Any]) -> str:
    if iv["n"] == 0:
        return "no value"
    if iv["n"] < 2:
        return f"{_fmt(iv['mean'])} (n=1, no interval)"
    return f"{_fmt(iv['mean'])} [{_fmt(iv['low'])}, {_fmt(iv['high'])}] (n={iv['n']})"


def build_report(study: Study, records: Sequence[RunRecord],
                 timing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as a JSON-safe dict (the content of ``study.json``)."""
    values: dict[str, dict[str, dict[int, float | None]]] = {
        a: {m.name: {} for m in study.metrics} for a in study.arms}
    failed = []
    runs = []
    for rec in records:
        for m in study.metrics:
            values[rec.run.arm][m.name][rec.run.seed] = rec.metrics.get(m.name) \
                if rec.status == "done" else None
        if rec.status != "done":
            failed.append({"run": rec.run.name, "arm": rec.run.arm, "seed": rec.run.seed,
                           "error": rec.error})
        runs.append({"index": rec.run.index, "arm": rec.run.arm, "seed": rec.run.seed,
                     "status": rec.status, "metrics": rec.metrics, "seconds": rec.seconds,
                     "cached": rec.cached, "error": rec.error, "info": rec.info})

    def missing(arm: str, metric: str) -> list[int]:
        return [s for s in study.seeds if values[arm][metric].get(s) is None]

    arms: dict[str, Any] = {}
    for a in study.arms:
        arms[a] = {}
        for m in study.metrics:
            vals = values[a][m.name]
            finite = [v for s, v in sorted(vals.items()) if v is not None]
            arms[a][m.name] = {
                "values": {str(s): vals.get(s) for s in study.seeds},
                "interval": t_interval(finite).to_dict(),
                "missing_seeds": missing(a, m.name),
                "cited": study.cited.get((a, m.name))}

    def paired(arm: str, base: str, metric: str) -> dict[str, Any]:
        a, b = values[arm][metric], values[base][metric]
        gaps = sorted(set(missing(arm, metric)) | set(missing(base, metric)))
        return {"diffs": {str(s): d for s, d in paired_differences(a, b).items()},
                "interval": paired_interval(a, b).to_dict(), "missing_seeds": gaps}

    comparisons = [{"arm": c.arm, "baseline": c.baseline, "metric": c.metric,
                    **paired(c.arm, c.baseline, c.metric)} for c in study.comparisons]
    claims = []
    for c in study.claims:
        p = paired(c.arm, c.baseline, c.metric)
        iv = Interval(**{k: (float("nan") if v is None else v)
                         for k, v in p["interval"].items()})
        complete = not p["missing_seeds"]
        v = verdict(iv, c.direction, complete=complete)
        if not complete:
            reason = f"seeds {p['missing_seeds']} missing for one of the arms"
        elif iv.n < 2:
            reason = "fewer than 2 paired seeds"
        elif not iv.excludes_zero():
            reason = "the 95 % interval of the paired difference contains 0"
        else:
            reason = "the 95 % interval of the paired difference excludes 0 " + \
                ("below" if iv.high < 0 else "above")
        claims.append({"name": c.name, "text": c.text, "arm": c.arm, "baseline": c.baseline,
                       "metric": c.metric, "direction": c.direction, "cited": c.cited,
                       "source": c.source, **p, "verdict": v, "reason": reason})
    return {
        "study": study.name, "preset": study.preset,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "level": LEVEL, "verdict_rule": VERDICT_RULE,
        "seeds": list(study.seeds), "arms": list(study.arms),
        "metrics": [{"name": m.name, "label": m.label, "lower_is_better": m.lower_is_better}
                    for m in study.metrics],
        "complete": not failed, "failed_runs": failed,
        "arm_results": arms, "comparisons": comparisons, "claims": claims,
        "cited_source": study.cited_source, "notes": list(study.notes), "runs": runs,
        "timing": dict(timing or {}),
        "machine": {"host": platform.node(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "config": study.config, "fingerprint": study.fingerprint}


def format_markdown(report: Mapping[str, Any], figure: str | None = "study.png") -> str:
    """``study.md``: the verdict rule, the claims, the per-arm table, the comparisons and
    any failed runs."""
    L: list[str] = []
    metrics = report["metrics"]
    seeds = report["seeds"]
    L.append(f"# {report['study']} study" + (f" (preset {report['preset']})"
                                             if report.get("preset") else ""))
    L.append("")
    L.append(f"{len(report['arms'])} arms x {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"generated {report['generated']}.")
    n_failed = len(report["failed_runs"])
    L.append("" if not n_failed else
             f"\n**INCOMPLETE: {n_failed} of {len(report['runs'])} runs failed** (listed at "
             "the end; the claims that need them are inconclusive; rerun the same command to "
             "redo them).")
    L.append("")
    L.append("## Verdict rule (fixed in code before any number was seen)")
    L.append("")
    L.append(report["verdict_rule"])
    L.append("")
    for note in report.get("notes", []):
        L.append(f"- {note}")
    if report.get("notes"):
        L.append("")
    if report["claims"]:
        L.append("## Claims")
        L.append("")
        L.append("| claim | seed's own number (citation) | paired difference, mean [95 % CI] "
                 "(n) | verdict |")
        L.append("|---|---|---|---|")
        for c in report["claims"]:
            L.append(f"| {c['text']} | {c['cited'] or '–'} | {_ci(c['interval'])} | "
                     f"**{c['verdict']}** ({c['reason']}) |")
        L.append("")
        srcs = sorted({c["source"] for c in report["claims"] if c.get("source")})
        if srcs:
            L.append("Citations: " + "; ".join(srcs) + ".")
            L.append("")
    L.append("## Per arm: mean [95 % CI] over seeds (n)")
    L.append("")
    head = "| arm | " + " | ".join(
        f"{m['label']} | seed's {m['label']}" for m in metrics) + " |"
    L.append(head)
    L.append("|---|" + "---|---|" * len(metrics))
    for a in report["arms"]:
        cells = []
        for m in metrics:
            r = report["arm_results"][a][m["name"]]
            gap = f"; no value for seeds {r['missing_seeds']}" if r["missing_seeds"] else ""
            cells += [_ci(r["interval"]) + gap, _fmt(r["cited"])]
        L.append(f"| {a} | " + " | ".join(cells) + " |")
    L.append("")
    if report.get("cited_source"):
        L.append(f"Seed's numbers (citations, not results of this study): "
                 f"{report['cited_source']}.")
        L.append("")
    if report["comparisons"]:
        L.append("## Paired differences (arm − baseline, same seeds), mean [95 % CI] (n)")
        L.append("")
        L.append("| arm | baseline | metric | difference |")
        L.append("|---|---|---|---|")
        for c in report["comparisons"]:
            gap = f"; seeds {c['missing_seeds']} missing" if c["missing_seeds"] else ""
            L.append(f"| {c['arm']} | {c['baseline']} | {c['metric']} | "
                     f"{_ci(c['interval'])}{gap} |")
        L.append("")
    L.append("## Runs")
    L.append("")
    L.append("Per-seed values are in study.json (`arm_results.<arm>.<metric>.values`, "
             "`runs`).")
    t = report.get("timing") or {}
    if t.get("seconds_per_rank"):
        secs = ", ".join(f"rank {r}: {float(s):.1f} s" for r, s in
                         sorted(t["seconds_per_rank"].items(), key=lambda kv: int(kv[0])))
        L.append(f"Wall time of this invocation ({t.get('world_size', 1)} process(es)): {secs} "
                 f"({sum(1 for r in report['runs'] if r['cached'])} runs were already finished).")
    if report["failed_runs"]:
        L.append("")
        L.append("### Failed runs")
        L.append("")
        for f in report["failed_runs"]:
            last = (f["error"] or "").strip().splitlines()[-1:] or [""]
            L.append(f"- {f['run']}: {last[0]} (traceback in runs/{f['arm']}/seed_{f['seed']}/"
                     "error.json)")
    if figure:
        L.append("")
        L.append(f"![{report['study']} study]({figure})")
    return "\n".join(L) + "\n"


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One figure: per metric, every arm's mean with its 95 % CI (dots: the seeds, red x:
    the seed document's number); every claim's paired difference with its CI; per claim, the
    two arms' per-seed values joined by seed, their means with CI, the verdict in the title."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    claims = report["claims"]
    arms = report["arms"]
    ncols = max(len(metrics) + (1 if claims else 0), len(claims), 1)
    top_h = max(2.5, 0.28 * len(arms) + 1)
    rows = 2 if claims else 1
    fig = plt.figure(figsize=(max(4.2 * ncols, 8), top_h + (3.2 if claims else 0)),
                     layout="constrained")
    gs = fig.add_gridspec(rows, ncols, height_ratios=[top_h, 3.2] if claims else [top_h])
    for j, m in enumerate(metrics):
        ax = fig.add_subplot(gs[0, j])
        for i, a in enumerate(arms):
            r = report["arm_results"][a][m["name"]]
            iv = r["interval"]
            vals = [v for v in r["values"].values() if v is not None]
            ax.plot(vals, [i] * len(vals), ".", color="0.6", ms=4, zorder=1)
            if iv["mean"] is not None:
                err = None if iv["low"] is None else \
                    [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]
                ax.errorbar([iv["mean"]], [i], xerr=err, fmt="o", color="C0", capsize=3,
                            zorder=2)
            if isinstance(r["cited"], (int, float)):
                ax.plot([r["cited"]], [i], "x", color="C3", zorder=3)
        ax.set_yticks(range(len(arms)), arms if j == 0 else [""] * len(arms), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(m["label"])
        ax.set_title(f"{m['label']}: mean, 95 % CI" + (" (x: seed's)" if j == 0 else ""),
                     fontsize=9)
    colours = {"supported": "C2", "contradicted": "C3"}
    if claims:  # the verdicts' quantity: each claim's paired difference with its interval
        ax = fig.add_subplot(gs[0, len(metrics)])
        for i, c in enumerate(claims):
            iv = c["interval"]
            for d in c["diffs"].values():
                ax.plot([d], [i], ".", color="0.6", ms=4)
            if iv["mean"] is not None:
                err = None if iv["low"] is None else \
                    [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]
                ax.errorbar([iv["mean"]], [i], xerr=err, fmt="o", capsize=3,
                            color=colours.get(c["verdict"], "0.3"))
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(claims)), [c["name"] for c in claims], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("paired difference (arm − baseline)")
        ax.set_title("claims: paired difference, 95 % CI\n(green supported, red contradicted)",
                     fontsize=9)
    for j, c in enumerate(claims):
        ax = fig.add_subplot(gs[1, j])
        res = [report["arm_results"][c["baseline"]][c["metric"]],
               report["arm_results"][c["arm"]][c["metric"]]]
        for s in report["seeds"]:
            pair = [res[0]["values"].get(str(s)), res[1]["values"].get(str(s))]
            if None not in pair:
                ax.plot([0, 1], pair, "-", color="0.75", lw=0.8, zorder=1)
        for x, r in enumerate(res):
            iv = r["interval"]
            if iv["mean"] is not None:
                err = None if iv["low"] is None else \
                    [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]
                ax.errorbar([x], [iv["mean"]], yerr=err, fmt="o", color="C0", capsize=4)
            if isinstance(r["cited"], (int, float)):
                ax.plot([x + 0.08], [r["cited"]], "x", color="C3")
        ax.set_xticks([0, 1], [c["baseline"], c["arm"]], fontsize=7)
        ax.set_xlim(-0.4, 1.4)
        label = next(m["label"] for m in metrics if m["name"] == c["metric"])
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{c['name']}\n{c['verdict']}", fontsize=8,
                     color=colours.get(c["verdict"], "0.3"))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``study.json``, ``study.png`` and ``study.md`` into ``out_dir``; returns them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "study.json", "figure": out / "study.png", "markdown": out / "study.md"}
    atomic_write_json(paths["json"], report)
    plot_report(report, paths["figure"])
    tmp = out / ".study.md.tmp"
    tmp.write_text(format_markdown(report, paths["figure"].name))
    os.replace(tmp, paths["markdown"])
    return paths
