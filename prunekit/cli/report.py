"""The ``report`` verb: one self-contained HTML page (and a text summary) of a workspace.

It reads what the stages left (``sensitivity.json`` from ana, ``plan.json`` from prune,
``iterative.json`` / ``summary.json`` from run, ``demo.json`` from the demo, ``config.yaml``)
and shows the sensitivity curves, the channels of every layer before and after, the metric
and MACs of every step, and the final before/after table. Plots are PNG images embedded as
base64, so the page needs nothing else (no network, no scripts).

Example:
    >>> path = write_report("ws")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from prunekit.utils import artifacts
from prunekit.utils.text import human, table
from prunekit.workflow.workspace import Workspace

__all__ = ["write_report", "summary_text", "load_results", "text_table"]


def load_results(workspace: str | Path) -> dict:
    """Everything the report shows, read from the workspace's JSON files."""
    ws = Workspace(workspace)
    if not ws.root.is_dir():
        raise FileNotFoundError(f"workspace {ws.root} does not exist")
    res: dict = {"root": str(ws.root)}
    for key, name in (
        ("sensitivity", artifacts.SENSITIVITY),
        ("summary", artifacts.SUMMARY),
        ("state", artifacts.ITERATIVE),
        ("demo", artifacts.DEMO),
        ("plan", artifacts.PLAN),
        ("prune", artifacts.PRUNE),
        ("finetune", artifacts.FINETUNE),
    ):
        if ws.exists(name):
            res[key] = ws.read_json(name)
    if ws.exists(artifacts.CONFIG):
        res["config"] = ws.path(artifacts.CONFIG).read_text()
    if not any(k in res for k in ("sensitivity", "summary", "state", "plan", "demo", "prune", "finetune")):
        raise ValueError(
            f"{ws.root} holds no prunekit results (sensitivity.json, plan.json, iterative.json, "
            "summary.json); run 'prunekit ana', 'prune' or 'run' with this workspace first"
        )
    if "summary" not in res and "state" in res:  # an unfinished run: its steps so far
        st = res["state"]
        res["partial"] = {
            "baseline": st.get("baseline"),
            "attempts": st.get("attempts", []),
            "notes": st.get("notes", []),
        }
    return res


def _bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _final_rows(res: dict) -> list[list[str]]:
    """Rows ``[what, before, after, change]`` of the before/after table."""
    demo = res.get("demo")
    if demo and "table" in demo:
        return demo["table"]
    s = res.get("summary")
    if not s:
        return _verb_rows(res)
    b, f = s["baseline"], s["final"]
    pct = lambda x, y: f"{100 * (y - x) / x:+.1f}%" if x else ""
    test = b.get("test_metric") is not None and f.get("test_metric") is not None  # reported only, never chosen on
    rows = [
        [
            "metric" + (" (validation)" if test else ""),
            f"{b['metric']:.4f}",
            f"{f['metric']:.4f}",
            f"{f['metric'] - b['metric']:+.4f}",
        ]
    ]
    if test:
        rows.append(
            [
                "test metric",
                f"{b['test_metric']:.4f}",
                f"{f['test_metric']:.4f}",
                f"{f['test_metric'] - b['test_metric']:+.4f}",
            ]
        )
    rows += [
        ["MACs / sample", human(b["macs"]), human(f["macs"]), pct(b["macs"], f["macs"])],
        ["parameters", human(b["params"]), human(f["params"]), pct(b["params"], f["params"])],
    ]
    if "file_bytes" in f:
        rows.append(
            [
                "file size",
                _bytes(f["baseline_file_bytes"]),
                _bytes(f["file_bytes"]),
                pct(f["baseline_file_bytes"], f["file_bytes"]),
            ]
        )
    return rows


def _finetune_of_plan(res: dict) -> dict | None:
    """``finetune.json`` if it fine-tuned the model ``prune.json`` describes (else ``None``)."""
    ft, pr = res.get("finetune"), res.get("prune")
    return ft if ft and pr and ft.get("plan") == pr.get("plan") else None


def _verb_rows(res: dict) -> list[list[str]]:
    """Before/after of the single verbs (``prune``, then ``finetune``), from ``prune.json`` / ``finetune.json``."""
    pr = res.get("prune")
    if not pr:
        return []
    b, p, ft = pr["baseline"], pr["pruned"], _finetune_of_plan(res)
    pct = lambda x, y: f"{100 * (y - x) / x:+.1f}%" if x else ""
    rows = [
        [
            "metric after pruning (no fine-tuning)",
            f"{b['metric']:.4f}",
            f"{p['metric']:.4f}",
            f"{p['metric'] - b['metric']:+.4f}",
        ]
    ]
    if ft is not None and ft.get("best_metric") is not None:
        rows.append(
            [
                f"metric after fine-tuning ({len(ft['history'])} epochs, best {ft['best_epoch']})",
                f"{b['metric']:.4f}",
                f"{ft['best_metric']:.4f}",
                f"{ft['best_metric'] - b['metric']:+.4f}",
            ]
        )
    rows += [
        ["MACs / sample", human(b["macs"]), human(p["macs"]), pct(b["macs"], p["macs"])],
        ["parameters", human(b["params"]), human(p["params"]), pct(b["params"], p["params"])],
    ]
    return rows


def _finetune_notes(res: dict) -> list[str]:
    ft = res.get("finetune")
    if ft and res.get("prune") and _finetune_of_plan(res) is None:
        return ["finetune.json was made for an earlier pruning plan: run 'prunekit finetune' again for this one"]
    return []


def _attempts(res: dict) -> tuple[dict | None, list[dict], list[str]]:
    src = res.get("summary") or res.get("partial")
    if not src:
        return None, [], []
    return src.get("baseline"), src.get("attempts", []), src.get("notes", [])


def _layers(res: dict) -> list[dict]:
    if res.get("summary"):
        return res["summary"].get("layers", [])
    plan = res.get("plan")
    if not plan:
        return []
    rows = []
    for name, shape in plan["shapes"].items():
        if name.endswith(".weight") and len(shape) >= 2:
            gone = len(plan["pruned"].get(name, {}).get("0", []))
            rows.append({"name": name[: -len(".weight")], "out_before": shape[0], "out_after": shape[0] - gone})
    return rows


def text_table(rows: list[list[str]], head: list[str]) -> str:
    """A report table as plain text (first column left-aligned)."""
    return table(rows, head)


def _step_rows(baseline: dict | None, attempts: list[dict]) -> list[list[str]]:
    rows = []
    if baseline:
        rows.append(
            ["baseline", "", human(baseline["macs"]), "", human(baseline["params"]), f"{baseline['metric']:.4f}", ""]
        )
    for a in attempts:
        rows.append(
            [
                f"step {a['step']}" + (f" retry {a['try']}" if a["try"] else ""),
                f"{a['ratio']:.3f}",
                human(a["macs"]),
                f"-{a['macs_reduction']:.1%}",
                human(a["params"]),
                f"{a['metric']:.4f}",
                "accepted" if a["accepted"] else "rejected",
            ]
        )
    return rows


_STEP_HEAD = ["step", "ratio", "MACs", "MACs change", "params", "metric", "verdict"]
_EPOCH_HEAD = ["epoch", "loss", "metric", "lr", "seconds"]


def _epoch_rows(ft: dict) -> list[list[str]]:
    """One row per epoch of ``finetune.json``'s history."""
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    return [
        [
            str(h["epoch"]),
            fmt(h.get("loss"), ".4f"),
            fmt(h.get("metric"), ".4f"),
            fmt(h.get("lr"), ".3g"),
            fmt(h.get("seconds"), ".1f"),
        ]
        for h in ft.get("history", [])
    ]


