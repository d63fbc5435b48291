"""Finding, hashing and decoding images: the ONE preprocessing path shared by training, evaluation and sorting.

Why one function: the pretrained stem amplifies tiny input differences, so decoding a photo one way for
training and another way for sorting flips predictions (measured: 0.18 grey levels on average flipped 11%
of labels). `load_model_input` is the only way pixels reach a model here: JPEG draft (DCT-domain
downscale, much faster on large photos), EXIF orientation applied, converted to RGB (alpha composited on
white, CMYK and 16-bit converted), shorter side resized to `size`, centre-cropped to `size` x `size`.
Caveat: draft decoding depends on the requested size, so a resized cache must be made at the same size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from loop.errors import ImageError

logger = logging.getLogger(__name__)

try:  # HEIC support is optional (pillow-heif); without it .heic files are reported unreadable
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - depends on the platform's wheels
    pass

# .gif: its first frame is the photo (an animated GIF is sorted by the frame a file browser shows)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif", ".bmp", ".gif"})

# Refuse images above ~180 MP (Pillow's own bomb limit is ~89 MP warning / 179 MP error).
MAX_PIXELS = 180_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def iter_image_files(root: Path, skip: Iterator[Path] | None = None, *,
                     on_error: Callable[[Path, str], None] | None = None) -> Iterator[Path]:
    """Image files under `root`, recursively, in a stable order; never follows directory symlinks.

    Not following directory links makes symlink loops harmless. Hidden files and folders (".x") are
    skipped, which also skips sortloop's own temp files. `skip`: folders not to descend into.
    `on_error(folder, reason)` hears of each folder that cannot be listed (unreadable, or a path longer than
    the system allows): its photos are not silently missing, the caller reports them (default: a warning).
    """
    root = Path(root)
    skipped = {Path(p).resolve() for p in (skip or [])}
    if root.is_file():
        yield root
        return

    def unlisted(exc: OSError) -> None:
        folder, reason = Path(exc.filename or root), exc.strerror or str(exc)
        if on_error is None:
            logger.warning("cannot list %s: %s", folder, reason)
        else:
            on_error(folder, f"folder not read ({reason}); its photos were not sorted")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlisted):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skipped)
        for name in sorted(filenames):
            path = here / name
            if is_image_name(path):
                yield path


def check_regular_file(path: Path) -> os.stat_result:
    """The file's stat; raises ImageError unless it is a regular file (a FIFO or device named x.jpg would
    block a read forever, or never end)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "not a regular file")
    return st


