import copy
import dataclasses

import onnx
import pytest
import torch
from torch import nn

from compression.data import load_data_config
from compression.errors import UserError
from compression.export import export_onnx
from compression.quantize import QuantConfig, ptq
from compression.relu import (ReluConfig, block_outputs, fit_relu, fit_targets, head_inputs, match_relu_,
                              swap_relu_)
from conftest import lively


def acts(model, blocks: range) -> list[type]:
    return [type(m.act) for i in blocks for m in model.model[i].modules() if hasattr(m, "act")]


def test_swap_relu_replaces_silu_in_the_first_blocks_only(tiny_yolov5):
    model = copy.deepcopy(tiny_yolov5)
    first = acts(model, range(3))
    assert swap_relu_(model, 3) == len(first) > 3 and set(acts(model, range(3))) == {nn.ReLU}
    assert set(acts(model, range(3, len(model.model)))) == {nn.SiLU}
    assert swap_relu_(copy.deepcopy(tiny_yolov5), 0) == 0
    with pytest.raises(UserError, match="relu_blocks=99"):
        swap_relu_(copy.deepcopy(tiny_yolov5), 99)


def test_relu_config_names_a_bad_field():
    with pytest.raises(ValueError, match="blocks must be in"):
        ReluConfig(blocks=-1)


def feature_error(student, teacher, x, blocks: list[int]) -> float:
    with torch.no_grad():
        pairs = zip(block_outputs(student, x, blocks), block_outputs(teacher, x, blocks))
        return float(sum(((s - t) ** 2).mean() / t.var() for s, t in pairs) / len(blocks))


def test_matching_before_the_swap_brings_relu_closer_to_the_silu_it_replaces(tiny_yolov5):
    torch.manual_seed(0)
    images = (torch.rand(8, 3, 64, 64) * 255).to(torch.uint8)
    teacher = lively(tiny_yolov5, images.float() / 255)
    plain, matched = copy.deepcopy(teacher), copy.deepcopy(teacher)
    before = {n: p.clone() for n, p in matched.named_parameters()}
    assert match_relu_(matched, 3, images[:4], batch=2) == swap_relu_(copy.deepcopy(teacher), 3)
    swap_relu_(plain, 3)
    swap_relu_(matched, 3)
    # only the BatchNorms of model.0-2 moved, by a positive scale (a ReLU's input keeps its sign's meaning)
    moved = {n for n, p in matched.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("model.0.", "model.1.", "model.2.")) and ".bn." in n for n in moved)
    assert all((matched.get_parameter(n) / before[n]).gt(0).all() for n in moved if n.endswith("bn.weight"))
    unseen = torch.rand(2, 3, 64, 64)  # not the images it matched on
    assert feature_error(matched, teacher, unseen, [2]) < 0.5 * feature_error(plain, teacher, unseen, [2])
    assert match_relu_(copy.deepcopy(teacher), 0, images) == 0


def test_the_fit_matches_later_backbone_blocks_and_what_the_head_reads(tiny_yolov5):
    assert head_inputs(tiny_yolov5) == [17, 20, 23]
    assert fit_targets(tiny_yolov5, 3) == [3, 4, 5, 6, 7, 8, 9, 17, 20, 23]
    assert fit_targets(tiny_yolov5, 12) == [17, 20, 23]
    outs = block_outputs(tiny_yolov5, torch.rand(1, 3, 64, 64), [2, 17])
    assert [o.shape[2] for o in outs] == [16, 8]  # model.2 at stride 4, model.17 at stride 8


