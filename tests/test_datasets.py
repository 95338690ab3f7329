import gzip
import re
import struct
import sys

import numpy as np
import pytest

from pccore import datasets


def write_idx(path, array: np.ndarray, code: int = 0x08, gz: bool = False) -> None:
    """An IDX writer written from the format description (independent of the loader)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    payload = header + big.tobytes(order="C")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fake_mnist(rng, n_train=40, n_test=12):
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.uint8),
    )


def write_mnist_dir(directory, arrays, gz):
    for stem, a in zip(datasets.IDX_FILES, arrays):
        write_idx(directory / (stem + (".gz" if gz else "")), a, gz=gz)


def check_against(ds, arrays):
    x_tr, l_tr, x_te, l_te = arrays
    np.testing.assert_array_equal(ds.x_train, x_tr.reshape(len(x_tr), -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test, x_te.reshape(len(x_te), -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train.argmax(1), l_tr)
    np.testing.assert_array_equal(ds.y_test.argmax(1), l_te)
    np.testing.assert_array_equal(ds.y_train.sum(1), 1.0)
    assert ds.x_train.dtype == ds.y_train.dtype == np.float32
    assert (ds.num_features, ds.num_classes) == (784, 10)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("loader", [datasets.load_mnist, datasets.load_fashion_mnist])
def test_idx_files_match_written_arrays(tmp_path, gz, loader):
    arrays = fake_mnist(np.random.default_rng(0))
    write_mnist_dir(tmp_path, arrays, gz)
    check_against(loader(tmp_path), arrays)


def test_idx_non_byte_dtype(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    write_idx(tmp_path / "a", a, code=0x0C)
    out = datasets.load_idx(tmp_path / "a")
    np.testing.assert_array_equal(out, a)


def test_npz_archive(tmp_path):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(1))
    np.savez(tmp_path / "fashion-mnist.npz", x_train=x_tr, y_train=l_tr, x_test=x_te, y_test=l_te)
    check_against(datasets.load_fashion_mnist(tmp_path), (x_tr, l_tr, x_te, l_te))
    check_against(datasets.load("mnist", data_dir=tmp_path / "fashion-mnist.npz"),
                  (x_tr, l_tr, x_te, l_te))


def test_missing_files_name_path_and_expected_names(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"No mnist data found in .*missing "
                       r"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
                       r".*mnist\.npz"):
        datasets.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does-not-exist does not exist.*IDX files"):
        datasets.load_mnist(tmp_path / "does-not-exist")


def test_bad_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04rubbish")
    with pytest.raises(ValueError, match="is not an IDX file"):
        datasets.load_idx(tmp_path / "x")
    write_idx(tmp_path / "y", np.zeros((3, 4), np.uint8))
    (tmp_path / "y").write_bytes((tmp_path / "y").read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        datasets.load_idx(tmp_path / "y")
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"lacks the arrays \['y_train', 'x_test', 'y_test'\]"):
        datasets.load_mnist(tmp_path / "mnist.npz")
    with pytest.raises(ValueError, match="`data_dir`: the mnist data set is read from files"):
        datasets.load("mnist")
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        datasets.load("cifar")


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels_must_match_in_number(tmp_path, gz, split):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=10, n_test=6)
    arrays = (x_tr, l_tr[:7], x_te, l_te) if split == "train" else (x_tr, l_tr, x_te, l_te[:4])
    write_mnist_dir(tmp_path, arrays, gz)
    images, n_images, n_labels = ("train", 10, 7) if split == "train" else ("t10k", 6, 4)
    suffix = r"\.gz" if gz else ""
    with pytest.raises(
        ValueError,
        match=rf"images and labels do not match: .*{images}-images-idx3-ubyte{suffix} holds "
              rf"{n_images} images but .*{images}-labels-idx1-ubyte{suffix} holds {n_labels} "
              r"labels; expected one label per image\. Use the image and label files of the "
              "same release",
    ):
        datasets.load_mnist(tmp_path)


def test_npz_images_and_labels_must_match_in_number(tmp_path):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=10)
    np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=l_tr[:3], x_test=x_te, y_test=l_te)
    with pytest.raises(ValueError, match=r"mnist\.npz\['x_train'\] holds 10 images but .*"
                                         r"mnist\.npz\['y_train'\] holds 3 labels; expected one"):
        datasets.load_mnist(tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=l_tr, x_test=x_te[:, :20],
             y_test=l_te)
    with pytest.raises(ValueError, match=r"training and test images differ in shape: .*"
                                         r"\(28, 28\), .*\['x_test'\] of shape \(20, 28\)"):
        datasets.load_mnist(tmp_path)


def test_labels_must_be_class_indices(tmp_path):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=10)
    path = tmp_path / "mnist.npz"
    for labels, message in [
        (l_tr.reshape(-1, 1), r"\['y_train'\]: expected one class index per sample, a 1-D "
                              r"array of shape \(n,\); got shape \(10, 1\)\. .*reshape"),
        (l_tr + 0.5, r"\['y_train'\]: expected integer class indices 0\.\.9; got dtype "
                     r"float64, with values such as \d\.5"),
        (np.r_[l_tr[:9], 10], r"\['y_train'\]: expected class indices 0\.\.9; got values "
                              r"from \d to 10"),
    ]:
        np.savez(path, x_train=x_tr, y_train=labels, x_test=x_te, y_test=l_te)
        with pytest.raises(ValueError, match=message):
            datasets.load_mnist(path)
    np.savez(path, x_train=x_tr, y_train=l_tr.astype(np.float32), x_test=x_te, y_test=l_te)
    check_against(datasets.load_mnist(path), (x_tr, l_tr, x_te, l_te))  # whole floats are fine


def test_unreadable_files_are_named(tmp_path):
    # the header claims three dimensions, but the file ends inside the first
    (tmp_path / "hdr").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"hdr: the header declares 3 dimensions, so the header "
                                         r"alone needs 16 bytes, but the file has 6 bytes\. The "
                                         "file is truncated or not an IDX file"):
        datasets.load_idx(tmp_path / "hdr")
    (tmp_path / "plain.gz").write_bytes(b"\0\0\x08\x01\0\0\0\x01\x07")  # raw IDX named .gz
    with pytest.raises(ValueError, match=r"plain\.gz is not a readable gzip file .*drop the "
                                         r"\.gz from its name"):
        datasets.load_idx(tmp_path / "plain.gz")
    write_idx(tmp_path / "cut.gz", np.zeros((50, 28, 28), np.uint8), gz=True)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "cut.gz").read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"cut\.gz is not a readable gzip file"):
        datasets.load_idx(tmp_path / "cut.gz")
    (tmp_path / "text.npz").write_text("x_train,y_train\n")
    with pytest.raises(ValueError, match=r"text\.npz is not a readable \.npz archive .*expected "
                                         r"a NumPy \.npz archive with numeric arrays x_train"):
        datasets.load_mnist(tmp_path / "text.npz")
    with open(tmp_path / "one.npz", "wb") as f:
        np.save(f, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"one\.npz holds one array of shape \(3, 4\) \(an \.npy "
                                         r"file\), not an \.npz archive"):
        datasets.load_mnist(tmp_path / "one.npz")
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=10)
    np.savez(tmp_path / "obj.npz", x_train=x_tr, y_train=np.array(list(l_tr), dtype=object),
             x_test=x_te, y_test=l_te)
    with pytest.raises(ValueError, match=r"obj\.npz: its arrays cannot be read"):
        datasets.load_mnist(tmp_path / "obj.npz")


def test_a_file_that_is_not_npz_is_not_reported_missing(tmp_path):
    write_mnist_dir(tmp_path, fake_mnist(np.random.default_rng(0)), gz=False)
    with pytest.raises(ValueError, match=r"`data_dir`: .*train-labels-idx1-ubyte exists but is "
                                         r"neither a folder nor an \.npz file; expected a folder "
                                         r"holding the mnist IDX files .*or the path of an \.npz "
                                         rf"file\. For IDX files, pass the folder that holds "
                                         rf"them: {re.escape(str(tmp_path))}\."):
        datasets.load_mnist(tmp_path / "train-labels-idx1-ubyte")


def test_digits_split_is_stratified_and_fixed():
    sk = pytest.importorskip("sklearn.datasets")
    x, labels = sk.load_digits(return_X_y=True)
    ds = datasets.load_digits(seed=3, test_fraction=0.25)
    # every sample appears exactly once, scaled by 1/16, with its own label
    rows = np.concatenate([ds.x_train, ds.x_test]) * 16
    got = np.concatenate([ds.y_train, ds.y_test]).argmax(1)
    order = np.lexsort(rows.T)
    ref_order = np.lexsort(x.T)
    np.testing.assert_array_equal(rows[order], x[ref_order])
    np.testing.assert_array_equal(np.bincount(got), np.bincount(labels))
    # stratified: round(f * n_c) test samples per class
    expected = np.round(0.25 * np.bincount(labels)).astype(int)
    np.testing.assert_array_equal(np.bincount(ds.y_test.argmax(1), minlength=10), expected)
    again = datasets.load_digits(seed=3, test_fraction=0.25)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    other = datasets.load_digits(seed=4, test_fraction=0.25)
    assert not np.array_equal(other.x_test, ds.x_test)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "pccore\[data\]"'):
        datasets.load_digits()


def test_split_and_one_hot_errors():
    with pytest.raises(ValueError, match="`test_fraction` must lie strictly between 0 and 1"):
        datasets.stratified_split(np.zeros(4, int), 1.0, 0)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        datasets.one_hot(np.array([0, 3]), 3)
