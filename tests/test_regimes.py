"""bench/regimes.py: the paired comparison and its verdicts."""

from __future__ import annotations

from bench import regimes


def test_paired_difference_and_its_interval():
    plain = [1] * 40 + [0] * 60
    same = regimes.paired_difference(plain, list(plain))
    assert same == {"difference": 0.0, "ci95": [0.0, 0.0], "n": 100}
    better = [0] * 100  # refcal refuses none of the 40 that plain refused
    diff = regimes.paired_difference(plain, better)
    assert diff["difference"] == -0.4 and diff["ci95"][1] < 0 < -diff["ci95"][0]
    small = regimes.paired_difference([1, 0, 0, 0], [0, 0, 0, 0])
    assert small["ci95"][0] < 0 and small["ci95"][1] == 0.0  # one changed prompt in four: no evidence


def test_verdicts_respect_the_direction_of_each_measure():
    drop = {"difference": -0.3, "ci95": [-0.4, -0.2]}
    assert regimes.verdict("over_refusal_trained", drop) == "win"
    assert regimes.verdict("harmful", drop) == "loss"
    assert regimes.verdict("frame_carried_out", drop) == "win"
    assert regimes.verdict("harmful", {"difference": 0.1, "ci95": [-0.02, 0.2]}) == "tie"
