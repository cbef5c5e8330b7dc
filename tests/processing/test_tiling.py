"""Tests for nvlm_jax.processing.tiling: grid choice, pixel values, real-world files."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nvlm_jax.processing import tiling
from nvlm_jax.processing.tiling import (
    ImageLoadError,
    candidate_grids,
    load_image,
    normalize_tiles,
    open_image,
    select_grid,
    tile_image,
)

MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
STD = np.asarray([0.229, 0.224, 0.225], np.float32)


def _reference_normalise(pil_tile: Image.Image) -> np.ndarray:
    """torchvision ToTensor + Normalize, channels last, written independently of the module."""
    x = np.asarray(pil_tile, dtype=np.float32) / np.float32(255)
    return (x - MEAN) / STD


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds one row: a decompression bomb stub."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------
# Grid selection.


def test_candidate_grid_order_matches_release():
    assert candidate_grids(1, 6) == (
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4),
        (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2),
    )  # fmt: skip


@pytest.mark.parametrize(
    "size, grid",
    [
        ((448, 448), (1, 1)),
        ((640, 640), (2, 2)),
        ((800, 600), (3, 2)),
        ((1024, 768), (3, 2)),
        ((1920, 1080), (2, 1)),
        ((1280, 720), (2, 1)),
        ((600, 800), (2, 3)),
        ((2480, 3508), (2, 3)),
        ((300, 1200), (1, 4)),
        ((4000, 1000), (4, 1)),
        ((100, 1000), (1, 6)),
        ((634, 634), (2, 2)),
        ((633, 633), (1, 1)),
        ((1, 1), (1, 1)),
        ((10000, 10), (6, 1)),
        ((10, 10000), (1, 6)),
        ((5000, 1), (6, 1)),
    ],
)
def test_grid_selection_matches_release(size, grid):
    assert select_grid(*size) == grid


def test_square_image_becomes_2x2_only_above_half_the_2x2_area():
    # 0.5 * 448² * 4 = 401,408 px: 634² = 401,956 is above, 633² = 400,689 below.
    assert select_grid(634, 634) == (2, 2)
    assert select_grid(633, 633) == (1, 1)
    # The threshold scales with tile size.
    assert select_grid(30, 30, tile_size=20) == (2, 2)
    assert select_grid(28, 28, tile_size=20) == (1, 1)


def test_min_and_max_num_bound_the_grid():
    assert select_grid(448, 448, min_num=2, max_num=6) == (2, 2)
    assert select_grid(4000, 1000, max_num=2) == (2, 1)
    assert select_grid(100, 1000, max_num=12) == (1, 10)
    assert all(2 <= c * r <= 4 for c, r in candidate_grids(2, 4))


@pytest.mark.parametrize("args", [(0, 10), (10, 0), (-1, 5)])
def test_select_grid_rejects_empty_sizes(args):
    with pytest.raises(ValueError, match="positive"):
        select_grid(*args)


def test_select_grid_rejects_bad_tile_bounds():
    with pytest.raises(ValueError, match="min_num"):
        select_grid(10, 10, min_num=3, max_num=2)


# ------------------------------------------------------------------------------------------
# Pixel values.


def test_tiles_equal_independent_resize_crop_normalise():
    image = _noise_image(800, 600)
    tiled = tile_image(image)
    assert tiled.grid == (3, 2)
    assert tiled.pixels.shape == (7, 448, 448, 3)
    assert tiled.pixels.dtype == np.float32
    resized = image.resize((3 * 448, 2 * 448), Image.BICUBIC)
    for k in range(6):
        col, row = k % 3, k // 3
        crop = resized.crop((col * 448, row * 448, (col + 1) * 448, (row + 1) * 448))
        np.testing.assert_array_equal(tiled.pixels[k], _reference_normalise(crop))


def test_thumbnail_is_the_whole_original_image_resized():
    image = _noise_image(300, 1200, seed=1)
    tiled = tile_image(image)
    assert tiled.grid == (1, 4) and tiled.has_thumbnail and tiled.num_tiles == 5
    expected = _reference_normalise(image.resize((448, 448), Image.BICUBIC))
    np.testing.assert_array_equal(tiled.pixels[-1], expected)


def test_single_tile_gets_no_thumbnail():
    image = _noise_image(448, 448, seed=2)
    tiled = tile_image(image)
    assert tiled.grid == (1, 1)
    assert not tiled.has_thumbnail
    assert tiled.pixels.shape == (1, 448, 448, 3)
    np.testing.assert_array_equal(tiled.pixels[0], _reference_normalise(image))


def test_use_thumbnail_false_gives_only_grid_tiles():
    tiled = tile_image(_noise_image(640, 640), use_thumbnail=False)
    assert tiled.grid == (2, 2) and tiled.num_tiles == 4 and not tiled.has_thumbnail


def test_tile_size_and_max_num_are_parameters():
    image = _noise_image(90, 30)
    tiled = tile_image(image, max_num=2, tile_size=28)
    assert tiled.grid == (2, 1)
    assert tiled.pixels.shape == (3, 28, 28, 3)
    resized = image.resize((56, 28), Image.BICUBIC)
    np.testing.assert_array_equal(
        tiled.pixels[1], _reference_normalise(resized.crop((28, 0, 56, 28)))
    )


def test_unnormalised_tiles_are_uint8_and_normalise_to_the_same_values():
    image = _noise_image(640, 480, seed=3)
    raw = tile_image(image, normalize=False)
    assert raw.pixels.dtype == np.uint8
    np.testing.assert_array_equal(normalize_tiles(raw.pixels), tile_image(image).pixels)


def test_normalize_tiles_matches_torchvision_formula_for_every_byte():
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    expected = (values.astype(np.float32) / np.float32(255) - MEAN) / STD
    np.testing.assert_array_equal(normalize_tiles(values), expected)


def _formula(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / np.float32(255) - MEAN) / STD


@pytest.mark.parametrize(
    "layout", ["contiguous", "tile_grid_view", "channel_reversed", "column_strided"]
)
def test_normalize_tiles_is_exact_for_every_layout(layout):
    # Every byte value in every channel, in the layouts the two code paths see: contiguous pixel
    # rows (one interleaved gather) and views whose rows are not contiguous (per-channel gather).
    rng = np.random.default_rng(0)
    # A 2 x 3 grid of 32 x 32 tiles, as the resized image [2*32, 3*32, 3].
    image = rng.permutation(np.tile(np.arange(256, dtype=np.uint8), 72)).reshape(64, 96, 3)
    if layout == "contiguous":
        tiles = image.reshape(2, 32, 96, 3)
    elif layout == "tile_grid_view":
        tiles = image.reshape(2, 32, 3, 32, 3).transpose(0, 2, 1, 3, 4)
    elif layout == "channel_reversed":
        tiles = image[..., ::-1]
    else:
        tiles = image[:, ::2]
    assert all(np.isin(np.arange(256), tiles[..., c]).all() for c in range(3))
    np.testing.assert_array_equal(normalize_tiles(tiles), _formula(tiles))
    out = np.full(tiles.shape, np.nan, np.float32)
    assert normalize_tiles(tiles, out=out) is out
    np.testing.assert_array_equal(out, _formula(tiles))


def test_normalize_tiles_writes_into_a_strided_output():
    tiles = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), np.uint8)
    big = np.zeros((3, 5, 14, 3), np.float32)
    normalize_tiles(tiles, out=big[:, :, ::2])
    np.testing.assert_array_equal(big[:, :, ::2], _formula(tiles))
    assert not big[:, :, 1::2].any()


def test_normalize_tiles_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="uint8"):
        normalize_tiles(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="out must be float32"):
        normalize_tiles(np.zeros((4, 4, 3), np.uint8), out=np.zeros((4, 5, 3), np.float32))


def test_load_image_returns_channels_last_float32_tiles(tmp_path):
    path = tmp_path / "photo.jpg"
    _noise_image(1280, 720).save(path, quality=90)
    pixels = load_image(path)
    assert pixels.shape == (3, 448, 448, 3) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, tile_image(str(path)).pixels)


@pytest.mark.parametrize(
    "size, grid", [((10000, 10), (6, 1)), ((10, 10000), (1, 6)), ((1, 1), (1, 1))]
)
def test_extreme_and_tiny_images_tile(size, grid):
    tiled = tile_image(Image.new("RGB", size, (10, 200, 30)))
    assert tiled.grid == grid
    assert tiled.num_tiles == grid[0] * grid[1] + (grid != (1, 1))
    assert np.isfinite(tiled.pixels).all()


# ------------------------------------------------------------------------------------------
# Real-world inputs.


def test_encoded_bytes_give_the_same_tiles_as_the_file(tmp_path):
    path = tmp_path / "a.png"
    _noise_image(900, 500).save(path)
    from_bytes = tile_image(path.read_bytes(), source_name="shard-0/item-3")
    np.testing.assert_array_equal(from_bytes.pixels, tile_image(path).pixels)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # transparent, stored black
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue
    rgb = np.asarray(open_image(Image.fromarray(rgba, "RGBA")))
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert tuple(rgb[0, 2]) == (127, 127, 255)


def test_alpha_background_none_drops_alpha_like_the_release():
    rgba = Image.fromarray(np.full((4, 4, 4), (0, 0, 0, 0), np.uint8), "RGBA")
    rgb = open_image(rgba, alpha_background=None)
    assert np.asarray(rgb).max() == 0
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(rgba.convert("RGB")))


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    path = tmp_path / "logo.png"
    image.save(path, transparency=0)
    rgb = np.asarray(open_image(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (0, 255, 0)


def test_palette_without_transparency_converts_like_the_release(tmp_path):
    path = tmp_path / "pal.png"
    _noise_image(32, 16).quantize(16).save(path)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)


def test_grayscale_and_grayscale_alpha(tmp_path):
    grey = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, "L")
    grey.save(tmp_path / "g.png")
    rgb = np.asarray(open_image(tmp_path / "g.png"))
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.asarray(grey))
    la = Image.merge("LA", [grey, Image.new("L", (4, 4), 0)])
    la.save(tmp_path / "la.png")
    assert np.asarray(open_image(tmp_path / "la.png")).min() == 255


@pytest.mark.parametrize(
    "mode",
    [
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGBA",
        "RGBa",
        "RGBX",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "I;16",
        "I;16B",
    ],
)
def test_every_common_pillow_mode_becomes_rgb(mode):
    rgb = open_image(Image.new(mode, (5, 3)))
    assert rgb.mode == "RGB" and rgb.size == (5, 3)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    rgb = np.asarray(open_image(path))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])


def test_32bit_integer_image_uses_the_16bit_range(tmp_path):
    path = tmp_path / "int.tif"
    Image.fromarray(np.array([[-5, 0, 65535, 100000]], np.int32)).save(path)
    rgb = np.asarray(open_image(path))
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 0, 255, 255])


def test_float_image_is_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((2, 2), np.float32)).save(path)
    with pytest.raises(ImageLoadError, match=r"float.tif.*mode F"):
        open_image(path)


def test_cmyk_jpeg_converts_like_the_release(tmp_path):
    path = tmp_path / "print.jpg"
    _noise_image(64, 48).convert("CMYK").save(path)
    with Image.open(path) as reference:
        assert reference.mode == "CMYK"
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)


def test_exif_orientation_is_ignored_by_default_and_applied_on_request(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    _noise_image(40, 20).save(path, exif=exif)
    assert open_image(path).size == (40, 20)
    assert open_image(path, apply_exif_orientation=True).size == (20, 40)


def test_animated_gif_uses_the_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgb = np.asarray(open_image(path))
    assert tuple(rgb[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_raises_value_error_naming_the_file(tmp_path, fmt, suffix):
    path = tmp_path / f"cut.{suffix}"
    buf = io.BytesIO()
    _noise_image(256, 256).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=rf"cut\.{suffix}.*truncated"):
        tile_image(path)


def test_zero_byte_file_raises_value_error(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png.*empty"):
        open_image(path)
    with pytest.raises(ImageLoadError, match="item-9.*empty"):
        open_image(b"", source_name="item-9")


def test_non_image_file_raises_value_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg.*not a recognised image"):
        load_image(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(tmp_path / "nope.png")


def test_image_over_max_pixels_is_refused_before_decoding():
    bomb = _png_with_header_size(9000, 9000)  # 81 Mpx header, one row of data
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*9000x9000.*max_pixels"):
        open_image(bomb, source_name="bomb.png")
    with pytest.raises(ImageLoadError, match="max_pixels=1000"):
        open_image(_noise_image(40, 30), max_pixels=1000)


def test_pillow_level_bomb_is_reported_as_value_error():
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(_png_with_header_size(20000, 20000), max_pixels=None)


def test_pixel_limit_does_not_depend_on_pillow_global_state(monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        open_image(_png_with_header_size(9000, 9000))
    monkeypatch.undo()
    open_image(_noise_image(8, 8))
    assert Image.MAX_IMAGE_PIXELS == before


def test_pil_input_is_not_modified():
    image = Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA")
    tile_image(image)
    assert image.mode == "RGBA" and image.size == (4, 4)


def test_unsupported_source_type_is_a_type_error():
    with pytest.raises(TypeError, match="expected a path"):
        open_image(12345)


def test_default_pixel_limit_is_64_megapixels():
    assert tiling.DEFAULT_MAX_PIXELS == 64_000_000


def test_tile_images_on_threads_equals_one_by_one(tmp_path):
    from nvlm_jax.processing.tiling import tile_image, tile_images

    paths = []
    for i, size in enumerate([(64, 64), (900, 300), (300, 900), (500, 500)]):
        path = tmp_path / f"im{i}.png"
        rgb = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path)
        paths.append(path)
    many = tile_images(paths, num_threads=2, max_num=4)
    for path, got in zip(paths, many, strict=True):
        want = tile_image(path, max_num=4)
        assert got.grid == want.grid
        np.testing.assert_array_equal(got.pixels, want.pixels)


def test_tile_images_mixed_sources_keep_input_order_and_errors_name_the_file(tmp_path):
    """Largest-first scheduling must not reorder results; a bad file still raises its error."""
    from nvlm_jax.processing.tiling import ImageLoadError, tile_image, tile_images

    small = tmp_path / "small.png"
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(small)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 1000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 600, 3), 200, np.uint8)).save(buf, format="PNG")
    sources = [small, big, buf.getvalue()]
    got = tile_images(sources, num_threads=3, max_num=4)
    for source, result in zip(sources, got, strict=True):
        want = tile_image(source, max_num=4)
        assert result.grid == want.grid
        np.testing.assert_array_equal(result.pixels, want.pixels)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png"):
        tile_images([small, big, empty], num_threads=2)


def test_huge_tile_budget_is_a_named_error_not_a_hang():
    from nvlm_jax.processing.tiling import MAX_TILE_BUDGET

    with pytest.raises(ValueError, match=r"max_num=1000000 tiles is over the supported budget of 64"):
        select_grid(448, 448, max_num=10**6)
    with pytest.raises(ValueError, match="over the supported budget"):
        load_image(Image.new("RGB", (8, 8)), max_num=MAX_TILE_BUDGET + 1)
    assert len(candidate_grids(1, MAX_TILE_BUDGET)) > 0