def test_fitting_brings_the_model_back_towards_the_teacher_on_images_it_did_not_see(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    torch.manual_seed(0)
    teacher = lively(tiny_yolov5, torch.rand(4, 3, 64, 64))
    cfg = ReluConfig(blocks=3, epochs=4, lr=0.01, batch=4, device="cpu")
    student, result = fit_relu(teacher, teacher, data, cfg, 64, progress=False)
    assert result.matched == 0  # matching is asked for, not the default
    _, with_match = fit_relu(teacher, teacher, data, dataclasses.replace(cfg, epochs=1, match=True), 64,
                             progress=False)
    assert with_match.matched == with_match.swapped > 0
    swapped = copy.deepcopy(teacher)
    assert result.swapped == swap_relu_(swapped, 3) and set(acts(student, range(3))) == {nn.ReLU}
    # two fits, each on every train image: the swapped blocks and the next one on its output, then every block
    # before the head (a tenth of the rate) on the later backbone blocks and the head's inputs
    targets = fit_targets(teacher, 3)
    assert [(f["blocks"], f["targets"], f["steps"], f["lr"]) for f in result.fits] == [
        (4, [3], 8, 0.01), (24, targets, 8, 0.001)]
    unseen = torch.rand(2, 3, 64, 64)  # neither the train images nor their flips
    assert feature_error(student, teacher, unseen, targets) < 0.8 * feature_error(swapped, teacher, unseen, targets)
    # the teacher is not trained, and the head (model.24) is left as it was
    after = dict(student.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in teacher.named_parameters() if n.startswith("model.24."))
    assert not all(torch.equal(p, after[n]) for n, p in teacher.named_parameters() if n.startswith("model.23."))


def test_a_head_with_no_inputs_to_fit_to_is_a_one_line_error(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    model = copy.deepcopy(tiny_yolov5)
    model.model[-1].f = []
    with pytest.raises(UserError, match="names no input blocks"):
        fit_relu(model, model, data, ReluConfig(blocks=12, epochs=1, device="cpu"), 64, progress=False)


def test_no_epochs_only_swaps(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    student, result = fit_relu(tiny_yolov5, tiny_yolov5, data, ReluConfig(blocks=2, epochs=0), 64, progress=False)
    assert result.fits == [] and result.swapped > 0
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), tiny_yolov5.state_dict().values()))


def test_the_int8_file_has_no_activation_op_where_relu_replaced_silu(tiny_yolov5, tiny_yolov5_relu, tmp_path):
    """Why ReLU: the quantizer folds it into the convolution's output range, where SiLU costs two 8-bit ops."""
    calib = torch.rand(4, 3, 64, 64)
    counts = {}
    for name, model in (("silu", tiny_yolov5), ("relu", tiny_yolov5_relu)):
        export_onnx(lively(model, calib), 64, tmp_path / f"{name}.onnx")
        ptq(tmp_path / f"{name}.onnx", tmp_path / f"{name}_int8.onnx", calib.numpy(), QuantConfig(fallback_rounds=0),
            lambda p: 0.5, fp32_map=0.5, progress=False)
        nodes = onnx.load(str(tmp_path / f"{name}_int8.onnx")).graph.node
        counts[name] = {op: sum(n.op_type == op and n.name.startswith(("/model.0/", "/model.1/", "/model.2/"))
                                for n in nodes) for op in ("Sigmoid", "Relu", "QLinearSigmoid")}
    assert counts["silu"]["Sigmoid"] + counts["silu"]["QLinearSigmoid"] > 0
    assert counts["relu"] == {"Sigmoid": 0, "Relu": 0, "QLinearSigmoid": 0}


def test_a_relu_output_keeps_a_range_from_zero_when_its_concat_reaches_below_zero(tiny_yolov5, tmp_path):
    """ONNX Runtime drops a Relu by quantizing with its range: shared with a SiLU output below 0, the ReLU is lost."""
    from compression.qat import qdq_params

    model = copy.deepcopy(tiny_yolov5)
    swap_relu_(model, 5)  # model.4's output meets a SiLU output in the head's Concat
    calib = torch.rand(4, 3, 64, 64)
    export_onnx(lively(model, calib), 64, tmp_path / "relu5.onnx")
    nodes = onnx.load(str(tmp_path / "relu5.onnx")).graph.node
    relu_outputs = {n.output[0] for n in nodes if n.op_type == "Relu"}
    in_concat = relu_outputs & {t for n in nodes if n.op_type == "Concat" for t in n.input}
    assert "/model.4/cv3/act/Relu_output_0" in in_concat
    ptq(tmp_path / "relu5.onnx", tmp_path / "int8.onnx", calib.numpy(), QuantConfig(fallback_rounds=0),
        lambda p: 0.5, fp32_map=0.5, progress=False)
    acts = qdq_params(onnx.load(str(tmp_path / "int8.onnx")))[0]
    assert in_concat <= acts.keys() and {t: acts[t][1] for t in in_concat} == {t: 0 for t in in_concat}
