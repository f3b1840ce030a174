"""Image decoding of every mode, EXIF orientation and unreadable files; resize policies against hand-worked
and torchvision references."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2

from vrlab.data.images import decode_image, list_images
from vrlab.encoders.base import NORMALIZATIONS, ImageTransform, letterbox_geometry
from vrlab.errors import ImageDecodeError, VrlabError

RGB = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)


def save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgb_roundtrip(tmp_path):
    out = decode_image(save(tmp_path, "a.png", Image.fromarray(RGB)))
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 20)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(RGB))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    image = Image.fromarray(RGB).convert(mode)
    suffix = "jpg" if mode == "CMYK" else ("tif" if mode == "LA" else "png")
    out = decode_image(save(tmp_path, f"a.{suffix}", image))
    expected = np.array(Image.open(tmp_path / f"a.{suffix}").convert("RGB"))
    assert out.shape == (3, 12, 20)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(expected))


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = decode_image(save(tmp_path, "g16.png", Image.fromarray(arr)))
    assert out[:, 0].tolist() == [[0, 100, 255]] * 3


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 270 degrees on display
    out = decode_image(save(tmp_path, "rot.jpg", image, exif=exif, quality=100))
    assert out.shape == (3, 20, 12)


def test_tiny_image(tmp_path):
    out = decode_image(save(tmp_path, "one.png", Image.new("RGB", (1, 1), (10, 20, 30))))
    assert out.flatten().tolist() == [10, 20, 30]
    assert ImageTransform(32)(out).shape == (3, 32, 32)


@pytest.mark.parametrize("pil_tolerates_truncation", [False, True], ids=["pil-default", "lmms-eval-import"])
def test_unreadable_image_names_the_file(tmp_path, monkeypatch, pil_tolerates_truncation):
    # importing lmms-eval turns PIL's LOAD_TRUNCATED_IMAGES on for the whole process; vrlab still refuses
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pil_tolerates_truncation)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        decode_image(bad)
    truncated = save(tmp_path, "cut.png", Image.fromarray(RGB))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_image(truncated)
    assert (
        ImageFile.LOAD_TRUNCATED_IMAGES is pil_tolerates_truncation
    )  # the process's setting is left as it was


def test_list_images_sorted_and_errors(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(VrlabError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(VrlabError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_squash_and_normalisation_match_torchvision_and_pil():
    img = torch.from_numpy(RGB).permute(2, 0, 1).contiguous()
    mean, std = NORMALIZATIONS["clip"]
    ours = ImageTransform(16, resize="squash", mean=mean, std=std)(img)
    ref = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize((16, 16), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.Normalize(mean, std),
        ]
    )(img)
    torch.testing.assert_close(
        ours,
        ref.clamp(
            (0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None],
            (1 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None],
        ),
    )
    # PIL (a different bicubic kernel) agrees to about one grey level on average.
    pil = np.asarray(Image.fromarray(RGB).resize((16, 16), Image.BICUBIC)).astype(np.float32) / 255
    ours_01 = (
        (ours * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).permute(1, 2, 0).numpy()
    )
    assert np.abs(ours_01 - pil).mean() < 3 / 255


def test_center_crop_matches_torchvision():
    img = torch.from_numpy(RGB).permute(2, 0, 1).contiguous()
    ours = ImageTransform(8, resize="center_crop", mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear")(
        img
    )
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(8, antialias=True), v2.CenterCrop(8)])(
        img
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_letterbox_places_the_image_centred_with_fill():
    img = torch.full((3, 10, 20), 255, dtype=torch.uint8)  # white, 2:1
    out = ImageTransform(20, resize="letterbox", mean=(0, 0, 0), std=(1, 1, 1), fill=0.0)(img)
    scale, new_h, new_w, top, left = letterbox_geometry(10, 20, (20, 20))
    assert (scale, new_h, new_w, top, left) == (1.0, 10, 20, 5, 0)
    assert torch.all(out[:, :5] == 0) and torch.all(out[:, 15:] == 0)
    assert torch.allclose(out[:, 5:15], torch.ones(3, 10, 20))


def test_batched_transform_equals_per_image():
    imgs = torch.from_numpy(np.stack([RGB, RGB[::-1]])).permute(0, 3, 1, 2).contiguous()
    t = ImageTransform(16, resize="center_crop")
    torch.testing.assert_close(t(imgs), torch.stack([t(i) for i in imgs]))


def test_bad_policy_names():
    with pytest.raises(VrlabError, match="unknown resize policy"):
        ImageTransform(16, resize="stretch")
