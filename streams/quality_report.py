"""The report of ``nwatch bench quality``: a summary on the terminal, JSON, markdown and PNG plots.

matplotlib (Agg, no display) is a dev extra and imported only when a report
is written. Plots are kept small (low dpi, few points per curve) so the report
can live in the repository.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from streams.config import Settings
from streams.quality_metrics import roc_curve

ADBENCH_CITE = (
    "ADBench: Han, Hu, Huang, Jiang, Zhao, *ADBench: Anomaly Detection Benchmark*, NeurIPS 2022 "
    "Datasets and Benchmarks, Tables D4 (ROC-AUC) and D5 (PR-AUC), unsupervised, 70/30 split, "
    "3 seeds, PyOD defaults (copied to `../shared/data/tabular`)"
)
HDFS_PUBLISHED_F1 = 0.915  # Invariants Mining, full HDFS (loglizer benchmark; ../shared/data/README.md)
TWENTY_NEWS_TARGET = 0.75


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k != "plot"}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def targets(results: dict, alpha: float) -> list[dict]:
    """Each target of issue #4 with the measured figure and met / missed (absent streams skipped)."""
    out: list[dict] = []

    def add(name: str, measured: float | str, target: str, met: bool) -> None:
        out.append({"target": name, "measured": measured, "wanted": target, "met": bool(met)})

    # Tabular targets are checked on judged events (after warm-up), the streaming
    # counterpart of ADBench's held-out 30 %: events scored against a reference of
    # a few dozen rows are reported (ROC-AUC over all events) but are not what a
    # warmed-up source does. HST is measured on the same judged events.
    tab = {n: r for n, r in results.items() if r["group"] == "tabular"}
    for n, r in tab.items():
        knn = r["published"].get("KNN_roc")
        if knn is not None:
            v = r["nwatch"]["roc_auc_judged"]
            add(f"{n} judged ROC-AUC >= ADBench KNN", round(v, 3), f">= {knn:.3f}", v >= knn)
    if len(tab) == 7:
        ours = float(np.mean([r["nwatch"]["roc_auc_judged"] for r in tab.values()]))
        iforest = float(np.mean([r["published"].get("IForest_roc", np.nan) for r in tab.values()]))
        add("tabular mean judged ROC-AUC >= ADBench IForest mean", round(ours, 3), f">= {iforest:.3f}",
            ours >= iforest)
        if all("HST" in r["baselines"] for r in tab.values()):
            hst = float(np.mean([r["baselines"]["HST"]["roc_auc_judged"] for r in tab.values()]))
            add("tabular mean judged ROC-AUC > HST mean (same events)", round(ours, 3), f"> {hst:.3f}",
                ours > hst)
    for n, r in results.items():
        far = r.get("nwatch", {}).get("false_alarm_rate")
        if far is not None and not math.isnan(far):
            add(f"{n} FAR <= 2 alpha", round(far, 4), f"<= {2 * alpha:g}", far <= 2 * alpha)
    if "20news_3_bert" in results:
        v = results["20news_3_bert"]["nwatch"]["roc_auc_judged"]
        add("20news judged ROC-AUC >= 0.75", round(v, 3), ">= 0.75", v >= TWENTY_NEWS_TARGET)
    if "HDFS_sessions" in results:
        f1 = results["HDFS_sessions"]["nwatch"]["f1"]
        add("HDFS sessions F1 > 0.915", round(f1, 3), "> 0.915", f1 > HDFS_PUBLISHED_F1)
    for n, r in results.items():
        if r["group"] != "drift":
            continue
        if r["change_at"] is None:
            add(f"{n}: no false drift alarm", r["false_alarms"], "0", r["false_alarms"] == 0)
        else:
            add(f"{n}: detected within 300 events, none before", str(r["delay"]), "<= 300, 0 before",
                r["detected"] and r["false_alarms"] == 0)
    if "machine_sound" in results:
        for k, v in results["machine_sound"]["nwatch"].items():
            if k.startswith("roc_auc_") and k != "roc_auc_judged":
                add(f"audio {k[8:]} ROC-AUC >= 0.95", round(v, 3), ">= 0.95", v >= 0.95)
    return out


