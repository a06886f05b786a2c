"""Specification of contrastive.data: loaders, safe unpickling, safe downloads, subsets.

Every test builds its own small fake data in tmp_path; only the last one reads a real
CIFAR-10 copy, and only when CONTRASTIVE_DATA points at one.
"""

import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive import data

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _Python2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote its str (BINSTRING), as in the official files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump(obj, path, style):
    if style == "py2":  # protocol 2, bytes keys, numpy 1 module names: like the official files
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(obj)
        raw = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        path.write_bytes(raw)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))


def make_cifar(root, n=20, style="py3", seed=0):
    """A fake cifar-10-batches-py with n images per batch file; returns {file: (data, labels)}."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if style in ("py2", "bytes") else (lambda k: k)
    rng = np.random.default_rng(seed)
    written = {}
    for name in FILES:
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(i) for i in rng.permutation(np.arange(n) % 10)]
        batch = {key("data"): pixels, key("labels"): labels, key("batch_label"): key(name)}
        _dump(batch, folder / name, style)
        written[name] = (pixels, labels)
    _dump({key("label_names"): [key(c) for c in CLASSES]}, folder / "batches.meta", style)
    return written


def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _load_quietly(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return data.load_cifar10(root, download=False)


class _Response(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def _serve(monkeypatch, payload):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(payload))


def _tar_bytes(entries):
    """A .tar.gz from (TarInfo, bytes or None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, payload in entries:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buffer.getvalue()


def _cifar_archive(tmp_path):
    """A .tar.gz of a fake CIFAR folder, with the folder at the top as in the official one."""
    make_cifar(tmp_path / "source")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue()


# ---- loading CIFAR-10 -------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "bytes", "py3"])
def test_load_cifar10_round_trips_pixels_and_labels_exactly(tmp_path, style):
    written = make_cifar(tmp_path, style=style)
    ds = _load_quietly(tmp_path)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.test_images.shape == (20, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.classes == CLASSES and ds.name == "cifar10"
    assert ds.val_images is None and ds.val_labels is None
    pixels, labels = written["data_batch_2"]
    i, c, y, x = 3, 2, 17, 5
    assert ds.train_images[20 + i, c, y, x] == pixels[i, c * 1024 + y * 32 + x]
    assert torch.equal(ds.train_images[20:40].reshape(20, -1), torch.from_numpy(pixels))
    assert ds.train_labels[20:40].tolist() == labels
    test_pixels, test_labels = written["test_batch"]
    assert torch.equal(ds.test_images.reshape(20, -1), torch.from_numpy(test_pixels))
    assert ds.test_labels.tolist() == test_labels


def test_unofficial_copy_warns_exactly_once_and_says_so_in_source(tmp_path):
    make_cifar(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load_cifar10(tmp_path, download=False)
    user = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user) == 1 and "not the official" in str(user[0].message)
    assert issubclass(user[0].category, data.UnofficialCopyWarning)  # its own category, to silence alone
    assert ds.source.startswith("not the official copy") and str(tmp_path) in ds.source


def test_files_matching_the_official_md5_load_without_warning(tmp_path, monkeypatch):
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(data, "CIFAR10_FILES", {p.name: _md5(p) for p in folder.iterdir()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = data.load_cifar10(tmp_path, download=False)
    assert ds.source.startswith("official")


def test_contrastive_data_environment_variable_is_the_default_root(tmp_path, monkeypatch):
    make_cifar(tmp_path)
    monkeypatch.setenv("CONTRASTIVE_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root(tmp_path / "other") == tmp_path / "other"
    assert len(_load_quietly(None).train_labels) == 100
    monkeypatch.delenv("CONTRASTIVE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root() == tmp_path / "home" / ".cache" / "contrastive"


def _assert_says_where_and_what_to_do(message, tmp_path):
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "CONTRASTIVE_DATA" in message and data.CIFAR10_URL in message


def test_missing_folder_without_download_says_where_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_cifar10(tmp_path, download=False)
    _assert_says_where_and_what_to_do(str(info.value), tmp_path)
    assert "download is off" in str(info.value)


def test_missing_folder_without_network_says_where_and_what_to_do(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        data.load_cifar10(tmp_path, download=True)
    _assert_says_where_and_what_to_do(str(info.value), tmp_path)
    assert "no network" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_missing_batch_file_is_named(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        _load_quietly(tmp_path)


def test_truncated_batch_file_is_named_with_advice_to_re_download(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="data_batch_3") as info:
        _load_quietly(tmp_path)
    assert "truncated or corrupt" in str(info.value) and "re-download" in str(info.value)


@pytest.mark.parametrize(
    "batch",
    [
        {"data": np.zeros((20, 3071), np.uint8), "labels": [0] * 20},
        {"data": np.zeros((20, 3072), np.float32), "labels": [0] * 20},
        {"data": np.zeros((20, 32, 32, 3), np.uint8), "labels": [0] * 20},
        {"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 19},
        {"data": np.zeros((20, 3072), np.uint8), "labels": [10] * 20},
        {"data": np.zeros((20, 3072), np.uint8), "labels": ["cat"] * 20},
        {"data": np.zeros((20, 3072), np.uint8)},
        [np.zeros((20, 3072), np.uint8)],
    ],
    ids=["width", "dtype", "ndim", "label-count", "label-range", "label-type", "no-labels", "list"],
)
def test_malformed_batch_is_a_value_error_naming_the_file(tmp_path, batch):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="data_batch_4"):
        _load_quietly(tmp_path)


class _OpensAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _RunsAShellCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_OpensAFile, _RunsAShellCommand])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, payload):
    make_cifar(tmp_path / "root")
    marker = tmp_path / "MARKER"
    raw = pickle.dumps({"data": payload(marker), "labels": [0]}, protocol=2)
    pickle.loads(raw)  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_1").write_bytes(raw)
    with pytest.raises(pickle.UnpicklingError, match="data_batch_1") as info:
        _load_quietly(tmp_path / "root")
    assert "never contains" in str(info.value)
    assert not marker.exists()


# ---- downloading and unpacking ---------------------------------------------------------


def test_download_verifies_unpacks_and_removes_the_archive(tmp_path, monkeypatch):
    payload = _cifar_archive(tmp_path)
    _serve(monkeypatch, payload)
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    root = tmp_path / "root"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = data.load_cifar10(root, download=True)
    assert ds.train_images.shape == (100, 3, 32, 32)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]


def test_download_with_wrong_md5_is_refused_and_deleted(tmp_path, monkeypatch):
    payload = _cifar_archive(tmp_path)
    _serve(monkeypatch, payload)
    root = tmp_path / "root"
    with pytest.raises(ValueError) as info:
        data.load_cifar10(root, download=True)
    message = str(info.value)
    assert data.CIFAR10_MD5 in message and hashlib.md5(payload).hexdigest() in message
    assert "cifar-10-python.tar.gz" in message
    assert list(root.iterdir()) == []


def _file(name, payload=b"x"):
    return tarfile.TarInfo(name), payload


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


UNSAFE_MEMBERS = {
    "dot-dot": [_file("cifar-10-batches-py/../../evil")],
    "absolute": [_file(str(Path("/tmp") / "contrastive-test-evil-absolute"))],
    "symlink": [_link("cifar-10-batches-py/data_batch_1", "../../evil")],
    "hardlink": [_link("cifar-10-batches-py/data_batch_1", "/etc/passwd", tarfile.LNKTYPE)],
}


@pytest.mark.parametrize("kind", UNSAFE_MEMBERS)
def test_safe_extract_refuses_unsafe_archives_and_writes_nothing(tmp_path, kind):
    archive = tmp_path / "a" / "archive.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(_tar_bytes([_file("cifar-10-batches-py/ok"), *UNSAFE_MEMBERS[kind]]))
    dest = tmp_path / "a" / "b" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(ValueError, match="unsafe member"):
        data._safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/contrastive-test-evil-absolute").exists()


@pytest.mark.parametrize("kind", ["dot-dot", "symlink"])
def test_downloaded_archive_with_unsafe_member_is_refused(tmp_path, monkeypatch, kind):
    payload = _tar_bytes([_file("cifar-10-batches-py/ok"), *UNSAFE_MEMBERS[kind]])
    _serve(monkeypatch, payload)
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    root = tmp_path / "x" / "root"
    with pytest.raises(ValueError, match="unsafe member"):
        data.load_cifar10(root, download=True)
    assert list(root.iterdir()) == []  # no folder, no archive, no unpacking leftovers
    assert not (tmp_path / "x" / "evil").exists() and not (tmp_path / "evil").exists()


def test_safe_extract_unpacks_a_well_formed_archive(tmp_path):
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(_tar_bytes([_file("top/inner/f.bin", b"payload")]))
    data._safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "top" / "inner" / "f.bin").read_bytes() == b"payload"


# ---- ImageDataset ------------------------------------------------------------------------


def _dataset(labels, test_labels=None):
    labels = torch.tensor(labels)
    index = (torch.arange(len(labels)) % 256).to(torch.uint8)  # each image encodes its index
    images = index.view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    test = torch.tensor(test_labels) if test_labels is not None else None
    test_images = None if test is None else torch.zeros(len(test), 1, 2, 2, dtype=torch.uint8)
    return data.ImageDataset(images.clone(), labels, test_images, test, ["a", "b", "c"])


def test_subset_keeps_each_class_share_and_image_label_pairs():
    ds = _dataset([0] * 60 + [1] * 30 + [2] * 10, test_labels=[0, 1] * 10)
    small = ds.subset(n_train=10, n_test=4, seed=3)
    assert torch.bincount(small.train_labels).tolist() == [6, 3, 1]
    assert torch.bincount(small.test_labels).tolist() == [2, 2]
    index = small.train_images[:, 0, 0, 0].long()
    assert torch.equal(ds.train_labels[index], small.train_labels)
    assert torch.all(index[1:] > index[:-1])  # original order kept
    assert small.classes == ds.classes and small.val_images is None


def test_subset_is_balanced_on_balanced_data_and_rounds_to_exactly_n():
    ds = _dataset([i % 3 for i in range(99)])
    assert torch.bincount(ds.subset(n_train=30).train_labels).tolist() == [10, 10, 10]
    assert len(ds.subset(n_train=31).train_labels) == 31


def test_subset_is_deterministic_per_seed_and_leaves_unrequested_splits_whole():
    ds = _dataset([i % 3 for i in range(300)], test_labels=[0, 1, 2] * 5)
    a, b, c = ds.subset(30, seed=1), ds.subset(30, seed=1), ds.subset(30, seed=2)
    assert torch.equal(a.train_images, b.train_images)
    assert not torch.equal(a.train_images, c.train_images)
    assert a.test_labels is ds.test_labels


def test_subset_larger_than_the_split_is_refused():
    with pytest.raises(ValueError, match="subset of 11"):
        _dataset([0, 1] * 5).subset(n_train=11)


def test_to_moves_every_tensor_and_keeps_the_rest():
    ds = _dataset([0, 1, 2], test_labels=[0, 1])
    moved = ds.to("meta")
    assert moved is not ds and ds.train_images.device.type == "cpu"
    assert all(t.is_meta for t in (moved.train_images, moved.train_labels, moved.test_images))
    assert moved.val_images is None and moved.classes == ds.classes


# ---- MedMNIST ----------------------------------------------------------------------------


def _write_npz(root, name, **arrays):
    path = Path(root) / "medmnist" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _split(n, rgb=False, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return images, rng.integers(0, classes, size=(n, 1)).astype(np.uint8)


def _load_medmnist_quietly(name, root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return data.load_medmnist(name, root, download=False)


def test_medmnist_grayscale_becomes_one_channel_with_int64_labels(tmp_path):
    (tr, trl), (va, val), (te, tel) = _split(12), _split(5, seed=1), _split(7, seed=2)
    splits = dict(train_images=tr, train_labels=trl, val_images=va, val_labels=val)
    _write_npz(tmp_path, "pneumoniamnist", **splits, test_images=te, test_labels=tel)
    ds = _load_medmnist_quietly("pneumoniamnist", tmp_path)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.val_images.shape == (5, 1, 28, 28) and ds.test_images.shape == (7, 1, 28, 28)
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.shape == (12,)
    assert torch.equal(ds.train_images[:, 0], torch.from_numpy(tr))
    assert ds.test_labels.tolist() == tel[:, 0].tolist()
    assert ds.classes == ["normal", "pneumonia"] and ds.name == "pneumoniamnist"


def test_medmnist_rgb_becomes_channels_first_and_missing_splits_are_none(tmp_path):
    images, labels = _split(10, rgb=True, classes=9)
    _write_npz(tmp_path, "pathmnist", train_images=images, train_labels=labels)
    ds = _load_medmnist_quietly("pathmnist", tmp_path)
    assert ds.train_images.shape == (10, 3, 28, 28)
    assert ds.train_images[4, 2, 7, 19] == images[4, 7, 19, 2]
    assert ds.val_images is None and ds.test_images is None and ds.test_labels is None
    assert len(ds.classes) == 9 and ds.classes[-1] == "colorectal adenocarcinoma epithelium"


def test_medmnist_multi_label_chest_keeps_label_rows(tmp_path):
    images = np.zeros((6, 28, 28), np.uint8)
    labels = np.eye(14, dtype=np.uint8)[:6]
    _write_npz(tmp_path, "chestmnist", train_images=images, train_labels=labels)
    ds = _load_medmnist_quietly("chestmnist", tmp_path)
    assert ds.train_labels.shape == (6, 14) and ds.train_labels.dtype == torch.int64


def test_medmnist_unofficial_copy_warns_exactly_once(tmp_path):
    images, labels = _split(4)
    _write_npz(tmp_path, "breastmnist", train_images=images, train_labels=labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load_medmnist("breastmnist", tmp_path, download=False)
    user = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user) == 1 and "not the official" in str(user[0].message)
    assert ds.source.startswith("not the official copy")


@pytest.mark.parametrize(
    "arrays, key",
    [
        ({"train_images": np.zeros((4, 28, 28), np.float32)}, "train_images"),
        ({"train_images": np.zeros((4, 784), np.uint8)}, "train_images"),
        ({"train_images": np.zeros((4, 32, 32), np.uint8)}, "train_images"),
        ({"train_labels": np.zeros((3, 1), np.uint8)}, "train_labels"),
        ({"train_labels": np.full((4, 1), 2, np.uint8)}, "train_labels"),
        ({"train_labels": np.zeros((4, 1), np.float64)}, "train_labels"),
        ({"test_images": np.zeros((4, 28, 28), np.uint8)}, "test_labels"),
    ],
    ids=["float", "2-d", "size", "label-count", "label-range", "label-dtype", "half-split"],
)
def test_medmnist_malformed_arrays_are_value_errors_naming_file_and_key(tmp_path, arrays, key):
    images, labels = _split(4)
    good = {"train_images": images, "train_labels": labels}
    path = _write_npz(tmp_path, "pneumoniamnist", **{**good, **arrays})
    with pytest.raises(ValueError) as info:
        _load_medmnist_quietly("pneumoniamnist", tmp_path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_medmnist_without_train_split_is_refused(tmp_path):
    images, labels = _split(4)
    _write_npz(tmp_path, "pneumoniamnist", test_images=images, test_labels=labels)
    with pytest.raises(ValueError, match="train_images"):
        _load_medmnist_quietly("pneumoniamnist", tmp_path)


def test_medmnist_object_arrays_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "MARKER"
    evil = np.empty(1, dtype=object)
    evil[0] = _OpensAFile(marker)
    images, _ = _split(1)
    _write_npz(tmp_path, "pneumoniamnist", train_images=images, train_labels=evil)
    with pytest.raises(ValueError, match="pneumoniamnist.npz"):
        _load_medmnist_quietly("pneumoniamnist", tmp_path)
    assert not marker.exists()


def test_medmnist_unknown_name_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown MedMNIST") as info:
        data.load_medmnist("mnist", tmp_path)
    assert "pneumoniamnist" in str(info.value) and "pathmnist" in str(info.value)


def test_medmnist_missing_file_without_download_names_path_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_medmnist("dermamnist", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "medmnist" / "dermamnist.npz") in message
    assert "CONTRASTIVE_DATA" in message
    assert "https://zenodo.org/records/10519652/files/dermamnist.npz?download=1" in message


def test_medmnist_download_is_checked_against_its_md5(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    images, labels = _split(3)
    np.savez(buffer, train_images=images, train_labels=labels)
    _serve(monkeypatch, buffer.getvalue())
    with pytest.raises(ValueError, match="28209eda62fecd6e6a2d98b1501bb15f"):
        data.load_medmnist("pneumoniamnist", tmp_path)
    assert list((tmp_path / "medmnist").iterdir()) == []
    md5 = hashlib.md5(buffer.getvalue()).hexdigest()
    monkeypatch.setitem(data.MEDMNIST, "pneumoniamnist", (md5, ["normal", "pneumonia"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = data.load_medmnist("pneumoniamnist", tmp_path)
    assert ds.train_images.shape == (3, 1, 28, 28) and ds.source.startswith("official")


# ---- the real data set, when there is one -------------------------------------------------

_REAL = os.environ.get("CONTRASTIVE_DATA", "")


@pytest.mark.skipif(
    not (_REAL and (Path(_REAL) / "cifar-10-batches-py").is_dir()),
    reason="CONTRASTIVE_DATA does not point at a folder with a real cifar-10-batches-py",
)
def test_real_cifar10_has_the_published_sizes_and_pixel_mean():
    ds = _load_quietly(None)
    assert ds.train_images.shape == (50000, 3, 32, 32)
    assert ds.test_images.shape == (10000, 3, 32, 32)
    assert len(ds.classes) == 10
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    mean = ds.train_images.sum(dtype=torch.int64).item() / ds.train_images.numel() / 255
    assert abs(mean - 0.4733) < 0.01
