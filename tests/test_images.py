"""images.py: every input users send becomes RGB uint8, or one clear ImageInputError; resize modes as users know them."""
import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from lib_controlnet import images
from lib_controlnet.errors import UserError
from lib_controlnet.images import ImageInputError, resize_to_target, to_rgb_array
from lib_controlnet.unit import ResizeMode

PHOTO = skimage.data.chelsea()  # 300x451 RGB cat


def _encode(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def test_rgb_photo_round_trips_through_every_container(tmp_path):
    png = _encode(Image.fromarray(PHOTO))
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode()
    for source in (PHOTO, Image.fromarray(PHOTO), png, bytearray(png), path, b64,
                   "data:image/png;base64," + b64, b64[:40] + "\n" + b64[40:]):
        out = to_rgb_array(source)
        assert out.shape == PHOTO.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, PHOTO)
    assert to_rgb_array(PHOTO) is not PHOTO  # callers' arrays are never handed back to be mutated


def test_strings_are_never_read_as_server_files(tmp_path):
    """Strings come from API clients: a path in one must not read, or reveal the existence of, a server file."""
    (tmp_path / "a.png").write_bytes(_encode(Image.fromarray(PHOTO)))
    messages = []
    for name in ("a.png", "b.png"):  # one exists, one does not: the answers must not tell them apart
        with pytest.raises(ImageInputError) as caught:
            to_rgb_array(str(tmp_path / name))
        messages.append(str(caught.value).replace(name, "NAME"))
    assert messages[0] == messages[1] and "not base64" in messages[0]
    with pytest.raises(ImageInputError, match="not an image"):
        to_rgb_array("/etc/passwd")  # happens to be valid base64; decodes to bytes that are no image


def test_grayscale_and_one_bit_become_three_equal_channels():
    gray = skimage.data.camera()
    for image in (Image.fromarray(gray), Image.fromarray(gray).convert("1")):
        out = to_rgb_array(_encode(image))
        assert out.shape == gray.shape + (3,)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(to_rgb_array(gray)[..., 1], gray)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:2, :, 3] = 255  # top opaque, bottom fully transparent
    rgba[2, :, 3] = 128
    out = to_rgb_array(_encode(Image.fromarray(rgba, "RGBA")))
    assert (out[:2] == (10, 20, 30)).all()
    assert (out[3] == 255).all()
    expected = np.round(np.array([10, 20, 30]) * 128 / 255 + 255 * (1 - 128 / 255))
    np.testing.assert_allclose(out[2, 0], expected, atol=1)
    np.testing.assert_array_equal(to_rgb_array(rgba), out)  # arrays follow the same rule


def test_palette_with_transparency_and_la():
    p = Image.new("P", (3, 3), 0)
    p.putpalette([200, 0, 0] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    assert (to_rgb_array(_encode(p)) == 255).all()
    opaque = Image.new("P", (3, 3), 0)
    opaque.putpalette([200, 0, 0] + [0, 0, 0] * 255)
    assert (to_rgb_array(_encode(opaque)) == (200, 0, 0)).all()
    la = Image.fromarray(np.dstack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 255, np.uint8)]), "LA")
    assert (to_rgb_array(la) == 50).all()


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = to_rgb_array(_encode(Image.fromarray(ramp)))
    np.testing.assert_allclose(out[..., 0], np.round(ramp / 257.0), atol=1)
    assert out.max() > 200  # 63000/257 = 245: clipping at 255 would have made almost all of it white
    np.testing.assert_allclose(to_rgb_array(ramp)[..., 0], np.round(ramp / 257.0), atol=1)


def test_float_arrays_in_unit_range_and_bool_masks():
    np.testing.assert_array_equal(to_rgb_array(np.full((2, 2, 3), 0.5, np.float32)), 128)
    np.testing.assert_array_equal(to_rgb_array(np.ones((2, 2), bool)), 255)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.fromarray(PHOTO).convert("CMYK")
    out = to_rgb_array(_encode(cmyk, "JPEG", quality=95))
    assert out.shape == PHOTO.shape
    assert np.abs(out.astype(int) - PHOTO).mean() < 12


