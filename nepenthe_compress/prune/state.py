"""The run's state file: what was configured and which rounds are done, for ``--resume``.

``DIR/prune_state.json`` is rewritten atomically after each round's checkpoint, so an interrupted
run resumes from the last round whose checkpoint and record both exist.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nepenthe_compress.errors import UserError
from nepenthe_compress.io import atomic_write_text

STATE_FILE = "prune_state.json"


class ResumeError(UserError):
    """The output folder cannot be (re)used for this run."""


def state_path(out_dir: Path) -> Path:
    return out_dir / STATE_FILE


def _check_round(r: Any, fields: set[str], path: Path) -> None:
    """A stored round is a record with exactly ``fields`` whose checkpoint is a file of the run folder."""
    if not isinstance(r, dict) or set(r) != fields:
        raise ResumeError(f"cannot resume: '{path}' holds a round that is not a record of {', '.join(sorted(fields))}")
    name = r["checkpoint"]
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ResumeError(f"cannot resume: '{path}' names checkpoint {str(name)[:80]!r}, not a file of the run folder")
    if type(r["round"]) is not int:
        raise ResumeError(f"cannot resume: '{path}' holds a round number that is not an integer")


def read_rounds(out_dir: Path, config: Mapping[str, Any], resume: bool, fields: set[str]) -> list[dict[str, Any]]:
    """Rounds already done in ``out_dir`` (empty for a fresh run), each a record with ``fields``.

    Without ``resume`` the folder must hold no run; with it, the stored ``config`` must equal this one.
    """
    path = state_path(out_dir)
    if not path.exists():
        return []
    if not resume:
        raise ResumeError(f"'{out_dir}' already holds a prune run ({STATE_FILE}); pass --resume to "
                          "continue it or choose another -o folder")
    try:
        stored = json.loads(path.read_text())
        stored_config, rounds = stored["config"], stored["rounds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"cannot resume: '{path}' is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(stored_config, dict) or not isinstance(rounds, list):
        raise ResumeError(f"cannot resume: '{path}' must hold a config record and a list of rounds")
    for r in rounds:
        _check_round(r, fields, path)
    changed = [k for k in sorted({*stored_config, *config}) if stored_config.get(k) != config.get(k)]
    if changed:
        k = changed[0]
        raise ResumeError(f"cannot resume '{out_dir}': it was run with {k}={stored_config.get(k)!r}, "
                          f"not {config.get(k)!r}")
    missing = [r["checkpoint"] for r in rounds if not (out_dir / r["checkpoint"]).is_file()]
    if missing:
        raise ResumeError(f"cannot resume '{out_dir}': checkpoint {missing[0]} is missing")
    return list(rounds)


def write_rounds(out_dir: Path, config: Mapping[str, Any], rounds: list[dict[str, Any]]) -> None:
    atomic_write_text(state_path(out_dir), json.dumps({"config": dict(config), "rounds": rounds}, indent=2) + "\n")
