"""Image decoding and dynamic high-resolution tiling, as in the NVLM-D-72B release.

Pipeline (NVLM_REFERENCE §3): decode → RGB → choose a (cols, rows) grid with the closest aspect
ratio among all grids of `min_num..max_num` tiles → one bicubic resize of the whole image to
`(tile*cols, tile*rows)` → row-major crops → when there is more than one tile, a thumbnail (the
whole original image resized to `tile × tile`) is appended last → ImageNet normalisation.
Output is channels-last float32 `[num_tiles, tile, tile, 3]`, bit-identical to the release's
`ToTensor` + `Normalize` values (before its cast to bfloat16).

Speed: the image is resized once and the tiles are views into that one array; normalisation is
a lookup table (the same float32 arithmetic as `(x / 255 - mean) / std`, evaluated once per
byte value and channel) gathered straight into the output, with no per-tile PIL objects.

Decoding choices for real-world files (`open_image`), where the release just calls
`Image.open(f).convert('RGB')`:

* Transparency (RGBA, LA, PA, RGBa, palette or L/RGB with a `transparency` key): composited on a
  white background (`alpha_background`). `convert('RGB')` would drop the alpha channel and expose
  whatever colour the transparent pixels happen to store (often black), which turns logos and
  screenshots into black blobs. Pass `alpha_background=None` to reproduce the release exactly.
  Fully opaque images give the same pixels either way.
* 16/32-bit integer greyscale (I;16*, I): scaled from the 16-bit range 0..65535 to 0..255
  (rounded; values outside the range are clipped). Pillow's `convert('RGB')` would clip at 255,
  making almost every 16-bit image white. Float images (mode F) have no defined display range
  and are rejected.
* CMYK, YCbCr, 1-bit, greyscale, palette without transparency: Pillow's `convert('RGB')`, as in
  the release (no ICC colour management, also as in the release).
* EXIF orientation: NOT applied by default, matching the release (which never reads EXIF), so
  a phone photo is tiled as stored. `apply_exif_orientation=True` rotates/flips it upright first.
* Animated images (GIF, APNG, multi-page TIFF): the first frame.
* Truncated, empty or non-image data, and images over `max_pixels` (decompression bombs;
  checked from the header, before any pixel is decoded): `ImageLoadError` (a ValueError) naming
  the source and the problem. Pillow's process-wide `Image.MAX_IMAGE_PIXELS` is neither read nor
  changed; Pillow still enforces it on its own (by default above 2 × 89.5 Mpx), which we report
  as the same error. `ImageFile.LOAD_TRUNCATED_IMAGES` is not changed either.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import struct
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TILE_SIZE = 448
DEFAULT_MAX_NUM = 6
DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image

# Pillow raises a zoo of exception types on corrupt data; these are the ones it is known to use.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_INT_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageLoadError(ValueError):
    """An image could not be decoded or was refused; the message names the source."""


@dataclasses.dataclass(frozen=True, eq=False)
class TiledImage:
    """Tiles of one image.

    Attributes:
      pixels: `[num_tiles, tile, tile, 3]`, channels last; float32 ImageNet-normalised, or uint8
        0..255 when tiled with `normalize=False`. Regular tiles in row-major order, then the
        thumbnail (if any).
      grid: `(cols, rows)` of the regular tiles.
      has_thumbnail: whether the last tile is the whole-image thumbnail.
    """

    pixels: np.ndarray
    grid: tuple[int, int]
    has_thumbnail: bool

    @property
    def num_tiles(self) -> int:
        """Regular tiles plus the thumbnail."""
        return int(self.pixels.shape[0])


# ------------------------------------------------------------------------------------------
# Grid selection.

MAX_TILE_BUDGET = 64  # NVLM uses 6, InternVL up to 40; a larger grid is a mistake, not a request


@functools.lru_cache(maxsize=64)
def candidate_grids(
    min_num: int = 1, max_num: int = DEFAULT_MAX_NUM
) -> tuple[tuple[int, int], ...]:
    """All `(cols, rows)` with `min_num <= cols*rows <= max_num`, in the release's scan order.

    The release builds a Python set with this exact comprehension and sorts it (stably) by
    area, so inside one area the order is CPython's set iteration order. That order matters
    when two different aspect ratios tie exactly, so it is reproduced by building the same set
    the same way (int-tuple hashes are not randomised, so the order is stable across runs and
    Python versions). For max_num=6:
    (1,1),(1,2),(2,1),(3,1),(1,3),(4,1),(1,4),(2,2),(1,5),(5,1),(6,1),(2,3),(1,6),(3,2).
    """
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    if max_num > MAX_TILE_BUDGET:
        # The release's scan is cubic in max_num: 10**6 would run for hours instead of failing.
        raise ValueError(f"max_num={max_num} tiles is over the supported budget of {MAX_TILE_BUDGET} tiles per image")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def select_grid(
    width: int,
    height: int,
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_NUM,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[int, int]:
    """The release's grid choice for a `width × height` image (pixels).

    Scans `candidate_grids` keeping the closest aspect ratio `cols/rows` to `width/height`; on
    an exact tie a later candidate wins only if the image area exceeds half the candidate's
    area at full resolution (`0.5 * tile_size² * cols * rows`). Since 1/1 == 2/2 exactly, a
    square-ish image becomes 2×2 once its area exceeds 401,408 px (634² → 2×2, 633² → 1×1).

    Returns:
      `(cols, rows)`: tiles across and down.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


