"""Issue 10: one documented contract for feature norms. Store.read returns the stored values
(float16: unit within 2**-11; float32: unit to float32 precision); everything computed from them,
export included, renormalises each row in float32, so export equals unit_rows(Store.read())."""
from __future__ import annotations

import numpy as np

from embedstore import Cache
from embedstore.encode.loop import EncodeOptions, encode_images
from embedstore.store.export import export_features
from embedstore.store.store import UNIT_NORM_TOLERANCE
from embedstore.util.arrays import unit_rows


def test_read_returns_stored_values_and_export_the_unit_rows(tmp_path, image_folder, open_clip_spec):
    cache = Cache(tmp_path / "c")
    for dtype in ("float16", "float32"):
        options = EncodeOptions(device="cpu", workers=0, batch_size=8, progress=False, dtype=dtype)
        encode_images(image_folder, open_clip_spec, cache, dataset=f"d-{dtype}", options=options)
    half = cache.open_image_store("d-float16", open_clip_spec)
    full = cache.open_image_store("d-float32", open_clip_spec)
    h, f = half.read().features, full.read().features
    h_err = np.abs(np.linalg.norm(h.astype(np.float64), axis=1) - 1)
    f_err = np.abs(np.linalg.norm(f.astype(np.float64), axis=1) - 1)
    assert h_err.max() <= UNIT_NORM_TOLERANCE
    assert h_err.max() > 1e-6            # read is not renormalised: the float16 rounding is still there
    assert f_err.max() <= 1e-6
    np.testing.assert_array_equal(h, half.read(as_float32=False).features.astype(np.float32))
    export_features(half, tmp_path / "out")
    exported = np.load(tmp_path / "out" / "features.npy")
    np.testing.assert_allclose(exported, unit_rows(h), rtol=0, atol=1e-7)
    assert np.abs(np.linalg.norm(exported.astype(np.float64), axis=1) - 1).max() <= 1e-6
