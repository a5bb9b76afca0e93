"""``nepenthe-compress prune``: NEPENTHE/EGP, iterative magnitude pruning or EASIER."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from nepenthe_compress.commands.base import Command, Need, RegistryChoice, RegistryOption
from nepenthe_compress.commands.common import (
    Ui,
    arch_kwargs_option,
    arch_option,
    emit_json,
    force_option,
    json_option,
    output_option,
    ui_options,
    user_errors,
)
from nepenthe_compress.io import OutputError, check_writable

if TYPE_CHECKING:
    from nepenthe_compress.prune import PruneResult, RoundResult

ROUND_FILE = re.compile(r"round_\d+\.pt")
ARCH_NEED = Need("--arch NAME (or --init CKPT)", lambda given: not {"arch", "init"} & given)


def _describe_methods() -> str:
    from nepenthe_compress.prune.catalog import METHOD_SUMMARIES

    return "; ".join(f"{name}: {summary}" for name, summary in METHOD_SUMMARIES.items())


def check_run_folder(out_dir: Path, force: bool) -> None:
    """Before any work: ``out_dir`` can be created and written, and a fresh run replaces no files of an
    earlier one without ``force``. A folder holding a resumable run (its state file) is left to the run
    itself, which continues it with --resume and refuses it otherwise."""
    from nepenthe_compress.prune.run import FINAL_FILE, SUMMARY_FILE
    from nepenthe_compress.prune.state import STATE_FILE

    check_writable([out_dir / STATE_FILE], force=True)
    if not out_dir.is_dir() or (out_dir / STATE_FILE).exists():
        return
    clashes = sorted(p.name for p in out_dir.iterdir()
                     if p.name in (FINAL_FILE, SUMMARY_FILE) or ROUND_FILE.fullmatch(p.name))
    if clashes and not force:
        raise OutputError(f"'{out_dir}' already holds {clashes[0]}, not from a run --resume can continue: "
                          "pass --force to replace its files, or choose another -o folder")


def _round_line(row: RoundResult) -> str:
    return (f"round {row.round:2d}  {row.action}: sparsity {100 * row.sparsity:.2f}%, "
            f"sites removed {row.sites_removed}/{row.sites_total}, top-1 {row.accuracy:.2f}%")


def render(result: PruneResult) -> Table:
    """The papers' table: round, sparsity, method, sites removed k/L, top-1; the kept round starred."""
    table = Table(title=f"prune: {result.out_dir}  ({result.stopped})")
    for name, justify in (("round", "right"), ("method", "left"), ("sparsity %", "right"),
                          ("sites removed", "right"), ("top-1 %", "right"), ("checkpoint", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in result.rounds:
        mark = " *" if row.round == result.selected else ("" if row.within_limit else " (over limit)")
        table.add_row(str(row.round), row.method, f"{100 * row.sparsity:.2f}",
                      f"{row.sites_removed}/{row.sites_total}", f"{row.accuracy:.2f}", row.checkpoint + mark)
    return table


@click.command("prune", cls=Command, needs=[ARCH_NEED])
@arch_option
@arch_kwargs_option
@click.option("--data", required=True, metavar="SRC",
              help="Labelled training data: file.npz/.pt with x and y, an ImageFolder dir, cifar10:ROOT, or 'mnist'.")
@click.option("--method", cls=RegistryOption, type=RegistryChoice("nepenthe_compress.prune.catalog:METHOD_SUMMARIES"),
              default="nepenthe", show_default=True, describe=_describe_methods)
@click.option("--zeta", type=float, default=0.5, show_default=True,
              help="Fraction of the remaining weights removed per round (nepenthe, imp).")
@click.option("--rounds", type=int, default=None, help="Stop after this many pruning rounds.")
@click.option("--target-sparsity", type=float, default=None,
              help="Stop at this fraction of removed weights (nepenthe, imp); the last round is trimmed to hit it.")
@click.option("--max-drop", type=float, default=None, metavar="PTS",
              help="Stop once top-1 falls more than PTS points below the dense model; keep the last round within it.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Dense training epochs (round 0).")
@click.option("--finetune-epochs", type=int, default=None, help="Retraining epochs per round [default: --epochs].")
@click.option("--lr", type=float, default=0.05, show_default=True, help="SGD learning rate (momentum 0.9).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=RegistryChoice("nepenthe_compress.prune.catalog:SCHEDULE_NAMES"), default="cosine",
              show_default=True, help="Learning-rate schedule of each training phase.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Global batch size (split over processes).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=float, default=0.2, show_default=True, help="Fraction of the data held out for top-1.")
@click.option("--limit", type=int, default=None, help="Use at most this many samples.")
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Start from this checkpoint instead of training a dense model (round 0 is not trained).")
@output_option("Output folder for round_XX.pt, final.pt, summary.json [default: prune_<arch>_<method>].", "--out",
               metavar="DIR")
@click.option("--resume", is_flag=True, default=False, help="Continue the run in the output folder.")
@json_option
@force_option
@ui_options
@user_errors
def prune(arch: str | None, arch_kw: dict, data: str, method: str, zeta: float, rounds: int | None,
          target_sparsity: float | None, max_drop: float | None, epochs: int, finetune_epochs: int | None,
          lr: float, weight_decay: float, schedule: str, batch_size: int, seed: int, holdout: float,
          limit: int | None, init: str | None, output: str | None, resume: bool, json_path: str | None,
          force: bool, ui: Ui) -> None:
    """Prune a network round by round, saving a checkpoint per round.

    Round 0 trains the dense model; each later round removes weights (nepenthe, imp) or linearises a
    rectifier site (easier), retrains and evaluates. Runs under torchrun (DistributedDataParallel).
    """
    check_writable([json_path], force)
    from nepenthe_compress.prune import PruneConfig

    default_out = f"prune_{(arch or Path(init or 'init').stem).replace(':', '_').replace('.', '_')}_{method}"
    cfg = PruneConfig(
        data=data, arch=arch, arch_kwargs=arch_kw, method=method, out_dir=Path(output or default_out),
        zeta=zeta, rounds=rounds, target_sparsity=target_sparsity, max_drop=max_drop, epochs=epochs,
        finetune_epochs=finetune_epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
        schedule=schedule, seed=seed, holdout=holdout, limit=limit, init=init, resume=resume, progress=not ui.quiet)
    check_run_folder(cfg.out_dir, force)
    from nepenthe_compress.prune import run_prune
    from nepenthe_compress.prune.run import FINAL_FILE

    result = run_prune(cfg, on_round=lambda row: ui.show(Text(_round_line(row)), json_path))
    if os.environ.get("RANK", "0") == "0":  # torchrun: one report
        ui.show(render(result), json_path)
        ui.show(Text(f"kept round {result.selected}: {cfg.out_dir / FINAL_FILE}"), json_path)
        emit_json(result.to_dict(), json_path)
