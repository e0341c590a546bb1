import doctest
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import monge
from monge import cli, datasets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPSILON = 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """x (30 points) and y (41 points) in 2-D, written in every supported format."""
    root = tmp_path_factory.mktemp("clouds")
    x, y = datasets.shapes(30, 41, seed=0)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    np.savetxt(root / "y.csv", y, delimiter=",", header="u,v", comments="")  # header line
    np.savetxt(root / "y.txt", y, fmt="%.9g")
    np.savetxt(root / "x.txt", x, fmt="%.9g")
    return root, x, y


def _error_line(capsys):
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("monge: error: ")
    return lines[0]


@pytest.mark.parametrize("target", ["y.npy", "y.csv", "y.txt"])
def test_solve_reads_every_format(data, target, capsys):
    root, _, _ = data
    code = cli.main(["solve", str(root / "x.npy"), str(root / target), "--epsilon", str(EPSILON)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "30 source, 41 target, dimension 2" in out
    assert "epsilon           0.1 (given)" in out
    assert "converged         yes" in out
    assert "status            converged" in out


def test_solve_out_matches_an_independent_reference(data, tmp_path, capsys):
    ot = pytest.importorskip("ot")
    root, x, y = data
    out_file = tmp_path / "result.npz"
    code = cli.main([
        "solve", str(root / "x.txt"), str(root / "y.csv"), "--epsilon", str(EPSILON),
        "--threshold", "1e-5", "--max-iterations", "5000", "--out", str(out_file),
    ])
    stdout = capsys.readouterr().out
    assert code == 0 and f"results written to {out_file}" in stdout
    with np.load(out_file, allow_pickle=False) as result:
        stored = {key: result[key] for key in result.files}
    assert {"f", "g", "plan", "cost", "reg_cost", "epsilon", "converged", "n_iters"} <= set(stored)
    assert stored["f"].shape == (30,) and stored["g"].shape == (41,)
    assert stored["plan"].shape == (30, 41)
    assert float(stored["epsilon"]) == pytest.approx(EPSILON)
    assert bool(stored["converged"]) and int(stored["n_iters"]) > 0
    # POT in float64, same data (as read back from the text files), same epsilon
    xs, ys = x.astype(np.float64), y.astype(np.float64)
    a, b = np.full(30, 1 / 30), np.full(41, 1 / 41)
    M = ot.dist(xs, ys)  # squared Euclidean, no 1/2, like monge's "sqeuclidean"
    options = {"method": "sinkhorn_log", "stopThr": 1e-12, "numItermax": 20_000}
    reference = ot.sinkhorn2(a, b, M, EPSILON, **options)
    assert float(stored["cost"]) == pytest.approx(float(reference), rel=1e-3)
    plan = ot.sinkhorn(a, b, M, EPSILON, **options)
    np.testing.assert_allclose(stored["plan"], plan, atol=2e-4 / 30)
    np.testing.assert_allclose(stored["plan"].sum(1), a, rtol=1e-3)


def test_solve_writes_the_plot(data, tmp_path, capsys):
    root, _, _ = data
    picture = tmp_path / "match.png"
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--plot", str(picture)])
    assert code == 0
    assert f"picture written to {picture}" in capsys.readouterr().out
    assert picture.read_bytes().startswith(PNG_MAGIC)


def test_solve_reports_non_convergence_with_status_1(data, capsys):
    root, _, _ = data
    code = cli.main([
        "solve", str(root / "x.npy"), str(root / "y.npy"),
        "--max-iterations", "1", "--threshold", "1e-5",
    ])
    out = capsys.readouterr().out
    assert code == 1
    assert "converged         no" in out and "not converged" in out


def test_options_reach_the_solver(data, monkeypatch, capsys):
    root, _, _ = data
    seen = {}
    real_solve = monge.solve

    def spy(x, y, **kwargs):
        seen.update(kwargs)
        return real_solve(x, y, **kwargs)

    monkeypatch.setattr(monge, "solve", spy)
    monkeypatch.setattr(cli, "PROGRESS_LIMIT", 100)  # 30 * 41 points counts as large
    code = cli.main([
        "solve", str(root / "x.npy"), str(root / "y.npy"), "--cost", "euclidean",
        "--tau-a", "0.9", "--tau-b", "0.8", "--threshold", "0.01", "--max-iterations", "300",
    ])
    assert code in (0, 1)
    assert seen == {
        "cost": "euclidean", "epsilon": None, "tau_a": 0.9, "tau_b": 0.8,
        "threshold": 0.01, "max_iterations": 300, "progress": True,
    }
    assert "tau_a=0.9, tau_b=0.8" in capsys.readouterr().out


def test_demo_writes_picture_and_results(tmp_path, capsys):
    out_dir = tmp_path / "new" / "folder"
    code = cli.main(["demo", "--out-dir", str(out_dir), "--n", "30"])
    out = capsys.readouterr().out
    assert code == 0
    assert "30 source, 40 target" in out
    assert (out_dir / "demo.png").read_bytes().startswith(PNG_MAGIC)
    with np.load(out_dir / "demo.npz") as result:
        assert result["plan"].shape == (30, 40)
    assert str(out_dir / "demo.png") in out and str(out_dir / "demo.npz") in out


def _write(root: Path, name: str, content) -> str:
    path = root / name
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


BAD_SOURCES = [
    ("missing.npy", None, r"SOURCE file '.*missing\.npy' does not exist: check the path"),
    ("bad.csv", "1,2\n3,x\n", r"'.*bad\.csv' is malformed: line 2 has a value that is not a"),
    ("ragged.csv", "1,2\n3,4,5\n", r"line 2 has 3 values where the first point has 2"),
    ("empty.txt", "# nothing\n", r"contains no points"),
    ("nan.txt", "1 2\nnan 3\n", r"1 NaN or infinite value\(s\) \(first in point 1"),
    ("inf.npy", np.array([[np.inf, 0.0], [1.0, 2.0]]), r"NaN or infinite"),
    ("words.npy", np.array(["a", "b"]), r"non-numeric values \(dtype <U1\)"),
    ("pickled.npy", np.array([{}, 1], dtype=object), r"monge never unpickles"),
    ("garbage.npy", b"not an array", r"could not be read as \.npy"),
    ("binary.csv", bytes(range(256)), r"is not a UTF-8 text file"),
    ("cube.npy", np.zeros((2, 3, 4)), r"shape \(2, 3, 4\): pass a 2-D array"),
    ("points.dat", "1 2\n", r"unsupported extension '\.dat': use \.npy"),
]


@pytest.mark.parametrize("name, content, pattern", BAD_SOURCES, ids=[b[0] for b in BAD_SOURCES])
def test_bad_source_files(data, tmp_path, capsys, name, content, pattern):
    root, _, _ = data
    source = str(tmp_path / name) if content is None else _write(tmp_path, name, content)
    code = cli.main(["solve", source, str(root / "y.npy")])
    assert code == 2
    assert re.search(pattern, _error_line(capsys))


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--cost", "hamming"], r"argument --cost: invalid choice: 'hamming'"),
        (["--epsilon", "-1"], r"argument --epsilon: must be a number > 0 .*got '-1'"),
        (["--epsilon", "abc"], r"argument --epsilon: must be a number > 0"),
        (["--tau-a", "1.5"], r"argument --tau-a: must be a number in \(0, 1\]"),
        (["--max-iterations", "0"], r"argument --max-iterations: must be a positive integer"),
        (["--out", "no/such/folder/r.npz"], r"--out no/such/folder/r\.npz: folder .* not exist"),
        (["--unknown"], r"unrecognized arguments: --unknown"),
    ],
)
def test_bad_options(data, capsys, extra, pattern):
    root, _, _ = data
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), *extra])
    assert code == 2
    assert re.search(pattern, _error_line(capsys))