READ_WHOLE_MAX_BYTES = 64 << 20  # files up to this size are read once, then hashed and decoded from memory


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to start reading these files (their first READ_WHOLE_MAX_BYTES) into memory now, and return.

    Why: a decode worker reads a photo, then decodes it; from a cold disk each read is a wait in which its CPU
    idles. Advised as a task is queued (the decode stream keeps several ahead), the disk reads the next photos
    while the workers decode the ones before (`bench/sort.py --cold` measures both). Advice only: a file that
    is not a regular one is left alone (opening a FIFO would block), and where `posix_fadvise` is missing
    (Windows, macOS) or refused, nothing happens."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            check_regular_file(path)
            fd = os.open(path, os.O_RDONLY)
        except (OSError, ImageError):
            continue  # the decoder reports it with the reason
        try:
            with contextlib.suppress(OSError):  # advice only
                os.posix_fadvise(fd, 0, READ_WHOLE_MAX_BYTES, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes: the image's identity everywhere in sortloop."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_hashed(path: Path, size: int) -> tuple[str, bytes | None]:
    """The file's sha256 and, if its `size` (from stat) is at most READ_WHOLE_MAX_BYTES, its bytes.

    Why: a sort hashes and decodes every photo; reading it once saves a second pass over a 2-5 MB file
    (`bench/sort.py`), and the identity and the pixels then come from the same bytes even if the file
    changes meanwhile. Larger files are hashed in chunks and decoded from disk, so memory stays bounded."""
    if size > READ_WHOLE_MAX_BYTES:
        return file_sha256(path), None
    with open(path, "rb") as fh:
        data = fh.read()
    return hashlib.sha256(data).hexdigest(), data


def open_image(path: Path, draft_size: int | None = None, data: bytes | None = None) -> Image.Image:
    """Open and fully decode `path` (or `data`, its bytes already read) as an upright RGB image.

    Args:
        draft_size: if set, let libjpeg decode at the smallest power-of-two scale that is still at least
            this many pixels on each side (only JPEG supports it; other formats ignore it).
        data: the file's bytes (`read_hashed`); `path` then only names it in errors.
    Raises:
        ImageError: with a short reason (empty file, not an image, truncated, too large, ...).
    """
    path = Path(path)
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(path, f"too large ({img.width}x{img.height} pixels; decompression-bomb guard)")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too large (decompression-bomb guard: {exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can read") from None
    except OSError as exc:
        if "truncat" in str(exc).lower():
            raise ImageError(path, f"truncated or corrupt image ({exc})") from None
        raise ImageError(path, f"unreadable ({exc})") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(path, f"corrupt image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited on white; 16-bit, palette, CMYK and grey converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear, antialiased), then a centred `size` x `size` crop."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_model_input(path: Path, size: int) -> np.ndarray:
    """The model's view of an image: uint8 array (size, size, 3). See the module docstring."""
    return np.asarray(resize_and_crop(open_image(path, draft_size=size), size), dtype=np.uint8)


# EXIF tags for the capture time: the Exif sub-IFD's DateTimeOriginal, else IFD0's DateTime.
EXIF_IFD, DATETIME_ORIGINAL, DATETIME = 0x8769, 36867, 306


PHASH_SIDE, PHASH_BITS_SIDE = 32, 8  # grey thumbnail side, and the low-frequency block whose signs are the hash
# The DCT-II along one axis as a matrix (scipy.fftpack.dct's unnormalised type 2: 2 * sum x[n] cos(pi k (2n+1) / 2N)),
# only the rows of the low frequencies the hash keeps.
_DCT_ROWS = 2.0 * np.cos(np.pi * np.outer(np.arange(PHASH_BITS_SIDE), 2 * np.arange(PHASH_SIDE) + 1) / (2 * PHASH_SIDE))


def perceptual_hash(img: Image.Image) -> str:
    """64-bit pHash as 16 hex digits (item grouping compares these): the same bits as `imagehash.phash`.

    Why not call imagehash: it imports scipy.fftpack on its first call, ~0.3 s of CPU in every decode
    worker of every sort, for two 32-point DCTs that an 8x32 matrix does (tests/unit/data/test_images.py
    checks the bits against imagehash on real photos)."""
    grey = img.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)
    # Rounded: a flat or one-directional image has coefficients that are exactly 0 in an FFT and +-1e-13 here.
    low = np.round(_DCT_ROWS @ np.asarray(grey, dtype=np.float64) @ _DCT_ROWS.T, 6)
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def exif_time_raw(img: Image.Image) -> str | None:
    """EXIF DateTimeOriginal (or DateTime) as written, e.g. "2024:05:01 13:45:10", or None.

    Kept free of pandas so decode worker processes can call it; `loop.data.items.parse_exif_time` parses it.
    """
    try:
        exif = img.getexif()
        raw = exif.get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL) or exif.get(DATETIME) if exif else None
    except Exception:  # noqa: BLE001 - malformed EXIF is common and never fatal
        return None
    return str(raw) if raw else None


def normalise(batch: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] then standardised per channel.

    Computed as one fused x * scale + bias per channel, written straight into the NCHW output: ~7x faster
    than the textbook (x / 255 - mean) / std + transpose (it runs on every sort batch), same values within 1e-6.
    """
    n, h, w, c = batch.shape
    std32 = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std32)
    bias = -np.asarray(mean, np.float32) / std32
    out = np.empty((n, c, h, w), np.float32)
    for ch in range(c):
        np.multiply(batch[..., ch], scale[ch], out=out[:, ch], dtype=np.float32)
        out[:, ch] += bias[ch]
    return out
