import copy
import math

import pytest
import torch

from compression.data import build_dataset, build_loader, load_data_config
from compression.distill import DistillConfig, distill, kd_loss
from compression.models import YOLOv5Loss, raw_view, task_loss
from compression.prune import PruneConfig, prune


@pytest.fixture(scope="module")
def batch(tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    return next(iter(build_loader(build_dataset(data, "train", 64), 8)))


def _img(batch):
    return batch["img"].float() / 255


def test_yolov5_loss_prefers_predictions_that_match_the_targets(tiny_yolov5, batch):
    head = tiny_yolov5.model[-1]
    loss = YOLOv5Loss(head, imgsz=64)
    raw = [r.detach() for r in copy.deepcopy(tiny_yolov5).train()(_img(batch))]
    # Build "perfect" logits: objectness and class high exactly where targets are assigned, boxes on target.
    targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
    perfect = [torch.full_like(r, -12.0) for r in raw]
    for i, p in enumerate(perfect):
        img, a, gy, gx, tbox, tcls, anchors = loss._match(targets, i, p.shape[2], p.shape[3])
        xy = ((tbox[:, :2] + 0.5) / 2).clamp(1e-4, 1 - 1e-4)
        wh = ((tbox[:, 2:] / anchors[a]).sqrt() / 2).clamp(1e-4, 1 - 1e-4)
        p[img, a, gy, gx, :4] = torch.logit(torch.cat((xy, wh), 1))
        p[img, a, gy, gx, 4] = 12.0
        p[img, a, gy, gx, 5 + tcls] = 12.0
    good, _ = loss(perfect, batch)
    noisy, _ = loss([p + torch.randn_like(p) for p in perfect], batch)
    random, _ = loss(raw, batch)
    assert good < 0.5 * noisy and good < 0.5 * random


def test_task_loss_steps_lower_it(tiny_yolov5, batch):
    for fixture_model in (tiny_yolov5,):
        model = copy.deepcopy(fixture_model).train()
        criterion = task_loss(model, 64)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        first = None
        for _ in range(8):
            loss, _ = criterion(model(_img(batch)), batch)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert criterion(model(_img(batch)), batch)[0].item() < first


def test_ultralytics_task_loss_runs(tiny_ultralytics, batch):
    model = copy.deepcopy(tiny_ultralytics).train()
    loss, _ = task_loss(model, 64)(model(_img(batch)), batch)
    assert loss.ndim == 0 and loss.item() > 0


@pytest.mark.parametrize("fixture", ["tiny_yolov5", "tiny_ultralytics"])
def test_kd_loss_is_zero_for_the_teacher_and_a_step_lowers_it(fixture, request, batch):
    teacher = copy.deepcopy(request.getfixturevalue(fixture)).train()
    t_view = {k: (v.detach() if v is not None else None) for k, v in raw_view(teacher, teacher(_img(batch))).items()}
    assert kd_loss(t_view, t_view, 4.0).abs().item() < 1e-4
    student, _ = prune(teacher.eval(), PruneConfig(sparsity=0.3), imgsz=64)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.001, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = kd_loss(raw_view(student, student(_img(batch))), t_view, 4.0)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_distill_reports_epochs_and_keeps_the_input_unchanged(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    before = copy.deepcopy(tiny_yolov5.state_dict())
    seen = []
    student, result = distill(tiny_yolov5, tiny_yolov5, data, DistillConfig(kd_epochs=2, batch=4, workers=0,
                                                                           device="cpu"), 64,
                              on_epoch=seen.append, progress=False)
    assert [e["epoch"] for e in seen] == [1, 2] and result.epochs == seen
    assert 1 <= result.best_epoch <= 2
    assert all(torch.equal(v, tiny_yolov5.state_dict()[k]) for k, v in before.items())
    assert student(torch.rand(1, 3, 64, 64)).shape[1] == 6


def test_distillation_only_works_without_labels(tiny_yolov5, tiny_data, tmp_path):
    data = load_data_config(tiny_data, ("train", "val"))
    unlabeled = tmp_path / "images"
    unlabeled.mkdir()
    for f in list((tiny_data.parent / "images" / "train").iterdir())[:4]:
        (unlabeled / f.name).write_bytes(f.read_bytes())
    cfg = DistillConfig(kd_epochs=1, kd_alpha=1.0, batch=4, workers=0, device="cpu")
    _, result = distill(tiny_yolov5, tiny_yolov5, {**data, "train": str(unlabeled)}, cfg, 64, progress=False)
    assert len(result.epochs) == 1
    cfg = DistillConfig(kd_epochs=1, kd_alpha=0.5, batch=4, workers=0, device="cpu", kd_images=str(unlabeled))
    _, result = distill(tiny_yolov5, tiny_yolov5, data, cfg, 64, progress=False)
    assert len(result.epochs) == 1


def test_train_imgsz_trains_small_and_evaluates_at_imgsz(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    model, sizes = copy.deepcopy(tiny_yolov5), set()
    model.register_forward_pre_hook(lambda _m, inp: sizes.add((inp[0].shape[-1], torch.is_grad_enabled())))
    cfg = DistillConfig(kd_epochs=1, batch=4, workers=0, device="cpu", train_imgsz=32)
    _, result = distill(model, tiny_yolov5, data, cfg, 64, progress=False)  # the hook travels with the copy
    assert len(result.epochs) == 1
    assert (32, True) in sizes and (64, True) not in sizes  # every training step at 32 px
    assert any(s == 64 for s, _ in sizes)  # validation at the model's size


@pytest.mark.parametrize("kwargs, field", [({"kd_alpha": 1.5}, "kd_alpha"), ({"kd_temperature": 0.5}, "kd_temperature"),
                                           ({"kd_epochs": -1}, "kd_epochs"), ({"lr": 0}, "lr"),
                                           ({"train_imgsz": -32}, "train_imgsz")])
def test_out_of_range_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qat", [False, True])
def test_distill_and_qat_epochs_on_cuda_give_a_cpu_model_that_exports(tiny_yolov5, tiny_data, tmp_path, qat):
    from compression.export import export_onnx
    from compression.qat import prepare_qat, set_fake_quant

    data = load_data_config(tiny_data, ("train", "val"))
    student = prepare_qat(tiny_yolov5, per_channel=True, calib=torch.rand(8, 3, 64, 64)) if qat else tiny_yolov5
    trained, result = distill(student, tiny_yolov5, data, DistillConfig(kd_epochs=2, batch=4, device="cuda"), 64,
                              progress=False)  # mixed precision on CUDA: fake-quant ops see float16 activations
    assert len(result.epochs) == 2 and result.skipped_steps == 0
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in result.epochs), result.epochs
    assert {p.device.type for p in trained.parameters()} == {"cpu"}
    if qat:
        set_fake_quant(trained, False)
    export_onnx(trained, 64, tmp_path / "model.onnx")  # checks ONNX Runtime against torch on the CPU
