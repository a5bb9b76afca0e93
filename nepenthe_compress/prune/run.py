"""The prune loop (docs/DESIGN.md 3): round 0 trains the dense model, each later round applies one method
step (linearise sites, remove weights), retrains, evaluates and measures entropy. Every round is
saved as ``DIR/round_XX.pt`` (this tool's checkpoint format) and recorded in the state file, so a
run resumes after an interruption; the end writes ``DIR/summary.json`` and ``DIR/final.pt`` (the
last round within ``max_drop``). Under torchrun every process runs this; rank 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import load_checkpoint, save_checkpoint
from nepenthe_compress.data import load_data, split
from nepenthe_compress.errors import DataError, UserError, first_line
from nepenthe_compress.io import atomic_path, atomic_write_text
from nepenthe_compress.prune.dist import DistContext, distributed_context
from nepenthe_compress.prune.layers import considered_layers, materialise
from nepenthe_compress.prune.masks import full_masks, layer_sparsity, prune_smallest
from nepenthe_compress.prune.methods import METHODS, MethodOptions, PruneState, target_reached
from nepenthe_compress.prune.state import read_rounds, write_rounds
from nepenthe_compress.prune.train import SCHEDULES, TrainConfig, evaluate, measure, train
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import trace_model

SUMMARY_FILE = "summary.json"
FINAL_FILE = "final.pt"


class PruneConfigError(UserError):
    """The prune options are inconsistent or do not fit the model / data."""


@dataclass(frozen=True)
class PruneConfig:
    data: str
    arch: str | None = None                  # None: taken from ``init``
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "nepenthe"
    out_dir: Path = Path("prune_out")
    zeta: float = 0.5
    rounds: int | None = None
    target_sparsity: float | None = None
    max_drop: float | None = None            # top-1 points below the dense model
    epochs: int = 10                         # dense training (round 0)
    finetune_epochs: int | None = None       # per later round; None: ``epochs``
    lr: float = 0.05
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "cosine"
    seed: int = 0
    holdout: float = 0.2
    limit: int | None = None
    init: str | None = None                  # start from this checkpoint (round 0 is not trained)
    resume: bool = False
    progress: bool = False

    # what may differ when a run is resumed: when to stop, and how to show it
    RUN_FIELDS = ("out_dir", "rounds", "target_sparsity", "max_drop", "resume", "progress")

    def identity(self) -> dict[str, Any]:
        """The options that define the run (compared on ``--resume``), JSON-like."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_FIELDS}

    def validate(self) -> None:
        method = METHODS.get(self.method)
        problems = [
            (method is None, f"unknown method '{self.method}' (choose {', '.join(METHODS)})"),
            (self.arch is None and self.init is None, "give --arch (or --init with a checkpoint)"),
            (not 0.0 < self.zeta < 1.0, f"--zeta must be in (0, 1), got {self.zeta}"),
            (self.target_sparsity is not None and not 0.0 < self.target_sparsity < 1.0,
             f"--target-sparsity must be in (0, 1), got {self.target_sparsity}"),
            (method is not None and not method.prunes_weights and self.target_sparsity is not None,
             f"--target-sparsity does not apply to {self.method} (it removes sites, not weights)"),
            (method is not None and method.prunes_weights and
             (self.rounds, self.target_sparsity, self.max_drop) == (None, None, None),
             f"{self.method} needs a stop: give --rounds, --target-sparsity or --max-drop"),
            (self.rounds is not None and self.rounds < 0, f"--rounds must be >= 0, got {self.rounds}"),
            (self.max_drop is not None and self.max_drop < 0, f"--max-drop must be >= 0, got {self.max_drop}"),
            (self.epochs < 0 or (self.finetune_epochs or 0) < 0, "epochs must be >= 0"),
            (self.lr <= 0, f"--lr must be > 0, got {self.lr}"),
            (self.batch_size < 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.schedule not in SCHEDULES, f"unknown schedule '{self.schedule}' (choose {', '.join(SCHEDULES)})"),
        ]
        for bad, message in problems:
            if bad:
                raise PruneConfigError(message)

    @property
    def retrain_epochs(self) -> int:
        return self.epochs if self.finetune_epochs is None else self.finetune_epochs

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                           schedule=self.schedule)


@dataclass
class RoundResult:
    round: int
    method: str
    action: str
    sparsity: float           # fraction of considered weights removed
    sites_removed: int        # linearised + zero-entropy sites (what fold can remove)
    sites_total: int
    accuracy: float           # top-1 % on the held-out split
    loss: float | None        # last training epoch's mean loss (None: not trained)
    linearised: list[str]
    zero_entropy: list[str]
    checkpoint: str           # file name in the output folder
    within_limit: bool        # top-1 within max_drop of the dense model


