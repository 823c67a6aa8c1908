"""TrialConfig: the parameters of one run of the chain, built in layers (defaults, then ``--set``/NNI values)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields

import yaml

from compression.distill import DistillConfig
from compression.errors import UserError
from compression.prune import PruneConfig


@dataclass
class TrialConfig:
    sparsity: float = 0.0  # fraction of channels pruned, 0 <= sparsity < 0.9
    prune_importance: str = "l1"  # "l1" | "l2" | "bn_scale"
    kd_epochs: int = 10  # recovery/distillation epochs over the train split
    kd_temperature: float = 4.0  # 1..20
    kd_alpha: float = 0.7  # 0..1, weight of the distillation loss
    kd_images: str | None = None  # extra unlabeled image folder for distillation
    lr: float = 0.01  # peak SGD learning rate
    batch: int = 16  # images per training step
    mosaic: float = 0.0  # mosaic augmentation probability, 0..1
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0
    quantize: bool = False  # INT8 quantization is not built yet (issue 4): only false is accepted

    def __post_init__(self):
        if self.quantize:
            raise ValueError("quantize must be false in this version (the INT8 stage is not built yet)")
        self.prune_config()
        self.distill_config()

    def prune_config(self) -> PruneConfig:
        return PruneConfig(sparsity=self.sparsity, importance=self.prune_importance)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(kd_epochs=self.kd_epochs, kd_temperature=self.kd_temperature, kd_alpha=self.kd_alpha,
                             kd_images=self.kd_images, lr=self.lr, batch=self.batch, mosaic=self.mosaic,
                             device=self.device, seed=self.seed)


def parse_sets(pairs: list[str]) -> dict:
    """``["sparsity=0.2", "quantize=false"]`` -> ``{"sparsity": 0.2, "quantize": False}`` (YAML scalars)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_config(overrides: dict) -> TrialConfig:
    """Defaults overlaid with ``overrides``; an unknown key or bad value is a one-line error naming the field."""
    names = {f.name: f for f in fields(TrialConfig)}
    values = {}
    for key, value in overrides.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown key '{key}'{hint}")
        default = names[key].default
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or (isinstance(default, int) and float(value) != int(float(value))):
                    raise TypeError
                value = type(default)(value)
            elif isinstance(default, str):
                value = str(value)
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a {type(default).__name__}, got {value!r}") from None
        values[key] = value
    try:
        return dataclasses.replace(TrialConfig(), **values) if values else TrialConfig()
    except ValueError as e:
        raise UserError(str(e)) from None