def _sources_text(sources: dict[str, dict]) -> str:
    """``name (key value, ...)`` for each source with settings of its own (source ``bert``:
    the 20news BERT vectors, ``vec`` the CIFAR ones; streams.quality_streams.VECTOR_SOURCES)."""
    return "; ".join(f"`{name}` ({', '.join(f'{k} {v}' for k, v in conf.items())})" for name, conf in sources.items())


def to_json(results: dict, settings: Settings, *, seeds: int, max_events: int, seconds: float) -> dict:
    alpha = settings.defaults.alpha
    return {
        "settings": {"alpha": alpha, "k": settings.defaults.k, "reference_size": settings.defaults.reference_size,
                     "seeds": seeds, "max_events": max_events, "batch_size": settings.batch_size,
                     "sources": {name: conf.model_dump(mode="json", exclude_unset=True)
                                 for name, conf in settings.sources.items()}},
        "seconds": seconds,
        "streams": _clean(results),
        "targets": targets(results, alpha),
    }


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def print_summary(results: dict, settings: Settings) -> None:
    alpha = settings.defaults.alpha
    print(f"\n{'stream':<24} {'ROC-AUC':>7} {'judged':>7} {'PR-AUC':>7} {'FAR@a':>7} {'recall':>7} {'F1':>6}"
          f" {'HST(j)':>6} {'KNN':>6} {'IForest':>7} {'ADB KNN':>7}")
    for n, r in results.items():
        if r["group"] == "drift":
            continue
        m, b, p = r["nwatch"], r.get("baselines", {}), r.get("published", {})
        print(f"{n:<24} {_f(m['roc_auc']):>7} {_f(m['roc_auc_judged']):>7} {_f(m['pr_auc']):>7} "
              f"{_f(m['false_alarm_rate'], 4):>7} {_f(m['recall']):>7} {_f(m['f1']):>6} "
              f"{_f(b.get('HST', {}).get('roc_auc_judged')):>6} {_f(b.get('PyOD KNN', {}).get('roc_auc')):>6} "
              f"{_f(b.get('PyOD IForest', {}).get('roc_auc')):>7} {_f(p.get('KNN_roc')):>7}")
    for n, r in results.items():
        if r["group"] == "drift":
            print(f"{n:<24} change at {r['change_at']}, alarms at {r['alarms']}, delay {r['delay']}, "
                  f"false alarms {r['false_alarms']}")
    rows = targets(results, alpha)
    print(f"\ntargets met: {sum(t['met'] for t in rows)} of {len(rows)}")
    for t in rows:
        if not t["met"]:
            print(f"  missed: {t['target']}: {t['measured']} (wanted {t['wanted']})")


# ------------------------------------------------------------------ plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 7, "axes.titlesize": 8, "figure.dpi": 72, "savefig.dpi": 72})
    return plt


