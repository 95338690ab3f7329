"""Small classification data sets as NumPy arrays: digits (bundled) and MNIST / Fashion-MNIST.

Every loader returns a [`pccore.datasets.Dataset`][]: inputs flattened to float32 (integer
pixels divided by 255, digits by 16, so they lie in $[0, 1]$), labels one-hot (float32), and a
fixed train/test split. Nothing is
downloaded: digits comes embedded in scikit-learn (the `data` extra), MNIST and Fashion-MNIST
are read from files you already have on disk, in either standard form:

- the four IDX files, gzipped or not: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (each optionally with `.gz`);
- one `.npz` archive with arrays `x_train`, `y_train`, `x_test`, `y_test` (Keras layout),
  named `mnist.npz` or `fashion-mnist.npz` (or passed as the path itself).
"""

import gzip
import math
import pathlib
import zipfile
import zlib

import equinox as eqx
import numpy as np

__all__ = [
    "Dataset",
    "IDX_FILES",
    "load",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_mnist",
    "one_hot",
    "stratified_split",
]

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The standard MNIST / Fashion-MNIST file names (each may also end in `.gz`)."""

_NPZ_NAMES = {"mnist": "mnist.npz", "fashion-mnist": "fashion-mnist.npz"}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Dataset(eqx.Module):
    """A classification data set with a fixed split (NumPy arrays, float32).

    **Fields:**

    - `x_train`, `x_test`: inputs of shape `(n, features)`, scaled to $[0, 1]$.
    - `y_train`, `y_test`: one-hot labels of shape `(n, num_classes)`.
    - `name`: the data set's name, e.g. `"digits"`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = eqx.field(static=True)

    @property
    def num_features(self) -> int:
        """The input width."""
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        """The number of classes (the width of the one-hot labels)."""
        return int(self.y_train.shape[1])

    def subset(self, train: int | None = None, test: int | None = None) -> "Dataset":
        """The first `train` training and `test` test samples (None keeps all)."""
        return Dataset(
            self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test],
            self.name,
        )


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels `(n,)` as float32 one-hot rows `(n, num_classes)`."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be a 1-D integer array; got shape {labels.shape} and dtype "
            f"{labels.dtype}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}); got values from {labels.min()} to "
            f"{labels.max()}."
        )
    return np.eye(num_classes, dtype=np.float32)[labels]


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(train, test)` with `round(test_fraction * n_c)` test samples of each class `c`.

    Each class is shuffled with `numpy.random.default_rng(seed)`, so the split is fixed by
    `seed`; both index arrays are sorted.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must lie strictly between 0 and 1; got {test_fraction}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), offline.

    **Arguments:**

    - `seed`: fixes the stratified train/test split.
    - `test_fraction`: the share of each class held out for testing.

    **Returns:** a [`pccore.datasets.Dataset`][] with inputs `x / 16` (64 features) and
    one-hot labels. Needs scikit-learn (`pip install "pccore[data]"`).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError(
            'The digits data set comes from scikit-learn, which is not installed. Install it '
            'with: pip install "pccore[data]"'
        ) from e
    x, labels = sk_load_digits(return_X_y=True)
    train, test = stratified_split(labels, test_fraction, seed)
    x = (x / 16.0).astype(np.float32)
    y = one_hot(labels, 10)
    return Dataset(x[train], y[train], x[test], y[test], "digits")


def load_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in `.gz`) into a NumPy array.

    The format: two zero bytes, a type code (`0x08` = uint8, ...), the number of dimensions,
    one big-endian int32 per dimension, then the data in C order.
    """
    path = pathlib.Path(path)
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(
                f"{path} is not a readable gzip file ({e}). It is damaged, truncated or not "
                "gzipped: download it again, or, if it holds the raw IDX bytes, drop the .gz "
                "from its name."
            ) from e
    else:
        data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: expected two zero bytes and a type code in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)}; got the header bytes {data[:4]!r}."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(
            f"{path}: the header declares {ndim} dimensions, so the header alone needs "
            f"{offset} bytes, but the file has {len(data)} bytes. The file is truncated or not "
            "an IDX file: download it again."
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    expected = offset + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: the header gives shape {dims} ({expected} bytes in all), but the file "
            f"has {len(data)} bytes. The file is truncated or not an IDX file."
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _labels(labels, source: str, num_classes: int) -> np.ndarray:
    """`labels` as int64 class indices, or a ValueError naming `source`."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"{source}: expected one class index per sample, a 1-D array of shape (n,); got "
            f"shape {labels.shape}. Store the labels as integers 0..{num_classes - 1} (for "
            "one-hot or (n, 1) labels: argmax or reshape(-1))."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        whole = np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))
        if not whole:
            bad = labels[labels != np.round(labels)] if labels.dtype.kind == "f" else labels
            raise ValueError(
                f"{source}: expected integer class indices 0..{num_classes - 1}; got dtype "
                f"{labels.dtype}, with values such as {bad.flat[0].item()!r}."
            )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source}: expected class indices 0..{num_classes - 1}; got values from "
            f"{labels.min()} to {labels.max()}."
        )
    return labels.astype(np.int64)


def _check_finite(x: np.ndarray, file: str | pathlib.Path, array: str) -> None:
    """A ValueError naming `file` and `array` (`x_train`, `x_test`) if `x` holds NaN or inf.

    A non-finite pixel would make every training step on its batch diverge; a non-finite
    test pixel would make the test accuracy meaningless.
    """
    if not np.issubdtype(x.dtype, np.inexact) or x.ndim < 2:
        return  # integer pixels are always finite; a wrong shape is reported by _from_arrays
    bad = ~np.isfinite(x)
    count = int(bad.sum())
    if count:
        first = int(np.flatnonzero(bad.reshape(x.shape[0], -1).any(axis=1))[0])
        raise ValueError(
            f"{file}: `{array}` holds {count} non-finite value{'s' * (count != 1)} (NaN or "
            f"inf) out of {x.size}, the first in sample {first}; expected finite pixel values. "
            f"Replace them (e.g. numpy.nan_to_num) or drop those samples, and write {file} again."
        )


def _from_arrays(name, arrays, sources, num_classes=10) -> Dataset:
    """The data set from `(x_train, labels_train, x_test, labels_test)`; `sources` names where
    each array came from (a file, or a key of an archive) for the error messages."""
    x_tr, l_tr, x_te, l_te = (np.asarray(a) for a in arrays)
    for split, x, labels, x_src, l_src in (
        ("training", x_tr, l_tr, sources[0], sources[1]),
        ("test", x_te, l_te, sources[2], sources[3]),
    ):
        if x.ndim < 2:
            raise ValueError(
                f"{x_src}: expected {split} images of shape (n, ...) with at least two "
                f"dimensions; got shape {x.shape}."
            )
        labels = np.asarray(labels)
        n_labels = labels.shape[0] if labels.ndim else 0
        if x.shape[0] != n_labels:
            raise ValueError(
                f"The {split} images and labels do not match: {x_src} holds {x.shape[0]} "
                f"images but {l_src} holds {n_labels} labels; expected one label per image. "
                "Use the image and label files of the same release (one of them may be "
                "truncated or belong to another data set)."
            )
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"The training and test images differ in shape: {sources[0]} holds images of shape "
            f"{x_tr.shape[1:]}, {sources[2]} of shape {x_te.shape[1:]}; expected the same "
            "shape (files of the same data set)."
        )

    def prep(x):
        scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0  # uint8 pixels -> [0, 1]
        return (x.reshape(x.shape[0], -1) / scale).astype(np.float32)

    return Dataset(
        prep(x_tr),
        one_hot(_labels(l_tr, sources[1], num_classes), num_classes),
        prep(x_te),
        one_hot(_labels(l_te, sources[3], num_classes), num_classes),
        name,
    )


_NPZ_READ_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError)


def _load_npz(path: pathlib.Path, name: str) -> Dataset:
    fix = (f"expected a NumPy .npz archive with numeric arrays {', '.join(_NPZ_KEYS)} (as "
           "numpy.savez writes them)")
    try:
        loaded = np.load(path)  # no pickles: a ValueError for pickled or object data
    except _NPZ_READ_ERRORS as e:
        raise ValueError(f"{path} is not a readable .npz archive ({e}); {fix}.") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds one array of shape {loaded.shape} (an .npy file), not an .npz "
            f"archive; {fix}."
        )
    with loaded as f:
        missing = [k for k in _NPZ_KEYS if k not in f.files]
        if missing:
            raise ValueError(
                f"{path} lacks the arrays {missing}; expected {list(_NPZ_KEYS)} (the Keras "
                f"layout); found {sorted(f.files)}."
            )
        try:
            arrays = [f[k] for k in _NPZ_KEYS]
        except _NPZ_READ_ERRORS as e:
            raise ValueError(f"{path}: its arrays cannot be read ({e}); {fix}.") from e
    for key, x in zip(_NPZ_KEYS, arrays):
        if key.startswith("x_"):
            _check_finite(np.asarray(x), path, key)
    return _from_arrays(name, arrays, [f"{path}[{k!r}]" for k in _NPZ_KEYS])


def _load_mnist_like(data_dir: str | pathlib.Path, name: str) -> Dataset:
    path = pathlib.Path(data_dir).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, name)
    if path.is_dir():
        files = [_find_idx(path, stem) for stem in IDX_FILES]
        if all(f is not None for f in files):
            arrays = [load_idx(f) for f in files]
            for key, f, x in zip(_NPZ_KEYS, files, arrays):
                if key.startswith("x_"):
                    _check_finite(x, f, key)
            return _from_arrays(name, arrays, files)
        if (path / _NPZ_NAMES[name]).is_file():
            return _load_npz(path / _NPZ_NAMES[name], name)
        missing = [stem for stem, f in zip(IDX_FILES, files) if f is None]
        raise FileNotFoundError(
            f"No {name} data found in {path}: missing {', '.join(missing)} (each may end in "
            f".gz), and there is no {_NPZ_NAMES[name]}. Put the four IDX files "
            f"{', '.join(IDX_FILES)} (gzipped or not), or one {_NPZ_NAMES[name]} with arrays "
            f"{', '.join(_NPZ_KEYS)}, in that folder."
        )
    if path.exists():
        raise ValueError(
            f"`data_dir`: {path} exists but is neither a folder nor an .npz file; expected a "
            f"folder holding the {name} IDX files {', '.join(IDX_FILES)} (gzipped or not) or "
            f"{_NPZ_NAMES[name]}, or the path of an .npz file. For IDX files, pass the folder "
            f"that holds them: {path.parent}."
        )
    raise FileNotFoundError(
        f"`data_dir`: {path} does not exist. Pass a folder holding the {name} IDX files "
        f"{', '.join(IDX_FILES)} (gzipped or not) or {_NPZ_NAMES[name]}, or the path of an "
        ".npz file."
    )


def load_mnist(data_dir: str | pathlib.Path) -> Dataset:
    """MNIST from files on disk: the four IDX files (gzipped or not) or `mnist.npz`.

    **Arguments:**

    - `data_dir`: a folder holding the files, or the path of an `.npz` archive.

    **Returns:** a [`pccore.datasets.Dataset`][] with 784 features in $[0, 1]$ and one-hot
    labels, split as the files are (60 000 / 10 000 for the real data).

    **Raises:** `FileNotFoundError` when the files are not there; `ValueError`, naming the
    file or archive key, when they cannot be used: a damaged, truncated or non-IDX file, a
    path that is neither a folder nor an `.npz`, images and labels of different counts,
    labels that are not class indices 0..9, or images (`x_train` or `x_test`) holding NaN or
    inf (the message gives the file, the array and how many).
    """
    return _load_mnist_like(data_dir, "mnist")


def load_fashion_mnist(data_dir: str | pathlib.Path) -> Dataset:
    """Fashion-MNIST from files on disk (same file names as MNIST, or `fashion-mnist.npz`).

    See [`pccore.datasets.load_mnist`][].
    """
    return _load_mnist_like(data_dir, "fashion-mnist")


def load(
    name: str, *, data_dir: str | pathlib.Path | None = None, seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """A data set by name: `"digits"`, `"mnist"` or `"fashion-mnist"` (the last two need `data_dir`).

    `digits` is bundled with scikit-learn and reads no files: a `data_dir` with it is refused
    (a ValueError) rather than ignored. `seed` and `test_fraction` fix the digits split; the
    file-based sets keep the split of their files.
    """
    if name == "digits":
        if data_dir is not None:
            raise ValueError(
                f"`data_dir`: got {str(data_dir)!r} with the digits data set, which is bundled "
                "with scikit-learn and reads no files; expected data_dir=None. Drop `data_dir`, "
                "or load 'mnist' or 'fashion-mnist' to read the files there."
            )
        return load_digits(seed, test_fraction)
    if name in _NPZ_NAMES:
        if data_dir is None:
            raise ValueError(
                f"`data_dir`: the {name} data set is read from files on disk; pass the folder "
                f"holding {', '.join(IDX_FILES)} (gzipped or not) or {_NPZ_NAMES[name]}."
            )
        return load_mnist(data_dir) if name == "mnist" else load_fashion_mnist(data_dir)
    raise ValueError(
        f"`name`: unknown data set {name!r}; expected one of 'digits', 'mnist', 'fashion-mnist'."
    )
