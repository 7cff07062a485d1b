"""Encoders: both adapters honour one contract; stored features equal the model's own outputs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from embedstore import Cache, EncoderSpec, ViewOptions, encode_images, encode_prompts
from embedstore.encode.encoders import load_encoder
from embedstore.errors import SpecError

TEXTS = ["a photo of a Glacier.", "a blurry image of the Street", "Sea"]


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def encoder(request):
    spec = request.getfixturevalue("open_clip_spec" if request.param == "open_clip" else "hf_spec")
    return load_encoder(spec, device="cpu")


def _batch(encoder, n=5, seed=0):
    import torch
    from PIL import Image

    from embedstore.encode.pil_view import PilTransform

    rng = np.random.default_rng(seed)
    view = encoder.card.default_view
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([PilTransform(view)(im) for im in images])


def test_encoder_contract(encoder):
    """float32, unit norm, (n, d) with d = card.dim, deterministic, eval mode, no grad."""
    images = encoder.encode_images(_batch(encoder))
    texts = encoder.encode_texts(TEXTS)
    d = encoder.card.dim
    for out, n in ((images, 5), (texts, len(TEXTS))):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert out.shape == (n, d)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(images, encoder.encode_images(_batch(encoder)))
    np.testing.assert_array_equal(texts, encoder.encode_texts(TEXTS))
    assert not encoder.model.training
    # a row does not depend on what else is in the batch
    np.testing.assert_allclose(encoder.encode_texts(TEXTS[:1]), texts[:1], atol=1e-6)
    card = encoder.card
    assert card.weights_digest.startswith("sha256:")
    assert card.default_view.size == 32 and card.default_view.resize_mode == "shortest"
    assert card.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_hf_text_features_match_transformers_directly(hf_spec, tiny_hf_dir):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    enc = load_encoder(hf_spec, device="cpu")
    model = CLIPModel.from_pretrained(tiny_hf_dir).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_hf_dir)
    with torch.no_grad():
        t = tok(TEXTS, padding=True, return_tensors="pt")
        out = model.get_text_features(**t)
        ref = out if isinstance(out, torch.Tensor) else out.pooler_output
        ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(TEXTS), ref, atol=1e-6)


def test_offline_hf_tokenizer_matches_open_clip_ids(tiny_hf_dir, tiny_open_clip_dir):
    from open_clip import get_tokenizer
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tiny_hf_dir)(TEXTS, padding="max_length", max_length=77)["input_ids"]
    theirs = get_tokenizer(f"local-dir:{tiny_open_clip_dir}")(TEXTS)
    for a, b in zip(ours, theirs.tolist()):
        end = a.index(49407) + 1
        assert a[:end] == b[:end]


@pytest.mark.parametrize("which", ["open_clip", "hf"])
def test_stored_features_equal_direct_encode(which, request, image_folder, cache, fast_options):
    """Encoding through the cache equals model.encode_image on the same preprocessed tensors."""
    import torch
    from PIL import Image

    from embedstore.encode.pil_view import PilTransform
    from embedstore.encode.sources import list_source

    spec = request.getfixturevalue(f"{which}_spec")
    view_options = ViewOptions(resize_mode="squash", sharpness=2.0)
    result = encode_images(image_folder, spec, cache, options=fast_options, view_options=view_options)
    assert result.encoded == 24 and result.failed == 0
    rows = cache.open_image_store("scenes", spec, view_options).read()
    source = list_source(image_folder)
    assert rows.keys == [item.key for item in source.items]
    assert rows.labels == [item.label for item in source.items]

    enc = load_encoder(spec, device="cpu")
    transform = PilTransform(result.view)
    batch = torch.stack([transform(Image.open(item.path).convert("RGB")) for item in source.items])
    with torch.no_grad():
        if which == "open_clip":
            ref = enc.model.encode_image(batch)
        else:
            out = enc.model.get_image_features(pixel_values=batch)
            ref = out if isinstance(out, torch.Tensor) else out.pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(rows.features, ref, atol=2e-3)  # float16 storage


def test_text_bank_encodes_only_new_prompts(open_clip_spec, cache):
    first = encode_prompts(TEXTS, open_clip_spec, cache, device="cpu")
    assert (first.new, first.cached) == (3, 0)
    again = encode_prompts(TEXTS + ["new one", "new one"], open_clip_spec, cache, device="cpu")
    assert (again.new, again.cached) == (1, 3)
    enc = load_encoder(open_clip_spec, device="cpu")
    stored = cache.text_bank(open_clip_spec).features_of(TEXTS + ["new one"])
    np.testing.assert_allclose(stored, enc.encode_texts(TEXTS + ["new one"]), atol=1e-6)
    with pytest.raises(KeyError, match="never encoded"):
        cache.text_bank(open_clip_spec).features_of(["never encoded"])


def test_unchanged_store_does_not_load_the_model(open_clip_spec, image_folder, cache, fast_options, monkeypatch):
    encode_images(image_folder, open_clip_spec, cache, options=fast_options)

    def boom(*args, **kwargs):
        raise AssertionError("model loaded although nothing changed")

    monkeypatch.setattr("embedstore.encode.loop.load_encoder", boom)
    again = encode_images(image_folder, open_clip_spec, cache, options=fast_options)
    assert (again.encoded, again.cached) == (0, 24)


def test_changed_weights_are_refused(tmp_path, image_folder, fast_options):
    """Same spec, different weights file: the store's weights digest differs and writing is refused."""
    from embedstore.encode.toy import make_tiny_open_clip
    from embedstore.errors import FingerprintMismatchError

    folder = make_tiny_open_clip(tmp_path / "m", seed=0)
    spec = EncoderSpec(f"local-dir:{folder}")
    cache = Cache(tmp_path / "cache")
    encode_images(image_folder, spec, cache, options=fast_options)
    make_tiny_open_clip(folder, seed=1)
    with pytest.raises(FingerprintMismatchError, match="weights_digest"):
        encode_images(image_folder, spec, cache, options=fast_options)


