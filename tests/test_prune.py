import copy

import pytest
import torch
from torch import nn

from conftest import lively
from compression.export import export_onnx
from compression.lowrank import (activation_stats, allocate_ranks, conv_blocks, factorize_, in_channels,
                                 in_rank, input_directions, is_factorized, projectable, rank, rank_options)
from compression.models import head_output_convs
from compression.prune import (PruneConfig, Structure, _Groups, _output_error, _zero_channels, allocate,
                               apply_structure, detection_error, prune, raw_outputs, reconstruct_, residual_blocks)

# the ultralytics variant repeats the original family's check: `make test-slow` runs it
FAMILIES_ULTRALYTICS_SLOW = ["tiny_yolov5", pytest.param("tiny_ultralytics", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(4, 3, 64, 64)


def conv_widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.slow  # the default importance (l1) prunes in every other test here
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale"])
def test_every_importance_makes_the_model_smaller_and_it_runs(tiny_yolov5, images, importance):
    cfg = PruneConfig(sparsity=0.3, method="channels", importance=importance, rounds=1)
    small, result = prune(tiny_yolov5, cfg, 64, images)
    assert result.params_after < 0.85 * result.params_before and result.macs_after < result.macs_before
    assert small(torch.rand(1, 3, 64, 64)).shape == tiny_yolov5(torch.rand(1, 3, 64, 64)).shape


@pytest.mark.parametrize("sparsity,method", [(0.3, "channels"), *(
    pytest.param(s, m, marks=pytest.mark.slow) for s, m in ((0.1, "both"), (0.1, "channels"), (0.3, "both")))])
def test_allocation_reaches_the_macs_target_and_keeps_widths(tiny_yolov5, images, method, sparsity):
    small, result = prune(tiny_yolov5, PruneConfig(sparsity=sparsity, method=method, rounds=2, min_channels=16),
                          64, images)
    assert abs(result.macs_after / result.macs_before - (1 - sparsity)) <= 0.02, result.rounds
    assert [r["target_macs"] for r in result.rounds] == pytest.approx([1 - sparsity / 2, 1 - sparsity], abs=1e-6)
    assert [c.out_channels for c in head_output_convs(small)] == [21, 21, 21]
    widths = [w for w in conv_widths(small) if w != 21]
    assert min(widths) >= 16 and all(w % 8 == 0 for w in widths)  # the tiny model's widths allow multiples of 8


def test_the_least_sensitive_cut_is_taken_first():
    groups = [{"counts": [8, 16], "macs_per_channel": 10, "blocks": ["a.cv1"]},
              {"counts": [8, 16], "macs_per_channel": 10, "blocks": ["b.cv1"]}]
    counts, blocks = allocate(groups, [[5.0, 9.0], [0.1, 0.3]], {}, {}, need=100)
    assert counts == {1: 16} and blocks == []  # 160 MACs at error 0.3, not group 0's 80 at 5.0
    counts, blocks = allocate(groups, [[5.0, 9.0], [1.0, 2.0]], {"b": 100}, {"b": 0.5}, need=100)
    assert counts == {} and blocks == ["b"]  # the block alone saves enough, for the least error
    counts, blocks = allocate(groups, [[5.0, 9.0], [3.0, 4.0]], {"b": 90}, {"b": 0.5}, need=150)
    assert blocks == ["b"] and counts == {0: 8}  # group 1 went with the block; group 0 adds the rest


def test_masked_sensitivity_equals_the_error_of_the_pruned_model(tiny_yolov5, images):
    """Zeroing a group's channels after their Conv blocks computes exactly what removing them computes."""
    model = copy.deepcopy(tiny_yolov5)
    groups = _Groups(model, PruneConfig(sparsity=0.2), 64, {})
    # in float64: the untrained tiny model's logits move by ~1e-8 and its error is ~1e-18, under float32 rounding
    model.double()
    images = images.double()
    g = max(groups.groups, key=lambda g: len(g["blocks"]))  # a residual stream: several Conv blocks coupled
    count = g["counts"][0]
    reference = [raw_outputs(model, images)]
    masked = _output_error(model, images, reference, {b: _zero_channels(i) for b, i in groups.masks(g, count).items()})
    groups.removal(g, count).prune()
    pruned = float(detection_error(raw_outputs(model, images), reference[0]))
    assert masked > 0 and masked == pytest.approx(pruned, rel=1e-4)


def test_blocks_are_removed_and_onnx_still_equals_torch(tiny_yolov5, images, tmp_path):
    small, result = prune(tiny_yolov5, PruneConfig(sparsity=0.05, method="blocks", rounds=1), 64, images)
    removed = result.structure.removed_blocks
    assert removed and all(isinstance(small.get_submodule(n), nn.Identity) for n in removed)
    assert set(removed) <= set(residual_blocks(tiny_yolov5)) and not result.structure.kept
    export_onnx(small, 64, tmp_path / "blocks.onnx")  # raises if ONNX Runtime differs from torch


def test_blocks_short_of_the_target_say_so(tiny_yolov5, images):
    with pytest.warns(UserWarning, match=r"asks for 0.50x MACs; prune_method='blocks' reached 0\.\d+x"):
        small, result = prune(tiny_yolov5, PruneConfig(sparsity=0.5, method="blocks", rounds=1), 64, images)
    assert result.macs_after / result.macs_before > 0.52  # every bottleneck is gone, and that is all blocks can do
    assert set(result.structure.removed_blocks) == set(residual_blocks(tiny_yolov5))


@pytest.mark.parametrize("fixture", FAMILIES_ULTRALYTICS_SLOW)
def test_pruned_onnx_matches_torch_and_is_smaller(fixture, request, images, tmp_path):
    model = request.getfixturevalue(fixture)
    small, _ = prune(model, PruneConfig(sparsity=0.25, method="both", rounds=2), 64, images)
    full = export_onnx(model, 64, tmp_path / "full.onnx")
    pruned = export_onnx(small, 64, tmp_path / "pruned.onnx")  # raises if ONNX differs from torch
    assert pruned.size_mb < 0.9 * full.size_mb


def test_zero_sparsity_is_an_exact_copy(tiny_yolov5):
    same, result = prune(tiny_yolov5, PruneConfig(sparsity=0.0), imgsz=64)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(same(x), tiny_yolov5(x)) and result.params_after == result.params_before
    assert same is not tiny_yolov5


@pytest.mark.parametrize("kwargs, field", [({"sparsity": 0.95}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                           ({"importance": "taylor"}, "importance"), ({"method": "layers"}, "method"),
                                           ({"rounds": 0}, "rounds")])
def test_out_of_range_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PruneConfig(**kwargs)


@pytest.mark.slow  # both families: the structure test below rebuilds students from these channels
@pytest.mark.parametrize("fixture", ["tiny_yolov5", "tiny_ultralytics"])
def test_the_structure_names_the_teachers_channels_across_rounds(fixture, request, images):
    model = request.getfixturevalue(fixture)
    small, result = prune(model, PruneConfig(sparsity=0.3, method="channels", rounds=3), 64, images)
    kept, bns, teacher = result.structure.kept, dict(small.named_modules()), dict(model.named_modules())
    assert kept and len(result.rounds) == 3
    for name, channels in kept.items():
        assert len(channels) == bns[name].num_features and channels == sorted(set(channels))
        assert torch.equal(bns[name].running_mean, teacher[name].running_mean[channels])  # the same, in order


@pytest.mark.parametrize("fixture", FAMILIES_ULTRALYTICS_SLOW)
def test_the_structure_rebuilds_the_student(fixture, request, images):
    """What the student cache stores (the structure and the tensors) gives back the same model."""
    model = request.getfixturevalue(fixture)

    def perturb(student, structure, step):  # stands for training between rounds: weights change, shapes do not
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        return student

    small, result = prune(model, PruneConfig(sparsity=0.3, method="both", rounds=2), 64, images, recover=perturb)
    again = apply_structure(model, Structure(**vars(result.structure)))
    again.load_state_dict(small.state_dict())
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(again.eval()(x), small.eval()(x))


@pytest.mark.slow  # every pruned trial of the default suite runs reconstruct_; this measures what it achieves
def test_reconstruction_brings_the_pruned_features_closer_to_the_teacher(tiny_yolov5, images):
    from compression.distill import FeatureTaps

    torch.manual_seed(0)
    teacher = tiny_yolov5.eval()
    fit, held_out = torch.rand(16, 3, 64, 64), torch.rand(4, 3, 64, 64)
    small, result = prune(teacher, PruneConfig(sparsity=0.25, method="channels", rounds=1), 64, images)
    kept = result.structure.kept

    def feature_error(student):
        taps = FeatureTaps(student, teacher, kept)
        with torch.no_grad():
            student.eval()(held_out)
            teacher(held_out)
        err = float(taps.loss())
        taps.remove()
        return err

    before = feature_error(small)
    reconstruct_(small, teacher, fit, kept, progress=False)
    assert feature_error(small) < 0.8 * before


class _Block(nn.Module):
    def __init__(self, c1, c2, k=1):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

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
    x = torch.rand(8, 3, 16, 16)
    reconstruct_(student, teacher, x, {"a.bn": [0, 1, 2]}, progress=False, bias=bias, ridge=1e-6)
    with torch.no_grad():
        err = (student(x) - teacher(x)).abs().max().item()
    assert (err < 1e-3) if bias else (err > 0.05), err


def test_lowrank_reaches_the_macs_target_with_ranks_on_the_grid(tiny_yolov5, images):
    teacher = lively(tiny_yolov5, images)
    small, result = prune(teacher, PruneConfig(sparsity=0.3, rounds=2), 64, images)  # lowrank is the default
    assert abs(result.macs_after / result.macs_before - 0.7) <= 0.02, result.rounds
    ranks = result.structure.ranks
    assert ranks and not result.structure.kept and not result.structure.removed_blocks
    blocks = dict(small.named_modules())
    for name, r in ranks.items():
        width = blocks[name].bn.num_features
        assert is_factorized(blocks[name]) and rank(blocks[name]) == r and 8 <= r < width
        assert r % 8 == 0 or width % 8  # multiples of 8 where the width is one
    for name, s in result.structure.in_ranks.items():
        width = in_channels(blocks[name])
        assert is_factorized(blocks[name]) and in_rank(blocks[name]) == s and 8 <= s < width
        assert s % 8 == 0 or width % 8
    widths = {n: m.num_features for n, m in small.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert widths == {n: m.num_features for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_a_full_rank_factorisation_computes_the_same_block(tiny_yolov5, images):
    """A = U^T D W and B = D^-1 U with every direction kept is the block itself: the algebra, on a plain block and
    on blocks factorised already (on either side), whose convolutions compose back into one."""
    model = copy.deepcopy(lively(tiny_yolov5, images))
    name = "model.3"  # a 3x3 stride-2 convolution
    block = model.get_submodule(name)
    x = model.model[:3](images)
    width = block.bn.num_features

    def full_rank_keeps_it():
        before = block(x)
        factorize_(block, width, activation_stats(model, images, [name])[name])
        assert not is_factorized(block) and torch.allclose(block(x), before, atol=1e-4, rtol=1e-4)

    full_rank_keeps_it()
    factorize_(block, width // 2, activation_stats(model, images, [name])[name])
    assert is_factorized(block) and rank(block) == width // 2
    full_rank_keeps_it()
    factorize_(block, width, activation_stats(model, images, [name], inputs=[name])[name], in_channels(block) // 2)
    assert is_factorized(block) and in_rank(block) == in_channels(block) // 2
    full_rank_keeps_it()


def test_an_input_projection_computes_the_block_on_the_projected_input(tiny_yolov5, images):
    """With input rank s the block reads mu + A P (x - mu): inside the borders (where zero padding would have to be
    projected too) its output is the full block's on that input, and the dropped directions are the least read."""
    model = copy.deepcopy(lively(tiny_yolov5, images))
    name = "model.3"
    block = model.get_submodule(name)
    full = copy.deepcopy(block)
    x = model.model[:3](images)
    stats = activation_stats(model, images, [name], inputs=[name])[name]
    p = input_directions(block, stats)
    assert torch.all(p["tail"][:-1] >= p["tail"][1:]) and p["tail"][-1] == 0
    s = in_channels(block) // 2
    factorize_(block, block.bn.num_features, stats, s)
    assert is_factorized(block) and in_rank(block) == s and rank(block) == block.bn.num_features
    v = p["V"][:, :s]
    a, proj, mu = (p["root"] @ v).float(), (v.T @ p["inv_root"]).float(), p["mean"].float().view(1, -1, 1, 1)
    projected = mu + torch.einsum("cs,si,nihw->nchw", a, proj, x - mu)
    with torch.no_grad():
        got, want = block.bn(block.conv(x)), full.bn(full.conv(projected))
    assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        lost = (want - full.bn(full.conv(x)))[..., 1:-1, 1:-1]
        v = p["V"][:, -s:]  # the same projection onto the trailing directions instead
        trailing = mu + torch.einsum("cs,si,nihw->nchw", (p["root"] @ v).float(), (v.T @ p["inv_root"]).float(),
                                     x - mu)
        lost_worst = (full.bn(full.conv(trailing)) - full.bn(full.conv(x)))[..., 1:-1, 1:-1]
    assert lost.pow(2).mean() < lost_worst.pow(2).mean()


def test_a_low_rank_block_projects_onto_the_leading_directions(tiny_yolov5, images):
    """Its BN output is the full block's, projected onto the r directions of most energy: mu + U_r U_r^T (z - mu)."""
    model = copy.deepcopy(lively(tiny_yolov5, images))
    block = model.get_submodule("model.3")
    x = model.model[:3](images)
    z = block.bn(block.conv(x))
    stats = activation_stats(model, images, ["model.3"])["model.3"]
    assert torch.all(stats["ev"][:-1] >= stats["ev"][1:])  # leading first
    r = block.bn.num_features // 2
    factorize_(block, r, stats)
    u, mu = stats["U"][:, :r].float(), stats["mean"].float().view(1, -1, 1, 1)
    projected = mu + torch.einsum("cr,dr,ndhw->nchw", u, u, z - mu)
    assert rank(block) == r and torch.allclose(block.bn(block.conv(x)), projected, atol=1e-4, rtol=1e-4)


def test_an_input_of_low_rank_is_projected_at_no_loss():
    """32 input channels that mix 4 signals: an input projection to 8 channels loses nothing, and the allocation
    takes it before any cut of the output (which a 3x3 convolution of 4 signals fills)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(32, 32, 3)).eval()
    x = torch.einsum("ck,nkhw->nchw", torch.randn(32, 4), torch.randn(8, 4, 16, 16))
    stats = activation_stats(model, x, ["0"], inputs=["0"])["0"]
    options = rank_options(model[0], stats, 16 * 16, step=8, floor=8)
    lost = {key: loss for key, _, loss in options}
    assert lost[(8, 32)] < 1e-6 < lost[(32, 24)]
    (s, r), = allocate_ranks({"0": options}, need=9 * 32 * 32 * 16 * 16 // 2).values()
    assert s < 32 and r == 32


def test_the_rank_allocation_takes_the_least_energy_for_the_macs():
    options = {"a": [(4, 100, 0.5)], "b": [(2, 150, 0.3), (4, 100, 0.1)]}
    assert allocate_ranks(options, 100) == {"b": 4}
    assert allocate_ranks(options, 150) == {"b": 2}  # 0.3 for 150, not a and b for 0.6
    assert allocate_ranks(options, 250) == {"a": 4, "b": 2}
    assert allocate_ranks(options, 400) == {"a": 4, "b": 2}  # out of reach: every block at its lowest rank
    assert allocate_ranks(options, 0) == {}


@pytest.mark.parametrize("fixture", FAMILIES_ULTRALYTICS_SLOW)
def test_a_factorised_student_rebuilds_and_its_onnx_equals_torch(fixture, request, images, tmp_path):
    model = lively(request.getfixturevalue(fixture), images)
    small, result = prune(model, PruneConfig(sparsity=0.25), 64, images)
    # and an input projection, whether or not the allocation chose one on random weights
    name = next(n for n, b in conv_blocks(small).items() if projectable(b, 8) and n not in result.structure.ranks)
    block = small.get_submodule(name)
    factorize_(block, block.bn.num_features, activation_stats(small, images, [name], inputs=[name])[name], 8)
    result.structure.in_ranks[name] = 8
    again = apply_structure(model, Structure(**vars(result.structure)))
    again.load_state_dict(small.state_dict())
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(again.eval()(x), small.eval()(x))
    export_onnx(small, 64, tmp_path / "lowrank.onnx")  # raises if ONNX Runtime differs from torch
