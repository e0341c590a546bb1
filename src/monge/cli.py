"""The `monge` command line: solve entropic OT between two point-cloud files.

    monge solve SOURCE TARGET [--epsilon E] [--cost C] [--out FILE.npz] [--plot FILE.png]
    monge demo [--out-dir DIR] [--n N]
    monge --version

Exit status: 0 when the solver converged (to a finite cost), 1 when it did not (the
status message says why; results are still written), 2 for bad input (one line `monge: error: ...` on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["main"]

COSTS = ("sqeuclidean", "euclidean", "cityblock", "cosine")
PLAN_SAVE_LIMIT = 25_000_000
"""Largest `n * m` for which `--out` stores the dense plan (25e6 float32 = 100 MB)."""
PROGRESS_LIMIT = 1_000_000
"""Above this `n * m`, the solver reports its progress on stderr without `--progress`."""
_TEXT_SUFFIXES = {".csv": ",", ".txt": None}
PLOT_INSTALL = 'run `pip install matplotlib` (or `pip install -e ".[plot]"` in a clone of monge)'
"""How to install what `--plot` needs; monge is not on PyPI, so no `monge[plot]`."""


class CLIError(Exception):
    """Bad input: printed as one line `monge: error: ...`, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse hook
        raise CLIError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------- argument types