def test_mismatched_dimensions(data, tmp_path, capsys):
    root, _, _ = data
    target = _write(tmp_path, "y3.npy", np.zeros((5, 3), np.float32))
    assert cli.main(["solve", str(root / "x.npy"), target]) == 2
    assert "SOURCE has points in dimension 2 but TARGET in dimension 3" in _error_line(capsys)


def test_missing_command_and_argument(data, capsys):
    assert cli.main([]) == 2
    assert "required: COMMAND" in _error_line(capsys)
    assert cli.main(["solve", str(data[0] / "x.npy")]) == 2
    assert "required: TARGET" in _error_line(capsys)


def test_value_errors_from_monge_become_one_line(data, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise ValueError("`monge.solve(epsilon=...)` is bad.\nA second line.")

    monkeypatch.setattr(monge, "solve", fails)
    assert cli.main(["solve", str(data[0] / "x.npy"), str(data[0] / "y.npy")]) == 2
    assert _error_line(capsys) == "monge: error: `monge.solve(epsilon=...)` is bad."


def test_runtime_checks_from_monge_become_one_line(data, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise RuntimeError("Stack.\n\nequinox.EquinoxRuntimeError: `x` has NaN.\n\nmore")

    monkeypatch.setattr(monge, "solve", fails)
    assert cli.main(["solve", str(data[0] / "x.npy"), str(data[0] / "y.npy")]) == 2
    assert _error_line(capsys) == "monge: error: `x` has NaN."


def test_help_and_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"monge {monge.__version__}"
    assert cli.main(["solve", "--help"]) == 0
    assert "--epsilon" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "monge"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"monge {monge.__version__}"


def test_docstring_examples_run():
    result = doctest.testmod(cli)
    assert result.attempted > 0 and result.failed == 0
