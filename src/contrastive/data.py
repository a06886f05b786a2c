"""Data sets as uint8 image tensors: CIFAR-10 and MedMNIST, downloaded with checksums.

Every loader returns an `ImageDataset` of uint8 images (N, C, H, W) and int64
labels, meant to be moved to the training device once and sliced by index.
Downloads are verified by md5 and unpacked with a path filter, and the CIFAR-10
pickles are read by an unpickler that only admits numpy arrays, so a tampered
file cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import importlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from tqdm.auto import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {  # md5 of the files the official archive unpacks to
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
# name -> (md5 of the 28 px file, class names), as the MedMNIST v3.0 package lists them
# fmt: off
MEDMNIST = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"]),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions"]),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", [
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", ["normal", "pneumonia"]),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", ["malignant", "normal, benign"]),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", [
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
        "monocyte", "neutrophil", "platelet"]),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", [
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
        "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", [
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen"]),
}
# fmt: on
MULTI_LABEL = {"chestmnist"}  # labels are (N, 14) multi-hot rows, not one class per image

_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: `root` if given, else $CONTRASTIVE_DATA, else ~/.cache/contrastive."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("CONTRASTIVE_DATA"):
        return Path(os.environ["CONTRASTIVE_DATA"]).expanduser()
    return Path.home() / ".cache" / "contrastive"


# CIFAR-10's per-channel mean and std of the training images in [0, 1]: what every encoder standardises with.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass
class ImageDataset:
    """uint8 images (N, C, H, W) and int64 labels (N,) per split; val/test may be None.

    `mean` and `std` are the per-channel statistics of the training images in [0, 1] that an
    encoder standardises its input with (CIFAR-10's published ones for CIFAR-10); None means
    "measure them on the training split" (`stats`).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    classes: list[str]
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    name: str = ""
    source: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def stats(self) -> dict[str, tuple[float, ...]]:
        """{"mean": ..., "std": ...} per channel of the training images in [0, 1]: the fields when set,
        else measured on the training split. What `models.build_backbone` standardises with."""
        if self.mean is not None and self.std is not None:
            return {"mean": tuple(self.mean), "std": tuple(self.std)}
        x = self.train_images.double().div(255).transpose(0, 1).flatten(1)  # (C, N * H * W)
        return {"mean": tuple(x.mean(1).tolist()), "std": tuple(x.std(1).tolist())}

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy with every tensor moved to `device` (once, for the whole run)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> ImageDataset:
        """A copy keeping n_train train and n_test test images, stratified by class.

        Each class keeps its share of the split (n / 10 per class on CIFAR-10), the
        images within a class are drawn with a generator seeded by `seed`, and the
        chosen images keep their original order. A split given as None is kept whole.
        """
        generator = torch.Generator().manual_seed(seed)
        changes = {}
        for split, n in (("train", n_train), ("test", n_test)):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if n is None or images is None:
                continue
            keep = stratified_indices(labels, n, generator).to(labels.device)
            changes[f"{split}_images"], changes[f"{split}_labels"] = images[keep], labels[keep]
        return dataclasses.replace(self, **changes)


def stratified_indices(
    labels: torch.Tensor, n: int, generator: torch.Generator, minimum: int = 0
) -> torch.Tensor:
    """Sorted indices of n images drawn class by class, each class keeping its share of `labels`.

    Class c keeps max(minimum, floor(n N_c / N)) images; the images left over go to the largest
    remainders, and a class never keeps more than it has. Within a class the images are the first
    of a permutation drawn from `generator`, class after class in label order. The one stratified
    sampler of the package: subsets of a split, the probe's validation split, label fractions.
    """
    if labels.ndim != 1:
        raise ValueError("a stratified sample needs one class per image; these labels are multi-label rows.")
    if not 0 < n <= len(labels):
        raise ValueError(f"cannot take a stratified subset of {n} from {len(labels)} images.")
    labels = labels.cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    share = counts.double() * n / len(labels)
    take = share.floor().long().clamp(min=minimum)
    left = n - int(take.sum())
    if left > 0:  # largest remainders get the images left over after rounding down
        take[torch.argsort(share - take, descending=True, stable=True)[:left]] += 1
    take = torch.minimum(take, counts)
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


# ---- downloading and unpacking ---------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch `url` to a temporary file next to `dest`, check its md5, then rename it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(
                f"The download of {url} into {dest} has md5 {digest.hexdigest()}, expected {md5}; "
                "the bad file was deleted: try again, or fetch the file by hand."
            )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name.replace("\\", "/")
    unsafe = (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(member.name).drive
        or ".." in PurePosixPath(name).parts
        or not (member.isfile() or member.isdir())
    )
    if unsafe:
        raise ValueError(
            f"{archive} contains an unsafe member {member.name!r} (an absolute path, a '..' "
            "component, a link or a device); refusing to unpack it: delete the file and "
            "download the official archive."
        )


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tar archive into `dest`, refusing it whole if any member is unsafe."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:  # check everything first, so a refusal writes nothing
            _check_member(member, archive)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)