# ------------------------------------------------------------------------------------------
# Decoding.


def _describe(source: ImageSource, source_name: str | None) -> str:
    if source_name:
        return source_name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _open_source(source: ImageSource, label: str) -> Image.Image:
    """Opens (header only) any supported source; empty input is an ImageLoadError."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{label}: no such image file")
        if os.path.isdir(path):
            raise ImageLoadError(f"{label}: is a directory, not an image file")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"{label}: empty file (0 bytes)")
        fp: str | BinaryIO = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes == 0:
            raise ImageLoadError(f"{label}: empty image data (0 bytes)")
        fp = io.BytesIO(source)
    elif hasattr(source, "read"):
        fp = source
    else:
        raise TypeError(
            f"{label}: expected a path, bytes, a binary file or a PIL image, "
            f"got {type(source).__name__}"
        )
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{label}: refused as a possible decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{label}: not a recognised image format") from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{label}: cannot read image header: {e}") from e


def _to_rgb(
    image: Image.Image, alpha_background: tuple[int, int, int] | None, label: str
) -> Image.Image:
    """Converts any decoded mode to RGB (see module docstring for the rules)."""
    if image.mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    mode = image.mode
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if alpha_background is not None and has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*alpha_background, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode in _INT_GREY_MODES:
        grey = np.asarray(image).astype(np.int64)
        # Round-half-up of v * 255 / 65535 in integer arithmetic.
        grey8 = (np.clip(grey, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(grey8.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ImageLoadError(f"{label}: floating-point images (mode F) have no display range")
    return image.convert("RGB")


def open_image(
    source: ImageSource,
    *,
    source_name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = False,
    alpha_background: tuple[int, int, int] | None = WHITE,
) -> Image.Image:
    """Decodes and validates one image and returns it as an RGB PIL image.

    Args:
      source: a file path, encoded image bytes, a binary file object, or a PIL image.
      source_name: label used in error messages (default: the path, or a description).
      max_pixels: refuse images with more than this many pixels (checked from the header before
        decoding); None disables the check.
      apply_exif_orientation: rotate/flip by the EXIF Orientation tag. Off by default, as in the
        release.
      alpha_background: RGB colour that transparent pixels are composited onto; None drops alpha
        like the release's `convert('RGB')`.

    Returns:
      An RGB image, fully loaded (no open file handle), first frame of animated images.

    Raises:
      ImageLoadError (a ValueError): empty, truncated, corrupt, non-image or too-large input.
      FileNotFoundError: a path that does not exist.
    """
    label = _describe(source, source_name)
    opened = not isinstance(source, Image.Image)
    image = _open_source(source, label) if opened else source
    try:
        rgb = _decode_rgb(image, label, max_pixels, apply_exif_orientation, alpha_background)
    except BaseException:
        if opened:
            image.close()
        raise
    if opened:
        if rgb is image and getattr(image, "n_frames", 1) > 1:
            # A multi-frame file may keep its handle open for seeking; detach frame 0 from it.
            rgb = image.copy()
        if rgb is not image:
            image.close()
    return rgb


def _decode_rgb(
    image: Image.Image,
    label: str,
    max_pixels: int | None,
    apply_exif_orientation: bool,
    alpha_background: tuple[int, int, int] | None,
) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{label}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: {width}x{height} = {width * height} pixels exceeds max_pixels="
            f"{max_pixels} (possible decompression bomb)"
        )
    try:
        # Animated images open on frame 0; loading decodes only that frame.
        image.load()
        if apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{label}: truncated or corrupt image data: {e}") from e
    try:
        return _to_rgb(image, alpha_background, label)
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{label}: cannot convert mode {image.mode} to RGB: {e}") from e


# ------------------------------------------------------------------------------------------
# Tiling and normalisation.


@functools.lru_cache(maxsize=1)
def _normalize_lut() -> np.ndarray:
    """`[256, 3]` float32: `(v / 255 - mean[c]) / std[c]` in float32, as torchvision computes."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    lut = (values[:, None] - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
        IMAGENET_STD, np.float32
    )
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=1)
def _interleaved_lut() -> np.ndarray:
    """`[768]` float32: `_normalize_lut` channel-major, indexed by `channel * 256 + byte`."""
    lut = np.ascontiguousarray(_normalize_lut().T).reshape(-1)
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=8)
def _channel_offsets(width: int) -> np.ndarray:
    """`[width * 3]` uint16 `0, 256, 512, 0, 256, 512, ...`: the channel part of the index."""
    offsets = np.tile(np.array([0, 256, 512], np.uint16), width)
    offsets.setflags(write=False)
    return offsets


