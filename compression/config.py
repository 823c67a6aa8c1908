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
from compression.relu import ReluConfig


# The flat keys of ``--set``, NNI and ``report.json`` that belong to a stage: stage config -> {key: its field}. Each
# stage config declares its fields, defaults and checks once; TrialConfig takes them from there, so a stage field
# gets a search-space key by one line here, and the student cache key (derived from the stage configs) follows.
STAGE_KEYS: dict[type, dict[str, str]] = {
    PruneConfig: {"sparsity": "sparsity", "prune_method": "method", "prune_importance": "importance",
                  "prune_rounds": "rounds"},
    DistillConfig: {"kd_steps": "steps", "kd_temperature": "kd_temperature", "kd_alpha": "kd_alpha",
                    "kd_feature": "kd_feature", "kd_images": "kd_images", "crop": "crop", "lr": "lr",
                    "optimizer": "optimizer", "freeze_bn": "freeze_bn", "batch": "batch", "mosaic": "mosaic",
                    "device": "device", "seed": "seed"},
    QuantConfig: {"quant_granularity": "granularity", "calib_method": "calib_method",
                  "calib_percentile": "calib_percentile", "calib_images": "calib_images",
                  "max_int8_drop": "max_int8_drop", "int8_fallback": "fallback", "silu_floor": "silu_floor",
                  "seed": "seed"},
    ReluConfig: {"relu_blocks": "blocks", "relu_epochs": "epochs", "relu_lr": "lr", "relu_match": "match",
                 "device": "device", "seed": "seed"},
}


# The DistillConfig fields that QAT sets itself (TrialConfig.qat_distill_config): the flat keys of the others
# (kd_temperature, kd_feature, kd_images, batch, ...) reach QAT.
QAT_SETS = ("steps", "evals", "kd_alpha", "lr", "optimizer", "mosaic", "crop", "warmup_steps", "freeze_bn")


@dataclass
class _TrialKeys:
    """The keys that belong to the trial itself, not to one stage (TrialConfig adds the stage keys after them)."""

    deploy_imgsz: int = 0  # input side the shipped model runs at (px, a multiple of the stride), 0 = the base --imgsz
    deploy_rect: bool = False  # shaped like the train images: deploy_imgsz along their longer side, the other by their
    # median height/width (a 4:3 camera: 384x512 for 512); false = square. Training stays square at deploy_imgsz
    round_steps: int = 25  # distillation steps after each pruning round but the last (the main recovery follows it)
    recon_images: int = 32  # train images for the least-squares reconstruction after each round (channels and
    # blocks; not lowrank, which it lowers), 0 = none
    holdout_images: int = 256  # train images never trained on: the best checkpoint, the INT8 fallback, QAT vs PTQ
    # and the tuner's score are chosen there (64 misjudged a trial's mAP drop by up to 0.03: README, The score)
    quantize: bool = True  # INT8 (PTQ, or QAT when qat_epochs > 0); false stops after distillation
    qat_epochs: int = 0  # 0 = post-training quantization
    qat_lr: float = 0.001  # peak learning rate of QAT (SGD: AdamW moves every weight by ~lr per step, too far here)
    ptq_fit_steps: int = 150  # without QAT: steps (8 calibration images each) in which the PTQ file's int8 weights
    # choose their rounding and its activation ranges adjust to reproduce the FP32 file; 0 = plain PTQ (README, INT8)
    bench_threads: int = 0  # the cores you deploy on: ONNX Runtime threads of the latency benchmark, 0 = all here

    def __post_init__(self):
        if not 0 <= self.qat_epochs <= 100:
            raise ValueError(f"qat_epochs must be in 0..100, got {self.qat_epochs}")
        if not 0 < self.qat_lr <= 1:
            raise ValueError(f"qat_lr must be in (0, 1], got {self.qat_lr}")
        if self.deploy_imgsz and not 32 <= self.deploy_imgsz <= 4096:
            raise ValueError(f"deploy_imgsz must be 0 (the base size) or in 32..4096 px, got {self.deploy_imgsz}")
        for name, top in (("recon_images", 10000), ("round_steps", 100000), ("holdout_images", 100000),
                          ("bench_threads", 1024), ("ptq_fit_steps", 100000)):
            if not 0 <= getattr(self, name) <= top:
                raise ValueError(f"{name} must be in 0..{top}, got {getattr(self, name)}")
        for stage in STAGE_KEYS:
            self._stage(stage)  # the stage's own checks, their messages in the flat keys' names

    def _stage(self, stage: type):
        keys = STAGE_KEYS[stage]
        try:
            return stage(**{field_name: getattr(self, key) for key, field_name in keys.items()})
        except ValueError as e:
            message = str(e)
            for key, field_name in keys.items():
                if message.startswith(f"{field_name} "):
                    message = key + message[len(field_name):]
            raise ValueError(message) from None

    def relu_config(self) -> ReluConfig:
        return self._stage(ReluConfig)

    def prune_config(self) -> PruneConfig:
        return self._stage(PruneConfig)

    def distill_config(self) -> DistillConfig:
        return self._stage(DistillConfig)

    def quant_config(self) -> QuantConfig:
        return self._stage(QuantConfig)

    def qat_distill_config(self, steps_per_epoch: int) -> DistillConfig:
        # QAT learns to match the FP32 teacher, not the labels: pure distillation keeps it where the teacher is;
        # whole images without mosaic, as the INT8 file will see them.
        fixed = {"kd_alpha": 1.0, "lr": self.qat_lr, "optimizer": "sgd", "mosaic": 0.0, "crop": 0, "warmup_steps": 0,
                 "freeze_bn": True}  # BN folds into the INT8 weights
        return dataclasses.replace(self.distill_config(), steps=self.qat_epochs * steps_per_epoch,
                                   evals=self.qat_epochs, **fixed)


