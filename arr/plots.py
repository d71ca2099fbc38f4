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
