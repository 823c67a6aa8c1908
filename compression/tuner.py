"""NNI's TPE tuner, told about the trials that end without a score, and started from earlier experiments.

The one module besides ``trial.py`` that imports ``nni``: NNI's dispatcher loads it (``experiment.yml``'s ``tuner:
className: compression.tuner.StopAwareTpe``), nothing in the trial path does.

Two gaps of NNI 3.0's TPE that cost this project whole experiments:

1. A trial the assessor stops (or that fails) reports no final metric, and TPE only learns from final metrics: it
   drew the same stopped settings again and again (experiment s1ah0cit: eight pruned QAT trials in a row, seven
   stopped by the assessor). Here such a trial counts as ``stopped_value`` (default: 0, the lowest score there is; when
   minimising, infinity).
2. ``nnictl experiment import`` reaches the tuner only after the experiment has started its first trial, which is
   then drawn at random. Here the import data named by ``YC_PRIOR`` (``python -m compression history`` output, an
   absolute path) is replayed before the first trial is drawn.

And one gap of its own: a draw that differs from an earlier trial only in keys that do nothing in it (the learning
rate of a trial that prunes nothing: :func:`compression.config.inert_keys`) makes the same model again. Experiment
lva0kc3r spent 9 of its 16 trials on byte-identical INT8 files; here such a draw is drawn again (up to ``redraws``
times), then changed in one choice (NNI's own deduplication only acts on all-discrete spaces). With 41 trials of
earlier experiments replayed, all 21 draws of the first trial repeated an earlier model: TPE had settled.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from nni.algorithms.hpo.tpe_tuner import TpeTuner
from nni.common.hpo_utils import format_parameters

from compression.config import inert_keys

_logger = logging.getLogger(__name__)


class StopAwareTpe(TpeTuner):
    """:class:`nni.algorithms.hpo.tpe_tuner.TpeTuner` plus a value for the trials that end without one, and a prior.

    ``stopped_value`` is the value recorded for a trial that ends (early-stopped, failed or killed) before reporting
    a final metric; ``prior`` (default: the ``YC_PRIOR`` environment variable) is a JSON list of NNI import records
    ``{"parameter": ..., "value": ...}`` replayed when the search space arrives, before any trial is drawn. A draw
    that would make the model of an earlier draw or imported trial again (equal but in its inert keys) is replaced
    by a new draw, at most ``redraws`` times; then (TPE has settled) by the last draw with one choice changed, if
    that makes a new model (:meth:`nearest_new`), else the repeat stands.

    Example (NNI's dispatcher does this from ``experiment.yml``):
        >>> tuner = StopAwareTpe(optimize_mode="maximize", prior="/abs/prior.json")
        >>> tuner.update_search_space(space); tuner.generate_parameters(0)  # drawn with the prior's trials known
    """

    def __init__(self, optimize_mode: str = "maximize", seed: int | None = None, tpe_args: dict | None = None,
                 stopped_value: float | None = None, prior: str | None = None, redraws: int = 20):
        super().__init__(optimize_mode=optimize_mode, seed=seed, tpe_args=tpe_args)
        self.redraws = redraws
        self._made: set[str] = set()  # the models drawn or imported so far (active keys only, see made_by)
        if stopped_value is None:  # the worst value there is: a score is >= 0; a minimised metric has no ceiling
            stopped_value = 0.0 if optimize_mode == "maximize" else float("inf")
        self.stopped_value = float(stopped_value)
        prior = prior if prior is not None else os.environ.get("YC_PRIOR", "")
        self._prior = Path(prior) if prior else None
        if self._prior is not None and not (self._prior.is_absolute() and self._prior.is_file()):
            raise FileNotFoundError(f"prior '{prior}' is not an absolute path to a file (YC_PRIOR must be absolute: "
                                    f"NNI's dispatcher runs in the experiment's log folder)")

    def update_search_space(self, space):
        self._choices = {key: spec["_value"] for key, spec in space.items() if spec.get("_type") == "choice"
                         and not any(isinstance(v, dict) for v in spec["_value"])}  # flat choices: nearest_new's
        super().update_search_space(space)
        if self._prior is not None:  # once: a later space update must not replay it twice
            prior, self._prior = self._prior, None
            records = json.loads(prior.read_text())
            self.import_data(records)
            _logger.info("replayed %d trials of %s before the first draw", len(records), prior)

    def generate_parameters(self, parameter_id, **kwargs):
        for redrawn in range(self.redraws + 1):
            params = super().generate_parameters(parameter_id, **kwargs)
            if made_by(params) not in self._made:
                if redrawn:
                    _logger.info("trial %s: %d draw(s) repeated earlier models", parameter_id, redrawn)
                break
        else:  # TPE keeps drawing made models (it has settled): the draw with one choice changed
            new = self.nearest_new(params)
            _logger.info("trial %s: %d draws repeated earlier models; %s", parameter_id, self.redraws + 1,
                         f"changed {sorted(k for k in new if new[k] != params[k])}" if new else "nothing new is one "
                         "choice away, the last draw stands")
            if new:
                params = new  # and what TPE learns from this trial's result is these values
                self._params[parameter_id] = self._running_params[parameter_id] = format_parameters(new, self.space)
        self._made.add(made_by(params))
        return params

    def nearest_new(self, params: dict) -> dict | None:
        """``params`` with one choice key changed so that the model is new (key and value in random order), or
        None when no single change makes one."""
        keys = [key for key in self._choices if key in params]
        for k in self.rng.permutation(len(keys)):
            values = self._choices[keys[k]]
            for v in self.rng.permutation(len(values)):
                candidate = {**params, keys[k]: values[v]}
                if made_by(candidate) not in self._made:
                    return candidate
        return None

    def import_data(self, data):
        super().import_data(data)
        records = json.loads(data) if isinstance(data, str) else data
        for record in records:
            record = json.loads(record) if isinstance(record, str) else record
            self._made.add(made_by(record["parameter"]))

    def trial_end(self, parameter_id, success, **kwargs):
        if not success and parameter_id in self._running_params:  # ended without a final metric
            self.receive_trial_result(parameter_id, None, self.stopped_value)
            _logger.info("trial %s ended without a score: recorded as %s", parameter_id, self.stopped_value)
        super().trial_end(parameter_id, success, **kwargs)


def made_by(params: dict) -> str:
    """What decides the model a draw makes: its keys but the inert ones, numbers as floats (an imported 0 and a drawn
    0.0 are one value), as a string to compare."""
    def plain(value):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    inert = inert_keys(params)
    return json.dumps({key: plain(value) for key, value in params.items() if key not in inert}, sort_keys=True)