def _number(what: str, high: float = math.inf):
    """An argparse type: a finite number in (0, high]."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0.0 < value <= high):
            bound = f"in (0, {high:g}]" if math.isfinite(high) else "> 0"
            raise argparse.ArgumentTypeError(f"must be a number {bound} ({what}), got {text!r}")
        return value

    return convert


def _integer(low: int):
    """An argparse type: an integer >= low."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            kind = "positive" if low == 1 else "non-negative"
            raise argparse.ArgumentTypeError(f"must be a {kind} integer, got {text!r}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    """The `monge` argument parser (exposed for documentation tools)."""
    from monge import __version__

    parser = _Parser(
        prog="monge",
        description="Entropic optimal transport between point clouds, from the shell.",
    )
    parser.add_argument("--version", action="version", version=f"monge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    solve = commands.add_parser(
        "solve",
        help="solve OT between two point-cloud files",
        description="Solve entropic OT between the points in SOURCE and TARGET (.npy, "
        ".csv or .txt; one point per row, a header line is skipped) and print a report.",
    )
    solve.add_argument("source", metavar="SOURCE", help="source points (.npy, .csv, .txt)")
    solve.add_argument("target", metavar="TARGET", help="target points (.npy, .csv, .txt)")
    _add_solver_options(solve)
    solve.add_argument("--out", metavar="FILE.npz", type=Path,
                       help="write f, g, plan, cost, ... to an .npz (errors: the error "
                       "after each block of 10 iterations run)")
    solve.add_argument("--plot", metavar="FILE.png", type=Path, help="draw the matching into a PNG")

    demo = commands.add_parser(
        "demo",
        help="solve a built-in example and draw it",
        description="Match a noisy ring to two crescents (monge.datasets.shapes), "
        "write demo.png and demo.npz and print the report.",
    )
    demo.add_argument("--out-dir", metavar="DIR", type=Path, default=Path("."),
                      help="folder for demo.png and demo.npz (default: current folder)")
    demo.add_argument("--n", metavar="N", type=_integer(1), default=300,
                      help="number of source points; the target has N + N//3 (default: 300)")
    demo.add_argument("--seed", metavar="S", type=_integer(0), default=0,
                      help="data seed (default: 0)")
    _add_solver_options(demo)
    return parser


def _add_solver_options(parser: argparse.ArgumentParser) -> None:
    epsilon = _number("the entropic regularisation, e.g. 0.01")
    tau = _number("1 is balanced, less relaxes the marginal", 1.0)
    threshold = _number("the marginal error (optimality residual if unbalanced) to stop "
                        "at, e.g. 1e-3")
    parser.add_argument("--epsilon", metavar="E", type=epsilon, default=None,
                        help="entropic regularisation (default: 0.05 x mean cost)")
    parser.add_argument("--cost", choices=COSTS, default="sqeuclidean",
                        help="ground cost (default: sqeuclidean, |x-y|^2 without 1/2)")
    for flag, side in (("--tau-a", "source"), ("--tau-b", "target")):
        parser.add_argument(flag, metavar="T", type=tau, default=1.0,
                            help=f"{side} marginal relaxation in (0, 1] (default: 1)")
    parser.add_argument("--threshold", metavar="T", type=threshold, default=1e-3,
                        help="stop when the L1 marginal error (with tau < 1: the optimality "
                        "residual) is below this (default: 1e-3)")
    parser.add_argument("--max-iterations", metavar="N", type=_integer(1), default=2000,
                        help="iteration budget (default: 2000)")
    parser.add_argument("--progress", action="store_true",
                        help="print progress on stderr "
                        f"(automatic when n*m > {PROGRESS_LIMIT:.0e})")


# ---------------------------------------------------------------- reading points
def _load_npy(path: Path, label: str) -> Any:
    how = "write it with numpy.save(path, array) of a numeric array"
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = _first_line(error)
        if "pickle" in reason:
            reason = "not a numeric .npy array; monge never unpickles data"
        raise CLIError(
            f"{label} file '{path}' could not be read as .npy ({reason}): {how}"
        ) from None
    if not isinstance(array, np.ndarray):  # an .npz archive behind a .npy name
        getattr(array, "close", lambda: None)()
        raise CLIError(f"{label} file '{path}' is an .npz archive, not a .npy array: {how}")
    return array


def _read_text(path: Path, delimiter: str | None, label: str) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"{label} file '{path}' is not a UTF-8 text file: save it as plain "
                       "text, or as .npy with numpy.save") from None
    except OSError as error:
        raise CLIError(f"{label} file '{path}' could not be read ({_first_line(error)}): "
                       "check its permissions") from None
    numbered = [(k + 1, line.split("#", 1)[0].strip()) for k, line in enumerate(text.splitlines())]
    numbered = [(k, line) for k, line in numbered if line]
    if numbered and _parse_row(numbered[0][1], delimiter) is None:
        numbered = numbered[1:]  # a header line
    sep = "','" if delimiter else "spaces"
    if not numbered:
        raise CLIError(f"{label} file '{path}' contains no points: write one point per "
                       f"line, coordinates separated by {sep}")
    with contextlib.suppress(ValueError):  # malformed: the slow path below says where
        return np.loadtxt([line for _, line in numbered], delimiter=delimiter, ndmin=2,
                          dtype=np.float64)
    # Slow path, only to say where the file is malformed.
    width = len(_parse_row(numbered[0][1], delimiter) or ())
    for number, line in numbered:
        row = _parse_row(line, delimiter)
        if row is None:
            problem = "a value that is not a number"
        elif len(row) != width:
            problem = f"{len(row)} values where the first point has {width}"
        else:
            problem = None
        if problem:
            raise CLIError(f"{label} file '{path}' is malformed: line {number} has {problem} "
                           f"({line[:40]!r}): write one point per line, the same number of "
                           f"numbers on each, separated by {sep}")
    raise CLIError(f"{label} file '{path}' is malformed: write one point per line, the same "
                   f"number of numbers on each, separated by {sep}")


def _parse_row(line: str, delimiter: str | None) -> list[float] | None:
    try:
        return [float(token) for token in line.split(delimiter)]
    except ValueError:
        return None


def load_points(path: str | Path, label: str = "SOURCE") -> np.ndarray:
    """Read a point cloud from .npy (never unpickled), .csv or .txt as float32 `(n, d)`.

    A 1-D array is `n` points in dimension 1. In text files, `#` starts a comment and a
    first line that is not numeric (a header) is skipped.

    Raises:
        CLIError: with a one-line message naming `label`, the file and the fix.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from monge.cli import load_points
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.csv"
        >>> _ = p.write_text("x,y\\n0,1\\n2,3\\n")
        >>> load_points(p)
        array([[0., 1.],
               [2., 3.]], dtype=float32)
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise CLIError(f"{label} file '{path}' does not exist: check the path")
    if not path.is_file():
        raise CLIError(f"{label} '{path}' is not a file: pass the path of a .npy, .csv or "
                       ".txt file")
    if suffix != ".npy" and suffix not in _TEXT_SUFFIXES:
        raise CLIError(f"{label} file '{path}' has unsupported extension "
                       f"{path.suffix or '(none)'!r}: use .npy (numpy.save), .csv "
                       "(comma-separated) or .txt (space-separated)")
    if suffix == ".npy":
        array = _load_npy(path, label)
    else:
        array = _read_text(path, _TEXT_SUFFIXES[suffix], label)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise CLIError(f"{label} file '{path}' holds non-numeric values (dtype {array.dtype}): "
                       "save a real-valued (float or integer) array")
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise CLIError(f"{label} file '{path}' holds an array of shape {array.shape}: pass a "
                       "2-D array with one point per row, shape (n, d)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise CLIError(f"{label} file '{path}' holds an empty array of shape {array.shape}: "
                       "pass at least one point with at least one coordinate")
    points = array.astype(np.float32)
    bad = ~np.isfinite(points)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise CLIError(f"{label} file '{path}' has {int(bad.sum())} NaN or infinite value(s) "
                       f"(first in point {row}, counting from 0, after conversion to "
                       "float32): remove or replace them")
    return points


# ---------------------------------------------------------------- solving and reporting
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _solver_message(error: RuntimeError) -> str | None:
    """The message of an equinox runtime check (`eqx.error_if`), else None."""
    match = re.search(r"EquinoxRuntimeError: (.+)", str(error))
    return match.group(1).strip() if match else None


def _solve(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> Any:
    import monge

    progress = bool(args.progress) or x.shape[0] * y.shape[0] > PROGRESS_LIMIT
    try:
        return monge.solve(
            x, y, cost=args.cost, epsilon=args.epsilon, tau_a=args.tau_a, tau_b=args.tau_b,
            threshold=args.threshold, max_iterations=args.max_iterations, progress=progress,
        )
    except ValueError as error:
        raise CLIError(_first_line(error)) from None
    except RuntimeError as error:
        message = _solver_message(error)
        if message is None:
            raise
        raise CLIError(message) from None


def _scalar(value: Any) -> Any:
    return np.asarray(value).reshape(-1)[0].item()


def succeeded(sol: Any) -> bool:
    """Whether to exit 0: the solver converged and its costs are finite numbers (a
    non-finite cost is never reported as a success, whatever the solver says)."""
    values = (sol.converged, sol.cost, sol.reg_cost)
    converged, cost, reg_cost = (_scalar(v) for v in values)
    return bool(converged) and math.isfinite(cost) and math.isfinite(reg_cost)


def report(x: np.ndarray, y: np.ndarray, sol: Any, args: argparse.Namespace) -> str:
    r"""The text report printed by `monge solve` and `monge demo`.

    The error row is the solver's stopping measure: the L1 marginal error
    $\|P\mathbf 1 - a\|_1$ for balanced OT; with `--tau-a`/`--tau-b` < 1 the marginals
    are not constraints, and it is the L1 optimality residual $\|a e^{-f/\rho_a} -
    P\mathbf 1\|_1$ (zero at the optimum), labelled so."""
    converged = bool(_scalar(sol.converged))
    final = float(_scalar(sol.error))
    balanced = (args.tau_a, args.tau_b) == (1.0, 1.0)
    error_name = "marginal error" if balanced else "optimality residual"
    how = "given" if args.epsilon is not None else "default: 0.05 x mean cost"
    rows = [
        ("points", f"{x.shape[0]} source, {y.shape[0]} target, dimension {x.shape[1]}"),
        ("cost function", args.cost + (f" (tau_a={args.tau_a:g}, tau_b={args.tau_b:g})"
                                       if (args.tau_a, args.tau_b) != (1.0, 1.0) else "")),
        ("epsilon", f"{_scalar(sol.epsilon):.6g} ({how})"),
        ("transport cost", f"{_scalar(sol.cost):.6g}  <C, P>"),
        ("regularised cost", f"{_scalar(sol.reg_cost):.6g}"),
        ("converged", f"{'yes' if converged else 'no'} after {_scalar(sol.n_iters)} iterations"),
        (error_name, f"{final:.3g} (threshold {args.threshold:g})"
                     + ("" if balanced else "; L1, of the unbalanced optimality conditions")),
        ("status", str(sol.message)),
    ]
    if converged and not succeeded(sol):
        rows.append(("warning", "the solver reported convergence but the cost is not a "
                                "finite number: the result is not usable (exit status 1)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _check_writable(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.is_dir():
        raise CLIError(f"{option} {path}: folder '{path.parent}' does not exist: create it first")


def _write_outputs(x, y, sol, out: Path | None, plot: Path | None) -> list[str]:
    notes = []
    if out is not None:
        n, m = x.shape[0], y.shape[0]
        arrays = {
            "f": np.asarray(sol.f), "g": np.asarray(sol.g),
            "cost": np.asarray(sol.cost), "reg_cost": np.asarray(sol.reg_cost),
            "epsilon": np.asarray(sol.epsilon), "converged": np.asarray(sol.converged),
            "n_iters": np.asarray(sol.n_iters), "errors": blocks_run(sol.errors),
        }
        if n * m <= PLAN_SAVE_LIMIT:
            arrays["plan"] = np.asarray(sol.plan)
        else:
            notes.append(f"plan not saved: n*m = {n * m:.3g} > {PLAN_SAVE_LIMIT:.3g} "
                         "(use the potentials f, g with monge to apply it)")
        try:
            with open(out, "wb") as handle:
                np.savez(handle, **arrays)
        except OSError as error:
            raise CLIError(f"--out {out}: cannot write ({_first_line(error)})") from None
        notes.append(f"results written to {out}")
    if plot is not None:
        from monge import plot as monge_plot

        try:
            monge_plot.save_matching(plot, x, y, sol)
        except (ImportError, ValueError, OSError) as error:
            raise CLIError(f"--plot {plot}: {_first_line(error)}") from None
        notes.append(f"picture written to {plot}")
    return notes


def blocks_run(errors: Any) -> np.ndarray:
    """The solver's error after each block of iterations that ran: `sol.errors` without
    the -1 entries of the blocks the solver never reached (the array has one slot per
    possible block, `max_iterations / inner_iterations`)."""
    errors = np.asarray(errors)
    return errors[errors != -1]


def _check_plot(path: Path | None) -> None:
    """Before solving: matplotlib is importable and draws the format of `path`."""
    if path is None:
        return
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CLIError(f"--plot {path}: drawing needs matplotlib, which is not installed: "
                       f"{PLOT_INSTALL}, or drop --plot") from None
    suffix = path.suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise CLIError(f"--plot {path}: matplotlib cannot write '.{suffix}' images: use "
                       f"one of {', '.join('.' + name for name in sorted(formats))}")


def _run(x, y, args, out: Path | None, plot: Path | None) -> int:
    _check_writable(out, "--out")
    _check_writable(plot, "--plot")
    _check_plot(plot)
    sol = _solve(x, y, args)
    print(report(x, y, sol, args))
    for note in _write_outputs(x, y, sol, out, plot):
        print(note)
    return 0 if succeeded(sol) else 1


def _command_solve(args: argparse.Namespace) -> int:
    x = load_points(args.source, "SOURCE")
    y = load_points(args.target, "TARGET")
    if x.shape[1] != y.shape[1]:
        raise CLIError(f"SOURCE has points in dimension {x.shape[1]} but TARGET in dimension "
                       f"{y.shape[1]}: both files need the same number of columns")
    return _run(x, y, args, args.out, args.plot)


def _command_demo(args: argparse.Namespace) -> int:
    from monge import datasets

    x, y = datasets.shapes(args.n, args.n + args.n // 3, seed=args.seed)
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(
            f"--out-dir {args.out_dir}: cannot create it ({_first_line(error)})"
        ) from None
    return _run(x, y, args, args.out_dir / "demo.npz", args.out_dir / "demo.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `monge` command line; returns the exit status.

    Args:
        argv: the arguments without the program name (default: `sys.argv[1:]`).

    Returns:
        0 on success, 1 when the solver did not converge, 2 for bad input (after one
        line `monge: error: ...` on stderr); `--help` and `--version` return 0.

    Example:
        >>> from monge.cli import main
        >>> main(["--version"])  # doctest: +ELLIPSIS
        monge ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "solve":
            return _command_solve(args)
        return _command_demo(args)
    except SystemExit as stop:  # --help, --version
        return stop.code if isinstance(stop.code, int) else 0
    except CLIError as error:
        print(f"monge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monge: interrupted", file=sys.stderr)
        return 130

