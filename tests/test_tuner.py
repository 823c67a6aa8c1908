"""StopAwareTpe: the trials that end without a score, and the prior replayed before the first draw."""

import json

import pytest
from nni.common.hpo_utils import deformat_parameters

from compression.tuner import StopAwareTpe

SPACE = {"imgsz": {"_type": "choice", "_value": [320, 448, 640]}, "lr": {"_type": "loguniform", "_value": [0.001, 0.01]}}


def recorded(tuner: StopAwareTpe) -> list[float]:
    return sorted(-r.loss for r in tuner._history[("imgsz",)])  # maximize: TPE keeps -value as the loss


def test_a_stopped_trial_is_recorded_at_stopped_value_and_a_scored_one_at_its_score():
    tuner = StopAwareTpe(seed=0, stopped_value=-5.0, prior="")
    tuner.update_search_space(SPACE)
    scored, stopped, killed_after_score = (tuner.generate_parameters(i) for i in range(3))
    tuner.receive_trial_result(0, scored, 2.5)
    tuner.trial_end(0, True)
    tuner.trial_end(1, False)                         # the assessor stopped it: no final metric came
    tuner.receive_trial_result(2, killed_after_score, 1.5)
    tuner.trial_end(2, False)                         # failed after its score: recorded once, with its score
    assert recorded(tuner) == [-5.0, 1.5, 2.5]
    assert not tuner._running_params


def test_after_a_stopped_trial_tpe_draws_away_from_it():
    space = {"mode": {"_type": "choice", "_value": ["a", "b", "c", "d"]}, "x": {"_type": "uniform", "_value": [0, 1]}}
    draws = {}
    for kind in ("stopped", "forgotten"):
        tuner = StopAwareTpe(seed=1, tpe_args={"n_startup_jobs": 2}, prior="")
        tuner.update_search_space(space)
        tuner.import_data([{"parameter": {"mode": "a", "x": 0.5}, "value": 1.0},
                           {"parameter": {"mode": "b", "x": 0.5}, "value": 1.0}])
        picks = []
        for i in range(12):
            p = tuner.generate_parameters(i)
            picks.append(p["mode"])
            if p["mode"] in ("a", "b"):
                tuner.receive_trial_result(i, p, 1.0)
            elif kind == "stopped":
                tuner.trial_end(i, False)             # c and d are stopped every time
            else:
                tuner._running_params.pop(i)          # NNI's TPE: the stopped trial leaves no trace
        draws[kind] = picks
    assert draws["stopped"].count("c") + draws["stopped"].count("d") < \
        draws["forgotten"].count("c") + draws["forgotten"].count("d")


def test_the_prior_is_replayed_before_the_first_draw(tmp_path, monkeypatch):
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps([{"parameter": {"imgsz": 448, "lr": 0.005}, "value": 3.0},
                                 {"parameter": {"imgsz": 640, "lr": 0.002}, "value": 0.0}]))
    monkeypatch.setenv("YC_PRIOR", str(prior))
    tuner = StopAwareTpe(seed=0)
    tuner.update_search_space(SPACE)
    assert recorded(tuner) == [0.0, 3.0]
    tuner.update_search_space(SPACE)                  # a later space update does not replay it again
    assert len(tuner._history[("imgsz",)]) == 2


@pytest.mark.parametrize("prior", ["prior.json", "/nonexistent/prior.json"])
def test_a_prior_that_is_not_an_absolute_file_is_refused_at_start(prior):
    with pytest.raises(FileNotFoundError, match="absolute"):
        StopAwareTpe(prior=prior)


def test_when_minimising_a_stopped_trial_counts_as_the_worst_value():
    tuner = StopAwareTpe(optimize_mode="minimize", seed=0, prior="")
    tuner.update_search_space(SPACE)
    params = tuner.generate_parameters(0)
    tuner.receive_trial_result(0, params, 0.0)
    tuner.generate_parameters(1)
    tuner.trial_end(1, False)
    assert sorted(r.loss for r in tuner._history[("imgsz",)]) == [0.0, float("inf")]


DEDUP_SPACE = {"deploy_imgsz": {"_type": "choice", "_value": [320, 448, 640]},
               "sparsity": {"_type": "choice", "_value": [0.0]},
               "qat_epochs": {"_type": "choice", "_value": [0]},
               "lr": {"_type": "loguniform", "_value": [0.001, 0.01]}}


def draws(redraws: int, count: int, prior: list | None = None, seed: int = 3) -> list[int]:
    tuner = StopAwareTpe(seed=seed, prior="", redraws=redraws)
    tuner.update_search_space(DEDUP_SPACE)
    if prior:
        tuner.import_data(prior)
    return [tuner.generate_parameters(i)["deploy_imgsz"] for i in range(count)]


def test_a_draw_that_would_make_an_earlier_model_is_drawn_again():
    from nni.algorithms.hpo.tpe_tuner import TpeTuner

    plain = TpeTuner(seed=3)
    plain.update_search_space(DEDUP_SPACE)
    # unpruned without QAT, lr changes nothing: only deploy_imgsz tells the models apart; NNI's TPE repeats one
    assert len({plain.generate_parameters(i)["deploy_imgsz"] for i in range(3)}) < 3
    assert sorted(draws(redraws=20, count=3)) == [320, 448, 640]
    five = draws(redraws=20, count=5)                 # nothing new left: no error (NNI's dedup would raise), the
    assert len(five) == 5 and sorted(five[:3]) == [320, 448, 640]  # repeats come only after every model is made


def test_when_tpe_has_settled_one_choice_of_its_draw_changes_and_tpe_learns_that_value():
    tuner = StopAwareTpe(seed=3, prior="", redraws=0)
    tuner.update_search_space(DEDUP_SPACE)
    made = [tuner.generate_parameters(i) for i in range(3)]
    assert sorted(p["deploy_imgsz"] for p in made) == [320, 448, 640]
    for i, params in enumerate(made):                # TPE records the values the trial ran with
        assert deformat_parameters(tuner._running_params[i], tuner.space) == params
        tuner.receive_trial_result(i, params, float(i))
    assert sorted(r.param for r in tuner._history[("deploy_imgsz",)]) == [0, 1, 2]  # choice indices


def test_imported_trials_count_as_made():
    prior = [{"parameter": {"deploy_imgsz": 448, "sparsity": 0, "qat_epochs": 0, "lr": 0.002}, "value": 3.0}]
    assert sorted(draws(redraws=20, count=2, prior=prior)) == [320, 640]
