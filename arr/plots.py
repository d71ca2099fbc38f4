"""Figures of what methods learned against what they forgot, shared by `arr compare` and experiments/frontier.py:
each method a mean point with its 95% interval over seeds as error bars, the Pareto front of the means drawn, and
few legend entries."""

from __future__ import annotations

import statistics


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% Student-t interval of the mean of `values` (None for fewer than two)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return statistics.mean(values) - half, statistics.mean(values) + half


def pareto_front(points: dict[str, tuple[float, float]], x_higher_is_better: bool = True) -> list[str]:
    """The names whose (x, y) no other point beats on both axes (y: higher is better)."""
    sign = 1 if x_higher_is_better else -1
    return [name for name, (x, y) in points.items()
            if not any(sign * a >= sign * x and b >= y and (a, b) != (x, y) for a, b in points.values())]


def mean_point(xs: list[float], ys: list[float]) -> dict:
    """Mean of x and y over seeds, with error-bar lengths from their 95% intervals (0 for one seed)."""
    out = {}
    for axis, values in (("x", xs), ("y", ys)):
        mean, ci = statistics.mean(values), t_interval(values)
        out[axis], out[f"{axis}err"] = mean, [[mean - ci[0]], [ci[1] - mean]] if ci else None
    return out


def draw(ax, point: dict, color, marker: str, filled: bool = True, label: str | None = None) -> None:
    ax.errorbar(point["x"], point["y"], xerr=point["xerr"], yerr=point["yerr"], fmt=marker, color=color, capsize=3,
                markersize=7, markerfacecolor=color if filled else "white", label=label)


def draw_front(ax, means: dict[str, tuple[float, float]], x_higher_is_better: bool = True) -> None:
    front = sorted(means[n] for n in pareto_front(means, x_higher_is_better))
    if len(front) > 1:
        ax.plot(*zip(*front), color="grey", lw=1, ls="--", zorder=0, label="Pareto front")


def draw_report(metrics: dict, path) -> None:
    """report.png of one run: the initial model (before) and the tuned one (after) on each probe, each in its own
    unit; the loss parts the run trains over its steps; and, with probe_steps, the forgetting headline and the task
    score at each probe round (the budget and the step kept, when one was set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .evaluation import ROWS, at_chance

    result, rounds = metrics["eval"], metrics.get("probe_rounds") or []
    probes = list(result["after"])
    fig = plt.figure(figsize=(max(11.0, 1.9 * len(probes)), 7.5), layout="constrained")
    grid = fig.add_gridspec(2, len(probes) * 2)
    for i, name in enumerate(probes):
        ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
        words, unit, lower = ROWS.get(name, (name, "", False))
        scale = 100 if unit == "points" else 1
        values = [result["before"][name] * scale, result["after"][name] * scale]
        bars = ax.bar(["before", "after"], values, color=["#9e9e9e", "#1f77b4"])
        ax.bar_label(bars, fmt="%.1f" if scale == 100 else "%.3g", fontsize=8)
        delta = result["delta"][name] * scale
        change = f"{delta:+.1f} points" if scale == 100 else f"{delta:+.3g}"
        label = "accuracy %" if unit == "points" else unit
        ax.set_title(f"{name}\n{label} {'↓' if lower else '↑'}\nchange {change}"
                     + ("\nat chance here" if at_chance(result, name) else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        if scale == 100:
            ax.set_ylim(0, 108)
        else:
            ax.margins(y=0.15)
    half = len(probes) if rounds else 2 * len(probes)
    ax = fig.add_subplot(grid[1, :half])
    steps = [h["step"] for h in metrics["history"]]
    for part in ("loss", *metrics["trained_parts"]):
        ax.plot(steps, [h[part] for h in metrics["history"]], label=part, lw=1.5 if part == "loss" else 1)
    ax.set(xlabel="optimizer step", ylabel="nats/token", title="loss parts the run trains")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    if rounds:
        ax = fig.add_subplot(grid[1, half:])
        ax.plot([r["step"] for r in rounds], [r["forgetting"] for r in rounds], "o-", color="#d62728",
                label="forgetting (nats/token)")
        budget = metrics.get("forgetting_budget") or {}
        if budget:
            ax.axhline(budget["budget"], color="#d62728", ls="--", lw=1, label="forgetting_budget")
        if budget.get("crossed_at") is not None:
            ax.axvline(budget["kept_step"], color="grey", ls=":", lw=1, label=f"kept: step {budget['kept_step']}")
        ax.set(xlabel="optimizer step", ylabel="forgetting, nats/token ↓", title="probe rounds while training")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "task_em" in rounds[0]:
            twin = ax.twinx()
            twin.plot([r["step"] for r in rounds], [100 * r["task_em"] for r in rounds], "s--", color="#2ca02c",
                      label="task exact match (%)")
            twin.set(ylabel="task exact match % ↑", ylim=(-5, 105))
            twin.legend(fontsize=8, loc="lower right")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"What the run forgot and learned: forgetting {result['forgetting']:+.4f} nats/token "
                 f"(before = adapter off, after = on)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
