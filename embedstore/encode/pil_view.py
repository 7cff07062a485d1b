"""A view applied to a decoded PIL image on the CPU: the model input tensor (torchvision, open_clip).

The device twin is :class:`embedstore.encode.tensor_view.TensorView`; what a view *is* (the settings
stored in fingerprints) is :class:`embedstore.store.views.View`.
"""
from __future__ import annotations

from typing import Any

from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
from PIL import ImageEnhance
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from embedstore.store.views import View

__all__ = ["PilTransform"]


class PilTransform:
    """Picklable callable: RGB PIL image -> normalised float32 tensor (3, size, size).

    Steps, in order: resize (and crop or pad) per ``resize_mode``; RGB conversion; sharpening
    (PIL ``ImageEnhance.Sharpness``) when ``view.sharpness`` is set; to-tensor; normalise. For the
    default views this is step for step what ``open_clip``'s inference transform does.
    """

    def __init__(self, view: View):
        self.view = view

    def geometry(self, image: Any) -> Any:
        """Resize and crop/pad a PIL image as the view says (returns a PIL image)."""
        view = self.view
        mode = InterpolationMode(view.interpolation)
        if view.resize_mode == "squash":
            return TF.resize(image, [view.size, view.size], interpolation=mode)
        if view.resize_mode == "shortest":
            image = TF.resize(image, view.size, interpolation=mode)
            return TF.center_crop(image, [view.size, view.size])
        image = ResizeKeepRatio(view.size, longest=1, interpolation=mode)(image)
        return CenterCropOrPad(view.size, fill=0)(image)

    def to_pil(self, image: Any) -> Any:
        """Geometry, RGB and sharpening: the uint8 image the model input is made from."""
        image = self.geometry(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.view.sharpness is not None:
            image = ImageEnhance.Sharpness(image).enhance(self.view.sharpness)
        return image

    def __call__(self, image: Any) -> Any:
        tensor = TF.to_tensor(self.to_pil(image))
        return TF.normalize(tensor, list(self.view.mean), list(self.view.std))
