"""Issue 10 item 4: a stale index never answers with a row the store no longer has."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.cli.main import main
from embedstore.search.index import IndexOptions, build_index, open_index
from tests.integration.test_index import D, make_store


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_deleted_rows_never_come_back_from_a_stale_index(tmp_path, kind):
    store = make_store(tmp_path / "s")
    build_index(store, IndexOptions(kind=kind, recall_target=0.9))
    gone = "c0/img0.jpg"
    vector = store.features_of([gone])
    with store.writer({"kind": "images", "encoder": {"id": "fake"}}, D, "float16") as w:
        w.drop([gone])
        w.add(["c0/new0.jpg"], vector, ["c0"])  # the image moved: same vector, new key
    index, staleness = open_index(store)
    assert staleness.stale and (staleness.added, staleness.removed) == (1, 1)
    assert not index.saved  # the stale saved index does not answer
    scores, ids = index.search(vector / np.linalg.norm(vector), 5)
    found = [index.rows.keys[i] for i in ids[0]]
    assert gone not in found and found[0] == "c0/new0.jpg"
    assert set(index.rows.keys) == set(store.read_keys_labels().keys)
    # once rebuilt, the saved index answers again
    build_index(store, IndexOptions())
    index, staleness = open_index(store)
    assert index.saved and not staleness.stale
    _, ids = index.search(vector / np.linalg.norm(vector), 1)
    assert index.rows.keys[ids[0, 0]] == "c0/new0.jpg"


def test_query_after_a_move_names_only_live_rows(tmp_path, image_folder, tiny_open_clip_dir):
    cache = str(tmp_path / "c")
    model = ["--model", f"local-dir:{tiny_open_clip_dir}", "--cache", cache]
    runner = CliRunner()

    def cli(*args: str):
        result = runner.invoke(main, list(args))
        assert result.exit_code == 0, result.output
        return result

    cli("encode", str(image_folder), *model, "--device", "cpu", "--workers", "0", "--no-progress")
    cli("index", "build", "--dataset", "scenes", *model)
    shutil.copy(image_folder / "Sea" / "img1.jpg", image_folder / "Sea" / "new1.jpg")
    (image_folder / "Sea" / "img1.jpg").unlink()
    cli("encode", str(image_folder), *model, "--device", "cpu", "--workers", "0", "--no-progress")
    out = cli("query", "--dataset", "scenes", *model, "--key", "Sea/new1.jpg", "-k", "23", "--json")
    assert "stale" in out.stderr and "exactly" in out.stderr
    payload = json.loads(out.stdout)
    hits = [h["key"] for h in payload["queries"][0]["hits"]]
    assert "Sea/img1.jpg" not in hits and len(hits) == 23 and "Sea/new1.jpg" not in hits  # itself left out
    assert payload["index"] == "exact search (the saved index is stale)"