def _fetch_cifar10(base: Path) -> None:
    archive = base / "cifar-10-python.tar.gz"
    try:
        _download(CIFAR10_URL, archive, CIFAR10_MD5)
    except _NETWORK_ERRORS as err:
        unpack = f"unpack it in {base}"
        raise _not_found("CIFAR-10", base / CIFAR10_FOLDER, CIFAR10_URL, unpack, err) from err
    unpacked = Path(tempfile.mkdtemp(dir=base, prefix=".unpack-"))
    try:
        _safe_extract(archive, unpacked)
        if not (unpacked / CIFAR10_FOLDER).is_dir():
            raise ValueError(f"{archive} does not contain a {CIFAR10_FOLDER} folder.")
        os.replace(unpacked / CIFAR10_FOLDER, base / CIFAR10_FOLDER)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        archive.unlink(missing_ok=True)


def _not_found(what: str, where: Path, url: str, then: str, error: Exception | None = None):
    reason = "download is off" if error is None else f"downloading it failed ({error})"
    retry = "pass download=True, " if error is None else ""
    return FileNotFoundError(
        f"{what} not found in {where} and {reason}: set CONTRASTIVE_DATA to the folder that "
        f"holds it, {retry}or fetch {url} by hand and {then}."
    )


class UnofficialCopyWarning(UserWarning):
    """A data set found on disk whose checksums differ from the official files', loaded anyway.

    Its own category, so that a notebook which states its data source in its banner (the
    `source` line this loader returns) can silence the repeat without silencing other warnings:
    `warnings.simplefilter("ignore", UnofficialCopyWarning)`.
    """


def _unofficial(what: str, where: Path, detail: str = "") -> str:
    """Warn once that a copy is not the official one; return the `source` line saying so."""
    message = f"{where} is not the official {what} copy (md5 differs{detail}); loading it anyway."
    warnings.warn(message, UnofficialCopyWarning, stacklevel=3)
    return f"not the official copy (md5 differs) in {where}"


# ---- CIFAR-10 ---------------------------------------------------------------------------


def _numpy_global(module: str, name: str):
    for prefix in ("numpy._core.", "numpy.core."):  # numpy >= 2 first: numpy.core warns there
        try:
            return getattr(importlib.import_module(prefix + module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


# Everything a CIFAR-10 pickle needs beyond builtin containers: numpy array reconstruction,
# under the module names of numpy 1 (the official files) and numpy 2 (copies made today).
_reconstruct = _numpy_global("multiarray", "_reconstruct")
_frombuffer = _numpy_global("numeric", "_frombuffer")
_SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR-10 file never contains."""


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, raw: bytes, path: Path):
        # latin1 reads the Python 2 strings of the official files, numpy's raw bytes included
        super().__init__(io.BytesIO(raw), encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"{self.path} asks for {module}.{name}, which a CIFAR-10 file never contains; "
            "refusing to load it: delete the file and download the official copy."
        )


def _refetch(path: Path) -> str:
    return f"delete {path.parent} and load again to re-download it."


def _read_pickle(path: Path, unofficial: list[str]) -> dict:
    """Unpickle one CIFAR-10 file safely; note its name in `unofficial` if its md5 differs."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {_refetch(path)}")
    raw = path.read_bytes()
    if _md5(raw) != CIFAR10_FILES[path.name]:
        unofficial.append(path.name)
    try:
        obj = _CifarUnpickler(raw, path).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; all mean the same
        raise ValueError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}): {_refetch(path)}"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict: {_refetch(path)}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_batch(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} has no 'data' or no 'labels' entry: {_refetch(path)}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: 'data' is not a 2-D uint8 array: {_refetch(path)}")
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: 'data' has shape {data.shape} and 'labels' {labels.shape}, expected "
            f"(n, 3072) and (n,): {_refetch(path)}"
        )
    if labels.dtype.kind not in "iu" or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise ValueError(f"{path}: 'labels' are not integers in 0..9: {_refetch(path)}")
    return data, labels.astype(np.int64)


