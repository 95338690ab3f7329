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
import pathlib

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
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: expected two zero bytes and a type code in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)}; got the header bytes {data[:4]!r}."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
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


def _from_arrays(name, x_train, labels_train, x_test, labels_test, num_classes=10) -> Dataset:
    def prep(x):
        x = np.asarray(x)
        scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0  # uint8 pixels -> [0, 1]
        return (x.reshape(x.shape[0], -1) / scale).astype(np.float32)

    return Dataset(
        prep(x_train),
        one_hot(np.asarray(labels_train).astype(np.int64), num_classes),
        prep(x_test),
        one_hot(np.asarray(labels_test).astype(np.int64), num_classes),
        name,
    )


def _load_npz(path: pathlib.Path, name: str) -> Dataset:
    with np.load(path) as f:
        missing = [k for k in _NPZ_KEYS if k not in f.files]
        if missing:
            raise ValueError(
                f"{path} lacks the arrays {missing}; expected {list(_NPZ_KEYS)} (the Keras "
                f"layout); found {sorted(f.files)}."
            )
        arrays = [f[k] for k in _NPZ_KEYS]
    return _from_arrays(name, *arrays)


def _load_mnist_like(data_dir: str | pathlib.Path, name: str) -> Dataset:
    path = pathlib.Path(data_dir).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, name)
    if path.is_dir():
        files = [_find_idx(path, stem) for stem in IDX_FILES]
        if all(f is not None for f in files):
            x_tr, l_tr, x_te, l_te = (load_idx(f) for f in files)
            return _from_arrays(name, x_tr, l_tr, x_te, l_te)
        if (path / _NPZ_NAMES[name]).is_file():
            return _load_npz(path / _NPZ_NAMES[name], name)
        missing = [stem for stem, f in zip(IDX_FILES, files) if f is None]
        raise FileNotFoundError(
            f"No {name} data found in {path}: missing {', '.join(missing)} (each may end in "
            f".gz), and there is no {_NPZ_NAMES[name]}. Put the four IDX files "
            f"{', '.join(IDX_FILES)} (gzipped or not), or one {_NPZ_NAMES[name]} with arrays "
            f"{', '.join(_NPZ_KEYS)}, in that folder."
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
    """A data set by name: `"digits"`, `"mnist"` or `"fashion-mnist"` (the last two need `data_dir`)."""
    if name == "digits":
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
