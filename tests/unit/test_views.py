"""Views: validation, stable keys, and the PIL path against open_clip's and the seed's transforms."""
from __future__ import annotations

import numpy as np
import pytest

from embedstore.encode.pil_view import PilTransform
from embedstore.errors import SpecError
from embedstore.store.views import View, ViewOptions, parse_triplet


def _image(seed: int = 0, size: tuple[int, int] = (61, 47)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_key_is_stable_and_distinguishes_fields():
    a = View()
    assert a.key == View().key
    keys = {
        a.key,
        View(resize_mode="squash").key,
        View(size=256).key,
        View(interpolation="bilinear").key,
        View(mean=(0.5, 0.5, 0.5)).key,
        View(std=(0.5, 0.5, 0.5)).key,
        View(sharpness=2.0).key,
    }
    assert len(keys) == 7


def test_sharpness_one_is_identity_and_shares_the_key():
    assert View(sharpness=1.0) == View()
    assert View(sharpness=1.0).key == View().key


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"size": 0}, "size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"sharpness": -1.0}, "sharpness"),
    ],
)
def test_invalid_views_name_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field):
        View(**kwargs)


def test_dict_round_trip_and_unknown_field():
    view = View(resize_mode="squash", sharpness=2.3, mean=(0.1, 0.2, 0.3))
    assert View.from_dict(view.to_dict()) == view
    with pytest.raises(SpecError, match="colour"):
        View.from_dict({**view.to_dict(), "colour": 1})


def test_options_override_only_what_is_set():
    base = View(size=336, interpolation="bilinear")
    out = ViewOptions(resize_mode="squash", sharpness=2.0).apply(base)
    assert out == View(resize_mode="squash", size=336, interpolation="bilinear", sharpness=2.0)
    assert ViewOptions.from_mapping({"std": "0.5,0.5,0.5", "weight": 3}).std == (0.5, 0.5, 0.5)


def test_parse_triplet_errors():
    assert parse_triplet("0.1, 0.2,0.3", "--mean") == (0.1, 0.2, 0.3)
    with pytest.raises(SpecError, match="--mean"):
        parse_triplet("0.1,0.2", "--mean")
    with pytest.raises(SpecError, match="--std"):
        parse_triplet("a,b,c", "--std")


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_default_views_equal_open_clip_transform(resize_mode, interpolation):
    """Without sharpening, our PIL path is open_clip's inference transform exactly."""
    import torch
    from open_clip.transform import image_transform

    view = View(resize_mode=resize_mode, size=32, interpolation=interpolation)
    theirs = image_transform(32, is_train=False, mean=view.mean, std=view.std,
                             resize_mode=resize_mode, interpolation=interpolation)
    for seed in range(3):
        img = _image(seed)
        assert torch.equal(PilTransform(view)(img), theirs(img))


@pytest.mark.parametrize("sharpness", [2.0, 2.3])
def test_seed_processor_is_expressible(sharpness):
    """The seed's processor_20/_23: Resize((224,224)) bicubic, CenterCrop, RGB,
    RandomAdjustSharpness(s, p=1), ToTensor, Normalize(OpenAI) == squash view with sharpness."""
    import torch
    from torchvision import transforms as T

    seed_processor = T.Compose([
        T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        lambda im: im.convert("RGB"),
        T.RandomAdjustSharpness(sharpness, p=1),
        T.ToTensor(),
        T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    view = View(resize_mode="squash", size=224, sharpness=sharpness)
    img = _image(1, size=(150, 150))
    ours = PilTransform(view)(img)
    assert torch.equal(ours, seed_processor(img))
    assert not torch.equal(ours, PilTransform(View(resize_mode="squash", size=224))(img))
