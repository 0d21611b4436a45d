"""Real-mask tier: the real u2netp model (../shared/models/u2netp.onnx) on real CelebA photos.
Skips cleanly where the file is absent."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CELEBA_SHARED, U2NETP
from prep.transforms.decode import decode_image, load_rgb
from prep.transforms.mask import MaskHandler, load_mask
from prep.schemas.records import Sample

pytestmark = pytest.mark.skipif(not U2NETP.is_file(), reason=f"real rembg model not present at {U2NETP}")


@pytest.mark.parametrize("name", ["200426.jpg", "119900.jpg"])
def test_u2netp_keeps_the_face_and_drops_background_corners(name):
    path = CELEBA_SHARED / "img_align_celeba" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    jpeg, width, height = decode_image(path.read_bytes())  # 119900.jpg carries an EXIF rotation
    handler = MaskHandler(str(U2NETP), device="cpu", min_fraction=0.01)
    sample = Sample(key="k", source="celeba", domain="specific", path=str(path), image_jpeg=jpeg, width=width, height=height)
    (result,) = handler.run_inference([sample], handler.load_model())
    png, fraction = result.inference
    mask = np.asarray(load_mask(png)) / 255.0
    h, w = mask.shape
    assert (w, h) == load_rgb(jpeg).size
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    center = mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
    top_corners = [mask[: h // 8, : w // 8].mean(), mask[: h // 8, -(w // 8) :].mean()]
    assert center > 0.95, f"subject not kept: centre foreground {center:.2f}"
    assert max(top_corners) < 0.05, f"background kept: top corners {top_corners}"
    assert 0.3 < fraction < 0.9
