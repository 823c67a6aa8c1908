"""TrialConfig: the parameters of one run of the chain, built in layers (defaults, then ``--set``/NNI values)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields

import yaml

from compression.distill import DistillConfig
from compression.errors import UserError
from compression.prune import PruneConfig
from compression.quantize import QuantConfig


@dataclass
class TrialConfig:
    sparsity: float = 0.0  # fraction of channels pruned, 0 <= sparsity < 0.9
    prune_importance: str = "l1"  # "l1" | "l2" | "bn_scale"
    kd_epochs: int = 10  # recovery/distillation epochs over the train split
    kd_temperature: float = 4.0  # 1..20
    kd_alpha: float = 0.7  # 0..1, weight of the distillation loss
    kd_feature: float = 1.0  # weight of the per-layer feature matching inside the distillation loss, >= 0
    kd_images: str | None = None  # extra unlabeled image folder for distillation
    train_imgsz: int = 0  # recovery-training image size, 0 = the evaluation imgsz
    recon_images: int = 32  # train images for the least-squares reconstruction after pruning, 0 = none
    lr: float = 0.001  # peak learning rate (0.01 collapsed or diverged after pruning on COCO128)
    optimizer: str = "sgd"  # sgd | adamw
    freeze_bn: bool = True  # BN running statistics stay fixed during recovery training
    batch: int = 16  # images per training step
    mosaic: float = 0.0  # mosaic augmentation probability, 0..1
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0
    quantize: bool = True  # INT8 (PTQ, or QAT when qat_epochs > 0); false stops after distillation
    quant_granularity: str = "per_channel"  # per_channel | per_tensor (weights)
    calib_method: str = "percentile"  # percentile | minmax | entropy
    calib_images: int = 128  # train images for calibration
    qat_epochs: int = 0  # 0 = post-training quantization
    qat_lr: float = 0.001  # peak learning rate of QAT (SGD: AdamW moves every weight by ~lr per step, too far here)
    max_int8_drop: float = 0.01  # mAP50-95 the INT8 model may lose before the sensitivity fallback

    def __post_init__(self):
        if not 0 <= self.qat_epochs <= 100:
            raise ValueError(f"qat_epochs must be in 0..100, got {self.qat_epochs}")
        if not 0 < self.qat_lr <= 1:
            raise ValueError(f"qat_lr must be in (0, 1], got {self.qat_lr}")
        self.quant_config()
        if not 0 <= self.recon_images <= 10000:
            raise ValueError(f"recon_images must be in 0..10000, got {self.recon_images}")
        self.prune_config()
        self.distill_config()

    def quant_config(self) -> QuantConfig:
        return QuantConfig(granularity=self.quant_granularity, calib_method=self.calib_method,
                           calib_images=self.calib_images, max_int8_drop=self.max_int8_drop, seed=self.seed)

    def qat_distill_config(self) -> DistillConfig:
        # QAT learns to match the FP32 teacher, not the labels: pure distillation keeps it where the teacher is
        return DistillConfig(kd_epochs=self.qat_epochs, kd_temperature=self.kd_temperature, kd_alpha=1.0,
                             kd_feature=self.kd_feature, kd_images=self.kd_images, lr=self.qat_lr, optimizer="sgd",
                             train_imgsz=self.train_imgsz,
                             batch=self.batch, mosaic=self.mosaic, device=self.device, seed=self.seed,
                             warmup_epochs=0)

    def prune_config(self) -> PruneConfig:
        return PruneConfig(sparsity=self.sparsity, importance=self.prune_importance)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(kd_epochs=self.kd_epochs, kd_temperature=self.kd_temperature, kd_alpha=self.kd_alpha,
                             kd_feature=self.kd_feature, kd_images=self.kd_images, lr=self.lr, optimizer=self.optimizer,
                             train_imgsz=self.train_imgsz,
                             freeze_bn=self.freeze_bn, batch=self.batch, mosaic=self.mosaic,
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
            kind = type(default).__name__
            raise UserError(f"{key} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}") from None
        values[key] = value
    try:
        return dataclasses.replace(TrialConfig(), **values) if values else TrialConfig()
    except ValueError as e:
        raise UserError(str(e)) from None