def _thin(x: np.ndarray, y: np.ndarray, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= n:
        return x, y
    idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
    return x[idx], y[idx]


def _grid(n: int, plt, width: float = 2.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, width * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _roc_panel(ax, plot: dict, title: str) -> None:
    y = plot["y"]
    for key, style in (("nwatch", "-"), ("HST", "--"), ("PyOD KNN", ":"), ("PyOD IForest", "-.")):
        if key in plot:
            fpr, tpr = _thin(*roc_curve(y, plot[key]))
            ax.plot(fpr, tpr, style, lw=1, label=key)
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.5)
    ax.set_title(title)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")


def _hist_panel(ax, y: np.ndarray, s: np.ndarray, title: str) -> None:
    s = np.asarray(s, dtype=np.float64)
    bins = np.linspace(np.nanmin(s), np.nanpercentile(s, 99.9) + 1e-12, 40)
    ax.hist(np.clip(s[y == 0], None, bins[-1]), bins=bins, density=True, alpha=0.6, label="normal")
    ax.hist(np.clip(s[y == 1], None, bins[-1]), bins=bins, density=True, alpha=0.6, label="anomaly")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("kNN score")


def write_plots(results: dict, out: Path) -> list[str]:
    plt = _plt()
    written = []
    sets = [(n, r) for n, r in results.items() if r["group"] in ("tabular", "vectors", "logs") and r.get("plot")]
    if sets:
        fig, axes = _grid(len(sets), plt)
        for ax, (n, r) in zip(axes, sets):
            _roc_panel(ax, r["plot"], n)
        axes[0].legend(loc="lower right", fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "roc.png")
        plt.close(fig)
        fig, axes = _grid(len(sets), plt)
        for ax, (n, r) in zip(axes, sets):
            _hist_panel(ax, r["plot"]["y"], r["plot"]["nwatch"], n)
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "scores.png")
        plt.close(fig)
        written += ["roc.png", "scores.png"]
    drift = [(n, r) for n, r in results.items() if r["group"] == "drift"]
    if drift:
        fig, axes = _grid(len(drift), plt, width=3.0)
        for ax, (n, r) in zip(axes, drift):
            tr = np.array(r["trace"], dtype=np.float64)
            if len(tr):
                ax.plot(tr[:, 0], tr[:, 1], lw=1, label="CUSUM S")
                ax.plot(tr[:, 0], tr[:, 2], "--", color="0.5", lw=0.8, label="threshold h")
            if r["change_at"] is not None:
                ax.axvline(r["change_at"], color="red", lw=1, label="change")
            for a in r["alarms"]:
                ax.axvline(a, color="black", lw=0.8, ls=":")
            ax.set_title(n)
            ax.set_xlabel("events")
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "drift.png")
        plt.close(fig)
        written.append("drift.png")
    if "machine_sound" in results and results["machine_sound"].get("plot"):
        p = results["machine_sound"]["plot"]
        faults = sorted({c for c in p["classes"] if c})
        fig, axes = plt.subplots(1, 2, figsize=(6.0, 2.6))
        normal = p["classes"] == ""
        for f in faults:
            sel = normal | (p["classes"] == f)
            fpr, tpr = _thin(*roc_curve(p["classes"][sel] == f, p["nwatch"][sel]))
            axes[0].plot(fpr, tpr, lw=1, label=f)
        axes[0].set_title("machine sound: ROC per fault")
        axes[0].legend(fontsize=6)
        s = np.asarray(p["nwatch"], dtype=np.float64)
        bins = np.linspace(s.min(), np.percentile(s, 99.9), 40)
        for f in [""] + faults:
            axes[1].hist(s[p["classes"] == f], bins=bins, density=True, alpha=0.5, label=f or "normal")
        axes[1].set_yscale("log")
        axes[1].set_title("scores by class")
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "audio.png")
        plt.close(fig)
        written.append("audio.png")
    return written


# ------------------------------------------------------------------ markdown

