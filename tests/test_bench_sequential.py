"""The simulation of full / cascade / sequential from a counts file's class probabilities,
under either certificate (`split`, the default, or `paper`) and either stopping rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msscale.bench.sequential import (
    RADII,
    format_simulation,
    run_simulation,
    simulate,
    true_probabilities,
)
from msscale.certify.counts import Counts, save_counts
from msscale.errors import UserError
from msscale.smoothing.certificate import Certificate
from msscale.smoothing.sequential import SequentialRule

SIGMAS = (0.25, 0.5, 1.0)


def fake_counts(num_images: int = 30, seed: int = 0) -> Counts:
    """Counts of a `full` run: images clear at small scales and mixed at the largest."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, size=num_images)
    estimate = np.zeros((num_images, 3, 4), np.int64)
    for i, y in enumerate(label):
        for k, share in enumerate((0.99, rng.uniform(0.6, 0.97), rng.uniform(0.2, 0.9))):
            probs = np.full(4, (1 - share) / 3)
            probs[y] = share
            estimate[i, k] = rng.multinomial(500, probs)
    meta = {"alpha": 0.001, "p0": 0.5, "schedule": "full"}
    return Counts(np.arange(num_images), label, np.array(SIGMAS), estimate // 10, estimate,
                  meta)


def test_true_probabilities_add_the_prior_and_need_every_scale():
    counts = fake_counts(3)
    probs = true_probabilities(counts, 0.5)
    np.testing.assert_allclose(probs.sum(axis=2), 1.0)
    assert np.all(probs > 0)
    expected = (counts.estimate[0, 0, 0] + 0.5) / (counts.estimate[0, 0].sum() + 2.0)
    assert probs[0, 0, 0] == pytest.approx(expected)
    counts.estimate[1, 0] = 0  # a scale the cascade never reached
    with pytest.raises(UserError, match="full"):
        true_probabilities(counts, 0.5)


@pytest.mark.parametrize("certificate", [Certificate("paper"), Certificate("split")],
                         ids=["paper", "split"])
def test_one_look_sequential_is_the_cascade_on_the_same_draws(certificate):
    # With one look at n, the sequential schedule is the cascade: same evaluations and the
    # same certificates from the shared draws, whichever rule stops it.
    counts = fake_counts()
    probs = true_probabilities(counts, 0.01)
    rule = SequentialRule(SIGMAS, 0.001, 0.5, (2000,), (1.0,), 0.0, certificate)
    result = simulate(probs, counts.label, rule, 50, replicates=2)
    rows = result["schedules"]
    # No tolerances and no radii: one row, stopped by the rule's own stopping.
    assert list(rows) == ["full", "cascade", "sequential tolerance"]
    assert rows["sequential tolerance"] == rows["cascade"]
    result = simulate(probs, counts.label, rule, 50, (0.0, 0.1), replicates=2, radii=(0.0, 0.5))
    rows = result["schedules"]
    assert list(rows) == ["full", "cascade", "sequential tol=0", "sequential tol=0.1",
                          "sequential radii"]
    for name in ("sequential tol=0", "sequential tol=0.1", "sequential radii"):
        assert rows[name] == rows["cascade"]
    assert list(rows["cascade"]["certified_accuracy"]) == ["0.0", "0.5"]
    assert result["radii"] == [0.0, 0.5]
    assert (result["certificate"], result["stage_shares"]) == (certificate.rule, None)


def test_the_certificate_changes_the_cascade():
    # The same draws under the paper's rule and the split rule (shares (0.5, 0.3, 0.2)):
    # both certify, with their own radii, and each names its certificate.
    counts = fake_counts()
    probs = true_probabilities(counts, 0.01)
    results = {}
    for certificate in (Certificate("paper"), Certificate("split", (0.5, 0.3, 0.2))):
        rule = SequentialRule.from_settings(SIGMAS, 0.001, 0.5, 2000, 250, 250, 2.0, 0.0,
                                            certificate)
        results[certificate.rule] = simulate(probs, counts.label, rule, 50, replicates=2)
    assert results["paper"]["certificate"] == "paper"
    assert (results["split"]["certificate"], results["split"]["stage_shares"]) == (
        "split", [0.5, 0.3, 0.2])
    paper, split = (results[r]["schedules"]["cascade"] for r in ("paper", "split"))
    assert paper["certified_accuracy"]["0.0"] > 0.5 and split["certified_accuracy"]["0.0"] > 0.5
    assert paper != split


