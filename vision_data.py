"""Images for pre-training and classification: a source of labelled images plus the paper's augmentations.

Two sources, one interface (`ImageData`):
- `ImageData.digits()`: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images, 10 classes, no
  download), prepared once into data/digits/ with a fixed stratified 80/20 train/test split. One channel,
  upsampled to `image_size` (default 32: patch 8 gives a 4x4 grid, patch 4 an 8x8 grid).
- `ImageData.folder(root)`: the usual `root/<class>/<image>` layout (or `root/train/<class>/...` plus
  `root/val/<class>/...`; images straight in the folder are one class, UNLABELLED, for pretraining), decoded once
  with Pillow into memory as uint8 RGB at `image_size` (shorter side resized, centre crop): 3 * image_size^2 bytes
  per image, so meant for small folders, not ImageNet.

Augmentations follow data2vec's vision recipe (BEiT's pre-training transform: colour jitter 0.4, horizontal flip,
random resized crop), written as batched torch ops that draw every random number from one generator, so a batch is
a pure function of (generator state, data): resuming at step N reproduces the uninterrupted run's batches.
"""

import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# the data helpers every modality shares; DataError: bad user data, which train.py and finetune.py catch
from text_data import DataError, prepared_meta, write_atomic, write_error, write_meta

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNLABELLED = "(unlabelled)"   # the one class of a folder of images without class subfolders
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PROGRESS_EVERY = 1000        # load_image_folder prints a progress line after each this many images


# ----------------------------------------------------------------------------------------------------------------
# sources

def _stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a fixed random `test_fraction` (at least one image of any class with two) goes to test.
    Returns sorted (train_idx, test_idx)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: max(1, round(test_fraction * len(idx))) if len(idx) > 1 else 0])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def prepare_digits(out_dir: Path) -> dict:
    """Write out_dir/digits.npz (images (N, 8, 8) uint8 in 0..16, labels, train_idx, test_idx) and meta.json,
    once; later calls only read meta.json, and write both again where digits.npz no longer has the size meta.json
    records (cut short by a full disk or a copy). Returns the meta dict."""
    out_dir = Path(out_dir)
    if (meta := prepared_meta(out_dir)) is not None:
        return meta
    from sklearn.datasets import load_digits  # only needed here, once

    digits = load_digits()
    images = digits.images.astype(np.uint8)                                   # (N, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)                                   # (N,)
    train_idx, test_idx = _stratified_split(labels)
    npz = io.BytesIO()
    np.savez(npz, images=images, labels=labels, train_idx=train_idx, test_idx=test_idx)
    meta = {"source": "sklearn.datasets.load_digits", "num_images": len(labels), "num_classes": 10,
            "num_train": len(train_idx), "num_test": len(test_idx), "pixel_max": 16, "split_seed": 0}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "digits.npz", npz.getvalue())
        write_meta(out_dir, meta, ["digits.npz"])
    except OSError as e:                                                      # a full disk, a read-only folder
        raise write_error(e, out_dir) from None
    return meta


def _read_image(path: Path, size: int) -> Tensor:
    """Decode as RGB, resize the shorter side to `size` (bicubic), centre-crop. Returns (3, size, size) uint8."""
    with Image.open(path) as im:
        im = im.convert("RGB")                                                # grey, RGBA, palette, CMYK -> RGB
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)     # (3, size, size)


