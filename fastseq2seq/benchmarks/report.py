"""The suite's output: the environment (device, versions, commit, date), markdown tables, the JSON of every row, and
PNG charts (speed-up over each baseline per shape; fraction of the roofline per shape)."""
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

import torch

import fastseq2seq

READING = ("Times are medians of alternated runs after warm-up (IQR = first to third quartile; n = timed runs per "
           "implementation). \"vs X\" = X's median / fastseq2seq's median, measured side by side in the same "
           "process (> 1: fastseq2seq is faster). GFLOP/s and GB/s come from each op's cost model (FLOPs and "
           "minimal bytes moved, fastseq2seq/benchmarks/costs.py); \"roofline\" = the time the measured ceilings "
           "allow for that cost / the measured time, and whether compute or memory bounds it.")


def _commit():
    """The commit of the fastseq2seq source tree (with "+changes" when it has uncommitted ones), or
    FASTSEQ2SEQ_COMMIT where it is not a git checkout."""
    if os.environ.get("FASTSEQ2SEQ_COMMIT"):
        return os.environ["FASTSEQ2SEQ_COMMIT"]
    source = os.path.dirname(os.path.dirname(os.path.abspath(fastseq2seq.__file__)))

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", source, *args], capture_output=True, text=True, check=False)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return commit


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device) -> dict:
    device = torch.device(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{_cpu_name()}, {torch.get_num_threads()} threads")
    return {"device": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
            "fastseq2seq": fastseq2seq.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "flashrnn": _version("flashrnn"), "python": platform.python_version(),
            "cpu": _cpu_name(), "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}


def format_ms(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" if k != "pass" else str(v) for k, v in case.items())


def _unique(items):
    return list(dict.fromkeys(items))


def markdown_table(rows) -> str:
    """One row per (case, implementation); the case's fields first, then time, spread, rates and ratios."""
    if not rows:
        return "(no rows)"
    keys = _unique(k for row in rows for k in row["case"])
    baselines = _unique(b for row in rows for b in row.get("speedup", {}))
    columns = [(k, lambda r, k=k: str(r["case"].get(k, "-"))) for k in keys]
    columns += [("impl", lambda r: r["impl"]), ("median ms", lambda r: format_ms(r["median_ms"])),
                ("IQR ms", lambda r: f"{format_ms(r['q1_ms'])}-{format_ms(r['q3_ms'])}"),
                ("min-max ms", lambda r: f"{format_ms(r['min_ms'])}-{format_ms(r['max_ms'])}"),
                ("n", lambda r: str(r["repeats"]))]
    optional = [("gflops", "GFLOP/s", lambda r: f"{r['gflops']:.1f}"), ("gbps", "GB/s", lambda r: f"{r['gbps']:.1f}"),
                ("roofline_fraction", "roofline", lambda r: f"{r['roofline_fraction']:.1%} {r['bound']}"),
                ("peak_mib", "peak MiB", lambda r: f"{r['peak_mib']:.1f}"),
                ("throughput", "throughput", lambda r: f"{r['throughput']:.0f} {r['unit']}"),
                ("overhead", "overhead", lambda r: f"{r['overhead']:+.1%}")]
    columns += [(header, fmt) for key, header, fmt in optional if any(key in row for row in rows)]
    columns += [(f"vs {b}", lambda r, b=b: f"{r['speedup'][b]:.2f}x") for b in baselines]

    def cell(fmt, row):
        try:
            return fmt(row)
        except (KeyError, TypeError):
            return "-"

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(fmt, row) for _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def _chart_labels(rows):
    """A label per case from the case fields that vary in this benchmark (the others go in the title)."""
    keys = _unique(k for row in rows for k in row["case"])
    varying = [k for k in keys if len({str(row["case"].get(k)) for row in rows}) > 1]
    fixed = [k for k in keys if k not in varying]
    return ({id(row): case_label({k: row["case"].get(k) for k in varying}) or "all" for row in rows},
            case_label({k: rows[0]["case"].get(k) for k in fixed}))


def _dot_chart(path, title, rows, series_of, value_of, xlabel, *, panels_of=lambda row: "", log=False, marker_at=None):
    """A dot plot: one line per case, one marker per series (color), one panel per panels_of value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels, fixed = _chart_labels(rows)
    cases = _unique(labels[id(row)] for row in rows)
    panels = _unique(panels_of(row) for row in rows if value_of(row) is not None)
    series = _unique(s for row in rows for s in series_of(row))
    fig, axes = plt.subplots(1, max(len(panels), 1), sharey=True, squeeze=False,
                             figsize=(3.2 + 3.6 * max(len(panels), 1), 1.4 + 0.28 * len(cases)))
    colors = plt.get_cmap("tab10")
    for ax, panel in zip(axes[0], panels):
        for i, name in enumerate(series):
            points = [(value_of(row)[name], cases.index(labels[id(row)])) for row in rows
                      if panels_of(row) == panel and value_of(row) and name in value_of(row)]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], color=colors(i % 10), label=name, s=22,
                           zorder=3)
        if marker_at is not None:
            ax.axvline(marker_at, color="0.4", lw=0.8)
        if log:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        else:
            ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            ax.set_xlim(left=0)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", color="0.9")
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(cases)), cases)
    axes[0][0].set_ylim(len(cases) - 0.5, -0.5)  # the first case on top
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=7, frameon=False)
    fig.suptitle(f"{title}\n{fixed}", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(names) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_charts(out_dir, name, rows, device_name) -> list:
    """speedup_<name>.png: per fastseq2seq implementation (panel), its speed-up over each baseline per shape;
    roofline_<name>.png: the fraction of the roofline each implementation reaches per shape."""
    written = []
    ours = [row for row in rows if row.get("speedup")]
    if ours:
        path = os.path.join(out_dir, f"speedup_{name}.png")
        _dot_chart(path, f"{name}: speed-up over each baseline ({device_name})", ours,
                   lambda row: row["speedup"], lambda row: row["speedup"], "baseline time / fastseq2seq time",
                   panels_of=lambda row: row["impl"], log=True, marker_at=1.0)
        written.append(path)
    if any("roofline_fraction" in row for row in rows):
        path = os.path.join(out_dir, f"roofline_{name}.png")
        _dot_chart(path, f"{name}: fraction of the roofline ({device_name})", rows, lambda row: [row["impl"]],
                   lambda row: {row["impl"]: row["roofline_fraction"]} if "roofline_fraction" in row else None,
                   "time the ceilings allow / measured time")
        written.append(path)
    return written


def report_data(results, *, environment, settings, ceilings, notes) -> dict:
    """What results.json holds. results: {benchmark: {"description", "seconds", "rows", "charts"?}}."""
    return {"environment": environment, "settings": settings, "ceilings": ceilings, "notes": notes,
            "benchmarks": results}


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_markdown(path, data):
    env, ceilings = data["environment"], data["ceilings"]
    lines = [f"# fastseq2seq benchmarks: {env['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items() if value is not None]
    lines += [f"- settings: {', '.join(f'{k}={v}' for k, v in data['settings'].items())}"]
    if ceilings:
        lines += [f"- ceilings measured in this run: {ceilings['flops_per_s'] / 1e12:.3g} TFLOP/s "
                  f"({ceilings['matmul']}), {ceilings['bytes_per_s'] / 1e9:.4g} GB/s ({ceilings['copy']})"]
    lines += ["", READING, ""]
    for name, result in data["benchmarks"].items():
        lines += [f"## {name}", "", result["description"], "",
                  f"{len(result['rows'])} rows in {result['seconds']:.0f} s.", "", markdown_table(result["rows"]), ""]
        lines += [f"![{chart}]({chart})" for chart in result.get("charts", [])] + [""]
    if data["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in data["notes"]] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
