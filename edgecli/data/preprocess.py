"""The preprocessing spec: one object used by training, calibration and inference.

It needs only numpy and Pillow, so ``infer`` and ``bench`` apply exactly the training
preprocessing without importing torch. Raw inputs are what a user holds: images as 8-bit
pixels (N, H, W, C), tables as float rows (N, F).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from edgecli.errors import DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class PreprocessSpec:
    kind: str  # "image" | "table" | "text"
    raw_shape: list[int]  # one raw sample: [H, W, C] for images, [F] for tables
    input_shape: list[int]  # one model input sample: [C, H, W] or [F]
    resize: list[int] | None = None  # [H, W]
    channels: int | None = None
    scale: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None
    extra: dict = field(default_factory=dict)  # kind-specific (e.g. tokenizer for text)

    # ------------------------------------------------------------------ building
    @classmethod
    def fit(cls, kind: str, x_train: np.ndarray, cfg) -> PreprocessSpec:
        """Build the spec from the training split (mean/std are computed on train only)."""
        if kind == "image":
            h, w, c = x_train.shape[1:]
            spec = cls(kind, [h, w, c], [], resize=list(cfg.resize) if cfg.resize else None,
                       channels=cfg.channels, scale=1.0 / 255.0)
            out_c = spec.channels or c
            oh, ow = spec.resize or (h, w)
            spec.input_shape = [out_c, oh, ow]
            if cfg.normalize == "imagenet":
                if out_c != 3:
                    raise DataError("data.preprocess.normalize: imagenet needs 3 channels; set preprocess.channels: 3")
                spec.mean, spec.std = IMAGENET_MEAN, IMAGENET_STD
            elif cfg.normalize == "per_dataset":
                spec.mean, spec.std = [0.0] * out_c, [1.0] * out_c  # identity while measuring
                xs = spec.apply(x_train[:2000])
                mean = xs.mean(axis=(0, 2, 3))
                std = xs.std(axis=(0, 2, 3))
                spec.mean = [float(m) for m in mean]
                spec.std = [float(max(s, 1e-6)) for s in std]
            return spec
        if kind == "table":
            f = x_train.shape[1]
            spec = cls(kind, [f], [f])
            if cfg.normalize == "per_dataset":
                spec.mean = [float(m) for m in x_train.mean(axis=0)]
                spec.std = [float(max(s, 1e-6)) for s in x_train.std(axis=0)]
            return spec
        raise DataError(f"no preprocessing for data kind '{kind}'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        """A spec read from a model's metadata or card: checked field by field (it is data from a file)."""
        from dataclasses import fields

        if not isinstance(d, dict):
            raise DataError("the model's preprocessing spec is not an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"the model's preprocessing spec has unknown field(s) {', '.join(map(str, unknown[:5]))}")
        if d.get("kind") not in ("image", "table", "text"):
            raise DataError(f"the model's preprocessing spec has kind {str(d.get('kind'))[:40]!r}, not image/table/text")

        def ints(v, n=None):
            return (isinstance(v, list) and (n is None or len(v) == n)
                    and all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= 1 << 20 for i in v))

        def floats(v):
            return isinstance(v, list) and all(isinstance(i, (int, float)) and not isinstance(i, bool)
                                               and np.isfinite(i) for i in v)

        ok = ints(d.get("raw_shape")) and ints(d.get("input_shape"))
        ok = ok and (d.get("resize") is None or ints(d["resize"], 2))
        ok = ok and (d.get("channels") is None or d["channels"] in (1, 3))
        ok = ok and isinstance(d.get("scale", 1.0), (int, float)) and np.isfinite(d.get("scale", 1.0))
        ok = ok and all(d.get(k) is None or floats(d[k]) for k in ("mean", "std"))
        ok = ok and isinstance(d.get("extra", {}), dict)
        if d.get("kind") == "image":
            ok = ok and len(d.get("raw_shape") or []) == 3 and len(d.get("input_shape") or []) == 3
        if not ok:
            raise DataError("the model's preprocessing spec is malformed (shapes, resize, channels, scale, mean, std)")
        return cls(**d)

    # ------------------------------------------------------------------ applying
    def check_raw(self, x: np.ndarray, what: str = "input") -> None:
        """Raise DataError (one line, naming ``what``) if a raw batch cannot be preprocessed."""
        if self.kind == "image":
            if x.dtype != np.uint8:
                raise DataError(f"{what}: images must be 8-bit pixels (uint8), got {x.dtype}")
            if x.ndim != 4:
                raise DataError(f"{what}: expected an image batch (N, H, W, C), got shape {list(x.shape)}")
            if x.shape[3] != self.raw_shape[2]:
                raise DataError(f"{what}: expected {self.raw_shape[2]} channel(s), got {x.shape[3]}")
            if self.resize is None and list(x.shape[1:3]) != self.raw_shape[:2]:
                raise DataError(f"{what}: expected {self.raw_shape[0]}x{self.raw_shape[1]} pixels, got {x.shape[1]}x{x.shape[2]}")
        elif self.kind == "text":
            if x.ndim != 1:
                raise DataError(f"{what}: expected a list of sentences, got shape {list(x.shape)}")
            for i, t in enumerate(x):
                if not isinstance(t, str):
                    raise DataError(f"{what}: item {i} is {type(t).__name__}, expected a string")
                if not t.strip():
                    raise DataError(f"{what}: item {i} is an empty sentence")
        elif self.kind == "table":
            if x.ndim != 2 or x.shape[1] != self.raw_shape[0]:
                raise DataError(f"{what}: expected {self.raw_shape[0]} feature(s) per row, got shape {list(x.shape)}")
            if not np.issubdtype(x.dtype, np.number):
                raise DataError(f"{what}: features must be numbers, got {x.dtype}")
            if not np.isfinite(x).all():
                raise DataError(f"{what}: contains NaN or Inf")

    def apply(self, x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Raw batch -> float32 model input batch (text: a dict of int64 input_ids/attention_mask)."""
        if self.kind == "text":
            from edgecli.data.text import tokenize

            # padded to this batch's longest sentence, never to max_length (16x slower at 7 tokens)
            return tokenize(x, self.extra["tokenizer"], self.extra["max_length"])
        if self.kind == "image":
            x = resize_images(x, self.resize) if self.resize else x
            x = convert_channels(x, self.channels) if self.channels else x
            out = x.astype(np.float32) * np.float32(self.scale)
            out = out.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            if self.mean is not None:
                m = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
                s = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
                out = (out - m) / s
            return np.ascontiguousarray(out, dtype=np.float32)
        if self.kind == "table":
            out = x.astype(np.float32)
            if self.mean is not None:
                out = (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            return out
        raise DataError(f"no preprocessing for data kind '{self.kind}'")


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


def load_image_file(path: str, channels: int) -> np.ndarray:
    """Read an image file as uint8 (H, W, C) in the dataset's raw mode (grayscale or RGB)."""
    from edgecli.safeio import INPUT_LIMIT, read_user_bytes, shown

    data = read_user_bytes(path, "an image file", INPUT_LIMIT, DataError)  # never blocks, bounded
    return decode_image(data, channels, shown(path))


def decode_image(data: bytes, channels: int, name: str) -> np.ndarray:
    """Decode image bytes held in memory (a file's, an upload's) as uint8 (H, W, C), guarded.

    A header claiming more than ``IMAGE_PIXEL_LIMIT`` pixels (a decompression bomb) is refused before
    anything is decoded; anything Pillow cannot read is a one-line DataError naming ``name``.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    from edgecli.safeio import IMAGE_PIXEL_LIMIT

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > IMAGE_PIXEL_LIMIT or w * h <= 0:  # a decompression bomb: refused before decoding
                raise DataError(f"{name}: {w}x{h} pixels, over the {IMAGE_PIXEL_LIMIT // 1_000_000} million pixel "
                                "limit for one image; refused")
            im.load()
            mode = "L" if channels == 1 else "RGB"
            arr = np.asarray(im.convert(mode))
    except Image.DecompressionBombError:
        raise DataError(f"{name}: over Pillow's pixel limit (a decompression bomb?); refused") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr
