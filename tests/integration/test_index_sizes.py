"""Issue 10: index kinds that need training refuse too-small stores clearly, and a build that
misses its recall target says so."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from embedstore.errors import SpecError
from embedstore.search import ann as search
from embedstore.search.index import IndexOptions, build_index
from tests.integration.test_index import make_store


@pytest.mark.parametrize("factory, need", [
    ("Flat", 0), ("HNSW32", 0), ("IVF64,Flat", 64), ("IVF1,PQ32x8", 256), ("IVF16,PQ8", 256),
    ("IVF512,PQ8x4", 512), ("IVF4,PQ8x4", 16),
])
def test_training_rows_needed(factory, need):
    assert search.training_rows_needed(factory)[0] == need


def test_pq_on_a_small_store_names_the_size_it_needs(tmp_path):
    store = make_store(tmp_path / "s", n=125)
    with pytest.raises(SpecError) as err:
        build_index(store, IndexOptions(kind="pq"))
    message = str(err.value)
    assert "needs at least 256 rows to train" in message and "the store has 125" in message
    assert "--kind flat" in message


def test_holdout_shrinks_so_that_pq_can_train(tmp_path):
    store = make_store(tmp_path / "s", n=270)  # 27 would be held out; 270 - 27 < 256
    index, report = build_index(store, IndexOptions(kind="pq"))
    assert report.tuning["sample"] == 270 - 256 and index.rows.n_live == 270


def test_missed_recall_target_is_reported(tmp_path, toy_cache, toy_clip_dir):
    from embedstore.cli.main import main

    out = CliRunner().invoke(main, ["index", "build", "--dataset", "scenes", "--model", f"local-dir:{toy_clip_dir}",
                                    "--cache", str(toy_cache.root), "--kind", "IVF4,PQ2x4"])
    assert out.exit_code == 0, out.output
    assert "below the target 0.95" in out.stderr and "--kind ivf or flat" in out.stderr
    ok = CliRunner().invoke(main, ["index", "build", "--dataset", "scenes", "--model", f"local-dir:{toy_clip_dir}",
                                   "--cache", str(toy_cache.root), "--kind", "flat"])
    assert ok.exit_code == 0 and "below the target" not in ok.stderr
