"""``layernorm_affine_into_linears``: LayerNorm's gamma / beta go into the Linears reading it; the
LayerNorm keeps only its normalisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, events, fold, measure, modules, set_states, weighted, zero_entropy
from nepenthe_compress.fold.rewrites.affine import LAYERNORM


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.l1, self.l2, self.l3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(self.norm(x))))))


def token_mlp() -> tuple[TokenMLP, Tensor]:
    torch.manual_seed(0)
    m, x = TokenMLP().double(), torch.randn(3, 5, 12, dtype=D)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.normal_()
    return m, x


def test_gamma_and_beta_go_into_the_linear() -> None:
    m, x = token_mlp()
    f = fold(m, x, rewrites=[LAYERNORM])
    (norm,) = modules(f, nn.LayerNorm)
    assert norm.weight is None and norm.bias is None and norm.eps == m.norm.eps
    assert events(f, "fold") == ["norm affine: into l1"]
    assert_exact(m, f, x)


@pytest.mark.parametrize("merge", ["auto", "all"])
def test_linear_chain_on_token_inputs_merges(merge: str) -> None:
    """(N, T, C) tokens: 12 -> 32 -> 32 -> 6 with both ReLUs ON is one 12 -> 6 Linear (cheaper
    too, so 'auto' merges as well); LayerNorm's affine goes into that Linear."""
    m, x = token_mlp()
    set_states(m, x, {m.l1: "on", m.l2: "on"})
    report = measure(m, x)
    assert zero_entropy(report) == {"relu", "relu_1"}
    assert all(s.neuron_axis == -1 for s in report.sites)
    f = fold(m, x, report, merge=merge)
    (linear,) = weighted(f)
    assert (linear.in_features, linear.out_features) == (12, 6)
    (norm,) = modules(f, nn.LayerNorm)
    assert norm.weight is None  # gamma / beta moved into the Linear
    assert_exact(m, f, x)


class NormThenRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.fc(h) + F.relu(h)[..., :3]


def test_layernorm_read_by_anything_else_keeps_its_affine() -> None:
    torch.manual_seed(0)
    m, x = NormThenRelu().double(), torch.randn(4, 6, dtype=D)
    f = fold(m, x, rewrites=[LAYERNORM])
    (norm,) = modules(f, nn.LayerNorm)
    assert norm.weight is not None and f.events == []
