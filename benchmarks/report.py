"""Shared output of the small benchmark scripts: the host, JSON + Markdown table, a log-log line plot."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch


def host() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write(out: Path, res: dict, title: str, note: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """OUT.json (res) and OUT.md: the title with the host, the command, a note and a table whose
    columns are (header, row key, format)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    h = res["host"]
    md = [f"# {title} ({h['cpu']}, {h['threads']} threads, {h['capability']})", "", f"Command: `{res['command']}`", "",
          note, "", "| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in columns) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def plot(path: Path, series: list[tuple[str, list, list, str]], xlabel: str, ylabel: str, title: str) -> None:
    """A log-log line plot of (label, xs, ys, matplotlib style) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xs, ys, style in series:
        ax.plot(xs, ys, style, label=label)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
