"""Masks stay exact through training; considered layers found from the fx graph."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import apply_linearised
from nepenthe_compress.prune.dist import DistContext
from nepenthe_compress.prune.layers import considered_layers, freeze_unused
from nepenthe_compress.prune.masks import attach_masks, full_masks, prune_smallest, sparsity
from nepenthe_compress.prune.train import TrainConfig, train
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import trace_model


class Res(nn.Module):
    """conv-BN-ReLU, a residual pair (conv2-BN + 1x1 skip-BN, add, the same ReLU again),
    a conv behind a max-pool, and a Linear head with a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.skip, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + 0.5 * self.bn3(self.skip(x)))
        x = F.relu(F.max_pool2d(self.conv3(x), 2))
        return self.fc2(F.relu(self.drop(self.fc1(x.mean((2, 3))))))


def _masked_model(seed: int = 0):
    torch.manual_seed(seed)
    model = Res()
    masks = full_masks(model, ["conv1", "conv2", "fc1"])
    for m in masks.values():
        m.view(-1)[torch.randperm(m.numel())[: m.numel() // 2]] = False
    return model, masks


def _steps(model, masks, hook: bool, n: int = 8) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    handle = attach_masks(opt, model, masks) if hook else None
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if handle:
        handle.remove()


def test_pruned_weights_stay_exactly_zero_with_momentum_and_weight_decay():
    model, masks = _masked_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    _steps(model, masks, hook=True)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert (params[name][~m] == 0).all(), name
        assert (params[name][m] != before[name][m]).any(), f"{name} kept weights did not train"
    # control: without re-applying the masks, momentum and gradients revive pruned weights
    model, masks = _masked_model()
    _steps(model, masks, hook=False)
    params = dict(model.named_parameters())
    assert any((params[n][~m] != 0).any() for n, m in masks.items())


def test_train_loop_keeps_masks():
    model, masks = _masked_model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    loss = train(model, x, y, 2, TrainConfig(lr=0.1, batch_size=8), DistContext(device=torch.device("cpu")),
                 masks, seed=0)
    assert loss is not None and loss > 0
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert (params[name][~m] == 0).all()
    zeros = sum(int((params[n] == 0).sum()) for n in masks)
    total = sum(m.numel() for m in masks.values())
    assert abs(sparsity(masks) - zeros / total) < 1e-12


def test_prune_smallest_removes_the_smallest_surviving_weights():
    w = torch.tensor([[0.3, -0.1], [0.2, -0.05]])
    mask = torch.tensor([[False, True], [True, True]])
    assert prune_smallest(w, mask, 2).tolist() == [[False, False], [True, False]]
    # ties: the first position goes first; already pruned weights never count
    w = torch.tensor([0.0, 0.1, -0.1, 0.1])
    assert prune_smallest(w, torch.tensor([False, True, True, True]), 1).tolist() == [False, False, True, True]


def test_sparsity_counts_all_masked_weights():
    masks = {"a": torch.tensor([True, False, False, False]), "b": torch.ones(2, 3, dtype=torch.bool)}
    assert abs(sparsity(masks) - 3 / 10) < 1e-12
    assert sparsity({}) == 0.0


def test_considered_layers_walk_through_bn_add_and_scaling():
    gm = trace_model(Res())
    sites = find_sites(gm)
    assert len(sites) == 4
    fed = considered_layers(gm, sites)
    # conv3 feeds a site only through a max-pool (not looked through); fc2 feeds no site
    assert fed == {"conv1": [sites[0].name], "conv2": [sites[1].name], "skip": [sites[1].name],
                   "fc1": [sites[3].name]}


def test_considered_layers_of_cifar_resnet18():
    gm = trace_model(build_model("cifar_resnet18", in_channels=1, width=0.0625))
    sites = {s.target: s.name for s in find_sites(gm)}
    fed = considered_layers(gm, find_sites(gm))
    convs = [n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(fed) == sorted(convs) and len(convs) == 20 and "fc" not in fed
    # a block's second conv and its downsample shortcut both feed the ReLU after the add
    assert fed["layer2.0.conv2"] == fed["layer2.0.downsample.0"] == [sites["layer2.0.relu#1"]]
    assert fed["layer2.0.conv1"] == [sites["layer2.0.relu"]]


def test_linearised_prelu_parameters_are_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2), nn.ReLU())
    gm = apply_linearised(model, [find_sites(trace_model(model))[0].name])
    freeze_unused(gm)
    frozen = sorted(n for n, p in gm.named_parameters() if not p.requires_grad)
    assert frozen == ["1.weight"]
