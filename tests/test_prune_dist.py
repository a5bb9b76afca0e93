"""Two gloo processes give exactly one process's entropy counts and accuracy; DDP training and a
whole prune run work across processes."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nepenthe_compress.checkpoint import load_checkpoint
from nepenthe_compress.prune import PruneConfig, run_prune
from nepenthe_compress.prune.dist import DistContext, distributed_context
from nepenthe_compress.prune.masks import full_masks
from nepenthe_compress.prune.train import TrainConfig, evaluate, measure, train
from nepenthe_compress.trace import trace_model

N = 37  # odd: the two shards differ in size, nothing may be padded or dropped


def tiny_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_channels, 3, 3, stride=4), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, num_classes))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 1, 12, 12, generator=g), torch.randint(0, 10, (N,), generator=g)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with distributed_context() as ctx:
            assert (ctx.rank, ctx.world) == (rank, world)
            x, y = _data()
            gm = trace_model(tiny_net())
            report = measure(gm, x, 5, ctx)
            acc = evaluate(gm, x, y, 4, ctx)
            model = tiny_net()
            masks = full_masks(model, ["0", "5"])
            masks["5.weight"][:, :3] = False
            train(model, x, y, 2, TrainConfig(batch_size=8), ctx, masks, seed=0)
            torch.save({"counts": [s.counts for s in report.sites], "samples": report.samples, "acc": acc,
                        "params": {k: v.detach() for k, v in model.state_dict().items()}}, f"{out}/rank{rank}.pt")
            cfg = PruneConfig(data="mnist", arch="test_prune_dist:tiny_net", method="nepenthe",
                              out_dir=f"{out}/run", rounds=2, epochs=1, limit=64, batch_size=16)
            run_prune(cfg)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    x, y = _data()
    gm = trace_model(tiny_net())
    single = measure(gm, x, 5, DistContext(device=torch.device("cpu")))
    for two, one in zip(r0["counts"], single.sites):
        assert two.dtype.name == "int64" and (two == one.counts).all()
    assert r0["samples"] == r1["samples"] == N
    # independent reference: count z > 0 per neuron with a plain forward pass
    net = tiny_net().eval()
    with torch.no_grad():
        z_conv = net[:2](x)                       # (N, 3, H, W): neuron axis 1
        z_fc = net[:6](x)                         # (N, 6)
    on_conv = (z_conv > 0).sum(dim=(0, 2, 3))
    assert r0["counts"][0][:, 1].tolist() == on_conv.tolist()
    assert r0["counts"][0].sum(1).tolist() == [N * z_conv.shape[2] * z_conv.shape[3]] * 3
    assert r0["counts"][1][:, 1].tolist() == (z_fc > 0).sum(0).tolist()
    with torch.no_grad():
        ref_acc = 100.0 * float((net(x).argmax(1) == y).sum()) / N
    assert r0["acc"] == r1["acc"] == ref_acc

    # DDP kept both replicas identical and the masked weights at zero
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert (r0["params"]["5.weight"][:, :3] == 0).all() and (r0["params"]["5.weight"][:, 3:] != 0).all()

    # a whole prune run under 2 processes: rank 0 wrote every round, the files load and agree
    for r in range(3):
        ck = load_checkpoint(tmp_path / "run" / f"round_{r:02d}.pt", arch="test_prune_dist:tiny_net")
        assert ck.meta["round"] == r
        zeros = sum(int((~m).sum()) for m in ck.masks.values())
        assert abs(ck.meta["sparsity"] - zeros / sum(m.numel() for m in ck.masks.values())) < 1e-12
    assert (tmp_path / "run" / "summary.json").is_file()