def write_report(results: dict, doc: dict, out: Path) -> Path:
    """``out/quality.md`` with its plots and ``quality.json`` in ``out/quality/``."""
    import json

    assets = out / "quality"
    assets.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, assets)
    (assets / "quality.json").write_text(json.dumps(doc, indent=2))
    st = doc["settings"]
    lines = [
        "# Detection quality",
        "",
        f"Generated by `nwatch bench quality --out {out}` (default settings: alpha {st['alpha']}, "
        f"k {st['k']}, reference {st['reference_size']}; {st['seeds']} seeds, at most {st['max_events']:,} events "
        f"per stream; {doc['seconds'] / 60:.1f} min on this machine). Every stream goes through the "
        "pipeline of `nwatch replay`. All figures are in `quality/quality.json`.",
        "",
        *([f"Per-source settings: {_sources_text(st['sources'])}.", ""] if st.get("sources") else []),
        "ROC-AUC and PR-AUC are over all events (the stream's first events are scored against a "
        "nearly empty reference and count too); *judged* excludes the warm-up. FAR is the share "
        "of normal events flagged after warm-up; recall, precision and F1 count warm-up events as "
        "not flagged. HST is river's HalfSpaceTrees behind a MinMaxScaler, score then learn, on "
        "the same stream; PyOD KNN (k=5, largest) and IForest are fitted on the whole stream in "
        "batch (they see the future and the anomalies). ADBench columns are the published "
        f"figures: {ADBENCH_CITE}.",
        "",
        "What limits each missed target, and what was tried with its figures: "
        "[quality-notes.md](quality-notes.md) (written by hand, not regenerated).",
        "",
    ]
    anomaly = [(n, r) for n, r in results.items() if r["group"] in ("tabular", "vectors", "logs", "audio")]
    if anomaly:
        lines += [
            "## Anomaly detection",
            "",
            "| stream | events | ROC-AUC | judged | PR-AUC | FAR@alpha | recall | precision | F1 | HST all / judged | PyOD KNN | PyOD IForest | ADBench KNN | ADBench IForest |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, r in anomaly:
            m, b, p = r["nwatch"], r.get("baselines", {}), r.get("published", {})
            seeds = f" ({r['seeds']} seeds)" if r.get("seeds", 1) > 1 else ""
            lines.append(
                f"| {n}{seeds} | {m['events']:,.0f} | {_f(m['roc_auc'])} | {_f(m['roc_auc_judged'])} | {_f(m['pr_auc'])} "
                f"| {_f(m['false_alarm_rate'], 4)} | {_f(m['recall'])} | {_f(m['precision'])} | {_f(m['f1'])} "
                f"| {_f(b.get('HST', {}).get('roc_auc'))} / {_f(b.get('HST', {}).get('roc_auc_judged'))} "
                f"| {_f(b.get('PyOD KNN', {}).get('roc_auc'))} "
                f"| {_f(b.get('PyOD IForest', {}).get('roc_auc'))} | {_f(p.get('KNN_roc'))} | {_f(p.get('IForest_roc'))} |"
            )
        lines += [""]
        pr_rows = [(n, r) for n, r in anomaly if r.get("baselines")]
        if pr_rows:
            lines += ["PR-AUC of the baselines on the same streams:", "",
                      "| stream | nwatch | HST | PyOD KNN | PyOD IForest | ADBench KNN | ADBench IForest |",
                      "|---|---|---|---|---|---|---|"]
            for n, r in pr_rows:
                b, p = r["baselines"], r.get("published", {})
                lines.append(f"| {n} | {_f(r['nwatch']['pr_auc'])} | {_f(b.get('HST', {}).get('pr_auc'))} "
                             f"| {_f(b.get('PyOD KNN', {}).get('pr_auc'))} | {_f(b.get('PyOD IForest', {}).get('pr_auc'))} "
                             f"| {_f(p.get('KNN_pr'))} | {_f(p.get('IForest_pr'))} |")
            lines.append("")
        if "machine_sound" in results:
            m = results["machine_sound"]["nwatch"]
            faults = [k[8:] for k in m if k.startswith("roc_auc_") and k != "roc_auc_judged"]
            lines += ["Machine sound (generated, `streams/synth_audio.py`), per fault class against the normal clips:", "",
                      "| fault | ROC-AUC | recall at alpha |", "|---|---|---|"]
            lines += [f"| {f} | {_f(m[f'roc_auc_{f}'])} | {_f(m[f'recall_{f}'])} |" for f in faults]
            lines.append("")
        for p in ("roc.png", "scores.png", "audio.png"):
            if p in plots:
                lines += [f"![{p[:-4]}](quality/{p})", ""]
    drift = [(n, r) for n, r in results.items() if r["group"] == "drift"]
    if drift:
        lines += [
            "## Drift",
            "",
            "Scenarios switch population at a known event (`change at`); the no-change streams have "
            "the same length and source. Delay is events from the change to the first alarm after it "
            "(target: at most 300); an alarm at or before the change is false.",
            "",
            "| stream | events | change at | alarms at (events seen) | delay | false alarms |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in drift:
            lines.append(f"| {n} | {r['events']:,} | {r['change_at'] if r['change_at'] is not None else 'none'} "
                         f"| {', '.join(map(str, r['alarms'])) or 'none'} | {r['delay'] if r['delay'] is not None else '-'} "
                         f"| {r['false_alarms']} |")
        lines += ["", "![drift](quality/drift.png)", ""]
    rows = doc["targets"]
    lines += ["## Targets of issue #4", "", f"{sum(t['met'] for t in rows)} of {len(rows)} met.", "",
              "| target | measured | wanted | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['wanted']} | {'yes' if t['met'] else '**no**'} |" for t in rows]
    lines.append("")
    path = out / "quality.md"
    path.write_text("\n".join(lines))
    return path