def load_image_folder(
    root: Path, image_size: int, class_names: list[str] | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Read `root/<class>/<image>` into memory, on a thread per core. Unreadable images are skipped with a warning
    naming each file.
    Images straight in root, without subfolders, are one class, UNLABELLED: enough to pretrain, which reads no labels.

    class_names: the label order to use (a validation folder reuses the training folder's); default: the sorted
    subfolder names. Returns (images (N, 3, S, S) uint8, labels (N,) long, class_names).
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {root} {what}; pass the folder that holds one subfolder per class")
    folders = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not folders and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        folders = {UNLABELLED: root}
    if not folders:
        raise DataError(f"{root} has no images and no class subfolders; lay images out as "
                        f"{root}/<class name>/<image>.png (or straight in {root} to pretrain only)")
    class_names = class_names or list(folders)
    unknown = sorted(set(folders) - set(class_names))
    if unknown:
        raise DataError(f"{root} has classes {unknown} that the training folder lacks; make the class folders match")
    jobs = [(path, label) for label, name in enumerate(class_names) if name in folders
            for path in sorted(folders[name].iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]

    def read(path: Path) -> Tensor | Exception:
        try:
            return _read_image(path, image_size)
        except (OSError, ValueError) as e:
            return e

    images, labels, skipped, t0 = [], [], 0, time.time()
    with ThreadPoolExecutor(os.cpu_count()) as pool:                         # Pillow decodes without the GIL
        for done, ((path, label), image) in enumerate(zip(jobs, pool.map(read, [p for p, _ in jobs])), 1):
            if isinstance(image, Exception):
                print(f"warning: skipping unreadable image {path}: {image}", file=sys.stderr)
                skipped += 1
            else:
                images.append(image)
                labels.append(label)
            if done % PROGRESS_EVERY == 0 and done < len(jobs):
                print(f"  {done:,}/{len(jobs):,} images read | {time.time() - t0:.0f}s")
    if not images:
        raise DataError(f"no readable images under {root}; supported extensions: {sorted(IMAGE_EXTENSIONS)}")
    print(f"{root}: {len(images)} images in {len(class_names)} classes, {skipped} unreadable skipped")
    return torch.stack(images), torch.tensor(labels), class_names


# ----------------------------------------------------------------------------------------------------------------
# augmentations: x (B, C, H, W) float in [0, 1] -> same range; every random number from `generator`

def color_jitter(x: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation factors uniform in [1 - strength, 1 + strength], per image
    (torchvision's ColorJitter(s, s, s) without hue, applied in a fixed order rather than a random one)."""
    f = 1 + strength * (2 * torch.rand(x.shape[0], 3, 1, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1, 1)
    x = (x * f[:, 0]).clamp(0, 1)
    mean = _gray(x).mean((1, 2, 3), keepdim=True)                             # (B, 1, 1, 1)
    x = (mean + f[:, 1] * (x - mean)).clamp(0, 1)
    gray = _gray(x)                                                           # (B, 1, H, W)
    return (gray + f[:, 2] * (x - gray)).clamp(0, 1)


def _gray(x: Tensor) -> Tensor:
    """Luma (ITU-R 601, as torchvision): (B, 3, H, W) -> (B, 1, H, W); a 1-channel image is its own grey."""
    if x.shape[1] == 1:
        return x
    return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


def hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability p."""
    flip = torch.rand(x.shape[0], generator=generator) < p                    # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(
    x: Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """torchvision's RandomResizedCrop for square images, batched: area fraction uniform in `scale`, log-uniform
    aspect ratio, 10 tries per image for a crop that fits (else the whole image), uniform position, bilinear
    resampling to (size, size). Returns (B, C, size, size)."""
    B = x.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(B, 10, generator=generator)         # (B, 10)
    log_r = torch.tensor(ratio).log()
    aspect = (log_r[0] + (log_r[1] - log_r[0]) * torch.rand(B, 10, generator=generator)).exp()  # (B, 10)
    cw, ch = (area * aspect).sqrt(), (area / aspect).sqrt()                   # (B, 10) crop side / image side
    fits = (cw <= 1) & (ch <= 1)
    first = fits.float().argmax(1, keepdim=True)                              # (B, 1) first try that fits
    ok = fits.any(1)
    cw = torch.where(ok, cw.gather(1, first).squeeze(1), 1.0)                 # (B,)
    ch = torch.where(ok, ch.gather(1, first).squeeze(1), 1.0)
    centre = torch.rand(B, 2, generator=generator)                            # (B, 2) where in the free range
    cx, cy = cw / 2 + centre[:, 0] * (1 - cw), ch / 2 + centre[:, 1] * (1 - ch)
    theta = torch.zeros(B, 2, 3)                                              # output [-1, 1] -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = cw, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch, 2 * cy - 1
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)          # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# the dataset

class ImageData:
    """Labelled images in memory, split into "train" and "test", served as normalised (B, C, S, S) batches."""

    def __init__(
        self,
        images: dict[str, Tensor],
        labels: dict[str, Tensor],
        class_names: list[str],
        *,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crop_scale: tuple[float, float],
        flip: bool,
        jitter: float,
    ):
        self.images = images                                                  # split -> (N, C, h, w) uint8
        self.labels = labels                                                  # split -> (N,) long
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.image_size = image_size
        self.in_chans = images["train"].shape[1]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)                      # (1, C, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.crop_scale, self.flip, self.jitter = crop_scale, flip, jitter

    @classmethod
    def digits(cls, data_dir: Path = Path("data/digits"), image_size: int = 32) -> "ImageData":
        """The bundled digits, 1 channel. Milder crops than ImageNet's (0.08, 1): an 8x8 digit has little to lose;
        no flip: a mirrored digit is another symbol."""
        prepare_digits(data_dir)
        d = np.load(Path(data_dir) / "digits.npz")
        images = torch.from_numpy(d["images"]).float().mul(255 / 16).round().to(torch.uint8)[:, None]  # (N, 1, 8, 8)
        labels = torch.from_numpy(d["labels"])
        split = {"train": torch.from_numpy(d["train_idx"]), "test": torch.from_numpy(d["test_idx"])}
        train = images[split["train"]].float() / 255
        return cls({k: images[i] for k, i in split.items()}, {k: labels[i] for k, i in split.items()},
                   [str(c) for c in range(10)], image_size=image_size, mean=(train.mean().item(),),
                   std=(train.std().item(),), crop_scale=(0.5, 1.0), flip=False, jitter=0.4)

    @classmethod
    def folder(cls, root: Path, image_size: int = 224) -> "ImageData":
        """`root/<class>/...` split 80/20 per class with a fixed seed, or `root/train/<class>/...` + `root/val/...`.
        Augmented with BEiT's ImageNet settings: crops of (0.08, 1) of the area, flips, colour jitter 0.4."""
        root = Path(root)
        if (root / "train").is_dir():
            if not (root / "val").is_dir():
                raise DataError(f"{root} has train/ but no val/; add {root}/val/<class>/... or drop the split folders")
            tr_x, tr_y, names = load_image_folder(root / "train", image_size)
            te_x, te_y, _ = load_image_folder(root / "val", image_size, names)
            images, labels = {"train": tr_x, "test": te_x}, {"train": tr_y, "test": te_y}
        else:
            x, y, names = load_image_folder(root, image_size)
            train_idx, test_idx = (torch.from_numpy(i) for i in _stratified_split(y.numpy()))
            images, labels = {"train": x[train_idx], "test": x[test_idx]}, {"train": y[train_idx], "test": y[test_idx]}
            if not len(test_idx):
                raise DataError(f"{root}: no class has 2 or more readable images, so none is left for the held-out "
                                "split; add images, or give root/train/<class>/... and root/val/<class>/...")
        return cls(images, labels, names, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   crop_scale=(0.08, 1.0), flip=True, jitter=0.4)

    def view(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """uint8 (B, C, h, w) -> normalised float (B, C, S, S); augmented when a generator is given."""
        x = x.float() / 255
        if generator is None:
            if x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        else:
            # BEiT's order (data2vec_vision datasets.py): jitter, flip, random resized crop
            if self.jitter > 0:
                x = color_jitter(x, self.jitter, generator)
            if self.flip:
                x = hflip(x, generator)
            x = random_resized_crop(x, self.image_size, generator, scale=self.crop_scale)
        return (x - self.mean) / self.std                                     # (B, C, S, S)

    def batch(self, split: str, batch_size: int, generator: torch.Generator, augment: bool) -> tuple[Tensor, Tensor]:
        """Images drawn uniformly with replacement. Returns (images (B, C, S, S) float, labels (B,) long)."""
        idx = torch.randint(len(self.labels[split]), (batch_size,), generator=generator)    # (B,)
        return self.view(self.images[split][idx], generator if augment else None), self.labels[split][idx]

