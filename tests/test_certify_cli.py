"""`msscale certify` and `msscale recertify` end to end, and their answers to bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import write_certify_yaml

from msscale.certify.counts import load_counts
from msscale.cli import main


def run_cli(*args):
    """The installed console entry point, in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "msscale", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def certified(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = write_certify_yaml(assets, root / "certify.yaml", root / "run")
    result = run_cli("certify", "--cfg", cfg, "smoothing.n=60")
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_certify_writes_counts_and_results(certified):
    counts = load_counts(certified / "counts.npz")
    assert counts.index.tolist() == list(range(6))
    assert counts.select.shape == (6, 3, 10)
    assert (counts.select.sum(axis=2) == 10).all() and (counts.estimate.sum(axis=2) == 60).all()
    assert counts.meta["n"] == 60 and counts.meta["seed"] == 7
    lines = (certified / "certify.tsv").read_text().splitlines()
    assert lines[0].split("\t") == [
        "idx",
        "label",
        "predict",
        "radius",
        "correct",
        "stage",
        "sigma",
    ]
    assert len(lines) == 7
    summary = json.loads((certified / "summary.json").read_text())
    assert set(summary["methods"]) == {"cascade", "cascade, paper's rule", "sigma=0.25",
                                       "sigma=0.5", "sigma=1"}
    assert (counts.meta["certificate"], counts.meta["stage_shares"]) == ("split", None)
    assert (summary["certificate"], summary["stage_shares"]) == ("split", None)
    assert (certified / "certified_accuracy.png").stat().st_size > 0
    assert "cascade" in (certified / "report.md").read_text()
    assert not list((certified / "counts").glob("*.progress.npz"))
    assert yaml.safe_load((certified / "config.yaml").read_text())["smoothing"]["n"] == 60


def test_recertify_reproduces_certify_tsv_exactly(certified, tmp_path):
    assert (
        main(["recertify", str(certified / "counts.npz"), "--out", str(tmp_path / "re.tsv")]) == 0
    )
    assert (tmp_path / "re.tsv").read_text() == (certified / "certify.tsv").read_text()


def test_recertify_single_scale_and_subsets(certified, tmp_path):
    counts = certified / "counts.npz"
    assert (
        main(["recertify", str(counts), "--single", "0.5", "--out", str(tmp_path / "a.tsv")]) == 0
    )
    rows = [r.split("\t") for r in (tmp_path / "a.tsv").read_text().splitlines()[1:]]
    assert {r[5] for r in rows} <= {"1", "-1"}  # only the 0.5 scale can decide
    assert (
        main(
            [
                "recertify",
                str(counts),
                "--sigmas",
                "0.25,1.0",
                "--alpha",
                "0.1",
                "--p0",
                "0.6",
                "--out",
                str(tmp_path / "b.tsv"),
            ]
        )
        == 0
    )
    rows = [r.split("\t") for r in (tmp_path / "b.tsv").read_text().splitlines()[1:]]
    assert {r[5] for r in rows} <= {"0", "2", "-1"}
    assert (
        main(["recertify", str(counts), "--single", "0.3", "--out", str(tmp_path / "c.tsv")]) == 2
    )
    assert not (tmp_path / "c.tsv").exists()


def test_recertify_names_the_certificate_and_its_shares(certified, tmp_path):
    """--certificate paper gives the report's paper row; shares are checked against the
    scales certified, with one line and exit 2."""
    from msscale.certify.report import PAPER_METHOD, methods_of

    counts = certified / "counts.npz"
    out = tmp_path / "paper.tsv"
    assert main(["recertify", str(counts), "--certificate", "paper", "--out", str(out)]) == 0
    run = load_counts(counts)
    paper = methods_of(run, run.meta["alpha"], run.meta["p0"])[PAPER_METHOD]
    rows = [r.split("\t") for r in out.read_text().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == paper.predict.tolist()
    assert [float(r[3]) for r in rows] == pytest.approx(paper.radius.tolist(), abs=1e-6)
    shares = tmp_path / "shares.tsv"
    argv = ["recertify", str(counts), "--stage-shares", "0.5,0.25,0.25", "--out", str(shares)]
    assert main(argv) == 0
    argv = ["recertify", str(counts), "--sigmas", "0.5,1.0", "--stage-shares", "0.5,0.25,0.25",
            "--out", str(tmp_path / "bad.tsv")]
    assert main(argv) == 2 and not (tmp_path / "bad.tsv").exists()
    argv = ["recertify", str(counts), "--certificate", "paper", "--stage-shares", "0.5,0.5,0",
            "--out", str(tmp_path / "bad.tsv")]
    assert main(argv) == 2 and not (tmp_path / "bad.tsv").exists()


def test_certify_resumes_from_flushed_progress(assets, certified, tmp_path):
    """A progress file from an interrupted run is continued, not redrawn."""
    write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run")
    progress = tmp_path / "run" / "counts" / "shard-00000-of-00001.progress.npz"
    progress.parent.mkdir(parents=True)
    # keep the first 2 images of a finished run as if the run had stopped there
    done = load_counts(certified / "counts" / "shard-00000-of-00001.npz")
    from msscale.certify.counts import Counts, save_counts

    save_counts(
        Counts(
            done.index[:2],
            done.label[:2],
            done.sigmas,
            done.select[:2] + 0,
            done.estimate[:2],
            done.meta,
        ),
        progress,
    )
    assert main(["certify", "--cfg", str(tmp_path / "c.yaml"), "smoothing.n=60"]) == 0
    resumed = load_counts(tmp_path / "run" / "counts.npz")
    np.testing.assert_array_equal(resumed.estimate, load_counts(certified / "counts.npz").estimate)
    assert not progress.exists()


def test_unknown_config_key_lists_the_valid_ones(assets, tmp_path):
    cfg = write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run")
    result = run_cli("certify", "--cfg", cfg, "smoothing.sigma=0.5")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert (
        "unknown config key smoothing.sigma" in result.stderr
        and "smoothing.sigmas" in result.stderr
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("smoothing.alpha=2", "smoothing.alpha: expected < 0.5"),
        ("smoothing.n=ten", "smoothing.n: expected int"),
        ("smoothing.schedule=fast", "smoothing.schedule: expected one of"),
        ("smoothing.sigmas=[0.5,0.25]", "ascending"),
    ],
)
def test_bad_values_name_the_key(assets, tmp_path, capsys, override, message):
    cfg = write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run")
    assert main(["certify", "--cfg", str(cfg), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _fails_cleanly(tmp_path, capsys, cfg, *overrides, expect):
    code = main(["certify", "--cfg", str(cfg), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err and err.count("\n") == 1, err
    out = tmp_path / "run"
    assert not (out / "counts.npz").exists() and not (out / "certify.tsv").exists()
    assert not list(out.glob("counts/shard-*.npz"))


def test_missing_model_directory(assets, tmp_path, capsys):
    cfg = write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run")
    _fails_cleanly(
        tmp_path,
        capsys,
        cfg,
        f"denoiser.path={tmp_path}/nowhere",
        expect=f"denoiser.path {tmp_path}/nowhere is not a directory",
    )


def test_classifier_with_the_wrong_number_of_classes(assets, tmp_path, capsys):
    cfg = write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run")
    _fails_cleanly(
        tmp_path,
        capsys,
        cfg,
        "classifier.num_classes=7",
        expect="has 10 classes but classifier.num_classes is 7",
    )


def test_corrupt_shard(assets, tmp_path, capsys):
    data = tmp_path / "digits"
    shutil.copytree(assets["data"]["shards"].rsplit("/", 1)[0], data)
    first = sorted(data.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:5000])
    cfg = write_certify_yaml(
        {**assets, "data": {"shards": str(data / "dataset.json")}},
        tmp_path / "c.yaml",
        tmp_path / "run",
    )
    _fails_cleanly(tmp_path, capsys, cfg, expect=first.name)


def test_recertify_agrees_with_an_independent_implementation(tmp_path):
    """`msscale recertify` on random count tables vs the reference of docs/design.md §1.2."""
    from test_stats import random_case, ref_cascade

    from msscale.certify.counts import Counts, save_counts

    rng = np.random.default_rng(11)
    sigmas = np.array([0.25, 0.5, 1.0])
    checked = 0
    for table in range(6):
        alpha, p0 = float(10 ** rng.uniform(-4, -1)), float(rng.choice([0.5, 0.6, 0.75]))
        select, estimate = np.zeros((40, 3, 10), np.int64), np.zeros((40, 3, 10), np.int64)
        for i in range(40):
            sel, est, *_ = random_case(rng)
            k, c = sel.shape
            select[i, 3 - k :, :c], estimate[i, 3 - k :, :c] = sel, est
            estimate[i, : 3 - k, 0] = select[i, : 3 - k, 0] = 1  # scales the case lacks
        path = tmp_path / f"counts{table}.npz"
        save_counts(Counts(np.arange(40), rng.integers(0, 10, 40), sigmas, select, estimate,
                           {"alpha": 0.5, "p0": 0.5}), path)
        out = tmp_path / f"t{table}.tsv"
        argv = ["recertify", str(path), "--alpha", str(alpha), "--p0", str(p0), "--out", str(out)]
        assert main(argv) == 0
        rows = [r.split("\t") for r in out.read_text().splitlines()[1:]]
        for i, row in enumerate(rows):
            pred, radius, stage, _ = ref_cascade(select[i], estimate[i], sigmas, alpha, p0)
            assert (int(row[2]), int(row[5])) == (pred, stage)
            assert float(row[3]) <= radius + 1e-12 and radius - float(row[3]) < 1e-6
            checked += 1
    assert checked == 240


def test_predict_writes_the_cascade_and_per_scale_predictions(assets, tmp_path):
    cfg = write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run")
    assert main(["predict", "--cfg", str(cfg), "--n", "30", "smoothing.p0=0.6"]) == 0
    lines = (tmp_path / "run" / "predict.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "stage", "correct",
                                    "cohen_0.25", "cohen_0.5", "cohen_1"]
    rows = [[int(x) for x in line.split("\t")] for line in lines[1:]]
    assert [r[0] for r in rows] == list(range(6))
    assert all(r[2] >= 0 and r[3] in (0, 1, 2) and r[4] == int(r[2] == r[1]) for r in rows)
    summary = json.loads((tmp_path / "run" / "predict.json").read_text())
    assert summary["n"] == 30 and summary["p0"] == 0.6
    assert summary["accuracy"]["cascade"] == np.mean([r[4] for r in rows])


def test_report_gives_each_share_with_its_interval_over_the_images():
    from scipy.stats import binomtest

    from msscale.certify.report import RADIUS_GRID, render_markdown

    accuracy = {str(r): 0.0 for r in RADIUS_GRID} | {"0.0": 0.93, "0.25": 0.5}
    summary = {"images": 100, "methods": {"cascade": {
        "certified_accuracy": accuracy, "acr": 0.5, "abstain": 0.06, "stages": {"1": 100}}}}
    row = next(line for line in render_markdown(summary).splitlines()
               if line.startswith("| cascade"))
    exact = binomtest(93, 100).proportion_ci(0.95, method="exact")  # scipy's, independent
    assert f"93.0 [{100 * exact.low:.0f}, {100 * exact.high:.0f}]" in row
    assert "50.0 [40, 60]" in row and "0.0 [0, 4]" in row and "| 6.0 [2, 13] |" in row
