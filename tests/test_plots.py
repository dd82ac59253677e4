"""The report's pictures at the edges a real run reaches: no stage refuses (or every answer does),
and an Elo point estimate outside its bootstrap interval."""

from __future__ import annotations

from caiflow import plots
from caiflow.refusal import rate


def test_refusal_plot_draws_zero_and_all_refusals(tmp_path):
    never, always = rate([False] * 112), rate([True] * 38)
    refusal = {
        "base": {"red_team": never, "benign": never},
        "sl": {"red_team": always, "benign": rate([True] + [False] * 37)},
    }
    path = plots.refusal_plot(refusal, tmp_path / "refusal.png")
    assert path == tmp_path / "refusal.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_elo_plot_draws_a_point_outside_its_interval(tmp_path):
    elo = {
        "harmless": {
            "base": {"rating": 990.0, "lo": 995.0, "hi": 1010.0},  # the bootstrap's quantiles missed it
            "sl": {"rating": 1010.0, "lo": 980.0, "hi": 1005.0},
        }
    }
    path = plots.elo_plot(elo, tmp_path / "elo.png")
    assert path == tmp_path / "elo.png" and path.read_bytes()[:4] == b"\x89PNG"
