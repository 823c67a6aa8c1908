import pytest
import torch
from torch import nn

from compression.export import export_onnx
from compression.models import head_output_convs
from compression.prune import PruneConfig, prune, reconstruct_


def conv_widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale"])
def test_every_importance_makes_the_model_smaller_and_it_runs(tiny_yolov5, importance):
    small, result = prune(tiny_yolov5, PruneConfig(sparsity=0.3, importance=importance), imgsz=64)
    assert result.params_after < 0.8 * result.params_before and result.macs_after < result.macs_before
    assert small(torch.rand(1, 3, 64, 64)).shape == tiny_yolov5(torch.rand(1, 3, 64, 64)).shape


@pytest.mark.parametrize("fixture", ["tiny_yolov5", "tiny_ultralytics"])
def test_pruned_onnx_matches_torch_and_is_smaller(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    small, _ = prune(model, PruneConfig(sparsity=0.25), imgsz=64)
    full = export_onnx(model, 64, tmp_path / "full.onnx")
    pruned = export_onnx(small, 64, tmp_path / "pruned.onnx")  # raises if ONNX differs from torch
    assert pruned.size_mb < 0.85 * full.size_mb


def test_head_outputs_and_minimum_width_are_kept(tiny_yolov5):
    small, _ = prune(tiny_yolov5, PruneConfig(sparsity=0.5, round_to=8, min_channels=16), imgsz=64)
    assert [c.out_channels for c in head_output_convs(small)] == [21, 21, 21]
    assert min(conv_widths(small)) >= 16
    assert all(w % 8 == 0 for w in conv_widths(small) if w != 21)


def test_zero_sparsity_is_an_exact_copy(tiny_yolov5):
    same, result = prune(tiny_yolov5, PruneConfig(sparsity=0.0), imgsz=64)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(same(x), tiny_yolov5(x)) and result.params_after == result.params_before
    assert same is not tiny_yolov5


@pytest.mark.parametrize("kwargs, field", [({"sparsity": 0.95}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                           ({"importance": "taylor"}, "importance")])
def test_out_of_range_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("fixture", ["tiny_yolov5", "tiny_ultralytics"])
def test_kept_channels_name_the_teachers_channels(fixture, request):
    model = request.getfixturevalue(fixture)
    small, _ = prune(model, PruneConfig(sparsity=0.25), imgsz=64)
    bns = dict(small.named_modules())
    assert small.kept_channels
    for name, kept in small.kept_channels.items():
        assert len(kept) == bns[name].num_features and kept == sorted(set(kept))
        teacher_bn = dict(model.named_modules())[name]
        assert torch.equal(bns[name].running_mean, teacher_bn.running_mean[kept])  # the same channels, in order


def test_reconstruction_brings_the_pruned_features_closer_to_the_teacher(tiny_yolov5):
    from compression.distill import FeatureTaps

    torch.manual_seed(0)
    teacher = tiny_yolov5.eval()
    fit, held_out = torch.rand(16, 3, 64, 64), torch.rand(4, 3, 64, 64)
    small, _ = prune(teacher, PruneConfig(sparsity=0.25), imgsz=64)

    def feature_error(student):
        taps = FeatureTaps(student, teacher)
        with torch.no_grad():
            student.eval()(held_out)
            teacher(held_out)
        err = float(taps.loss())
        taps.remove()
        return err

    before = feature_error(small)
    reconstruct_(small, teacher, fit, progress=False)
    assert feature_error(small) < 0.8 * before