def test_spec_parsing_and_errors(tmp_path, tiny_open_clip_dir):
    assert EncoderSpec("hf:openai/clip-vit-base-patch32").kind == "hf"
    assert EncoderSpec("ViT-B-32", "laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    a = EncoderSpec(f"local-dir:{tiny_open_clip_dir}")
    assert a.id == EncoderSpec(f"local-dir:{tiny_open_clip_dir}/.").id
    assert EncoderSpec("ViT-B-32").id != EncoderSpec("ViT-B-32", "openai").id
    with pytest.raises(SpecError, match="--pretrained"):
        EncoderSpec(f"local-dir:{tiny_open_clip_dir}", "openai")
    with pytest.raises(SpecError, match="--model"):
        EncoderSpec("")
    with pytest.raises(SpecError, match="not a file and not a known tag"):
        load_encoder(EncoderSpec("ViT-B-32", "no_such_tag"), device="cpu")


def test_remote_code_needs_the_flag(tmp_path, tiny_hf_dir):
    """A model whose config asks for remote code is refused unless --trust-remote-code is given."""
    import json
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(tiny_hf_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "eva_clip_custom"
    cfg["auto_map"] = {"AutoConfig": "configuration_eva.EvaConfig", "AutoModel": "modeling_eva.EvaModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="--trust-remote-code"):
        load_encoder(EncoderSpec(f"hf:{folder}"), device="cpu")


def test_importing_embedstore_stays_light():
    code = "import sys, embedstore; print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("which", ["open_clip", "hf"])
def test_text_only_load_gives_the_same_text_features(which, request):
    spec = request.getfixturevalue(f"{which}_spec")
    full = load_encoder(spec, device="cpu")
    light = load_encoder(spec, device="cpu", card=full.card, text_only=True)
    np.testing.assert_allclose(light.encode_texts(TEXTS), full.encode_texts(TEXTS), atol=1e-6)
    if which == "hf":
        assert not hasattr(light.model, "vision_model")  # only the text tower was loaded
    assert light.card is full.card
