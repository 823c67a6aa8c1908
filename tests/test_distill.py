import copy
import math

import pytest
import torch

from compression.data import build_dataset, build_loader, holdout_split, load_data_config, split_images
from compression.distill import DistillConfig, crop_batch, distill, kd_loss
from compression.models import YOLOv5Loss, bernoulli_kl, raw_view, task_loss
from compression.prune import PruneConfig, prune, raw_outputs


@pytest.fixture(scope="module")
def batch(tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    return next(iter(build_loader(build_dataset(data, "train", 64), 8)))


def _img(batch):
    return batch["img"].float() / 255


def test_bernoulli_kl_is_bce_minus_the_targets_entropy_with_its_gradient():
    torch.manual_seed(0)
    extreme = torch.tensor([[-120., 120., 35., -25., 0.], [-110., 110., 30., -30., 0.]], dtype=torch.double)
    s, t = torch.cat((torch.randn(2, 200, dtype=torch.double) * 6, extreme), 1)
    s.requires_grad_()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(s, t.sigmoid(), reduction="none") - bce(t, t.sigmoid(), reduction="none")
    kl = bernoulli_kl(s, t)
    assert torch.allclose(kl, expected, atol=1e-6) and (kl > -1e-9).all()
    weights = torch.rand_like(kl)
    assert torch.allclose(torch.autograd.grad((kl * weights).sum(), s)[0],
                          torch.autograd.grad((expected * weights).sum(), s)[0], atol=1e-9)
    assert bernoulli_kl(t, t).abs().max() < 1e-6


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


@pytest.mark.slow  # test_distillation_only_works_without_labels checks that distillation lowers kd_loss
@pytest.mark.parametrize("fixture", ["tiny_yolov5", "tiny_ultralytics"])
def test_kd_loss_is_zero_for_the_teacher_and_a_step_lowers_it(fixture, request, batch):
    teacher = copy.deepcopy(request.getfixturevalue(fixture)).train()
    t_view = {k: (v.detach() if v is not None else None) for k, v in raw_view(teacher, teacher(_img(batch))).items()}
    assert kd_loss(t_view, t_view, 4.0).abs().item() < 1e-4
    student, _ = prune(teacher.eval(), PruneConfig(sparsity=0.3, rounds=1), 64, _img(batch))
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


def test_distill_reports_evaluations_and_keeps_the_input_unchanged(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    train, holdout = holdout_split(data, 2)
    before = copy.deepcopy(tiny_yolov5.state_dict())
    seen = []
    cfg = DistillConfig(steps=4, evals=2, batch=4, workers=0, device="cpu", crop=0)
    student, result = distill(tiny_yolov5, tiny_yolov5, train, cfg, 64, holdout=holdout, on_eval=seen.append,
                              progress=False)
    assert [e["step"] for e in seen] == [2, 4] and result.evals == seen
    # 8 train images less 2 held out = 6 per pass: batches of 4, 2, 4, 2
    assert result.best_step in (0, 2, 4) and result.steps == 4 and result.images == 12
    assert all(torch.equal(v, tiny_yolov5.state_dict()[k]) for k, v in before.items())
    assert student(torch.rand(1, 3, 64, 64)).shape[1] == 6


def test_checkpoints_are_chosen_on_held_out_train_images_never_on_val(tiny_yolov5, tiny_data, monkeypatch):
    import compression.distill as distill_module

    data = load_data_config(tiny_data, ("train", "val"))
    train, holdout = holdout_split(data, 2)
    held = set(split_images(holdout, "val"))
    assert held and held.isdisjoint(split_images(train, "train")) and held <= set(split_images(data, "train"))
    read, real = [], distill_module.evaluate
    monkeypatch.setattr(distill_module, "evaluate", lambda model, d, *a, **k: read.append(d["val"]) or real(
        model, d, *a, **k))
    distill(tiny_yolov5, tiny_yolov5, train, DistillConfig(steps=2, evals=2, batch=4, workers=0, device="cpu"), 64,
            holdout=holdout, progress=False)
    assert read and all(v == holdout["val"] for v in read)  # the input and two checkpoints, all held out
    read.clear()
    distill(tiny_yolov5, tiny_yolov5, train, DistillConfig(steps=2, evals=2, batch=4, workers=0, device="cpu"), 64,
            progress=False)
    assert not read  # without held-out images nothing is evaluated: the last weights are kept


@pytest.mark.parametrize("errors,best", [([0.3, 0.1, 0.2], 2), ([0.3, 0.2, 0.1], 4), ([0.1, 0.2, 0.3], 0)])
def test_an_output_error_chooses_the_checkpoint_where_it_is_lowest(tiny_yolov5, tiny_data, errors, best):
    data = load_data_config(tiny_data, ("train", "val"))
    train, holdout = holdout_split(data, 2)
    values = iter(errors)  # the input's, then the checkpoints' at steps 2 and 4
    cfg = DistillConfig(steps=4, evals=2, batch=4, workers=0, device="cpu", crop=0)
    student, result = distill(tiny_yolov5, tiny_yolov5, train, cfg, 64, holdout=holdout, progress=False,
                              output_error=lambda model: next(values))
    assert result.best_step == best and result.start_output_error == errors[0]
    assert [e["output_error"] for e in result.evals] == errors[1:]
    unchanged = all(torch.equal(v, tiny_yolov5.state_dict()[k]) for k, v in student.state_dict().items())
    assert unchanged == (best == 0)  # the input is returned only when it was closest


def test_distillation_only_works_without_labels(tiny_yolov5, tiny_data, tmp_path):
    data = load_data_config(tiny_data, ("train", "val"))
    teacher = copy.deepcopy(tiny_yolov5)
    head = teacher.model[-1]
    with torch.no_grad():  # an untrained head is ~0.001 confident everywhere, which makes kd_loss ~1e-9: lift it
        for conv in head.m:
            conv.bias.view(head.na, -1)[:, 4] = 0.0
    unlabeled = tmp_path / "images"
    unlabeled.mkdir()
    for f in list((tiny_data.parent / "images" / "train").iterdir())[:4]:
        (unlabeled / f.name).write_bytes(f.read_bytes())
    student, _ = prune(teacher, PruneConfig(sparsity=0.3, rounds=1), 64, torch.rand(2, 3, 64, 64))
    with torch.no_grad():  # random deep features are near constant, so the head biases carry the outputs: move them
        for conv in student.model[-1].m:
            conv.bias.add_(torch.randn_like(conv.bias))
    x = torch.rand(4, 3, 64, 64)

    def kd(model):
        with torch.no_grad():
            return float(kd_loss(raw_outputs(model, x), raw_outputs(teacher, x), 1.0))

    cfg = DistillConfig(steps=8, kd_alpha=1.0, batch=4, workers=0, device="cpu", crop=0, lr=0.01, warmup_steps=0)
    trained, result = distill(student, teacher, {**data, "train": str(unlabeled)}, cfg, 64, progress=False)
    assert result.steps == 8 and result.skipped_steps == 0
    moved = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), student.state_dict().values())]
    assert any(moved) and kd(trained) < kd(student)  # the weights moved and the student came closer to the teacher
    cfg = DistillConfig(steps=1, kd_alpha=0.5, batch=4, workers=0, device="cpu", kd_images=str(unlabeled))
    _, result = distill(tiny_yolov5, tiny_yolov5, data, cfg, 64, progress=False)
    assert result.images == 8  # a labeled and an unlabeled batch per step


