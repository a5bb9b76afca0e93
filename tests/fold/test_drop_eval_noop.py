"""``drop_eval_noop``: Dropout, Identity, F.dropout(training=False) and identity affine maps go."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, image, modules
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.fold.driver import fold_model
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.rewrites.affine import DROP_NOOP
from nepenthe_compress.fold.rewriter import FoldOptions


class NoOps(nn.Module):
    def __init__(self, training_dropout: bool) -> None:
        super().__init__()
        self.training_dropout = training_dropout
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 3, 1)
        self.drop, self.ident = nn.Dropout2d(0.5), nn.Identity()
        self.unit = ChannelAffine(torch.ones(4, dtype=D), torch.zeros(4, dtype=D), axis=1)
        self.halve = ChannelAffine(torch.full((4,), 0.5, dtype=D), torch.zeros(4, dtype=D), axis=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ident(self.drop(self.c1(x)))
        y = self.halve(self.unit(F.dropout(y, 0.3, training=False)))
        return self.c2(F.dropout(y, 0.1, training=self.training_dropout))


def noop_fold(m: nn.Module, x: Tensor):
    leaves = (ChannelAffine,)  # a model that holds ChannelAffine maps (as a folded model does)
    report = measure_entropy(m, [x], leaf_modules=leaves)
    return fold_model(m, report, x[:2], FoldOptions(), leaf_modules=leaves, rewrites=[DROP_NOOP])


def test_eval_noops_are_removed_and_nothing_else() -> None:
    torch.manual_seed(0)
    m, x = NoOps(training_dropout=True).to(D), image()
    f = noop_fold(m, x)
    assert modules(f, (nn.Dropout2d, nn.Identity)) == []
    assert [a.scale.tolist() for a in modules(f, ChannelAffine)] == [[0.5] * 4]  # the unit map went
    dropouts = [n for n in f.model.graph.nodes if n.op == "call_function" and n.target is F.dropout]
    assert [n.kwargs["training"] for n in dropouts] == [True]  # a training dropout is not a no-op
    assert f.events == []  # removing a no-op is not reported


def test_removal_is_exact_in_eval_mode() -> None:
    torch.manual_seed(0)
    m, x = NoOps(training_dropout=False).to(D), image()
    f = noop_fold(m, x)
    ops = [n.op for n in f.model.graph.nodes]
    assert ops == ["placeholder", "call_module", "call_module", "call_module", "output"]  # c1, halve, c2
    assert_exact(m, f, x)