@dataclass
class PruneResult:
    config: dict[str, Any]
    rounds: list[RoundResult]
    selected: int             # the round kept (final.pt)
    stopped: str              # why the run ended
    out_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "selected": self.selected, "final": FINAL_FILE,
                "stopped": self.stopped, "rounds": [dataclasses.asdict(r) for r in self.rounds]}


def run_prune(cfg: PruneConfig, on_round: Callable[[RoundResult], None] | None = None) -> PruneResult:
    """Run (or resume) a pruning run; ``on_round`` sees each finished round (rank 0 only)."""
    cfg.validate()
    with distributed_context() as ctx:
        return _Runner(cfg, ctx, on_round or (lambda row: None)).run()


def _calib_spec(src: str) -> str:
    """The data spec as later commands should read it (absolute when it is a path)."""
    return str(Path(src).resolve()) if Path(src).exists() else src


class _Runner:
    def __init__(self, cfg: PruneConfig, ctx: DistContext, on_round: Callable[[RoundResult], None]) -> None:
        self.cfg, self.ctx, self.on_round = cfg, ctx, on_round
        self.out = Path(cfg.out_dir)
        done = read_rounds(self.out, cfg.identity(), cfg.resume, {f.name for f in dataclasses.fields(RoundResult)})
        self.rows = [RoundResult(**r) for r in done]
        ds = load_data(cfg.data, limit=cfg.limit)
        if ds.y is None:
            raise DataError(f"data {cfg.data!r} has no labels (y); prune trains, so it needs them")
        self.train_set, self.test_set = split(ds, cfg.holdout, seed=cfg.seed)
        if min(len(self.train_set), len(self.test_set)) < ctx.world:
            raise PruneConfigError(f"too few samples ({len(ds)}) for {ctx.world} processes")
        self.input_shape = list(ds.x.shape[1:])
        self.method = METHODS[cfg.method]
        self.opts = MethodOptions(cfg.zeta, cfg.target_sparsity)
        self.arch, self.arch_kwargs = cfg.arch, dict(cfg.arch_kwargs)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> PruneResult:
        if self.rows:
            state = self._restore(self.out / self.rows[-1].checkpoint)
        else:
            state = self._start()
            epochs = 0 if self.cfg.init else self.cfg.epochs
            loss = self._train(state, epochs, 0, "dense")
            self._finish_round(state, 0, f"initial weights from {self.cfg.init}" if self.cfg.init
                               else f"dense training ({epochs} epochs)", loss)
        stopped = self._stop_reason(state)
        while stopped is None:
            r = len(self.rows)
            step = self.method.step(state, self.opts)
            if step is None:
                stopped = "nothing left to remove"
                break
            if step.linearise:
                state.linearised = [*state.linearised, *step.linearise]
                state.gm = materialise(self.arch, self.arch_kwargs, state.gm.state_dict(), state.linearised,
                                       self._user_arch)
            params = dict(state.gm.named_parameters())
            for name, k in step.prune.items():
                state.masks[name] = prune_smallest(params[name], state.masks[name], k)
            loss = self._train(state, self.cfg.retrain_epochs, r, f"round {r}")
            self._finish_round(state, r, step.action, loss)
            stopped = self._stop_reason(state)
        return self._summarise(stopped)

    def _train(self, state: PruneState, epochs: int, r: int, desc: str) -> float | None:
        return train(state.gm, self.train_set.x, self.train_set.y, epochs, self.cfg.train_config, self.ctx,
                     state.masks, seed=self.cfg.seed + r, progress=self.cfg.progress, desc=desc)

    def _stop_reason(self, state: PruneState) -> str | None:
        cfg, last = self.cfg, self.rows[-1]
        if not last.within_limit:
            return f"top-1 fell more than {cfg.max_drop} points below the dense model"
        if cfg.rounds is not None and last.round >= cfg.rounds:
            return f"reached {cfg.rounds} round(s)"
        if self.method.prunes_weights and cfg.target_sparsity is not None and target_reached(state, self.opts):
            return f"reached the target sparsity {cfg.target_sparsity:g}"
        return None

    # ---- model state -----------------------------------------------------------------------

    @property
    def _user_arch(self) -> bool:
        """The architecture is the one the user named (so ``package.module:callable`` may be imported)."""
        return self.cfg.arch is not None and self.arch == self.cfg.arch

    def _start(self) -> PruneState:
        torch.manual_seed(self.cfg.seed)
        if self.cfg.init is None:
            model = build_model(self.arch, allow_import=self._user_arch, **self.arch_kwargs)
            return self._state(model.state_dict(), [], {})
        ck = load_checkpoint(self.cfg.init, arch=self.cfg.arch, arch_kwargs=self.arch_kwargs or None)
        self.arch, self.arch_kwargs = ck.arch, ck.arch_kwargs
        sd = ck.model.state_dict()
        state = self._state(sd, list(ck.meta.get("linearised_sites", [])), ck.masks)
        for name in state.considered:   # weights that are exactly zero count as pruned
            state.masks[name] &= sd[name] != 0
        return state

    def _restore(self, path: Path) -> PruneState:
        ck = load_checkpoint(path, arch=self.cfg.arch)
        self.arch, self.arch_kwargs = ck.arch, ck.arch_kwargs
        state = self._state(ck.model.state_dict(), list(ck.meta.get("linearised_sites", [])), ck.masks)
        state.report = measure(state.gm, self.train_set.x, self.cfg.batch_size, self.ctx)
        return state

    def _state(self, sd: dict, linearised: list[str], masks: dict) -> PruneState:
        original = trace_model(build_model(self.arch, allow_import=self._user_arch, **self.arch_kwargs))
        sites = find_sites(original)
        self.sites_total = len(sites)
        gm = materialise(self.arch, self.arch_kwargs, sd, linearised, self._user_arch)
        self._check_fit(gm)
        layer_sites = considered_layers(original, sites)
        all_masks = full_masks(gm, layer_sites)
        for name, m in masks.items():   # masks of other layers are kept (and respected) as well
            all_masks[name] = all_masks[name] & m if name in all_masks else m.clone()
        return PruneState(gm, all_masks, linearised, layer_sites)

    def _check_fit(self, gm: torch.nn.Module) -> None:
        x, y = self.train_set.x[:2], self.train_set.y
        try:
            with torch.no_grad():
                out = gm.eval()(x)
        except RuntimeError as e:
            first = first_line(e)
            raise PruneConfigError(f"'{self.arch}' does not accept inputs of shape {tuple(x.shape[1:])}: "
                                   f"{first} (set --arch-kw in_channels=...)") from None
        if out.ndim != 2 or out.shape[1] <= int(y.max()):
            raise PruneConfigError(f"'{self.arch}' gives outputs of shape {tuple(out.shape[1:])} but the labels "
                                   f"go up to {int(y.max())} (set --arch-kw num_classes=...)")

    # ---- bookkeeping -----------------------------------------------------------------------

    def _finish_round(self, state: PruneState, r: int, action: str, loss: float | None) -> None:
        accuracy = evaluate(state.gm, self.test_set.x, self.test_set.y, self.cfg.batch_size, self.ctx)
        state.report = measure(state.gm, self.train_set.x, self.cfg.batch_size, self.ctx)
        zero = [s.name for s in state.report.zero_entropy_sites]
        dense = accuracy if r == 0 else self.rows[0].accuracy
        row = RoundResult(
            round=r, method=self.cfg.method, action=action, sparsity=state.sparsity(),
            sites_removed=len(state.linearised) + len(zero), sites_total=self.sites_total,
            accuracy=accuracy, loss=loss, linearised=list(state.linearised), zero_entropy=zero,
            checkpoint=f"round_{r:02d}.pt",
            within_limit=r == 0 or self.cfg.max_drop is None or accuracy >= dense - self.cfg.max_drop)
        if self.ctx.main:
            save_checkpoint(self.out / row.checkpoint, state.gm, self.arch, self.arch_kwargs, state.masks,
                            self._meta(state, row, dense))
            write_rounds(self.out, self.cfg.identity(), [dataclasses.asdict(x) for x in [*self.rows, row]])
        self.ctx.barrier()
        self.rows.append(row)
        if self.ctx.main:
            self.on_round(row)

    def _meta(self, state: PruneState, row: RoundResult, dense: float) -> dict[str, Any]:
        considered = {k: v for k, v in layer_sparsity(state.masks).items() if k in state.considered}
        return {
            "method": row.method, "round": row.round, "action": row.action,
            "sparsity": row.sparsity, "layer_sparsity": considered,
            "accuracy": row.accuracy, "dense_accuracy": dense, "loss": row.loss,
            "entropy": {s.name: s.entropy for s in state.report.sites},
            "zero_entropy_sites": row.zero_entropy, "linearised_sites": row.linearised,
            "sites_total": row.sites_total, "sites_removed": row.sites_removed,
            "calib": _calib_spec(self.cfg.data), "normalize": None, "input_shape": self.input_shape,
            "train_samples": len(self.train_set), "holdout_samples": len(self.test_set),
            "zeta": self.cfg.zeta, "seed": self.cfg.seed,
        }

    def _summarise(self, stopped: str) -> PruneResult:
        selected = max(r.round for r in self.rows if r.within_limit)
        result = PruneResult(self.cfg.identity(), self.rows, selected, stopped, self.out)
        if self.ctx.main:
            with atomic_path(self.out / FINAL_FILE) as tmp:
                shutil.copyfile(self.out / self.rows[selected].checkpoint, tmp)
            atomic_write_text(self.out / SUMMARY_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
        self.ctx.barrier()
        return result