def inert_keys(values: dict) -> set[str]:
    """The keys of ``values`` (flat TrialConfig keys, e.g. one NNI draw) that cannot change what the trial makes,
    given the others there: without pruning (``sparsity`` 0) nothing is distilled, so the pruning and recovery keys
    are idle, and so are the distillation keys QAT reads unless ``qat_epochs`` > 0; ``qat_lr`` without QAT,
    ``ptq_fit_steps`` with it; the ReLU fit's keys without ReLU blocks. A key that decides (sparsity, qat_epochs,
    relu_blocks) counts only when it is in ``values``: the trial's fixed budget may set it otherwise.

    Example:
        >>> sorted(inert_keys({"sparsity": 0.0, "qat_epochs": 0, "lr": 0.004, "kd_temperature": 2.0, "seed": 0}))
        ['kd_temperature', 'lr']
    """
    inert: set[str] = set()
    no_qat = values.get("qat_epochs", 1) == 0
    if values.get("sparsity", 1) == 0:
        inert |= {key for key in STAGE_KEYS[PruneConfig] if key != "sparsity"} | {"round_steps", "recon_images"}
        distill = STAGE_KEYS[DistillConfig]
        shared = {key for stage, keys in STAGE_KEYS.items() if stage is not DistillConfig for key in keys}
        inert |= {key for key, name in distill.items()
                  if key not in shared and (name in QAT_SETS or no_qat)}
    if no_qat:
        inert.add("qat_lr")
    if values.get("qat_epochs", 0) > 0:  # QAT starts from the plain PTQ file
        inert.add("ptq_fit_steps")
    if values.get("relu_blocks", 1) == 0:
        shared = {key for stage, keys in STAGE_KEYS.items() if stage is not ReluConfig for key in keys}
        inert |= {key for key in STAGE_KEYS[ReluConfig] if key not in shared and key != "relu_blocks"}
    return inert & set(values)


def _stage_fields() -> list[tuple[str, str, dataclasses.Field]]:
    """TrialConfig's stage keys as dataclass fields: each with its stage field's type and default."""
    out, seen = [], set()
    for stage, keys in STAGE_KEYS.items():
        declared = {f.name: f for f in fields(stage)}
        for key, field_name in keys.items():
            if key not in seen:
                seen.add(key)
                f = declared[field_name]
                out.append((key, f.type, dataclasses.field(default=f.default)))
    return out


TrialConfig = dataclasses.make_dataclass("TrialConfig", _stage_fields(), bases=(_TrialKeys,))
TrialConfig.__module__ = __name__
TrialConfig.__doc__ = ("The parameters of one run of the chain: the trial's own keys (:class:`_TrialKeys`) and every "
                       "stage key of :data:`STAGE_KEYS`, with the stage config's default.")


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
