"""`embedstore serve`: the HTTP API through FastAPI's test client, on the toy cache.

Every endpoint, its bad inputs (a 4xx with a message, never a traceback), and that what the page
shows is what `classify` computes: a run's predictions equal a Session run of the same
experiment, and a saved variant is a TOML file that reproduces them.
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from embedstore import Cache  # noqa: E402
from embedstore.encode.loop import prompt_encoder  # noqa: E402
from embedstore.encode.thumbnails import thumbnail  # noqa: E402
from embedstore.score.experiment import load_experiment  # noqa: E402
from embedstore.score.session import Session  # noqa: E402
from embedstore.serve.app import create_app  # noqa: E402
from embedstore.serve.playground import Playground  # noqa: E402


def _image_encoder(cache: Cache):
    from embedstore.encode.image_query import image_vectors

    return lambda spec, store, paths: image_vectors(cache, spec, store, paths, "cpu")


@pytest.fixture(scope="module")
def served(playground_files, tmp_path_factory):
    cache_root, experiment = playground_files
    cache = Cache(cache_root)
    save_dir = tmp_path_factory.mktemp("saved")
    playground = Playground(cache, experiment, prompt_encoder(cache, "cpu"), _image_encoder(cache), thumbnail,
                            save_dir=save_dir)
    with TestClient(create_app(playground)) as client:
        yield client, playground, experiment
    playground.close()


def _variant(client, **changes):
    variant = json.loads(json.dumps(client.get("/api/experiment").json()["variant"]))
    variant.update(changes)
    return variant


def _run(client, variant):
    response = client.post("/api/run", json=variant)
    assert response.status_code == 200, response.text
    return response.json()


def _error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert "Traceback" not in response.text
    return body["error"]


def test_page_and_assets_ship_with_the_package(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text
    for asset in ("static/app.js", "static/app.css"):
        assert client.get("/" + asset).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: offline


def test_experiment_describes_members_classes_and_prompts(served):
    client, _, _ = served
    data = client.get("/api/experiment").json()
    assert data["dataset"] == "scenes" and data["rows"] == 150 and data["labelled"]
    assert len(data["members"]) == 2 and data["thumbnails"] and data["image_search"]
    prompts = data["variant"]["prompts"]
    assert [p["text"] for p in prompts if p["class"] is None] == [
        "a photo of a {}.", "a {} scene.", "{}", "a blurry photo of the {}."]
    assert {"text": "white and blue ice", "class": "Glacier", "on": True} in prompts
    assert data["variant"]["drop_below"] == 0.002 and data["variant"]["weights"] == [0.5, 0.5]


def test_run_equals_a_session_run_of_the_experiment(served, playground_files):
    client, _, experiment = served
    result = _run(client, _variant(client))
    m = result["metrics"]
    assert result["rows"] == 150 and result["prompts"] == 4 * 6 + 1
    assert np.asarray(m["confusion"]).sum() == 150
    cache_root, _ = playground_files
    expected = Session(Cache(cache_root), prompt_encoder(Cache(cache_root), "cpu")).run(load_experiment(experiment))
    assert m["accuracy"] == pytest.approx(expected.metrics.accuracy, abs=2 / 150)
    assert np.abs(np.asarray(m["confusion"]) - expected.metrics.confusion).sum() <= 4


def test_weight_and_drop_changes_move_the_metrics(served):
    client, playground, _ = served
    base = _run(client, _variant(client))
    only_first = _run(client, _variant(client, weights=[1.0, 0.0]))
    drop_most = _run(client, _variant(client, drop_below=0.99))  # rows left with no prompt go to the first class
    print({k: v["metrics"]["accuracy"] for k, v in (("base", base), ("first", only_first), ("drop", drop_most))})
    assert only_first["weights"] == [1.0, 0.0]
    assert drop_most["predicted_counts"][0] > base["predicted_counts"][0]
    assert any("every prompt dropped" in note for note in drop_most["notes"])
    assert base["metrics"]["accuracy"] > drop_most["metrics"]["accuracy"]
    scored = playground.result(only_first["id"])
    assert scored.result.models[1].weight == 0.0


def test_new_template_is_encoded_once(served):
    client, _, _ = served
    variant = _variant(client)
    variant["prompts"].append({"text": "an oil painting of the {}.", "class": None, "on": True})
    first = _run(client, variant)
    again = _run(client, variant)
    assert first["prompts"] == 31 and first["new_prompts"] == 6
    assert again["new_prompts"] == 0


def test_cell_lists_the_images_of_a_confusion_cell(served):
    client, _, _ = served
    result = _run(client, _variant(client))
    confusion = np.asarray(result["metrics"]["confusion"])
    i, j = np.unravel_index(np.argmax(confusion), confusion.shape)
    data = client.post("/api/cell", json={"result": result["id"], "true": int(i), "predicted": int(j)}).json()
    assert data["count"] == confusion[i, j] == len(data["images"])
    for image in data["images"]:
        assert image["label"] == result["classes"][i]
        assert image["top"][0]["class"] == result["classes"][j] and len(image["top"]) == 3
        probs = [t["probability"] for t in image["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5


def test_thumbnails_only_for_stored_keys_and_resized(served):
    from PIL import Image

    client, playground, _ = served
    key = next(iter(playground._keys))
    response = client.get("/api/thumb", params={"key": key, "size": 24})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) <= 24
    _error(client.get("/api/thumb", params={"key": "../exp.toml"}), 404)
    _error(client.get("/api/thumb", params={"key": "/etc/passwd"}), 404)
    _error(client.get("/api/thumb", params={"key": key, "size": 100000}), 422)


def test_neighbours_and_nearest_classes_of_an_image(served):
    client, playground, _ = served
    result = _run(client, _variant(client))
    key = next(iter(playground._keys))
    data = client.post("/api/neighbours", json={"key": key, "k": 5, "result": result["id"]}).json()
    assert len(data["images"]) == 5 and key not in [h["key"] for h in data["images"]]
    scores = [h["score"] for h in data["images"]]
    assert scores == sorted(scores, reverse=True)
    assert len(data["classes"]) == 5 and data["image"]["key"] == key
    _error(client.post("/api/neighbours", json={"key": "nope.jpg"}), 404)


def test_text_and_image_search(served, playground_files):
    client, playground, _ = served
    data = client.post("/api/search", json={"text": "a photo of a Glacier.", "k": 7}).json()
    assert len(data["images"]) == 7 and data["searched"].startswith("exact")
    key = next(iter(playground._keys))
    image = (playground_files[0].parent / "scenes" / key).read_bytes()
    found = client.post("/api/search-image?k=3", content=image, headers={"content-type": "image/jpeg"}).json()
    assert found["images"][0]["key"] == key and found["images"][0]["score"] > 0.99
    _error(client.post("/api/search-image", content=b"not an image"), 400)
    _error(client.post("/api/search", json={"text": ""}), 422)


def test_prompt_table_matches_leaving_each_template_out(served):
    import time

    client, _, _ = served
    variant = _variant(client)
    job = client.post("/api/prompt-table", json=variant).json()
    for _ in range(200):
        if job["status"] != "running":
            break
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    rows = job["result"]["templates"]
    assert [r["template"] for r in rows] == [p["text"] for p in variant["prompts"] if p["class"] is None]
    full = _run(client, variant)["metrics"]["accuracy"]
    assert job["result"]["accuracy"] == pytest.approx(full, abs=2 / 150)
    second = rows[1]
    for p in variant["prompts"]:
        p["on"] = p["text"] != second["template"]
    without = _run(client, variant)["metrics"]["accuracy"]
    assert second["without"] == pytest.approx(without, abs=2 / 150)
    assert second["delta"] == pytest.approx(second["without"] - job["result"]["accuracy"])
    _error(client.get("/api/jobs/unknown"), 404)


def test_save_writes_an_experiment_classify_reproduces(served, playground_files):
    from click.testing import CliRunner

    from embedstore.cli.main import main

    client, playground, _ = served
    cache_root, _ = playground_files
    variant = _variant(client, weights=[0.7, 0.3], drop_below=0.003)
    variant["prompts"][2]["on"] = False
    variant["prompts"].append({"text": "a photo of the {}, seen from afar.", "class": None, "on": True})
    shown = _run(client, variant)
    saved = client.post("/api/save", json={"variant": variant, "name": "better"}).json()
    path = playground.save_dir / "better.toml"
    assert saved["files"] == [str(playground.save_dir / "better.prompts.toml"), str(path)]
    exp = load_experiment(path)
    assert exp.drop_below == 0.003 and [m.weight for m in exp.models] == [0.7, 0.3]
    fresh = Session(Cache(cache_root)).run(exp)
    kept = playground.result(shown["id"]).result
    assert np.allclose(fresh.top_probabilities, kept.top_probabilities, atol=1e-5)
    clear = np.abs(fresh.top_probabilities[:, 0] - fresh.top_probabilities[:, 1]) > 1e-4
    assert np.array_equal(fresh.predictions[clear], kept.predictions[clear])
    log = [json.loads(line) for line in (cache_root / "runs.jsonl").read_text().splitlines()]
    assert log[-1]["experiment_file"] == str(path) and log[-1]["via"] == "serve"
    assert log[-1]["run_id"] == saved["run_id"]
    out = CliRunner().invoke(main, ["classify", str(path), "--cache", str(cache_root), "--no-encode",
                                    "--out", str(playground.save_dir / "p.csv")])
    assert out.exit_code == 0, out.output
    assert f"accuracy {shown['metrics']['accuracy']:.4f}" in out.output
    _error(client.post("/api/save", json={"variant": variant, "name": "better"}), 409)
    _error(client.post("/api/save", json={"variant": variant, "name": "../escape"}), 400)
    names = [v["name"] for v in client.get("/api/variants").json()]
    assert "better" in names


def test_unedited_prompts_save_the_original_prompt_set(served):
    client, playground, _ = served
    saved = client.post("/api/save", json={"variant": _variant(client, weights=[0.2, 0.8]), "name": "plain"}).json()
    assert saved["files"] == [str(playground.save_dir / "plain.toml")]
    assert load_experiment(playground.save_dir / "plain.toml").templates.endswith("prompts.toml")


def test_keep_a_variant_to_go_back_to(served):
    client, _, _ = served
    result = _run(client, _variant(client, weights=[0.9, 0.1]))
    kept = client.post("/api/variants", json={"result": result["id"], "name": "mostly default view"}).json()
    assert kept["variant"]["weights"] == [0.9, 0.1]
    assert kept["metrics"]["accuracy"] == result["metrics"]["accuracy"]
    assert client.get("/api/variants").json()[-1]["name"] == "mostly default view"


@pytest.mark.parametrize("change, status, words", [
    ({"weights": [0.5]}, 400, "weights"),
    ({"weights": [0.0, 0.0]}, 400, "all weights are zero"),
    ({"weights": [-1.0, 1.0]}, 400, "must be >= 0"),
    ({"weights": ["a", 1]}, 422, "weights"),
    ({"scale": -3}, 400, "scale"),
    ({"aggregate": "mean"}, 422, "aggregate"),
    ({"aggregate": "embed-mean"}, 400, "drop_below"),
    ({"drop_below": 1.5}, 400, "drop_below"),
    ({"surprise": 1}, 422, "surprise"),
    ({"prompts": [{"text": "no placeholder", "class": None, "on": True}]}, 400, "placeholder"),
    ({"prompts": [{"text": "a {}", "class": None, "on": False}]}, 400, "every prompt is off"),
    ({"prompts": []}, 422, "prompts"),
])
def test_bad_variants_are_4xx_with_a_message(served, change, status, words):
    client, _, _ = served
    message = _error(client.post("/api/run", json=_variant(client, **change)), status)
    assert words in message


def test_bad_requests_are_4xx_json(served):
    client, _, _ = served
    _error(client.post("/api/run", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _error(client.post("/api/cell", json={"result": "gone", "true": 0, "predicted": 0}), 404)
    result = _run(client, _variant(client))
    _error(client.post("/api/cell", json={"result": result["id"], "true": 0, "predicted": 99}), 400)
    _error(client.get("/api/nothing-here"), 404)


def test_concurrent_runs_keep_each_variant_apart(served):
    client, _, _ = served
    variants = [_variant(client, weights=[w, 1 - w], drop_below=d) for w in (0.0, 0.3, 1.0) for d in (0.001, 0.5)]
    alone = [_run(client, v)["metrics"]["confusion"] for v in variants]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda v: _run(client, v), variants * 2))
    for i, got in enumerate(together):
        assert got["weights"] == pytest.approx(variants[i % len(variants)]["weights"])
        assert got["metrics"]["confusion"] == alone[i % len(variants)]


def test_token_and_host_checks(served):
    _, playground, _ = served
    app = create_app(playground, token="s3cret", allowed_hosts=["127.0.0.1"])
    with TestClient(app, base_url="http://127.0.0.1") as guarded:
        _error(guarded.get("/api/experiment"), 403)
        _error(guarded.get("/api/experiment?token=wrong"), 403)
        assert guarded.get("/?token=s3cret").status_code == 200
        assert guarded.get("/api/experiment").status_code == 200  # the cookie set by the first visit
    with TestClient(app, base_url="http://evil.example") as rebinding:
        assert rebinding.get("/?token=s3cret").status_code == 400


def test_cli_binds_loopback_and_requires_a_token_elsewhere(playground_files, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from embedstore.cli.main import main

    cache_root, experiment = playground_files
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: started.update(app=app, host=host))
    out = CliRunner().invoke(main, ["serve", str(experiment), "--cache", str(cache_root), "--port", "9999"])
    assert out.exit_code == 0, out.output
    assert "http://127.0.0.1:9999/" in out.output and "token" not in out.output and started["host"] == "127.0.0.1"
    out = CliRunner().invoke(main, ["serve", str(experiment), "--cache", str(cache_root), "--host", "0.0.0.0"])
    assert out.exit_code == 0, out.output
    assert "warning" in out.output and "?token=" in out.output
    token = out.output.split("?token=")[1].split()[0]
    with TestClient(started["app"], base_url="http://10.0.0.5") as remote:
        _error(remote.get("/api/experiment"), 403)
        assert remote.get(f"/api/experiment?token={token}").status_code == 200
    out = CliRunner().invoke(main, ["serve", "--cache", str(cache_root / "nothing")])
    assert out.exit_code == 2 and "EXPERIMENT_FILE" in out.output


def test_activity_says_when_prompts_are_being_encoded(playground_files, tmp_path):
    cache_root, experiment = playground_files
    cache = Cache(cache_root)
    seen = []
    real = prompt_encoder(cache, "cpu")

    def encode(texts, spec, digest):
        seen.append(playground.activity.snapshot())
        return real(texts, spec, digest)

    playground = Playground(cache, experiment, encode, save_dir=tmp_path)
    try:
        with TestClient(create_app(playground)) as client:
            assert client.get("/api/activity").json() == {"busy": False}
            variant = _variant(client)
            variant["prompts"].append({"text": "a watercolour of the {}, seen at dusk.", "class": None, "on": True})
            assert _run(client, variant)["new_prompts"] == 6
            assert client.get("/api/activity").json() == {"busy": False}
    finally:
        playground.close()
    assert len(seen) == 1 and seen[0]["busy"] and "encoding 6 new prompt(s)" in seen[0]["what"]


def test_a_bug_is_a_json_500_and_large_uploads_are_413(served, monkeypatch):
    import embedstore.serve.app as app_module

    client, playground, _ = served

    def broken():
        raise RuntimeError("internal detail")

    monkeypatch.setattr(playground, "describe", broken)
    with TestClient(create_app(playground), raise_server_exceptions=False) as fresh:
        message = _error(fresh.get("/api/experiment"), 500)
    assert "bug" in message and "internal detail" not in message
    monkeypatch.setattr(app_module, "MAX_UPLOAD", 1000)
    _error(client.post("/api/search-image", content=b"x" * 5000), 413)
