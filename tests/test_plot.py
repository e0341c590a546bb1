import doctest
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import monge  # noqa: E402
from monge import datasets, plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def clouds():
    return datasets.shapes(30, 41, seed=0)


@pytest.fixture(scope="module")
def sol(clouds):
    x, y = clouds
    return monge.solve(x, y, epsilon=0.05)


def _segments(ax):
    from matplotlib.collections import LineCollection

    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    if not lines:
        return np.empty((0, 2, 2))
    return np.concatenate([np.asarray(c.get_segments()) for c in lines])


def test_points_only_returns_axes(clouds):
    from matplotlib.axes import Axes

    x, y = clouds
    ax = plot.plot_matching(x, y)
    assert isinstance(ax, Axes)
    assert ax.get_title() == "source (n=30) and target (m=41)"
    assert len(_segments(ax)) == 0


def test_with_solution_draws_strongest_links(clouds, sol):
    x, y = clouds
    ax = plot.plot_matching(x, y, sol, max_lines=12, title="mine")
    assert ax.get_title() == "mine"
    segments = _segments(ax)
    assert segments.shape == (12, 2, 2)
    # each link goes from a source point to the target point receiving most of its mass
    plan = np.asarray(sol.plan)
    for start, end in segments:
        i = int(np.argmin(np.linalg.norm(x - start, axis=1)))
        np.testing.assert_allclose(end, y[np.argmax(plan[i])], atol=1e-5)


def test_explicit_plan_takes_precedence(clouds):
    x, y = clouds
    plan = np.zeros((30, 41))
    plan[np.arange(30), np.arange(30)] = 1.0 / 30  # source i -> target i
    ax = plot.plot_matching(x, y, plan=plan)
    segments = _segments(ax)
    assert len(segments) == 30
    for start, end in segments:
        i = int(np.argmin(np.linalg.norm(x - start, axis=1)))
        np.testing.assert_allclose(end, y[i], atol=1e-6)


class _NoDensePlan:
    """A solution whose dense plan must not be touched."""

    def __init__(self, sol):
        self._sol = sol

    @property
    def plan(self):
        raise AssertionError("plot_matching materialised the dense plan")

    def transport(self, z):
        return self._sol.transport(z)

    def apply(self, v, axis=0):
        return self._sol.apply(v, axis)


def test_large_problems_use_the_map_not_the_plan(clouds, sol, monkeypatch):
    x, y = clouds
    monkeypatch.setattr(plot, "DENSE_PLAN_LIMIT", 10)
    ax = plot.plot_matching(x, y, _NoDensePlan(sol), max_lines=10)
    (arrows,) = [c for c in ax.collections if type(c).__name__ == "Quiver"]
    assert arrows.N == 10
    assert "barycentric" in ax.get_title()


@pytest.mark.slow
def test_large_problems_without_a_map_use_the_barycentric_projection(clouds, monkeypatch):
    x, y = clouds
    sol = monge.solve(x, y, cost="cosine")
    monkeypatch.setattr(plot, "DENSE_PLAN_LIMIT", 10)
    ax = plot.plot_matching(x, y, _NoDensePlan(sol), max_lines=50)
    (arrows,) = [c for c in ax.collections if type(c).__name__ == "Quiver"]
    plan = np.asarray(sol.plan, np.float64)
    expected = plan @ y / plan.sum(1, keepdims=True)
    np.testing.assert_allclose(arrows.U, expected[:, 0] - x[:, 0], atol=1e-4)
    np.testing.assert_allclose(arrows.V, expected[:, 1] - x[:, 1], atol=1e-4)


def test_three_dimensional_points_are_projected(tmp_path):
    x, y, _ = datasets.gaussians(30, 41, dim=3, seed=0)
    sol = monge.solve(x, y)
    ax = plot.plot_matching(x, y, sol)
    assert "first two of 3 coordinates" in ax.get_title()
    segments = _segments(ax)
    assert segments.shape[1:] == (2, 2) and len(segments) == 30
    path = plot.save_matching(tmp_path / "three.png", x, y, sol)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_save_matching_writes_a_png(clouds, sol, tmp_path):
    x, y = clouds
    path = plot.save_matching(tmp_path / "match.png", x, y, sol)
    assert path == tmp_path / "match.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    no_suffix = plot.save_matching(tmp_path / "match", x, y)
    assert no_suffix.read_bytes().startswith(PNG_MAGIC)


def test_one_dimensional_points(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30).astype(np.float32), rng.normal(size=41).astype(np.float32)
    ax = plot.plot_matching(x, y)
    assert "1-D" in ax.get_title()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"y": np.zeros((41, 3))}, r"x has points in dimension 2 but y in dimension 3"),
        ({"plan": np.zeros((41, 30))}, r"plan=\.\.\.\)` has shape \(41, 30\).*shape \(30, 41\)"),
        ({"max_lines": 0}, r"max_lines=\.\.\.\)` must be a positive integer, got 0"),
        ({"x": np.zeros((0, 2))}, r"x=\.\.\.\)` must be a non-empty array.*got shape \(0, 2\)"),
    ],
)
def test_bad_arguments(clouds, kwargs, pattern):
    args = {"x": clouds[0], "y": clouds[1], **kwargs}
    with pytest.raises(ValueError, match=pattern):
        plot.plot_matching(args.pop("x"), args.pop("y"), **args)


def test_save_matching_rejects_ax(clouds):
    with pytest.raises(ValueError, match="takes no `ax=`"):
        plot.save_matching("unused.png", *clouds, ax=object())


def test_missing_matplotlib_says_how_to_install(clouds, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install matplotlib` \(or `pip install -e "\.\[plot\]"` in a clone of monge\)'):
        plot.plot_matching(*clouds)


def test_docstring_examples_run():
    result = doctest.testmod(plot)
    assert result.attempted > 0 and result.failed == 0
