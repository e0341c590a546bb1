"""Pictures of a transport between two point clouds (needs matplotlib).

`plot_matching` draws the two clouds and the strongest couplings on a matplotlib Axes;
`save_matching` writes the same picture to a file. matplotlib is imported only when
these functions run (install it with `pip install matplotlib`, or `pip install -e ".[plot]"` in a clone of monge), and figures created
here use the non-interactive Agg canvas, so nothing here touches pyplot's global state
or needs a display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DENSE_PLAN_LIMIT", "plot_matching", "save_matching"]

DENSE_PLAN_LIMIT = 4_000_000
"""Largest `n * m` for which `plot_matching` reads the dense `sol.plan`; above it, the
source points are drawn with arrows to their barycentric targets `sol.transport(x)`."""

_SOURCE_COLOR = "#1f77b4"
_TARGET_COLOR = "#d62728"
_LINE_COLOR = (0.2, 0.2, 0.2)


def _import_matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "monge.plot needs matplotlib, which is not installed: run "
            '`pip install matplotlib` (or `pip install -e ".[plot]"` in a clone of monge).'
        ) from error
    del matplotlib
    return Figure, FigureCanvasAgg, LineCollection


def _points(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"`monge.plot.plot_matching({name}=...)` must be a non-empty array of "
            f"points of shape (n, d), got shape {np.shape(value)}: pass one point per row."
        )
    return array


def _xy(points: np.ndarray, height: float) -> np.ndarray:
    """Plane coordinates: first two columns, or (value, height) for 1-D points."""
    if points.shape[1] == 1:
        return np.concatenate([points, np.full_like(points, height)], axis=1)
    return points[:, :2]


def _strongest(plan: np.ndarray, max_lines: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row its largest entry; keep the `max_lines` heaviest rows."""
    cols = np.argmax(plan, axis=1)
    mass = plan[np.arange(plan.shape[0]), cols]
    rows = np.argsort(-mass, kind="stable")[:max_lines]
    return rows, cols[rows], mass[rows]


def _draw_plan(ax, line_collection, xs, ys, plan, max_lines: int) -> None:
    rows, cols, mass = _strongest(plan, max_lines)
    top = float(mass.max()) if mass.size else 0.0
    if top <= 0.0 or not np.isfinite(top):
        return
    alpha = 0.1 + 0.8 * np.clip(mass / top, 0.0, 1.0)
    colors = np.zeros((rows.size, 4))
    colors[:, :3] = _LINE_COLOR
    colors[:, 3] = alpha
    segments = np.stack([xs[rows], ys[cols]], axis=1)
    ax.add_collection(line_collection(segments, colors=colors, linewidths=0.8, zorder=1))


def _draw_arrows(ax, x, xs, y, sol, max_lines: int) -> None:
    rows = np.unique(np.linspace(0, x.shape[0] - 1, min(max_lines, x.shape[0])).astype(int))
    try:
        moved = np.asarray(sol.transport(x[rows]), dtype=np.float64)
    except (ValueError, NotImplementedError):  # no entropic map for this cost
        # Barycentric projection P y / P 1, through `apply` (never the dense plan).
        mass = np.asarray(sol.apply(np.ones(y.shape[0], np.float32), axis=1), np.float64)
        moved = np.asarray(sol.apply(y.astype(np.float32), axis=1), np.float64)
        moved = (moved / np.maximum(mass, np.finfo(np.float64).tiny)[:, None])[rows]
    ends = _xy(moved, 1.0)
    delta = ends - xs[rows]
    ax.quiver(
        xs[rows, 0], xs[rows, 1], delta[:, 0], delta[:, 1],
        angles="xy", scale_units="xy", scale=1.0, width=0.002,
        color=_LINE_COLOR, alpha=0.6, zorder=3,
    )


