"""The kernel-regime prediction for Rahbar et al. 2020's student (`wide2 fixed_output=true`).

Torch has no neural-tangent-kernel helper, so the one kernel we need is written out here: for
f(x) = m^-1/2 Σ_r a_r σ(w_r·x/√d) with ReLU σ, a_r = ±1 fixed and w_r ~ N(0, I) trained, the tangent
kernel converges as m → ∞ to (Du et al. 2019, eq. 3; Arora et al. 2019)

    Θ(x, x') = (x·x' / d) · (π − θ(x, x')) / (2π),      θ = the angle between x and x'.

Gradient descent on a least-squares loss from f_0 = 0 then ends at kernel regression of the targets,
f(x) = Θ(x, X) Θ(X, X)⁻¹ T, one output at a time (the outputs' kernels are independent at infinite width).
"""

from __future__ import annotations

import math

import torch


def relu_first_layer_ntk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Θ between the rows of a (n, d) and b (k, d), inputs flattened: (n, k), float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    dot = a @ b.T
    norms = a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True).T
    theta = torch.arccos((dot / norms.clamp_min(1e-300)).clamp(-1.0, 1.0))
    return dot / a.shape[1] * (math.pi - theta) / (2 * math.pi)


def kernel_regression(
    k_train: torch.Tensor, k_query: torch.Tensor, targets: torch.Tensor, ridge: float = 0.0
) -> torch.Tensor:
    """Θ(query, X) (Θ(X, X) + ridge·n·I)⁻¹ T: the interpolant (ridge 0) or kernel ridge regression."""
    n = k_train.shape[0]
    system = k_train + ridge * n * torch.eye(n, dtype=k_train.dtype)
    return k_query @ torch.linalg.solve(system, targets.to(k_train.dtype))
