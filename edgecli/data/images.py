"""Images as users hold them: one loader for training, calibration and infer.

16-bit PNGs are scaled to 8 bits (not clipped at 255), EXIF orientation is applied, and an
imagefolder's class folders are read with their nested sub-folders. Only numpy and Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecli.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def resize_images(x: np.ndarray, size: list[int] | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 NHWC images with Pillow (what a deployer's image library does)."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if x.shape[1] == h and x.shape[2] == w:
        return x
    out = np.empty((x.shape[0], h, w, x.shape[3]), dtype=np.uint8)
    for i, img in enumerate(x):
        if img.shape[2] == 1:
            out[i, :, :, 0] = np.asarray(Image.fromarray(img[:, :, 0], "L").resize((w, h), Image.BILINEAR))
        else:
            for c in range(img.shape[2]):  # per channel: works for any channel count
                out[i, :, :, c] = np.asarray(Image.fromarray(img[:, :, c], "L").resize((w, h), Image.BILINEAR))
    return out


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    c = x.shape[3]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=3)
    if c == 3 and channels == 1:  # ITU-R 601 luma, as Pillow's convert("L")
        y = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def _to_8bit(im):
    """A Pillow image in 8-bit grayscale or RGB terms: 16/32-bit integer pixels are scaled, not clipped.

    Pillow's ``convert("L")`` of a 16-bit PNG clips every value above 255 to white: a 16-bit digit
    became a white square that a model answered "eight" (issue 12). Scaling by 255/65535 keeps it.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im


def load_image_file(path: str, channels: int) -> np.ndarray:
    """Read an image file as uint8 (H, W, C) in the dataset's raw mode (grayscale or RGB)."""
    from edgecli.safeio import INPUT_LIMIT, read_user_bytes, shown

    data = read_user_bytes(path, "an image file", INPUT_LIMIT, DataError)  # never blocks, bounded
    return decode_image(data, channels, shown(path))


def decode_image(data: bytes, channels: int, name: str) -> np.ndarray:
    """Decode image bytes held in memory (a file's, an upload's) as uint8 (H, W, C), guarded.

    A header claiming more than ``IMAGE_PIXEL_LIMIT`` pixels (a decompression bomb) is refused before
    anything is decoded; EXIF orientation is applied and 16-bit pixels are scaled; anything Pillow
    cannot read is a one-line DataError naming ``name``.
    """
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    from edgecli.safeio import IMAGE_PIXEL_LIMIT

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > IMAGE_PIXEL_LIMIT or w * h <= 0:  # a decompression bomb: refused before decoding
                raise DataError(f"{name}: {w}x{h} pixels, over the {IMAGE_PIXEL_LIMIT // 1_000_000} million pixel "
                                "limit for one image; refused")
            im.load()
            im = ImageOps.exif_transpose(im)  # a phone photo stored sideways with an orientation tag
            im = _to_8bit(im)
            mode = "L" if channels == 1 else "RGB"
            arr = np.asarray(im.convert(mode))
    except Image.DecompressionBombError as e:  # Image.open's own check, before ours: say what its header claims
        claim = str(e).split(",")[0].strip().rstrip(".")
        raise DataError(f"{name}: over Pillow's pixel limit (a decompression bomb?): {claim}; refused") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def image_is_colour(path: Path) -> bool | None:
    """True for a colour image, False for grayscale, None when Pillow cannot tell (read later, reported there)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode not in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F", "P", "LA")
    except Exception:  # noqa: BLE001 - an unreadable file is reported by load_image_file with its name
        return None


def list_imagefolder(root: Path, class_names=None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, class index)]) of an imagefolder: what the loader reads and train declares.

    Images in nested sub-folders of a class folder belong to that class (``cats/indoor/1.png`` is a
    cat). Hidden files and folders are skipped. A class folder without images is a DataError.
    """
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a directory of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names:
        names = list(class_names.values()) if isinstance(class_names, dict) else [str(c) for c in class_names]
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise DataError(f"data.path: folder(s) {', '.join(unknown)} are not in data.class_names")
        classes = names
    if not classes:
        raise DataError(f"data.path: {root} has no class sub-folders")
    files: list[tuple[Path, int]] = []
    for i, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        found = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(d).parts))
        files += [(f, i) for f in found]
    odd = [f for f, _ in files if not f.is_file()]
    if odd:  # a FIFO would block the loader forever; a dangling link would silently shrink a class
        raise DataError(f"{odd[0]}: not a regular image file (directory, FIFO, device or broken link)")
    if not files:
        raise DataError(f"data.path: no images (PNG/JPEG/BMP) under {root}")
    counts = np.bincount([i for _, i in files], minlength=len(classes))
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{root}: class(es) with zero samples: {', '.join(empty[:5])} (empty class folder)")
    return classes, files