def test_crops_train_at_the_crop_size_and_evaluate_at_imgsz(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    train, holdout = holdout_split(data, 2)
    model, sizes = copy.deepcopy(tiny_yolov5), set()
    model.register_forward_pre_hook(lambda _m, inp: sizes.add((inp[0].shape[-1], torch.is_grad_enabled())))
    cfg = DistillConfig(steps=1, evals=1, batch=4, workers=0, device="cpu", crop=32)
    distill(model, tiny_yolov5, train, cfg, 64, holdout=holdout, progress=False)  # the hook travels with the copy
    assert (32, True) in sizes and (64, True) not in sizes  # every training step on 32 px crops
    assert any(s == 64 for s, _ in sizes)  # held-out evaluation at the model's size


def test_crops_keep_the_boxes_inside_the_window():
    img = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.1, 0.1, 0.1, 0.1]])}
    out = crop_batch(batch, 48, torch.Generator().manual_seed(0))
    assert out["img"].shape == (2, 3, 48, 48)
    assert out["bboxes"].min() >= 0 and out["bboxes"].max() <= 1 and len(out["bboxes"]) == len(out["cls"])
    assert 0.0 in out["batch_idx"].tolist()  # the centred box lies inside any 48 px window of a 64 px image
    centred = out["bboxes"][out["batch_idx"] == 0][0]
    assert centred[2:].tolist() == pytest.approx([16 / 48, 16 / 48])