def load_cifar10(root: str | os.PathLike | None = None, download: bool = True) -> ImageDataset:
    """CIFAR-10 from `<root>/cifar-10-batches-py`: 50,000 train and 10,000 test images.

    `root=None` means $CONTRASTIVE_DATA, else ~/.cache/contrastive. A missing folder is
    downloaded (md5-checked) when `download` is true. A copy whose files differ from the
    official ones still loads, with one warning, and says so in `source`.
    """
    base = data_root(root)
    folder = base / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise _not_found("CIFAR-10", folder, CIFAR10_URL, f"unpack it in {base}")
        _fetch_cifar10(base)
    unofficial: list[str] = []
    meta_path = folder / "batches.meta"
    names = _read_pickle(meta_path, unofficial).get("label_names")
    if not isinstance(names, list) or [type(n) in (str, bytes) for n in names] != [True] * 10:
        raise ValueError(f"{meta_path} does not list 10 label_names: {_refetch(meta_path)}")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    splits = {}
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    for split, names in (("train", train_files), ("test", ["test_batch"])):
        parts = [_check_batch(_read_pickle(folder / n, unofficial), folder / n) for n in names]
        images = np.concatenate([data for data, _ in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([labels for _, labels in parts])
        splits[split] = torch.from_numpy(images), torch.from_numpy(labels)
    source = f"official cifar-10-python files in {folder}"
    if unofficial:
        source = _unofficial("CIFAR-10", folder, f" for {', '.join(unofficial)}")
    return ImageDataset(
        *splits["train"],
        *splits["test"],
        classes,
        name="cifar10",
        source=source,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


# ---- MedMNIST ---------------------------------------------------------------------------


def _npz_split(npz, split: str, path: Path, n_classes: int, multi_label: bool):
    keys = f"{split}_images", f"{split}_labels"
    if not any(k in npz.files for k in keys):
        return None, None
    try:
        images, labels = (npz[k] for k in keys)
    except KeyError as err:
        raise ValueError(f"{path} has only one of {keys[0]} and {keys[1]}.") from err
    except ValueError as err:  # object arrays, refused by allow_pickle=False
        raise ValueError(f"{path}: {split} arrays cannot be read safely ({err}).") from err
    if images.dtype != np.uint8 or images.shape[1:] not in ((28, 28), (28, 28, 1), (28, 28, 3)):
        raise ValueError(
            f"{path}: {keys[0]} is {images.dtype} {images.shape}, expected uint8 (N, 28, 28) "
            "or (N, 28, 28, 3)."
        )
    width = n_classes if multi_label else 1
    highest = 1 if multi_label else n_classes - 1
    if labels.ndim == 1 and width == 1:
        labels = labels[:, None]
    if labels.dtype.kind not in "iu" or labels.shape != (len(images), width):
        raise ValueError(
            f"{path}: {keys[1]} is {labels.dtype} {labels.shape}, expected integers of shape "
            f"({len(images)}, {width})."
        )
    if labels.size and not 0 <= labels.min() <= labels.max() <= highest:
        raise ValueError(f"{path}: {keys[1]} has values outside 0..{highest}.")
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = labels.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(
        labels if multi_label else labels[:, 0]
    )


def load_medmnist(name: str, root: str | os.PathLike | None = None, download: bool = True) -> ImageDataset:
    """A MedMNIST v2 data set at 28 px from `<root>/medmnist/<name>.npz`.

    Images come back as uint8 (N, 1 or 3, 28, 28) and labels as int64 (N,) (ChestMNIST:
    (N, 14) multi-hot). Splits absent from the file are None. A file whose md5 differs
    from the official one still loads, with one warning.
    """
    if name not in MEDMNIST:
        raise ValueError(f"unknown MedMNIST name {name!r}; choose one of {', '.join(MEDMNIST)}.")
    md5, classes = MEDMNIST[name]
    url = MEDMNIST_URL.format(name=name)
    path = data_root(root) / "medmnist" / f"{name}.npz"
    if not path.is_file():
        if not download:
            raise _not_found(name, path, url, f"save it as {path}")
        try:
            _download(url, path, md5)
        except _NETWORK_ERRORS as err:
            raise _not_found(name, path, url, f"save it as {path}", err) from err
    official = _md5(path.read_bytes()) == md5
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable .npz file ({err}): delete it and load again.") from err
    with npz:
        split = {
            s: _npz_split(npz, s, path, len(classes), name in MULTI_LABEL) for s in ("train", "val", "test")
        }
    if split["train"][0] is None:
        raise ValueError(f"{path} has no train_images and train_labels.")
    source = f"official {name}.npz in {path.parent}" if official else _unofficial(name, path)
    return ImageDataset(
        *split["train"], *split["test"], list(classes), *split["val"], name=name, source=source
    )
