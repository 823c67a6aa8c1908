"""The tuner's objective against the README's claims about it."""

import pytest

from compression.score import ScoreConfig, score


def report(mAP: float, latency: float, size: float, base_mAP: float = 0.30) -> dict:
    base = {"mAP50_95": base_mAP, "mAP50": 0.5, "latency_ms": 10.0, "size_mb": 8.0, "params": 1, "macs": 1}
    return {"baseline": base, "result": {**base, "mAP50_95": mAP, "latency_ms": latency, "size_mb": size}}


def test_fp32_scores_one_and_speed_at_equal_accuracy_counts_in_full():
    cfg = ScoreConfig(w_size=0)
    assert score(report(0.30, 10.0, 8.0), cfg)["default"] == pytest.approx(1.0)
    assert score(report(0.30, 10.0 / 1.3, 8.0), cfg)["default"] == pytest.approx(1.3)


def test_each_point_past_the_allowed_drop_halves_the_score():
    cfg = ScoreConfig(w_map=0, w_size=0, max_map_drop=0.02)
    within = score(report(0.285, 5.0, 8.0), cfg)["default"]  # 1.5 points lost: inside the allowance
    assert within == pytest.approx(2.0)
    assert score(report(0.27, 5.0, 8.0), cfg)["default"] == pytest.approx(1.0)  # 3 points: one past, halved
    assert score(report(0.26, 5.0, 8.0), cfg)["default"] == pytest.approx(0.5)  # 4 points: two past


def test_a_smaller_file_and_the_interval_reach_the_final_metric():
    rep = {**report(0.30, 5.0, 2.0), "deploy_imgsz": 448, "latency_ratio_interval": [0.4, 0.6]}
    final = score(rep, ScoreConfig())
    assert final["default"] == pytest.approx(2.0 * 4.0 ** 0.25)
    assert (final["imgsz"], final["speedup_low"], final["speedup_high"]) == (448, pytest.approx(1 / 0.6), 2.5)


def test_the_score_reads_the_held_out_figures_and_shows_val():
    rep = {**report(0.30, 5.0, 8.0), "selection": {"on": "holdout", "images": 64, "mAP50_95": 0.20,
                                                   "baseline_mAP50_95": 0.25}}
    cfg = ScoreConfig(w_size=0)
    final = score(rep, cfg)
    assert final["default"] == pytest.approx(0.8 ** 4 * 2.0 * 0.5 ** 3)  # 5 held-out points lost: 3 past the allowance
    assert (final["mAP50_95"], final["score_mAP50_95"]) == (0.30, 0.20)
    moved_val = {**rep, "result": {**rep["result"], "mAP50_95": 0.01}, "baseline": {**rep["baseline"], "mAP50_95": 0.9}}
    assert score(moved_val, cfg)["default"] == final["default"]


def test_a_drop_inside_the_allowance_only_by_less_than_its_spread_is_penalised():
    held_out = {"on": "holdout", "images": 253, "mAP50_95": 0.285, "baseline_mAP50_95": 0.30}  # 1.5 points lost
    rep = {**report(0.30, 5.0, 8.0), "selection": {**held_out, "drop_sd": 0.01}}
    cfg = ScoreConfig(w_map=0, w_size=0)
    assert score(rep, cfg)["default"] == pytest.approx(2.0 * 0.5 ** 0.5)  # 1.5 + 1 sd = 2.5 points: half past
    assert score(rep, cfg)["score_drop_sd"] == 0.01
    assert score(rep, ScoreConfig(w_map=0, w_size=0, drop_sds=0))["default"] == pytest.approx(2.0)
    assert score({**rep, "selection": held_out}, cfg)["default"] == pytest.approx(2.0)  # reports before drop_sd
