"""The fold pass on many real torchvision architectures (random weights, their own neuron states):
whatever it linearises, merges or drops, the folded model must compute the original's outputs.
These models exercise constructs the zoo does not: squeeze-excitation, channel shuffles, dense
concatenations, inception branches, Hardswish / SiLU, grouped convs."""
from __future__ import annotations

import pytest
import torch
import torchvision

from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.fold.core import fold_graph
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.verify import verify_equivalence

ARCHS = ["squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5", "mobilenet_v3_small", "efficientnet_b0",
         "regnet_y_400mf", "densenet121", "googlenet"]


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_is_exact_on_real_architectures(arch: str) -> None:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs).eval()
    x = torch.randn(4, 3, 64, 64)
    report = measure_entropy(model, [x])
    changes = 0
    for merge in ("auto", "all"):
        folded = fold_graph(model, report, x[:2], FoldOptions(merge=merge))
        assert verify_equivalence(model, folded.model, [x]).max_rel <= 1e-5, merge
        changes += folded.channels_dropped + len(folded.linearised) + folded.count("merge")
    assert changes > 0  # the pass really rewrote something (random nets have dead channels)
