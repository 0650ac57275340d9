"""Raw-input readers for ``edgecli infer``: files, arguments and JSON lines -> checked model inputs.

One reader per model kind (``model_info["kind"]``: image, table, text; ``None`` for a model
edgecli knows nothing about, which only takes .npy arrays of model inputs). Every reader turns an
input into raw samples as a user holds them and then applies exactly the model's preprocessing
(``PreprocessSpec.check_raw`` + ``apply``). numpy and Pillow only: no torch, no sklearn.

Accepted inputs
- image models: PNG/JPEG/BMP/GIF/TIFF/WebP files; .npy of uint8 pixels, one image (H, W) or
  (H, W, C) or a batch (N, H, W[, C]) (integer arrays with values 0-255 are taken as pixels);
- table models: .csv files of feature rows (header optional; a column named like the label is
  dropped); .npy of one row (F,) or rows (N, F);
- text models: each argument that is not an existing file is a sentence;
- any model: ``-`` reads JSON lines on stdin, one request per line:
  ``{"id": 7, "pixels": [[0, 255, ...], ...]}`` (image), ``{"features": [0.1, 2.0, ...]}`` (table),
  ``{"text": "turn on the lights"}`` (text), ``{"path": "digit.png"}`` (any file above),
  ``{"input": [[...]]}`` (model input values, for a model without edgecli metadata).

Every problem is a ``Sample`` with ``error`` set (one line naming the input), never an exception:
files are opened by the one guarded opener (``edgecli.safeio``: regular files only, never blocking on
a FIFO, bounded in size), and any other failure while reading one input (a decompression bomb, an
.npy header claiming 1e12 elements, JSON nested 100k deep) is that input's error alone.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecli.errors import DataError, EdgeError
from edgecli.safeio import INPUT_LIMIT, read_user_bytes, read_user_text, shown

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass
class Sample:
    """One answerable request: a model-input batch (``feeds``, n rows) or an error."""

    name: str
    feeds: dict[str, np.ndarray] | None = None
    error: str | None = None
    id: Any = None
    n: int = 0
    names: list[str] = field(default_factory=list)  # one name per row (a .npy batch: file.npy[i])


class Reader:
    """Turns raw inputs into model inputs for one model kind."""

    kind = "?"
    fields: tuple[str, ...] = ()  # the request keys this kind takes besides "id" and "path"

    def __init__(self, info: dict | None, input_specs: list[dict]):
        self.info = info or {}
        self.inputs = input_specs  # [{"name", "shape", "dtype"}] of the session
        spec = self.info.get("preprocess")
        if spec:
            from edgecli.data.preprocess import PreprocessSpec

            self.spec = PreprocessSpec.from_dict(spec)
        else:
            self.spec = None

    # ------------------------------------------------------------------ entry points
    def argument(self, arg: str) -> Sample:
        """A command-line argument: a file of a kind this model takes."""
        name = shown(arg)
        p = Path(arg)
        try:
            if not p.exists() and not p.is_symlink():
                return Sample(name, error=f"{name}: no such file")
            if p.is_dir():
                return Sample(name, error=f"{name}: is a directory, expected a file")
        except (OSError, ValueError) as e:  # a name too long, or holding NUL
            return Sample(name, error=f"{name}: not a usable path ({type(e).__name__})")
        return self._guard(name, lambda: self.file(p, name))

    def json_line(self, line: str | bytes, where: str) -> Sample:
        """One JSON request (a line of stdin)."""
        obj, err = _parse_json(line, where)
        if err is not None:
            return err
        return self.request(obj, where)

    def json_body(self, body: str | bytes, where: str = "request", *, allow_path: bool = False) -> tuple[list[Sample], bool]:
        """An HTTP request body: one JSON request object or a list of them -> (samples, was_one_object).

        The objects are exactly infer's JSON lines; ``{"path": ...}`` is refused unless ``allow_path``
        (a server must not read its own files on a caller's say-so). A parse error is one error sample.
        """
        obj, err = _parse_json(body, where)
        if err is not None:
            return [err], True
        if isinstance(obj, list):
            if not obj:
                return [Sample(where, error=f"{where}: an empty list; send one request object or a list of them")], False
            return [self.request(o, f"{where}[{i}]", allow_path=allow_path) for i, o in enumerate(obj)], False
        return [self.request(obj, where, allow_path=allow_path)], True

    def request(self, obj, where: str, *, allow_path: bool = True) -> Sample:
        """One parsed request object (a JSON line, an item of an HTTP body) -> a Sample."""
        if not isinstance(obj, dict):
            return Sample(where, error=f"{where}: expected a JSON object such as {self.example()}")
        rid = obj.get("id")
        if rid is not None and (not isinstance(rid, (str, int, float, bool))
                                or (isinstance(rid, float) and not np.isfinite(rid))):
            return Sample(where, error=f"{where}: \"id\" must be a string or a finite number")
        name = shown(rid) if rid is not None else where
        unknown = sorted(str(k) for k in obj if k not in self.fields and k not in ("id", "path"))
        if unknown:
            listed = ", ".join(f'"{shown(k)[:40]}"' for k in unknown[:5])
            s = Sample(name, error=f"{name}: unknown field(s) {listed} in the request; expected "
                                   f"{' or '.join(chr(34) + f + chr(34) for f in self.fields)} (or \"path\"), and an optional \"id\"")
        elif "path" in obj:
            if not allow_path:
                s = Sample(name, error=f"{name}: \"path\" is refused here (serve.allow_path is off); send the "
                                       "data itself or upload the file")
            elif not isinstance(obj["path"], str):
                s = Sample(name, error=f"{name}: \"path\" must be a string")
            else:
                s = self.argument(obj["path"])
        else:
            s = self._guard(name, lambda: self.json_obj(obj, name))
        s.id = rid
        return s

    def upload(self, data: bytes, name: str) -> Sample:
        """One uploaded file's bytes (an HTTP multipart part or image body), decoded in memory."""
        return Sample(name, error=f"{name}: this is a {self.kind or 'model-input'} model; it takes JSON requests "
                                  f"such as {self.example()}, not uploaded files")

    def _guard(self, name: str, fn) -> Sample:
        """Run one input's reading; whatever goes wrong becomes that input's one-line error."""
        try:
            return fn()
        except (DataError, EdgeError) as e:
            msg = e.message if e.message.startswith(name) else f"{name}: {e.message}"
            return Sample(name, error=msg)
        except (ValueError, TypeError, OverflowError) as e:
            return Sample(name, error=f"{name}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
        except MemoryError:
            return Sample(name, error=f"{name}: too large to hold in memory; refused")
        except RecursionError:
            return Sample(name, error=f"{name}: nested too deeply; refused")
        except Exception as e:  # noqa: BLE001 - the funnel is total: one input never ends the run
            first = (str(e).splitlines() or [""])[0][:160]
            return Sample(name, error=f"{name}: cannot be read ({type(e).__name__}{': ' + first if first else ''})")

    # ------------------------------------------------------------------ to override
    def file(self, path: Path, name: str) -> Sample:
        raise NotImplementedError

    def json_obj(self, obj: dict, name: str) -> Sample:
        raise NotImplementedError

    def example(self) -> str:
        return '{"path": "x.npy"}'

    # ------------------------------------------------------------------ helpers
    def _preprocess(self, raw, name: str, rows: list[str] | None = None) -> Sample:
        self.spec.check_raw(raw, name)
        x = self.spec.apply(raw)
        feeds = x if isinstance(x, dict) else {self.inputs[0]["name"]: x}
        n = len(next(iter(feeds.values())))
        return Sample(name, feeds=feeds, n=n, names=rows or _row_names(name, n))


def _row_names(name: str, n: int) -> list[str]:
    return [name] if n == 1 else [f"{name}[{i}]" for i in range(n)]


def _parse_json(text: str | bytes, where: str):
    """(object, None) or (None, an error Sample): strict JSON, never NaN/Infinity, bounded nesting."""
    try:
        return json.loads(text, parse_constant=_no_constant), None  # NaN/Infinity are not JSON: never echoed back
    except json.JSONDecodeError as e:
        return None, Sample(where, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError:
        return None, Sample(where, error=f"{where}: not valid JSON (not UTF-8 text)")
    except ValueError as e:
        return None, Sample(where, error=f"{where}: not valid JSON ({e})")
    except RecursionError:
        return None, Sample(where, error=f"{where}: JSON nested too deeply; refused")


def _no_constant(c: str):
    raise ValueError(f"{c} is not a JSON value")


def _load_npy(path: Path, name: str) -> np.ndarray:
    """A plain numeric .npy through the guarded opener; its header must match the bytes it holds."""
    import io

    data = read_user_bytes(path, "an .npy array", INPUT_LIMIT, DataError)
    if data[:2] == b"PK":
        raise DataError(f"{name}: an .npz archive; give one .npy array per file")
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, EOFError, TypeError, OverflowError, SyntaxError) as e:
        raise DataError(f"{name}: not a readable .npy array ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if dtype.hasobject:
        raise DataError(f"{name}: holds Python objects (pickled); edgecli only reads plain numeric .npy arrays")
    count = 1
    for d in shape:
        count *= int(d)
    need = count * dtype.itemsize
    have = len(data) - f.tell()
    if need != have:  # a header claiming 1e12 elements is refused before anything is allocated
        raise DataError(f"{name}: the .npy header claims shape {list(shape)} ({need} bytes) but the file holds "
                        f"{have} bytes of data; truncated or forged")
    f.seek(0)
    try:
        arr = np.load(f, allow_pickle=False)  # never unpickle user files
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(f"{name}: holds Python objects (pickled); edgecli only reads plain numeric .npy arrays") from None
        raise DataError(f"{name}: not a readable .npy array ({str(e).splitlines()[0][:120]})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{name}: not a readable .npy array ({type(e).__name__})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{name}: an .npz archive; give one .npy array per file")
    return arr


def _finite(arr: np.ndarray, name: str) -> None:
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        if not np.isfinite(arr).all():
            raise DataError(f"{name}: contains NaN or Inf")


def _numeric(value, name: str, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError:
        raise DataError(f"{name}: {what} must be a rectangular array of numbers (rows of unequal length)") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{name}: {what} must be numbers, got {arr.dtype if arr.dtype != object else 'mixed values'}")
    return arr


class ImageReader(Reader):
    kind = "image"
    fields = ("pixels",)

    def example(self) -> str:
        return '{"pixels": [[0, 255, ...], ...]} or {"path": "digit.png"}'

    def _channels(self) -> int:
        return int(self.spec.raw_shape[2])

    def pixels(self, arr: np.ndarray, name: str) -> np.ndarray:
        """A user's pixel array -> a uint8 (N, H, W, C) batch (shape checked by check_raw)."""
        _finite(arr, name)
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.integer):
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise DataError(f"{name}: pixel values must be 0-255, got {arr.min()}..{arr.max()}")
                arr = arr.astype(np.uint8)
            else:
                raise DataError(f"{name}: images must be 8-bit pixels (integers 0-255, uint8), got {arr.dtype}")
        c = self._channels()
        if arr.ndim == 2:  # one grayscale image
            arr = arr[None, :, :, None]
        elif arr.ndim == 3:
            # (H, W, C) with the model's channel count, else a batch of grayscale (N, H, W)
            if arr.shape[2] == c and (c == 3 or list(arr.shape[:2]) == self.spec.raw_shape[:2]):
                arr = arr[None]
            elif c == 1 and arr.shape[2] in (3, 4):
                raise DataError(f"{name}: expected 1 channel (grayscale), got {arr.shape[2]}")
            else:
                arr = arr[..., None]
        elif arr.ndim != 4:
            raise DataError(f"{name}: expected an image (H, W[, C]) or a batch (N, H, W[, C]), got shape {list(arr.shape)}")
        return arr

    def file(self, path: Path, name: str) -> Sample:
        suf = path.suffix.lower()
        if suf == ".npy":
            return self._preprocess(self.pixels(_load_npy(path, name), name), name)
        if suf in (".csv", ".tsv", ".json", ".jsonl", ".txt"):
            raise DataError(f"{name}: a {suf} file, but this is an image model; give image files or .npy pixels")
        from edgecli.data.images import load_image_file

        img = load_image_file(str(path), self._channels())  # raises DataError naming the file
        return self._preprocess(img[None], name)

    def upload(self, data: bytes, name: str) -> Sample:
        from edgecli.data.images import decode_image

        return self._guard(name, lambda: self._preprocess(decode_image(data, self._channels(), name)[None], name))

    def json_obj(self, obj: dict, name: str) -> Sample:
        if "pixels" not in obj:
            raise DataError(f"{name}: expected \"pixels\" (or \"path\") in the request, got keys {sorted(obj)}")
        return self._preprocess(self.pixels(_numeric(obj["pixels"], name, "pixels"), name), name)


class TableReader(Reader):
    kind = "table"
    fields = ("features",)

    def example(self) -> str:
        return '{"features": [0.1, 2.0, ...]}'

    def rows(self, arr: np.ndarray, name: str) -> np.ndarray:
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise DataError(f"{name}: expected feature rows (F,) or (N, F), got shape {list(arr.shape)}")
        _finite(arr, name)
        return arr.astype(np.float64)

    def file(self, path: Path, name: str) -> Sample:
        suf = path.suffix.lower()
        if suf == ".npy":
            return self._preprocess(self.rows(_numeric(_load_npy(path, name), name, "features"), name), name)
        if suf in (".csv", ".tsv", ".txt"):
            return self._preprocess(self.rows(self._csv(path, name), name), name)
        raise DataError(f"{name}: this is a table model; give .csv rows or a .npy array, not a {suf or 'suffix-less'} file")

    def _csv(self, path: Path, name: str) -> np.ndarray:
        label = str(self.info.get("label_column") or "label").lower()
        text = read_user_text(path, "a text CSV file", INPUT_LIMIT, DataError)
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        try:
            rows = [r for r in csv.reader(text.splitlines(), dialect=dialect) if r and any(c.strip() for c in r)]
        except csv.Error as e:  # a field over the csv module's 128 KB limit, a NUL byte
            raise DataError(f"{name}: not a valid CSV ({e})") from None
        if not rows:
            raise DataError(f"{name}: empty CSV file")
        drop = None
        order = None
        has_header = not any(_is_number(c) for c in rows[0])  # a data row with one typo is still data
        if has_header:
            header = [c.strip().lower() for c in rows[0]]
            drop = header.index(label) if label in header else None
            order = self._columns(header, drop, name)
            rows = rows[1:]
            if not rows:
                raise DataError(f"{name}: only a header line, no rows of features")
        out = []
        for i, r in enumerate(rows, start=2 if has_header else 1):
            vals = [r[j] for j in order] if order is not None and len(r) == len(rows[0]) else \
                [c for j, c in enumerate(r) if j != drop]
            try:
                out.append([float(c) for c in vals])
            except ValueError:
                raise DataError(f"{name}: line {i}: not all values are numbers") from None
        if len({len(r) for r in out}) > 1:
            raise DataError(f"{name}: rows have different numbers of values")
        return np.asarray(out, dtype=np.float64)

    def _columns(self, header: list[str], drop: int | None, name: str) -> list[int] | None:
        """Column positions in the model's feature order, matched by the training CSV's names.

        Reordered columns give the same answers; a missing or extra column is an error naming it.
        None for a model trained without feature names (position order, as before)."""
        names = self.info.get("feature_names")
        if not names:
            return None
        want = [str(n).strip().lower() for n in names]
        have = {h: j for j, h in enumerate(header) if j != drop}
        missing = [n for n in want if n not in have]
        if missing:
            raise DataError(f"{name}: column {missing[0]!r} is missing (the model takes {', '.join(names[:8])})")
        extra = [h for h in have if h not in want]
        if extra:
            raise DataError(f"{name}: column {extra[0]!r} is not a feature of this model "
                            f"(it takes {', '.join(names[:8])})")
        return [have[n] for n in want]

    def json_obj(self, obj: dict, name: str) -> Sample:
        if "features" not in obj:
            raise DataError(f"{name}: expected \"features\" (or \"path\") in the request, got keys {sorted(obj)}")
        return self._preprocess(self.rows(_numeric(obj["features"], name, "features"), name), name)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class TextReader(Reader):
    """Sentences: an argument that is not an existing file, or {"text": ...} lines."""

    kind = "text"
    fields = ("text",)

    def example(self) -> str:
        return '{"text": "turn on the lights"}'

    def argument(self, arg: str) -> Sample:
        p = Path(arg)
        try:
            is_txt = p.suffix.lower() in (".txt",) and p.exists()
        except (OSError, ValueError):
            is_txt = False
        if is_txt:
            return self._guard(shown(arg), lambda: self.file(p, shown(arg)))
        return self._guard(shown(_short(arg)), lambda: self._preprocess(np.asarray([arg], dtype=object), shown(_short(arg))))

    def file(self, path: Path, name: str) -> Sample:
        text = read_user_text(path, "a UTF-8 text file", INPUT_LIMIT, DataError)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise DataError(f"{name}: no sentences in the file")
        return self._preprocess(np.asarray(lines, dtype=object), name)

    def json_obj(self, obj: dict, name: str) -> Sample:
        t = obj.get("text")
        if not isinstance(t, str):
            raise DataError(f"{name}: expected \"text\": \"a sentence\" in the request")
        return self._preprocess(np.asarray([t], dtype=object), name)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


class ModelInputReader(Reader):
    """A model without edgecli metadata: .npy arrays (or JSON "input") that are model inputs already."""

    kind = None
    fields = ("input",)

    def example(self) -> str:
        return '{"input": [[...]]}'

    def check(self, arr: np.ndarray, name: str) -> Sample:
        spec = self.inputs[0]
        if len(self.inputs) != 1:
            raise DataError(f"{name}: the model has {len(self.inputs)} inputs; edgecli infer feeds single-input models "
                            "without edgecli metadata")
        shape = spec["shape"]
        if arr.ndim == len(shape) - 1:
            arr = arr[None]
        if arr.ndim != len(shape):
            raise DataError(f"{name}: expected model input {spec['name']} of shape {shape}, got {list(arr.shape)}")
        for i, (have, want) in enumerate(zip(arr.shape, shape, strict=True)):
            if i > 0 and isinstance(want, int) and have != want:
                raise DataError(f"{name}: expected model input {spec['name']} of shape {shape}, got {list(arr.shape)}")
        want = np.dtype(spec["dtype"])
        _finite(arr, name)
        if arr.dtype != want:
            same_family = (np.issubdtype(arr.dtype, np.floating) and np.issubdtype(want, np.floating)) or (
                np.issubdtype(arr.dtype, np.integer) and np.issubdtype(want, np.integer))
            if not same_family:
                raise DataError(f"{name}: model input {spec['name']} is {want.name}, got {arr.dtype}")
            arr = arr.astype(want)
        return Sample(name, feeds={spec["name"]: np.ascontiguousarray(arr)}, n=len(arr), names=_row_names(name, len(arr)))

    def file(self, path: Path, name: str) -> Sample:
        if path.suffix.lower() != ".npy":
            raise DataError(f"{name}: this model carries no edgecli preprocessing metadata, so infer only takes .npy "
                            "arrays of model inputs (export it from an edgecli stage to feed raw images/CSV)")
        return self.check(_numeric(_load_npy(path, name), name, "the array"), name)

    def json_obj(self, obj: dict, name: str) -> Sample:
        if "input" not in obj:
            raise DataError(f"{name}: this model carries no edgecli metadata; send {{\"input\": [...]}} model input values")
        return self.check(_numeric(obj["input"], name, "input"), name)


READERS: dict[str | None, type[Reader]] = {"image": ImageReader, "table": TableReader, "text": TextReader,
                                           None: ModelInputReader}


def reader_for(info: dict | None, input_specs: list[dict]) -> Reader:
    """The reader for this model's kind (model inputs only when the model has no edgecli metadata)."""
    kind = (info or {}).get("kind") if (info or {}).get("preprocess") else None
    cls = READERS.get(kind)
    if cls is None:
        raise DataError(f"infer: no reader for model kind '{kind}'")
    return cls(info if kind else None, input_specs)