@pytest.mark.parametrize("kwargs, field", [({"kd_alpha": 1.5}, "kd_alpha"), ({"kd_temperature": 0.5}, "kd_temperature"),
                                           ({"steps": -1}, "steps"), ({"lr": 0}, "lr"),
                                           ({"crop": -32}, "crop"), ({"evals": -1}, "evals")])
def test_out_of_range_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qat", [False, True])
def test_distill_and_qat_epochs_on_cuda_give_a_cpu_model_that_exports(tiny_yolov5, tiny_data, tmp_path, qat):
    import onnx

    from compression.export import export_onnx
    from compression.qat import prepare_qat, strip_qat_
    from compression.quantize import QuantConfig, ptq, ptq_graph

    data = load_data_config(tiny_data, ("train", "val"))
    student = tiny_yolov5
    if qat:
        calib = torch.rand(8, 3, 64, 64)
        export_onnx(tiny_yolov5, 64, tmp_path / "fp32.onnx")
        ptq(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib.numpy(), QuantConfig(fallback_rounds=0),
            lambda p: 0.5, fp32_map=0.5, progress=False)
        student, _ = prepare_qat(tiny_yolov5, onnx.load(str(tmp_path / "int8.onnx")),
                                 ptq_graph(tmp_path / "fp32.onnx")[0], calib[:1])
    train, holdout = holdout_split(data, 2)
    trained, result = distill(student, tiny_yolov5, train, DistillConfig(steps=4, evals=2, batch=4, device="cuda"), 64,
                              holdout=holdout, progress=False)  # mixed precision: fake-quant sees float16 activations
    assert len(result.evals) == 2 and result.skipped_steps == 0
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in result.evals), result.evals
    assert {p.device.type for p in trained.parameters()} == {"cpu"}
    if qat:
        strip_qat_(trained)
    export_onnx(trained, 64, tmp_path / "model.onnx")  # checks ONNX Runtime against torch on the CPU


def test_schedule_warms_up_then_follows_one_cosine_to_one_percent():
    from compression.distill import schedule

    lr, momentum = zip(*(schedule(step, 100, 10, 0.01) for step in range(1, 101)))
    assert lr[0] == pytest.approx(0.001, rel=0.01) and momentum[0] == pytest.approx(0.8137)  # 1/10 of the way up
    assert max(lr) == lr[9] and momentum[9:] == (0.937,) * 91  # warm-up ends at step 10
    assert all(a >= b for a, b in zip(lr[9:], lr[10:])) and lr[-1] == pytest.approx(0.0001, rel=0.05)
    assert schedule(1, 100, 0, 0.01) == (0.01, 0.937)  # no warm-up: the full LR at once
