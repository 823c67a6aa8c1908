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
    deploy_imgsz: int = 0  # input side the shipped model runs at (px, a multiple of the stride), 0 = the base --imgsz
    sparsity: float = 0.0  # fraction of the model's MACs removed by pruning, 0 <= sparsity < 0.9
    prune_method: str = "channels"  # channels (filters) | blocks (whole residual bottlenecks) | both
    prune_importance: str = "l2"  # which channels of a group go first: l1 | l2 | bn_scale
    prune_rounds: int = 1  # pruning steps to the target, each followed by reconstruction and round_steps
    # (sparsity 0.1 on coco1k: 1 round beat 4, held-out 0.132 vs 0.100 before the main recovery; README)
    round_steps: int = 25  # distillation steps after each pruning round
    recon_images: int = 32  # train images for the least-squares reconstruction after each round, 0 = none
    kd_steps: int = 500  # optimizer steps of the main recovery (batch images each), after the last round
    kd_temperature: float = 1.0  # 1..20
    kd_alpha: float = 1.0  # 0..1, weight of the distillation loss (1 = no labels needed)
    kd_feature: float = 1.0  # weight of the per-layer feature matching inside the distillation loss, >= 0
    kd_images: str | None = None  # extra unlabeled image folder for distillation
    crop: int = 320  # recovery trains on random crops of this side of imgsz images (0 = whole images)
    holdout_images: int = 64  # train images never trained on; best checkpoint and INT8 fallback are chosen there
    lr: float = 0.003  # peak learning rate (0.01 and more undo the reconstruction: loss 0.10 -> 0.36 in 40 steps)
    optimizer: str = "sgd"  # sgd | adamw
    freeze_bn: bool = True  # BN running statistics stay fixed during recovery training
    batch: int = 16  # images per training step
    mosaic: float = 0.0  # mosaic augmentation probability, 0..1 (recovery learns the teacher on real images)
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0
    quantize: bool = True  # INT8 (PTQ, or QAT when qat_epochs > 0); false stops after distillation
    quant_granularity: str = "per_channel"  # per_channel | per_tensor (weights)
    calib_method: str = "percentile"  # percentile | minmax | entropy
    calib_images: int = 128  # train images for calibration
    qat_epochs: int = 0  # 0 = post-training quantization
    qat_lr: float = 0.001  # peak learning rate of QAT (SGD: AdamW moves every weight by ~lr per step, too far here)
    max_int8_drop: float = 0.01  # mAP50-95 the INT8 model may lose (on the held-out images) before the fallback
    bench_threads: int = 0  # the cores you deploy on: ONNX Runtime threads of the latency benchmark, 0 = all here

    def __post_init__(self):
        if not 0 <= self.qat_epochs <= 100:
            raise ValueError(f"qat_epochs must be in 0..100, got {self.qat_epochs}")
        if not 0 < self.qat_lr <= 1:
            raise ValueError(f"qat_lr must be in (0, 1], got {self.qat_lr}")
        self.quant_config()
        if self.deploy_imgsz and not 32 <= self.deploy_imgsz <= 4096:
            raise ValueError(f"deploy_imgsz must be 0 (the base size) or in 32..4096 px, got {self.deploy_imgsz}")
        for name, top in (("recon_images", 10000), ("round_steps", 100000), ("holdout_images", 100000),
                          ("bench_threads", 1024)):
            if not 0 <= getattr(self, name) <= top:
                raise ValueError(f"{name} must be in 0..{top}, got {getattr(self, name)}")
        self.prune_config()
        self.distill_config()

    def quant_config(self) -> QuantConfig:
        return QuantConfig(granularity=self.quant_granularity, calib_method=self.calib_method,
                           calib_images=self.calib_images, max_int8_drop=self.max_int8_drop, seed=self.seed)

    def qat_distill_config(self, steps_per_epoch: int) -> DistillConfig:
        # QAT learns to match the FP32 teacher, not the labels: pure distillation keeps it where the teacher is;
        # whole images without mosaic, as the INT8 file will see them.
        return DistillConfig(steps=self.qat_epochs * steps_per_epoch, kd_temperature=self.kd_temperature, kd_alpha=1.0,
                             kd_feature=self.kd_feature, kd_images=self.kd_images, lr=self.qat_lr, optimizer="sgd",
                             batch=self.batch, mosaic=0.0, crop=0, device=self.device, seed=self.seed,
                             warmup_steps=0, evals=self.qat_epochs, freeze_bn=True)  # BN folds into the INT8 weights

    def prune_config(self) -> PruneConfig:
        return PruneConfig(sparsity=self.sparsity, method=self.prune_method, importance=self.prune_importance,
                           rounds=self.prune_rounds)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(steps=self.kd_steps, kd_temperature=self.kd_temperature, kd_alpha=self.kd_alpha,
                             kd_feature=self.kd_feature, kd_images=self.kd_images, lr=self.lr, optimizer=self.optimizer,
                             crop=self.crop, freeze_bn=self.freeze_bn, batch=self.batch, mosaic=self.mosaic,
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
