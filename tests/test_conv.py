"""Residual adapters (series and parallel) against the papers' equations and parameter counts."""

import copy
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import count_parameters
from reference_impls.conv import (
    ParallelResidualAdapter,
    SeriesResidualAdapter,
    inject_conv_adapters,
    inject_residual_adapters,
    merge_residual_adapters,
    toy_convnet,
    unmerge_residual_adapters,
)

from helpers import demo_losses


def net():
    """Odd channel counts and sizes, a strided conv, a conv with bias, and a 5×5 filter."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 7, 3, padding=1, bias=False),
        nn.BatchNorm2d(7),
        nn.ReLU(),
        nn.Conv2d(7, 11, 5, stride=2, padding=2),
        nn.BatchNorm2d(11),
        nn.ReLU(),
    )


def randomise(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (SeriesResidualAdapter, ParallelResidualAdapter)):
                module.alpha.weight.normal_(0, 0.3)
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("placement", ["series", "parallel"])
@pytest.mark.parametrize("training", [False, True])
def test_identity_at_initialisation(placement, training):
    base = net().train(training)
    model = copy.deepcopy(base)
    inject_residual_adapters(model, ["0", "3"], placement=placement)
    x = torch.randn(2, 3, 9, 13)
    torch.testing.assert_close(model(x), base(x))


def test_series_adapter_is_y_plus_alpha_of_its_own_normalised_y():
    model = net().eval()
    inject_residual_adapters(model, ["3"], placement="series")
    randomise(model)
    adapter, x = model[3], torch.randn(2, 7, 9, 13)
    assert not adapter.norm.training  # injected into a model in eval mode, the new BatchNorm is too
    with torch.no_grad():
        y = F.conv2d(x, adapter.conv.weight, adapter.conv.bias, stride=2, padding=2)
        norm = adapter.norm
        normalised = (y - norm.running_mean[:, None, None]) / torch.sqrt(norm.running_var[:, None, None] + norm.eps)
        normalised = normalised * norm.weight[:, None, None] + norm.bias[:, None, None]
        expected = y + torch.einsum("oc,bchw->bohw", adapter.alpha.weight[:, :, 0, 0], normalised)
        torch.testing.assert_close(adapter(x), expected)


def test_parallel_adapter_reads_the_input_at_the_conv_stride():
    model = net().eval()
    inject_residual_adapters(model, ["3"], placement="parallel")
    randomise(model)
    adapter, x = model[3], torch.randn(2, 7, 9, 13)
    with torch.no_grad():
        strided = x[:, :, ::2, ::2]  # a 1×1 filter at stride 2 sees every other pixel
        expected = adapter.conv(x) + torch.einsum("oc,bchw->bohw", adapter.alpha.weight[:, :, 0, 0], strided)
        torch.testing.assert_close(adapter(x), expected)


@pytest.mark.parametrize(
    "placement, per_conv", [("series", lambda c_in, c: c * c + 2 * c), ("parallel", lambda c_in, c: c_in * c)]
)
def test_parameter_count_and_gradients(placement, per_conv):
    model = net()
    inject_residual_adapters(model, ["0", "3"], placement=placement, train_norms=False)
    assert count_parameters(model)[0] == per_conv(3, 7) + per_conv(7, 11)
    model(torch.randn(2, 3, 9, 13)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert {name.rsplit(".", 2)[-2] for name, p in model.named_parameters() if p.requires_grad} <= {"alpha", "norm"}

    with_norms = net()
    inject_residual_adapters(with_norms, ["0", "3"], placement=placement)  # the papers: BatchNorms per domain
    assert count_parameters(with_norms)[0] == count_parameters(model)[0] + 2 * 7 + 2 * 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parallel_merge_then_unmerge(dtype):
    model = net().to(dtype).eval()
    inject_residual_adapters(model, ["0", "3"], placement="parallel")
    randomise(model)
    weights = [module.conv.weight.clone() for module in model.modules() if isinstance(module, ParallelResidualAdapter)]
    x = torch.randn(3, 3, 10, 7, dtype=dtype)
    with torch.no_grad():
        unmerged = model(x)
        merge_residual_adapters(model)
        torch.testing.assert_close(model(x), unmerged)
        unmerge_residual_adapters(model)
        torch.testing.assert_close(model(x), unmerged)
    after = [module.conv.weight for module in model.modules() if isinstance(module, ParallelResidualAdapter)]
    for before, now in zip(weights, after):
        torch.testing.assert_close(now, before)


def test_what_cannot_be_adapted_or_merged_is_refused():
    uncentred = nn.Sequential(nn.Conv2d(4, 4, 3, padding=0))
    inject_residual_adapters(uncentred, ["0"], placement="parallel")
    with pytest.raises(ValueError, match="odd kernel padded"):
        merge_residual_adapters(uncentred)
    with pytest.raises(ValueError, match="ungrouped"):
        inject_residual_adapters(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2)), ["0"])
    with pytest.raises(ValueError, match="placement"):
        inject_residual_adapters(toy_convnet(), ["0"], placement="diagonal")


def test_demo_runs_and_learns(capsys):
    from reference_impls.conv import demo

    demo()
    output = capsys.readouterr().out
    losses = demo_losses(output)
    assert len(losses) == 3 and all(after < 0.8 * before for before, after in losses)
    assert float(re.search(r"max output change ([\d.e+-]+)", output).group(1)) < 1e-5


def stage():
    """A conv block as in a ResNet: 3×3 conv (stride 2) + BatchNorm + ReLU, odd channel counts."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(12, 10, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU())


def test_conv_adapter_follows_its_equation():
    model = nn.Sequential(OrderedDict(stage=stage())).eval()
    inject_conv_adapters(model, ["stage"], reduction=4)
    adapter = model.stage.adapter
    with torch.no_grad():
        adapter.scale.normal_(1, 0.5)
        x = torch.randn(2, 12, 9, 13)
        hidden = F.relu(F.conv2d(x, adapter.down.weight, adapter.down.bias, stride=2, padding=1, groups=3))
        assert hidden.shape == (2, 3, 5, 7)  # 12 / γ = 3 channels, each from its own 4 input channels
        expected = model.stage.block(x) + adapter.scale * F.conv2d(hidden, adapter.up.weight, adapter.up.bias)
        torch.testing.assert_close(model(x), expected)


def test_conv_adapter_parameter_count_and_gradients():
    model = nn.Sequential(OrderedDict(stage=stage()))
    inject_conv_adapters(model, ["stage"], reduction=4, kernel_size=3)
    c_in, c_out, width, k = 12, 10, 3, 3
    assert count_parameters(model)[0] == c_in * k * k + width + width * c_out + c_out + c_out
    model(torch.randn(2, 12, 8, 8)).sum().backward()
    assert {name.split(".")[2] for name, p in model.named_parameters() if p.grad is not None} == {"down", "up", "scale"}
    with pytest.raises(ValueError, match="must divide"):
        inject_conv_adapters(nn.Sequential(OrderedDict(stage=stage())), ["stage"], reduction=5)
    with pytest.raises(ValueError, match="beside a block with convolutions"):
        inject_conv_adapters(nn.Sequential(OrderedDict(stage=nn.ReLU())), ["stage"])


@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_bfloat16(placement):
    model = net().to(torch.bfloat16)
    inject_residual_adapters(model, ["0", "3"], placement=placement)
    y = model(torch.randn(2, 3, 9, 13, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
