"""Stage 2 never loads stage 1: in a fresh interpreter, a synthetic cache, a classify session, a tune
objective, text and key queries and a prediction file leave torch, PIL and embedstore.encode unimported.

The import rules themselves are checked statically by import-linter (setup.cfg, run in .ci/run); this
test checks what actually gets imported at run time, function-local imports included.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np
    import embedstore
    from embedstore.report.predictions import write_predictions
    from embedstore.score.experiment import experiment_from_mapping
    from embedstore.score.prompts import expand, load_prompt_set
    from embedstore.score.query import class_vectors, key_vectors, nearest_classes, nearest_images, text_vectors
    from embedstore.score.session import Session
    from embedstore.score.synthetic import FakeEncoder, write_synthetic_cache
    from embedstore.search.index import StoreIndex
    from embedstore.tune.study import Objective

    root = Path(sys.argv[1])
    classes = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
    a, b = FakeEncoder("a", 24, 1.0), FakeEncoder("b", 16, 0.7, shift=2)
    cache = embedstore.Cache(root / "cache")
    keys = write_synthetic_cache(cache, "scene", [a, b], classes, per_class=20, noise=2.0,
                                 prompt_set=load_prompt_set("ajou-2024"))
    exp = experiment_from_mapping({
        "dataset": "scene", "classes": classes, "templates": "ajou-2024", "aggregate": "prob-mean", "scale": 60.0,
        "validation": {"fraction": 0.25, "seed": 0},
        "models": [{"model": str(a.spec), "weight": 0.6}, {"model": str(b.spec), "weight": 0.4}]})
    result = Session(cache).run(exp)
    objective = Objective(cache, exp)
    tuned = objective.evaluate([0.5, 0.5], 50.0, None)
    store = cache.open_image_store("scene", a.spec)
    index = StoreIndex.exact(store)
    hits = nearest_images(index, text_vectors(cache, a.spec, store, expand(load_prompt_set("ajou-2024"), classes).texts[:1]), 3)
    own = key_vectors(store, keys[:2])
    near = nearest_images(index, own, 2, exclude=keys[:2])
    ranking = nearest_classes(class_vectors(cache, a.spec, store, classes, "ajou-2024"), own, keys[:2])
    out = write_predictions(result, root / "predictions.csv")
    print(json.dumps({
        "accuracy": result.metrics.accuracy, "tuned": tuned, "hits": len(hits[0]), "near": len(near[0]),
        "ranked": len(ranking.keys), "written": Path(out).is_file(),
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip",
                                                                        "transformers", "PIL")
                         or m.startswith("embedstore.encode") or m.startswith("embedstore.cli")),
    }))
''')


def test_stage_two_runs_without_loading_stage_one(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [], f"stage 2 imported {report['loaded']}"
    # the run did real work: predictions better than chance, every query answered, a file written
    assert report["accuracy"] > 1 / 6 and 0 <= report["tuned"] <= 1
    assert report["hits"] == 3 and report["near"] == 2 and report["ranked"] == 2 and report["written"]