def summary_text(workspace: str | Path) -> str:
    """A terminal summary of the workspace."""
    res = load_results(workspace)
    lines = [f"prunekit workspace {res['root']}"]
    final = _final_rows(res)
    if final:
        lines += ["", text_table(final, ["", "before", "after", "change"])]
    baseline, attempts, notes = _attempts(res)
    if attempts:
        lines += [
            "",
            ("steps (unfinished run)" if "partial" in res else "steps"),
            text_table(_step_rows(baseline, attempts), _STEP_HEAD),
        ]
    lines += [f"note: {n}" for n in notes + _finetune_notes(res)]
    ft = _finetune_of_plan(res)
    if ft is not None and not attempts:
        lines += ["", "fine-tuning (prunekit finetune)", text_table(_epoch_rows(ft), _EPOCH_HEAD)]
    sens = res.get("sensitivity")
    if sens:
        lines += [
            "",
            f"sensitivity: {len(sens['curves'])} channel groups analysed at ratios {sens['ratios']} "
            f"(baseline metric {sens['baseline']:.4f})",
        ]
    if "plan" in res and not attempts:
        meta = res["plan"].get("meta", {})
        if "macs_before" in meta:
            lines.append(
                f"prune: MACs {human(meta['macs_before'])} -> {human(meta['macs_after'])}, params "
                f"{human(meta['params_before'])} -> {human(meta['params_after'])} ({meta.get('method')})"
            )
    return "\n".join(lines)


# ----- plots -----------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_sensitivity(sens: dict, limit: int = 12) -> str:
    plt = _plt()
    base = sens["baseline"]
    lower = sens.get("lower_is_better", False)
    curves = {int(g): {float(r): v for r, v in c.items()} for g, c in sens["curves"].items()}
    labels = {int(g): v for g, v in sens.get("labels", {}).items()}

    def mean_loss(g):
        vals = [(v - base) if lower else (base - v) for v in curves[g].values()]
        return sum(vals) / max(1, len(vals))

    order = sorted(curves, key=mean_loss, reverse=True)[:limit]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for g in order:
        xs = sorted(curves[g])
        ax.plot([0] + xs, [base] + [curves[g][x] for x in xs], marker="o", ms=3, label=f"{g}: {labels.get(g, '')[:28]}")
    ax.set_xlabel("fraction of the group's channels removed (that group alone)")
    ax.set_ylabel("metric")
    ax.set_title(f"Sensitivity of the {len(order)} most sensitive channel groups")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _plot_steps(baseline: dict, attempts: list[dict]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    acc = [a for a in attempts if a["accepted"]]
    xs = [0] + [a["step"] for a in acc]
    ax.plot(xs, [baseline["metric"]] + [a["metric"] for a in acc], "o-", color="tab:blue", label="metric (accepted)")
    rej = [a for a in attempts if not a["accepted"]]
    if rej:
        ax.plot(
            [a["step"] for a in rej],
            [a["metric"] for a in rej],
            "x",
            color="tab:red",
            ms=9,
            label="metric (rejected attempt)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("metric", color="tab:blue")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [baseline["macs"] / 1e6] + [a["macs"] / 1e6 for a in acc], "s--", color="tab:orange", label="MACs (M)")
    ax2.set_ylabel("MACs per sample (M)", color="tab:orange")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
    ax.set_title("Metric and MACs after each prune -> fine-tune step")
    return _png(fig)


def _plot_layers(layers: list[dict]) -> str:
    plt = _plt()
    names = [r["name"] for r in layers]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(names) + 1)))
    y = list(range(len(names)))
    ax.barh(y, [r["out_before"] for r in layers], color="#cccccc", label="before")
    ax.barh(y, [r["out_after"] for r in layers], color="tab:green", label="after")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.legend(fontsize=8)
    ax.set_title("Channels per layer")
    return _png(fig)


