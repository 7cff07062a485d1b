"""Issue 10: report thumbnails link to files whose names hold spaces, %, #, quotes and <>."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np

from embedstore.report.html import write_report
from embedstore.score.metrics import compute_metrics

NAMES = ["a b%20c.jpg", "it's #1 <b>.jpg", 'q"uote?.jpg']


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.alts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("src", "").endswith(".jpg"):
            self.urls.append(attrs["src"])
            self.alts.append(attrs.get("alt", ""))


def test_thumbnail_links_resolve_to_the_files(tmp_path):
    images = tmp_path / "images"
    (images / "Sea").mkdir(parents=True)
    keys = [f"Sea/{name}" for name in NAMES]
    for key in keys:
        (images / key).write_bytes(b"jpeg")
    classes = ("Forests", "Sea")
    true = ["Sea"] * len(keys)
    predictions = np.zeros(len(keys), dtype=np.int64)  # all wrong: every image is shown
    result = SimpleNamespace(
        experiment=SimpleNamespace(dataset="d", aggregate="prob-mean"), classes=classes, keys=keys,
        true_labels=true, predictions=predictions, top=np.tile([0, 1], (len(keys), 1)),
        top_probabilities=np.tile([0.9, 0.1], (len(keys), 1)),
        metrics=compute_metrics(np.ones(len(keys), dtype=np.int64), predictions, classes),
        models=[SimpleNamespace(label="m <x>", weight=1.0)], notes=[], source_location=str(images))
    page = write_report(result, tmp_path / "report")
    text = page.read_text()
    parser = Links()
    parser.feed(text)
    assert len(parser.urls) == len(keys)
    for url, key in zip(parser.urls, keys):
        assert not re.search(r"[ #?'\"<>]", url), url     # nothing a browser would read as syntax
        assert (page.parent / unquote(url)).resolve() == (images / key).resolve()
    assert sorted(parser.alts) == sorted(keys)             # the text comes back unchanged
    assert "#1 <b>" not in text and "#1 &lt;b&gt;" in text and "m &lt;x&gt;" in text
