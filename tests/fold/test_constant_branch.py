"""``constant_branch``: a layer pruned to zero weights outputs a constant; so does everything computed
only from it; added to a live tensor it becomes a per-channel shift (or a constant add)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, events, fold, image, measure, modules, weighted, zero_entropy
from nepenthe_compress.fold.modules import AddConstant, ChannelAffine
from nepenthe_compress.fold.rewrites.constants import CONSTANT_BRANCH, channel_shift


class PrunedBranch(nn.Module):
    """y = x + c2(relu(c1(x))) whose branch conv c1 was pruned away entirely (all weights 0)."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=padding), nn.Conv2d(8, 8, 3, padding=padding)
        self.head = nn.Conv2d(8, 4, 1)
        self.crop = 2 * (1 - padding)  # two unpadded 3x3s shrink the branch by 2 on each side

    def forward(self, x: Tensor) -> Tensor:
        skip = x[..., 2:-2, 2:-2] if self.crop else x
        return self.head(F.relu(skip + self.c2(F.relu(self.c1(x)))))


def pruned(padding: int) -> tuple[PrunedBranch, Tensor]:
    torch.manual_seed(0)
    m, x = PrunedBranch(padding).double(), image(8)
    with torch.no_grad():
        m.c1.weight.zero_()
    return m, x


def test_an_unpadded_pruned_branch_becomes_a_per_channel_shift() -> None:
    m, x = pruned(padding=0)
    f = fold(m, x, rewrites=[CONSTANT_BRANCH])
    (shift,) = modules(f, ChannelAffine)
    assert bool((shift.scale == 1).all()) and shift.axis == 1
    expected = m.c2(F.relu(m.c1.bias.view(1, -1, 1, 1).expand(1, 8, 3, 3)))[0, :, 0, 0]
    torch.testing.assert_close(shift.shift, expected.detach(), rtol=1e-14, atol=1e-14)
    assert events(f, "constant") == ["c2: layer computes a constant: its branch of add becomes a per-channel shift"]
    assert [n.target for n in f.model.graph.nodes if n.op == "call_module"
            and isinstance(f.model.get_submodule(n.target), nn.Conv2d)] == ["head"]
    assert_exact(m, f, x)


def test_a_padded_pruned_branch_is_a_constant_map() -> None:
    """c2 zero-pads the constant, so the branch is a border-shaped constant: a constant add."""
    m, x = pruned(padding=1)
    f = fold(m, x, rewrites=[CONSTANT_BRANCH])
    (add,) = modules(f, AddConstant)
    assert tuple(add.value.shape) == (8, 10, 10) and channel_shift(add.value[None]) is None
    assert_exact(m, f, x)


def test_the_whole_fold_leaves_only_the_head() -> None:
    m, x = pruned(padding=1)
    report = measure(m, x)
    assert zero_entropy(report) == {"relu"}  # the constant c1 output: each channel always ON or OFF
    f = fold(m, x, report)
    assert [type(w) for w in weighted(f)] == [nn.Conv2d]  # only the head is left
    assert_exact(m, f, x)


class TokenBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch, self.fc = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x + self.branch(x))


def test_a_pruned_linear_branch_on_tokens_is_a_shift_on_the_last_axis() -> None:
    torch.manual_seed(0)
    m, x = TokenBranch().double(), torch.randn(2, 5, 6, dtype=D)
    with torch.no_grad():
        m.branch.weight.zero_()
    f = fold(m, x, rewrites=[CONSTANT_BRANCH])
    (shift,) = modules(f, ChannelAffine)
    assert shift.axis == -1 and torch.equal(shift.shift, m.branch.bias.detach())
    assert_exact(m, f, x)


def test_channel_shift_finds_the_constant_axis() -> None:
    v = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 4, 5)
    assert torch.equal(channel_shift(v)[0], torch.arange(3.0)) and channel_shift(v)[1] == 1
    t = torch.arange(4.0).expand(1, 7, 4)
    assert torch.equal(channel_shift(t)[0], torch.arange(4.0)) and channel_shift(t)[1] == -1
    assert channel_shift(torch.randn(1, 3, 4, 5)) is None