def _plot_history(attempts: list[dict]) -> str | None:
    hist = [a for a in attempts if a.get("history") and any(h.get("metric") is not None for h in a["history"])]
    if not hist:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for a in hist:
        pts = [(h["epoch"], h["metric"]) for h in a["history"] if h.get("metric") is not None]
        ax.plot(*zip(*pts), "o-", ms=3, label=f"step {a['step']}" + (f" retry {a['try']}" if a["try"] else ""))
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Fine-tuning")
    return _png(fig)


# ----- HTML ------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f5f5f5}img{max-width:100%}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}.note{color:#8a5a00}"""


def _html_table(rows: list[list[str]], head: list[str]) -> str:
    e = html.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(res: dict) -> str:
    """The report page for :func:`load_results`' output."""
    from prunekit import __version__

    e = html.escape
    parts = [f"<h1>prunekit report</h1><p>Workspace <code>{e(res['root'])}</code>, prunekit {e(__version__)}.</p>"]
    final = _final_rows(res)
    if final:
        parts += ["<h2>Before and after</h2>", _html_table(final, ["", "before", "after", "change"])]
    baseline, attempts, notes = _attempts(res)
    if attempts and baseline:
        title = "Steps (unfinished run)" if "partial" in res else "Steps"
        parts += [
            f"<h2>{title}</h2>",
            _html_table(_step_rows(baseline, attempts), _STEP_HEAD),
            _img(_plot_steps(baseline, attempts), "metric and MACs per step"),
        ]
        hist = _plot_history(attempts)
        if hist:
            parts.append(_img(hist, "fine-tuning curves"))
    parts += [f'<p class="note">{e(n)}</p>' for n in notes + _finetune_notes(res)]
    ft = _finetune_of_plan(res)
    if ft is not None and not attempts:
        parts += [
            "<h2>Fine-tuning</h2>",
            f"<p>{len(ft['history'])} epochs of <code>prunekit finetune</code> (lr {ft['lr']:g}) from "
            f"{e(ft['input'])}: metric {ft['before']:.4f} before, best {ft['best_metric']:.4f} at epoch "
            f"{ft['best_epoch']}.</p>",
            _html_table(_epoch_rows(ft), _EPOCH_HEAD),
        ]
        curve = _plot_history([{"step": "finetune", "try": 0, "history": ft["history"]}])
        if curve:
            parts.append(_img(curve, "fine-tuning curve"))
    layers = _layers(res)
    if layers:
        rows = [
            [
                r["name"],
                str(r["out_before"]),
                str(r["out_after"]),
                f"{100 * (r['out_after'] - r['out_before']) / r['out_before']:+.0f}%" if r["out_before"] else "",
            ]
            for r in layers
        ]
        parts += [
            "<h2>Channels per layer</h2>",
            _img(_plot_layers(layers), "channels per layer"),
            _html_table(rows, ["layer", "before", "after", "change"]),
        ]
    sens = res.get("sensitivity")
    if sens and sens.get("curves"):
        parts += [
            "<h2>Sensitivity</h2>",
            f"<p>Metric after pruning each channel group alone (baseline {sens['baseline']:.4f}).</p>",
            _img(_plot_sensitivity(sens), "sensitivity curves"),
        ]
    if res.get("config"):
        parts += ["<h2>Configuration</h2>", f"<pre>{e(res['config'])}</pre>"]
    if res.get("demo"):
        opts = {k: v for k, v in res["demo"].items() if k != "table"}
        parts += ["<h2>Demo options</h2>", f"<pre>{e(json.dumps(opts, indent=1))}</pre>"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>prunekit report</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(workspace: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report (default ``WORKSPACE/report.html``); returns its path."""
    from prunekit.utils.files import atomic_write

    res = load_results(workspace)
    path = Path(output) if output else Path(workspace) / artifacts.REPORT
    atomic_write(path, render_html(res))
    return path
