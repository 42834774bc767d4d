"""Pictures of a grid world in the book's style: a heat map of state values with the numbers written in,
forbidden cells shaded, targets outlined, and the policy drawn as arrows (length proportional to
``pi(a|s)``) with a circle for ``stay``.

``plot_grid_world`` draws on the axes it is given; ``plot_grid_worlds`` builds a
``matplotlib.figure.Figure`` (no pyplot), so neither selects a backend nor touches pyplot's figures: the
figure saves to PNG headless (``fig.savefig``) and shows in a notebook as the cell's value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure

from jaxlab.rl.tabular.gridworld import ACTION_DELTAS, GridWorld

__all__ = ["plot_grid_world", "plot_grid_worlds"]


def plot_grid_world(
    ax: Any,
    env: GridWorld,
    values: Any | None = None,
    policy: Any | None = None,
    *,
    title: str | None = None,
    fmt: str = "{:.1f}",
    cmap: str = "viridis",
    min_prob: float = 0.02,
) -> Any:
    """Draw ``env`` on ``ax``: ``values [S]`` as a heat map with numbers, ``policy [S, A]`` as arrows.

    Either may be None. Returns the image (for a colour bar) or None when no values are given.
    """
    nrows, ncols = env.shape
    image = None
    if values is not None:
        values = np.asarray(values, dtype=float).reshape(nrows, ncols)
        image = ax.imshow(values, cmap=cmap, origin="upper", extent=(0, ncols, nrows, 0))
        lo, hi = float(values.min()), float(values.max())
        for (r, c), v in np.ndenumerate(values):
            light = hi > lo and (v - lo) / (hi - lo) > 0.6
            ax.text(c + 0.5, r + 0.87, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="black" if light else "white")
    for s in range(env.num_states):
        r, c = divmod(s, ncols)
        if env.forbidden[s]:
            ax.add_patch(patches.Rectangle((c, r), 1, 1, facecolor="orange", alpha=0.45 if values is not None else 0.8,
                                           hatch="//", edgecolor="darkorange", lw=0))
        if env.target[s]:
            ax.add_patch(patches.Rectangle((c + 0.04, r + 0.04), 0.92, 0.92, fill=values is None,
                                           facecolor="deepskyblue", edgecolor="deepskyblue", lw=2.5))
    if policy is not None:
        policy = np.asarray(policy, dtype=float).reshape(env.num_states, env.num_actions)
        for s in range(env.num_states):
            r, c = divmod(s, ncols)
            cx, cy = c + 0.5, r + 0.4  # arrows above the number
            for a, p in enumerate(policy[s]):
                if p < min_prob:
                    continue
                d_row, d_col = ACTION_DELTAS[a]
                if d_row == 0 and d_col == 0:
                    ax.add_patch(patches.Circle((cx, cy), 0.04 + 0.08 * p, fill=False, edgecolor="red", lw=1.2))
                else:
                    length = 0.12 + 0.22 * p  # visible past the stay circle even for small p
                    ax.arrow(cx, cy, d_col * length, d_row * length, width=0.015 + 0.01 * p,
                             head_width=0.06 + 0.06 * p, head_length=0.07, length_includes_head=True, color="red")
    ax.set_xlim(0, ncols)
    ax.set_ylim(nrows, 0)
    ax.set_xticks(np.arange(ncols) + 0.5, [str(i + 1) for i in range(ncols)], fontsize=7)
    ax.set_yticks(np.arange(nrows) + 0.5, [str(i + 1) for i in range(nrows)], fontsize=7)
    ax.set_xticks(np.arange(ncols + 1), minor=True)
    ax.set_yticks(np.arange(nrows + 1), minor=True)
    ax.grid(which="minor", color="gray", lw=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    return image


def plot_grid_worlds(
    env: GridWorld | Sequence[GridWorld],
    values: Sequence[Any | None],
    policies: Sequence[Any | None],
    titles: Sequence[str],
    *,
    ncols: int | None = None,
    panel_size: float = 2.8,
    fmt: str = "{:.1f}",
) -> Figure:
    """A row (or grid) of :func:`plot_grid_world` panels; ``env`` may be one world or one per panel.
    Returns the figure (a ``matplotlib.figure.Figure``, not registered with pyplot)."""
    n = len(titles)
    envs = list(env) if isinstance(env, Sequence) else [env] * n
    if not (len(envs) == len(values) == len(policies) == n):
        raise ValueError(f"got {len(envs)} envs, {len(values)} values, {len(policies)} policies, {n} titles")
    ncols = ncols or n
    nrows = -(-n // ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.3))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, e, v, p, t in zip(axes.flat, envs, values, policies, titles):
        plot_grid_world(ax, e, v, p, title=t, fmt=fmt)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig
