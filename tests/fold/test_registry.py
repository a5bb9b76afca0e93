"""The rewrite registry documents itself: docs/REWRITES.md is generated from it, and every entry
names a pattern, its algebra, its exactness condition and a test file that exists."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from nepenthe_compress.fold import algebra
from nepenthe_compress.fold.rewrites import REWRITES, table

ROOT = Path(__file__).resolve().parents[2]


def test_docs_rewrites_md_is_the_generated_table() -> None:
    doc = (ROOT / "docs" / "REWRITES.md").read_text()
    assert doc == table(), "regenerate: python -m nepenthe_compress.fold.rewrites > docs/REWRITES.md"


def test_the_module_prints_the_table(capsys) -> None:
    runpy.run_module("nepenthe_compress.fold.rewrites", run_name="__main__")
    assert capsys.readouterr().out == table()


@pytest.mark.parametrize("rewrite", REWRITES, ids=lambda r: r.name)
def test_every_rewrite_is_declared_and_tested(rewrite) -> None:
    assert (ROOT / rewrite.tests).is_file(), rewrite.tests
    assert rewrite.tests == f"tests/fold/test_{rewrite.name}.py"
    assert rewrite.pattern and rewrite.exactness
    assert all(callable(f) for f in (rewrite.match, rewrite.plan, rewrite.apply))
    assert f"`{rewrite.name}`" in table() and rewrite.tests in table()
    assert all(f.__module__.startswith("nepenthe_compress.fold") for f in rewrite.algebra)


def test_names_are_unique_and_merges_are_priced() -> None:
    names = [r.name for r in REWRITES]
    assert len(set(names)) == len(names)
    priced = {r.name for r in REWRITES if r.cost}
    assert priced == {"parallel_add", "merge_chains"}
    used = {f for r in REWRITES for f in r.algebra if f.__module__ == algebra.__name__}
    assert {algebra.compose_convs, algebra.add_convs, algebra.affine_then_conv, algebra.conv_then_affine} <= used