def _rows_view(x: np.ndarray) -> np.ndarray | None:
    """`[..., h, w, 3]` as `[..., h, w*3]` without a copy, or None when a row is not contiguous."""
    if x.ndim < 3 or x.strides[-1] != x.itemsize or x.strides[-2] != 3 * x.itemsize:
        return None
    return x.reshape(*x.shape[:-2], x.shape[-2] * 3)


def normalize_tiles(tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ImageNet-normalises uint8 pixels `[..., 3]` (0..255) to float32 `[..., 3]`.

    Equal, bit for bit, to `(x.astype(float32) / 255 - mean) / std` (torchvision's `ToTensor` +
    `Normalize`), via a lookup table. `tiles` may be any strided view; `out` (float32, same
    shape) is written in place when given.
    """
    if tiles.dtype != np.uint8 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 [..., 3] pixels, got {tiles.dtype} {tiles.shape}")
    if out is None:
        out = np.empty(tiles.shape, np.float32)
    elif out.shape != tiles.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {tiles.shape}, got {out.dtype} {out.shape}")
    in_rows, out_rows = _rows_view(tiles), _rows_view(out)
    if in_rows is None or out_rows is None:
        lut = _normalize_lut()
        for c in range(3):
            # mode="clip" (uint8 indices are always in range) lets numpy write `out` directly;
            # the default mode="raise" buffers it, which costs ~40% more.
            np.take(lut[:, c], tiles[..., c], out=out[..., c], mode="clip")
        return out
    # Pixel rows are contiguous: one gather per image from a 768-entry table indexed by
    # `byte + 256 * channel` runs ~2.5x faster than three channel-strided gathers.
    lut, offsets = _interleaved_lut(), _channel_offsets(tiles.shape[-2])
    index = np.empty(in_rows.shape[-2:], np.uint16)  # [h, w*3], reused for each [h, w] image
    for lead in np.ndindex(*in_rows.shape[:-2]):
        np.add(in_rows[lead], offsets, out=index, dtype=np.uint16)
        np.take(lut, index, out=out_rows[lead], mode="clip")
    return out


def tile_image(
    source: ImageSource,
    max_num: int = DEFAULT_MAX_NUM,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    min_num: int = 1,
    use_thumbnail: bool = True,
    normalize: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = False,
    alpha_background: tuple[int, int, int] | None = WHITE,
    source_name: str | None = None,
) -> TiledImage:
    """Decodes and tiles one image exactly like the NVLM-D-72B release.

    Args:
      source: path, encoded bytes, binary file or PIL image (see `open_image`).
      max_num / min_num: bounds on the number of regular tiles (release: 1..6).
      tile_size: tile edge in pixels (448).
      use_thumbnail: append the whole-image thumbnail when there is more than one tile.
      normalize: float32 ImageNet-normalised pixels if True, raw uint8 if False.
      max_pixels, apply_exif_orientation, alpha_background, source_name: see `open_image`.

    Returns:
      `TiledImage` with `pixels` `[num_tiles, tile_size, tile_size, 3]` and `grid` (cols, rows).
    """
    image = open_image(
        source,
        source_name=source_name,
        max_pixels=max_pixels,
        apply_exif_orientation=apply_exif_orientation,
        alpha_background=alpha_background,
    )
    cols, rows = select_grid(
        image.width, image.height, min_num=min_num, max_num=max_num, tile_size=tile_size
    )
    num_regular = cols * rows
    has_thumbnail = use_thumbnail and num_regular > 1
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    # [rows, tile, cols, tile, 3] view of the resized image -> row-major tiles, no copy yet.
    grid_view = np.asarray(resized).reshape(rows, tile_size, cols, tile_size, 3)
    tiles_view = grid_view.transpose(0, 2, 1, 3, 4)
    num_tiles = num_regular + int(has_thumbnail)
    shape = (num_tiles, tile_size, tile_size, 3)
    pixels = np.empty(shape, np.float32 if normalize else np.uint8)
    regular_out = pixels[:num_regular].reshape(rows, cols, tile_size, tile_size, 3)
    if normalize:
        normalize_tiles(tiles_view, out=regular_out)
    else:
        regular_out[...] = tiles_view
    if has_thumbnail:
        # From the original image, not from the resized grid (as in the release).
        thumb = np.asarray(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
        if normalize:
            normalize_tiles(thumb, out=pixels[num_regular])
        else:
            pixels[num_regular] = thumb
    return TiledImage(pixels=pixels, grid=(cols, rows), has_thumbnail=has_thumbnail)


def load_image(
    path_or_pil: ImageSource,
    max_num: int = DEFAULT_MAX_NUM,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    min_num: int = 1,
    use_thumbnail: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = False,
    alpha_background: tuple[int, int, int] | None = WHITE,
) -> np.ndarray:
    """The release's `load_image`: float32 `[num_tiles, tile_size, tile_size, 3]` pixels.

    Same arguments as `tile_image`; use `tile_image` when the grid is needed too.
    """
    return tile_image(
        path_or_pil,
        max_num,
        tile_size=tile_size,
        min_num=min_num,
        use_thumbnail=use_thumbnail,
        max_pixels=max_pixels,
        apply_exif_orientation=apply_exif_orientation,
        alpha_background=alpha_background,
    ).pixels


def _work_estimate(source: ImageSource) -> int:
    """A cheap size proxy for scheduling: encoded bytes for files and buffers, pixels for PIL."""
    if isinstance(source, Image.Image):
        return source.width * source.height
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    if isinstance(source, (str, os.PathLike)):
        try:
            return os.path.getsize(source)
        except OSError:
            return 0  # tile_image reports the problem
    return 0


def tile_images(sources: Sequence[ImageSource], num_threads: int | None = None, **kwargs) -> list[TiledImage]:
    """`tile_image` over many images on a thread pool, results in input order.

    Pillow's decode and resize and the NumPy normalisation release the GIL, so threads scale
    with cores (default: all of them). Largest images start first: one big scan started last
    would otherwise leave the other threads idle at the end. kwargs are `tile_image`'s.
    """
    num_threads = num_threads or os.cpu_count() or 1
    if num_threads == 1 or len(sources) < 2:
        return [tile_image(s, **kwargs) for s in sources]
    order = sorted(range(len(sources)), key=lambda i: -_work_estimate(sources[i]))
    results: list[TiledImage | None] = [None] * len(sources)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        futures = {pool.submit(tile_image, sources[i], **kwargs): i for i in order}
        for future, i in futures.items():
            results[i] = future.result()
    return results  # type: ignore[return-value]
