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


class _Block(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, 1, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _Pair(nn.Module):
    def __init__(self, mid):
        super().__init__()
        self.a, self.b = _Block(3, mid), _Block(mid, 3)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("bias", [True, False])
def test_reconstruction_offset_replaces_what_a_removed_channel_added_on_average(bias):
    """The teacher's 4th middle channel is a constant (its conv weights are 0); the student lacks it. Only an offset
    (folded into the next BN's running mean) can give back its contribution to ``b``: exactly, with ``bias``."""
    torch.manual_seed(0)
    teacher = _Pair(4).eval()
    with torch.no_grad():
        teacher.a.conv.weight[3] = 0
        teacher.a.bn.bias[3] = 1.0  # SiLU(1) = 0.73 everywhere
        teacher.b.bn.running_var.fill_(1.0)
        teacher.b.conv.weight[:, 3] = 2.0  # a large, constant contribution to every output
    student = _Pair(3).eval()
    student.load_state_dict({k: v[:3] if k.startswith("a.") and v.ndim else v
                             for k, v in teacher.state_dict().items() if not k.startswith("b.conv")}, strict=False)
    with torch.no_grad():
        student.b.conv.weight.copy_(teacher.b.conv.weight[:, :3])
    student.kept_channels = {"a.bn": [0, 1, 2]}
    x = torch.rand(8, 3, 16, 16)
    reconstruct_(student, teacher, x, progress=False, bias=bias, ridge=1e-6)
    with torch.no_grad():
        err = (student(x) - teacher(x)).abs().max().item()
    assert (err < 1e-3) if bias else (err > 0.05), err
