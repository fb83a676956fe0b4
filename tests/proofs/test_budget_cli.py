"""``fedsec privacy-budget``: one JSON line matching dp-accounting; one-line errors, exit 2."""

from __future__ import annotations

import json

import pytest

from fl_core.cli import main
from proofs.accountant import GaussianDpEvent, SkellamDpEvent, epsilon_for_rounds

dp_accounting = pytest.importorskip("dp_accounting")

ARGS = ["privacy-budget", "--sampling-rate", "0.02", "--rounds", "500", "--delta", "1e-6"]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_gaussian_budget_matches_dp_accounting(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, [*ARGS, "--noise-multiplier", "1.3"])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    theirs = dp_accounting.rdp.RdpAccountant()
    theirs.compose(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3)), 500
    )
    eps, order = theirs.get_epsilon_and_optimal_order(1e-6)
    assert record["epsilon"] == pytest.approx(eps, rel=1e-6)
    assert record["order"] == order
    assert record["mechanism"] == "gaussian" and record["delta"] == 1e-6
    assert record["noise_multiplier"] == 1.3 and record["sampling_rate"] == 0.02
    assert record["rounds"] == 500
    # The amplified figure says what it assumes, and the figure without it is beside it.
    assert "Poisson" in record["amplification_assumes"]
    assert "cannot see" in record["amplification_assumes"]
    unamplified, _ = epsilon_for_rounds(GaussianDpEvent(1.3), 1.0, 500, 1e-6)
    assert record["epsilon_without_amplification"] == pytest.approx(unamplified)
    assert record["epsilon_without_amplification"] > 10 * record["epsilon"]
    assert record["adjacency"].startswith("zero-out")


def test_help_says_the_amplified_figure_assumes_secret_poisson_coins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["privacy-budget", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "assumes Poisson sampling with coins the observer cannot see" in text
    code, out, _ = _run(
        capsys,
        ["privacy-budget", "--sampling-rate", "1", "--rounds", "20", "--noise-multiplier", "5"],
    )
    assert code == 0
    record = json.loads(out)
    assert record["amplification_assumes"] == "none (q = 1)"
    assert record["epsilon"] == record["epsilon_without_amplification"]


def test_skellam_budget_uses_the_sensitivities(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*ARGS, "--mechanism", "skellam", "--noise-multiplier", "1.3"]
    code, out, _ = _run(capsys, [*argv, "--l2-sensitivity", "5000", "--dim", "65536"])
    assert code == 0
    record = json.loads(out)
    expected, order = epsilon_for_rounds(
        SkellamDpEvent(5000.0, 5000.0 * 256, (1.3 * 5000) ** 2), 0.02, 500, 1e-6
    )
    assert record["epsilon"] == pytest.approx(expected)
    assert record["order"] == order and record["l1_sensitivity"] == 5000.0 * 256
    # A coarse scale (small integer sensitivity) pays a visible discretisation surcharge.
    code, out, _ = _run(capsys, [*argv, "--l2-sensitivity", "3", "--dim", "65536"])
    assert json.loads(out)["epsilon"] > record["epsilon"] * 1.05


@pytest.mark.parametrize(
    "extra",
    [
        ["--noise-multiplier", "1.0", "--sampling-rate", "1.5", "--rounds", "10"],
        ["--noise-multiplier", "1.0", "--sampling-rate", "0", "--rounds", "10"],
        ["--noise-multiplier", "-0.5", "--sampling-rate", "0.1", "--rounds", "10"],
        ["--noise-multiplier", "1.0", "--sampling-rate", "0.1", "--rounds", "10", "--delta", "1"],
        ["--noise-multiplier", "1.0", "--sampling-rate", "0.1", "--rounds", "0"],
        [
            "--mechanism",
            "skellam",
            "--noise-multiplier",
            "1",
            "--sampling-rate",
            "0.1",
            "--rounds",
            "10",
        ],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    code, out, err = _run(capsys, ["privacy-budget", *extra])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "error:" in err
