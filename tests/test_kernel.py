"""The kernel-regime analysis: the fixed-output wide2 student, its tangent kernel and what GD converges to."""

import math

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.evaluation.kernel import kernel_regression, relu_first_layer_ntk
from kd_lightning.models import create_model


def _fixed(width: int, classes: int = 3, dim: int = 5) -> torch.nn.Module:
    return create_model(
        {"name": "wide2", "width": width, "parametrization": "ntk", "fixed_output": True}, classes, (dim,)
    )


def test_fixed_output_starts_at_zero_and_only_the_first_layer_trains():
    torch.manual_seed(0)
    model = _fixed(64)
    x = torch.randn(7, 5)
    assert model(x).abs().max() < 1e-6  # paired units with opposite signs: 0 up to float rounding
    assert set(model.fc.weight.unique().tolist()) == {-1.0, 1.0} and not model.fc.weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["features.1.weight"]
    model(x).pow(2).sum().backward()  # zero output: no gradient yet; a target gives one
    (model(x) - 1).pow(2).sum().backward()
    assert model.features[1].weight.grad.abs().sum() > 0 and model.fc.weight.grad is None


def test_fixed_output_refuses_settings_it_cannot_honour():
    for bad in ({"zero_output": True}, {"width": 63}, {"parametrization": "standard"}):
        with pytest.raises(ConfigError, match="fixed_output"):
            create_model(
                {"name": "wide2", "width": 64, "parametrization": "ntk", "fixed_output": True, **bad}, 3, (5,)
            )


def test_the_closed_form_kernel_is_the_wide_networks_tangent_kernel():
    torch.manual_seed(1)
    width, x = 40_000, torch.randn(6, 5)
    model = _fixed(width, classes=1)
    grads = []
    for xi in x:
        model.zero_grad()
        model(xi[None])[0, 0].backward()
        grads.append(model.features[1].weight.grad.flatten().clone())
    g = torch.stack(grads).double()
    empirical = g @ g.T
    closed = relu_first_layer_ntk(x, x)
    assert torch.allclose(empirical, closed, atol=0.02 * closed.diag().mean())
    # against a hand value: orthogonal unit inputs → (0/d)(π − π/2)/(2π) = 0; x with itself → |x|²/(2d)
    e = torch.eye(5)
    assert relu_first_layer_ntk(e[:1], e[1:2]).item() == 0.0
    assert relu_first_layer_ntk(e[:1], e[:1]).item() == pytest.approx(1 / (2 * 5))


def test_gradient_descent_on_the_wide_student_ends_at_kernel_regression():
    torch.manual_seed(2)
    x, xq = torch.randn(10, 20), torch.randn(20, 20)
    targets = torch.randn(10, 2)
    torch.manual_seed(3)
    model = _fixed(8192, classes=2, dim=20)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=20.0)
    for _ in range(600):
        opt.zero_grad()
        (model(x) - targets).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        trained = model(xq).double()
    k = relu_first_layer_ntk(x, x)
    predicted = kernel_regression(k, relu_first_layer_ntk(xq, x), targets)
    # measured 0.033 at this width (0.072 at 2048, 0.020 at 32768): the finite-width gap shrinks with width
    assert (trained - predicted).norm() / predicted.norm() < 0.06
    linear = kernel_regression(x.double() @ x.double().T, xq.double() @ x.double().T, targets)
    assert (trained - linear).norm() / linear.norm() > 0.2  # another kernel's interpolant is far
    # the interpolant fits the training targets; a ridge shrinks it
    assert math.isclose(float((kernel_regression(k, k, targets) - targets).abs().max()), 0, abs_tol=1e-8)
    assert kernel_regression(k, k, targets, ridge=1.0).norm() < kernel_regression(k, k, targets).norm()
