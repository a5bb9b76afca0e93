"""Site linearisation: a zero-entropy rectifier site becomes the per-channel affine map of its
neurons' recorded states (docs/DESIGN.md 4.1), or disappears when every neuron is always ON."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nepenthe_compress.entropy import SiteStats
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewriter import GraphRewriter
from nepenthe_compress.sites import Site


def site_affine(site: Site, stats: SiteStats) -> tuple[Tensor, Tensor]:
    """Per-neuron (scale, shift) of a zero-entropy site from each neuron's recorded state."""
    states = stats.neuron_state
    n = len(states)
    scale = torch.empty(n, dtype=torch.float64)
    shift = torch.empty(n, dtype=torch.float64)
    for s in np.unique(states):
        a, c = site.kind.affine(site.params, int(s), n)
        idx = torch.from_numpy(np.nonzero(states == s)[0])
        scale[idx], shift[idx] = a[idx], c[idx]
    return scale, shift


@dataclass
class Linearisation:
    site: Site
    scale: Tensor
    shift: Tensor
    states: str          # e.g. "OFF 2, ON 4"


def match(rw: GraphRewriter) -> Iterator[Site]:
    for site in rw.sites:
        st = rw.stats.get(site.name)
        if not getattr(site.node, "_erased", False) and st is not None and st.zero_entropy:
            yield site


def plan(rw: GraphRewriter, site: Site) -> Linearisation | None:
    if not site.kind.exact and not rw.options.approximate:
        rw.record("skip", site.target, f"{site.kind.name} is never exactly linear "
                  "(use --approximate to linearise it; the error is then measured)")
        return None
    st = rw.stats[site.name]
    states = ", ".join(f"{k} {v}" for k, v in st.always().items() if v)
    return Linearisation(site, *site_affine(site, st), states)


def apply(rw: GraphRewriter, p: Linearisation) -> None:
    site, node = p.site, p.site.node
    if bool((p.scale == 1).all() and (p.shift == 0).all()):
        rw.bypass(node, site.input)
        detail = "always ON: identity"
    else:
        affine = ChannelAffine(p.scale.to(rw.dtype), p.shift.to(rw.dtype), site.neuron_axis)
        rw.bypass(node, rw.insert_module(node, affine, site.input, f"{site.target} (linear)"))
        detail = f"per-channel affine ({p.states})"
    rw.record("linearise", site.target, detail)
    rw.linearised.append(site.name)


LINEARISE = Rewrite(
    name="linearise_site",
    pattern="zero-entropy rectifier site -> per-channel affine (identity if always ON)",
    algebra=(site_affine,),
    exactness="exact on inputs where the recorded states hold; smooth rectifiers (GELU, SiLU, ...) "
              "only with --approximate (error measured)",
    tests="tests/fold/test_linearise_site.py",
    match=match, plan=plan, apply=apply)