def test_schedules_figures_are_consistent():
    counts = fake_counts()
    probs = true_probabilities(counts, 0.01)
    rule = SequentialRule.from_settings(SIGMAS, 0.001, 0.5, 4000, 250, 250, 2.0, 0.0)
    result = simulate(probs, counts.label, rule, 50, (0.0, 0.05, 1.0), replicates=2)
    rows = result["schedules"]
    assert rows["full"]["evaluations_per_image"] == 3 * (50 + 4000)
    assert rows["full"]["certified_accuracy"] == rows["cascade"]["certified_accuracy"]
    assert 50 + 4000 <= rows["cascade"]["evaluations_per_image"] < 3 * (50 + 4000)
    evaluations = [rows[f"sequential tol={t:g}"]["evaluations_per_image"] for t in (0, 0.05, 1)]
    # A larger tolerance stops sooner; the first look is the least an image can use.
    assert evaluations[0] > evaluations[1] > evaluations[2] >= 50 + 250
    for row in rows.values():
        accuracy = [row["certified_accuracy"][str(r)] for r in RADII]
        assert all(a >= b for a, b in zip(accuracy, accuracy[1:], strict=False))
    table = format_simulation([result])
    assert "sequential tol=0.05" in table and "n=4000" in table


def test_run_simulation_reads_a_counts_file(tmp_path):
    path = tmp_path / "counts.npz"
    save_counts(fake_counts(10), path)
    results = run_simulation(path, ns=(1000, 2000), tolerances=(0.05,), n0=20, noise_block=250,
                             first_look=250, replicates=1)
    assert [r["n"] for r in results] == [1000, 2000]
    assert results[0]["alpha"] == 0.001 and results[0]["looks"] == [250, 500, 1000]
    # The default: the split certificate, a row per tolerance and one deciding RADII.
    assert results[0]["certificate"] == "split" and results[0]["radii"] == list(RADII)
    assert list(results[0]["schedules"]) == ["full", "cascade", "sequential tol=0.05",
                                             "sequential radii"]
    # first_look None is n / 100 (here rounded up to one block); no tolerance, no such row.
    results = run_simulation(path, ns=(1000,), tolerances=(), n0=20, noise_block=100,
                             replicates=1, radii=(0.25, 0.5), certificate=Certificate("paper"))
    assert results[0]["looks"] == [100, 200, 400, 800, 1000]
    assert results[0]["certificate"] == "paper" and results[0]["radii"] == [0.25, 0.5]
    assert list(results[0]["schedules"]) == ["full", "cascade", "sequential radii"]
    assert list(results[0]["schedules"]["full"]["certified_accuracy"]) == ["0.25", "0.5"]
    with pytest.raises(UserError, match="target radii"):
        run_simulation(path, ns=(1000,), n0=20, noise_block=250, radii=(0.5, 0.25))
    counts = fake_counts(10)
    counts.meta.pop("alpha")
    save_counts(counts, path)
    with pytest.raises(UserError, match="no alpha or p0: give --alpha and --p0"):
        run_simulation(path, ns=(1000,), n0=20, noise_block=250, first_look=250)


def test_bench_sequential_command(tmp_path, capsys):
    from msscale.cli import main

    path = tmp_path / "counts.npz"
    save_counts(fake_counts(8), path)
    args = ["bench-sequential", str(path), "--n", "1000", "--n0", "20", "--noise-block", "250",
            "--first-look", "250", "--replicates", "1"]
    assert main([*args, "--tolerance", "0.02", "0.1"]) == 0
    table = capsys.readouterr().out
    assert "sequential tol=0.02" in table and "sequential tol=0.1" in table
    assert "sequential radii" in table and "split certificate" in table
    assert main([*args, "--certificate", "paper", "--tolerance", "--radii", "0", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "paper certificate" in table and "sequential tol" not in table
    assert "r=0.0" in table and "r=0.5" in table and "r=0.25" not in table
    assert main([*args, "--stage-shares", "0.5,0.5"]) == 2  # two shares for three scales
    assert "stage shares" in capsys.readouterr().err
    assert main([*args, "--certificate", "paper", "--stage-shares", "0.5,0.3,0.2"]) == 2
    assert "--certificate/--stage-shares" in capsys.readouterr().err
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n"] == 1000
    assert main([*args, "--look-growth", "1.0"]) == 2
    assert "look_growth" in capsys.readouterr().err