def plot_matching(
    x: Any,
    y: Any,
    sol: Any = None,
    *,
    plan: Any = None,
    ax: Any = None,
    max_lines: int = 300,
    title: str | None = None,
) -> Any:
    r"""Draw two point clouds and the strongest links of a transport between them.

    Source points are blue, target points red. With a coupling (`plan=`, or `sol.plan`
    when `n * m <= DENSE_PLAN_LIMIT`), each source point is joined to the target point
    that receives most of its mass; the `max_lines` heaviest of these links are drawn,
    with opacity proportional to their mass. For larger problems the dense plan is never
    built: arrows go from (up to `max_lines` evenly spaced) source points to their
    barycentric images `sol.transport(x)` (for a cost without an entropic map, the
    barycentric projection $Py / P\mathbf{1}$ computed with `sol.apply`).

    Points in `d > 2` dimensions are drawn by their first two coordinates (the title
    says so); 1-D points are drawn on two horizontal lines, source at height 0 and
    target at height 1.

    Args:
        x: source points, shape `(n, d)` (NumPy or JAX array).
        y: target points, shape `(m, d)`.
        sol: optional `monge` solution of the problem between `x` and `y`.
        plan: optional coupling of shape `(n, m)`; takes precedence over `sol`.
        ax: matplotlib Axes to draw on; by default a new figure (Agg canvas, not
            registered with pyplot) is made. Pass `plt.subplots()[1]` to draw in an
            interactive figure.
        max_lines: the most links (or arrows) to draw.
        title: the Axes title; a default title gives the sizes.

    Returns:
        The matplotlib Axes (its figure is `ax.figure`).

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when the shapes of `x`, `y` or `plan` do not fit, or `max_lines`
            is not a positive integer.

    Example:
        >>> from monge import datasets, plot
        >>> x, y = datasets.shapes(30, 41)
        >>> ax = plot.plot_matching(x, y)
        >>> ax.get_title()
        'source (n=30) and target (m=41)'
    """
    figure_cls, canvas_cls, line_collection = _import_matplotlib()
    x, y = _points("x", x), _points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            "`monge.plot.plot_matching(x, y)`: x has points in dimension "
            f"{x.shape[1]} but y in dimension {y.shape[1]}: both clouds must have the "
            "same number of columns."
        )
    if isinstance(max_lines, bool) or not isinstance(max_lines, (int, np.integer)) or max_lines < 1:
        raise ValueError(
            "`monge.plot.plot_matching(max_lines=...)` must be a positive integer, got "
            f"{max_lines!r}: pass e.g. max_lines=300."
        )
    n, m, dim = x.shape[0], y.shape[0], x.shape[1]
    if plan is not None:
        plan = np.asarray(plan, dtype=np.float64)
        if plan.shape != (n, m):
            raise ValueError(
                f"`monge.plot.plot_matching(plan=...)` has shape {plan.shape} but x and "
                f"y have {n} and {m} points: pass a coupling of shape ({n}, {m})."
            )
    elif sol is not None and n * m <= DENSE_PLAN_LIMIT:
        plan = np.asarray(sol.plan, dtype=np.float64)

    if ax is None:
        figure = figure_cls(figsize=(6.0, 6.0))
        canvas_cls(figure)
        ax = figure.add_subplot()
    xs, ys = _xy(x, 0.0), _xy(y, 1.0)
    notes = []
    if plan is not None:
        _draw_plan(ax, line_collection, xs, ys, plan, int(max_lines))
    elif sol is not None:
        _draw_arrows(ax, x, xs, y, sol, int(max_lines))
        notes.append("arrows: barycentric map")
    size = max(4.0, min(20.0, 3000.0 / (n + m)))
    ax.scatter(xs[:, 0], xs[:, 1], s=size, c=_SOURCE_COLOR, label=f"source (n={n})", zorder=2)
    ax.scatter(ys[:, 0], ys[:, 1], s=size, c=_TARGET_COLOR, label=f"target (m={m})", zorder=2)
    if title is None:
        title = f"source (n={n}) and target (m={m})"
        if dim > 2:
            notes.insert(0, f"first two of {dim} coordinates")
        elif dim == 1:
            notes.insert(0, "1-D: source at height 0, target at height 1")
        if notes:
            title += "\n" + "; ".join(notes)
    ax.set_title(title)
    ax.set_aspect("equal" if dim > 1 else "auto")
    ax.autoscale_view()
    ax.legend(loc="upper right", fontsize="small")
    return ax


def save_matching(
    path: str | os.PathLike,
    x: Any,
    y: Any,
    sol: Any = None,
    *,
    dpi: int = 150,
    **kwargs: Any,
) -> Path:
    """Write the picture of `plot_matching(x, y, sol, **kwargs)` to an image file.

    Args:
        path: where to write; the format follows the suffix (`.png`, `.pdf`, `.svg`,
            ...) and is PNG when there is no suffix.
        x: source points, shape `(n, d)`.
        y: target points, shape `(m, d)`.
        sol: optional `monge` solution, as in `plot_matching`.
        dpi: resolution of raster formats.
        **kwargs: passed to `plot_matching` (`plan`, `max_lines`, `title`).

    Returns:
        The path written, as a `pathlib.Path`.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: as `plot_matching`, or for an unknown image format.
        OSError: when the file cannot be written (e.g. its folder does not exist).

    Example:
        >>> import tempfile, pathlib
        >>> from monge import datasets, plot
        >>> x, y = datasets.shapes(30, 41)
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "clouds.png"
        >>> plot.save_matching(out, x, y).stat().st_size > 0
        True
    """
    if "ax" in kwargs:
        raise ValueError(
            "`monge.plot.save_matching` makes its own figure and takes no `ax=`: call "
            "`plot_matching(..., ax=ax)` and save `ax.figure` yourself instead."
        )
    path = Path(path)
    ax = plot_matching(x, y, sol, **kwargs)
    figure = ax.figure
    figure.tight_layout()
    figure.savefig(path, dpi=dpi, format=None if path.suffix else "png")
    return path