def test_exif_orientation_is_applied():
    image = Image.fromarray(PHOTO)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: viewers turn it 90 degrees clockwise
    out = to_rgb_array(_encode(image, "JPEG", exif=exif, quality=95))
    assert out.shape == (PHOTO.shape[1], PHOTO.shape[0], 3)
    expected = np.rot90(PHOTO, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 8


def test_one_pixel_image():
    out = to_rgb_array(_encode(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert out.shape == (1, 1, 3) and tuple(out[0, 0]) == (1, 2, 3)


def _png_claiming(width, height) -> bytes:
    """A real 8x8 PNG whose header (IHDR, CRC fixed up) claims another size: decoding it would need that much."""
    data = bytearray(_encode(Image.new("RGB", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_enormous_image_is_refused_from_its_header():
    started = time.perf_counter()
    with pytest.raises(ImageInputError, match="too large"):
        to_rgb_array(_png_claiming(60000, 60000))  # 10.8 GB of RGB if it were decoded
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ImageInputError, match=f"too large: {images.MAX_PIXELS // 1000 + 1}x1000"):
        to_rgb_array(_png_claiming(images.MAX_PIXELS // 1000 + 1, 1000))
    with pytest.raises(ImageInputError, match="too large"):
        to_rgb_array(np.broadcast_to(np.uint8(0), (10000, 10000, 3)))


@pytest.mark.parametrize("bad, message", [
    (b"this is not an image", "not an image"),
    (b"", "empty"),
    ("", "empty"),
    ("   ", "empty"),
    (None, "No image"),
    (42, "int"),
    ("data:image/png;base64,@@@not base64@@@", "base64"),
    ("data:text/plain,hello", "not base64-encoded"),
    ("/no/such/file.png", "not base64 image data"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 5), np.uint8), "not an image"),
    (np.zeros((2, 2, 2, 2), np.uint8), "not an image"),
    (_png_claiming(16, 16), "damaged or truncated"),
    (_encode(Image.fromarray(PHOTO))[:300], "damaged or truncated"),
])
def test_bad_inputs_get_one_clear_user_error(bad, message):
    with pytest.raises(ImageInputError, match=message) as info:
        to_rgb_array(bad)
    assert isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_missing_path_object(tmp_path):
    with pytest.raises(ImageInputError, match="No such image file"):
        to_rgb_array(tmp_path / "missing.png")


# ---------------------------------------------------------------- resize modes


def test_just_resize_stretches():
    out = resize_to_target(PHOTO, 200, 100, ResizeMode.RESIZE)
    assert out.shape == (100, 200, 3)


def test_crop_and_resize_covers_then_crops_the_centre():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255  # white centre square, black sides
    out = resize_to_target(img, 64, 64, "Crop and Resize")
    assert out.shape == (64, 64, 3)
    assert out.min() == 255  # the sides were cropped away


def test_resize_and_fill_fits_and_pads_with_the_border_colour():
    img = np.full((100, 200, 3), (10, 200, 30), np.uint8)
    img[40:60, 90:110] = 0
    out = resize_to_target(img, 64, 64, 2)  # old integer index works too
    assert out.shape == (64, 64, 3)
    assert (out[0, 0] == (10, 200, 30)).all() and (out[-1, -1] == (10, 200, 30)).all()
    assert out[28:36, 28:36].min() < 100  # the dark centre survived, scaled to fit


def test_binary_maps_stay_binary_and_2d_maps_stay_2d():
    edges = np.zeros((64, 64), np.uint8)
    edges[::7] = 255
    for mode in ResizeMode:
        out = resize_to_target(edges, 100, 37, mode)
        assert out.shape == (37, 100)
        assert set(np.unique(out)) <= {0, 255}


def test_bad_target_size():
    with pytest.raises(ImageInputError):
        resize_to_target(PHOTO, 0, 10, ResizeMode.RESIZE)


# ---------------------------------------------------------------- masks


def test_decode_mask_from_alpha_or_brightness():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, 3] = 255
    mask = images.decode_mask(Image.fromarray(rgba, "RGBA"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert (mask[:4] == 255).all() and (mask[4:] == 0).all()
    gray = np.zeros((8, 8), np.uint8)
    gray[:, :3] = 200
    mask = images.decode_mask(gray, size=(16, 16))
    assert mask.shape == (16, 16) and (mask[:, :6] == 255).all() and (mask[:, 6:] == 0).all()


def test_split_image_and_mask_from_a_sketch_dict():
    mask = np.zeros(PHOTO.shape[:2], np.uint8)
    image, got = images.split_image_and_mask({"image": PHOTO, "mask": mask})
    assert got is None  # an empty mask means "no mask"
    mask[10:20, 10:20] = 255
    image, got = images.split_image_and_mask({"image": PHOTO, "mask": mask})
    assert got.sum() == 100 * 255
    image, got = images.split_image_and_mask(PHOTO)
    assert got is None and image.shape == PHOTO.shape
