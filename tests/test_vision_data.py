"""Vision data: augmentations keep shape and range, the digits split, image folders (modes, corrupt files, errors)."""

import errno
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vision_data
from tests.test_text_data import fail_writing
from vision_data import (
    DataError,
    ImageData,
    UNLABELLED,
    color_jitter,
    hflip,
    load_image_folder,
    prepare_digits,
    random_resized_crop,
)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentations_keep_shape_and_range(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, channels, 12, 12)
    for y in (color_jitter(x, 0.4, g), hflip(x, g), random_resized_crop(x, 12, g)):
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    y = random_resized_crop(x, 20, g, scale=(0.5, 1.0))
    assert y.shape == (16, channels, 20, 20) and y.min() >= 0 and y.max() <= 1


def test_augmentations_against_plain_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(hflip(x, g, p=1.0), x.flip(-1))
    whole = random_resized_crop(x, 32, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image, resized
    assert torch.allclose(whole, F.interpolate(x, size=32, mode="bilinear", align_corners=False), atol=1e-5)
    assert torch.allclose(color_jitter(x, 0.0, g), x, atol=1e-6)                 # factors all 1: no change


def test_digits_prepare_and_split(digits_dir):
    d = np.load(digits_dir / "digits.npz")
    train, test, labels = d["train_idx"], d["test_idx"], d["labels"]
    assert d["images"].shape == (1797, 8, 8) and d["images"].max() == 16
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    for split in (train, test):
        assert set(labels[split]) == set(range(10))
    for c in range(10):                                                       # stratified: 20 % of each class
        assert abs((labels[test] == c).sum() / (labels == c).sum() - 0.2) < 0.01
    mtime = (digits_dir / "digits.npz").stat().st_mtime_ns
    assert prepare_digits(digits_dir)["num_test"] == len(test)                # second call reads, never rewrites
    assert (digits_dir / "digits.npz").stat().st_mtime_ns == mtime


def test_a_full_disk_leaves_no_partial_digits_and_says_what_to_do(tmp_path, monkeypatch):
    fail_writing(monkeypatch, "digits.npz", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(DataError, match=r"could not write the prepared data in .*digits \(No space left on device; "
                                        r"[\d,]+ MiB free there\): free some space there, or clone the project"):
        prepare_digits(tmp_path / "digits")
    assert list((tmp_path / "digits").iterdir()) == []


def test_damaged_digits_are_prepared_again(tmp_path, capsys):
    meta = prepare_digits(tmp_path)
    written = (tmp_path / "digits.npz").read_bytes()
    damages = [(lambda: (tmp_path / "digits.npz").write_bytes(written[:5000]),
                f"{tmp_path / 'digits.npz'} has 5,000 bytes, not the {len(written):,} written"),
               (lambda: (tmp_path / "meta.json").write_text('{"num_images": '), f"{tmp_path / 'meta.json'} is damaged")]
    for damage, what in damages:
        damage()
        capsys.readouterr()
        assert prepare_digits(tmp_path) == meta
        assert capsys.readouterr().err == f"warning: {what}; preparing {tmp_path} again\n"
        assert (tmp_path / "digits.npz").read_bytes() == written


def test_digits_batches(digits_dir):
    data = ImageData.digits(digits_dir, image_size=32)
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 1, 32)
    x, y = data.batch("train", 64, torch.Generator().manual_seed(0), augment=True)
    x2, y2 = data.batch("train", 64, torch.Generator().manual_seed(0), augment=True)
    assert x.shape == (64, 1, 32, 32) and y.dtype == torch.long and torch.equal(x, x2) and torch.equal(y, y2)
    x_test = data.view(data.images["test"], None)
    assert x_test.shape == (359, 1, 32, 32) and abs(x_test.mean().item()) < 0.1  # normalised with train stats


def write_image_folder(root, size=(20, 14)):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("L", size, 128).save(root / "cat" / "gray.png")
    Image.new("RGBA", size, (255, 0, 0, 100)).save(root / "cat" / "rgba.png")
    Image.new("P", size, 3).save(root / "dog" / "palette.png")
    Image.new("RGB", size, (0, 0, 255)).save(root / "dog" / "rgb.jpg")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")


def test_image_folder_converts_modes_and_skips_corrupt(tmp_path, capsys):
    write_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images, labels, names = load_image_folder(tmp_path, 16)
    err = capsys.readouterr().err
    broken = tmp_path / "dog" / "broken.png"
    assert err.startswith(f"warning: skipping unreadable image {broken}: ") and err.count("\n") == 1
    assert names == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    gray, rgba = images[0], images[1]
    assert (gray == 128).all()                                                # grey -> equal R, G, B
    assert rgba[0].eq(255).all() and rgba[1:].eq(0).all()                     # alpha dropped, colour kept


def test_a_large_image_folder_says_how_far_it_has_read(tmp_path, capsys, monkeypatch):
    """Read on threads, in order: the images, labels and warnings of a sequential read, and a progress line after
    every PROGRESS_EVERY images (none after the last: the summary line follows)."""
    write_image_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(vision_data, "PROGRESS_EVERY", 2)
    images, labels, _ = load_image_folder(tmp_path, 16)
    out, err = capsys.readouterr()
    assert re.fullmatch(r"  2/5 images read \| \d+s\n  4/5 images read \| \d+s\n.*: 4 images in 2 classes, 1 "
                        r"unreadable skipped\n", out)
    assert err.startswith(f"warning: skipping unreadable image {tmp_path / 'cat' / 'broken.png'}: ")
    expected = [vision_data._read_image(tmp_path / c / f, 16) for c, f in
                (("cat", "gray.png"), ("cat", "rgba.png"), ("dog", "palette.png"), ("dog", "rgb.jpg"))]
    assert torch.equal(images, torch.stack(expected)) and labels.tolist() == [0, 0, 1, 1]
    monkeypatch.setattr(vision_data, "PROGRESS_EVERY", 5)                  # 5 of 5: the summary line alone
    load_image_folder(tmp_path, 16)
    assert "images read" not in capsys.readouterr().out


def test_image_folder_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 16)
    with pytest.raises(DataError, match="has no images and no class subfolders"):
        load_image_folder(tmp_path, 16)                                       # empty
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="has no images and no class subfolders"):
        load_image_folder(tmp_path, 16)                                       # files, but no images, no subfolders
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_image_folder(tmp_path / "loose.png", 16)
    with pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path, 16)                                       # straight in the folder: unlabelled
    assert "warning: skipping unreadable image" in capsys.readouterr().err
    (tmp_path / "loose.png").unlink()
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path, 16)
    assert "warning: skipping unreadable image" in capsys.readouterr().err


def test_images_without_class_subfolders_are_one_unlabelled_class(tmp_path):
    """Pretraining reads no labels, so a plain folder of images (no subfolders) is enough: one class, UNLABELLED,
    split 80/20 like any other; the train/val layout works the same way."""
    for i in range(5):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    images, labels, names = load_image_folder(tmp_path, 16)
    assert names == [UNLABELLED] and labels.tolist() == [0] * 5 and images.shape == (5, 3, 16, 16)
    data = ImageData.folder(tmp_path, image_size=16)
    assert (len(data.labels["train"]), len(data.labels["test"])) == (4, 1)
    for split in ("train", "val"):
        (tmp_path / "split" / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), (0, 40 * i, 0)).save(tmp_path / "split" / split / f"{i}.png")
    data = ImageData.folder(tmp_path / "split", image_size=16)
    assert data.class_names == [UNLABELLED] and len(data.labels["train"]) == len(data.labels["test"]) == 2


def test_folder_dataset_layouts(tmp_path):
    write_image_folder(tmp_path / "flat")
    data = ImageData.folder(tmp_path / "flat", image_size=16)
    assert (data.num_classes, data.in_chans) == (2, 3)
    assert len(data.labels["train"]) == 2 and sorted(data.labels["test"].tolist()) == [0, 1]
    x, y = data.batch("train", 8, torch.Generator().manual_seed(0), augment=True)
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,)
    write_image_folder(tmp_path / "split" / "train")
    write_image_folder(tmp_path / "split" / "val")
    data = ImageData.folder(tmp_path / "split", image_size=16)
    assert len(data.labels["train"]) == len(data.labels["test"]) == 4
    (tmp_path / "split" / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        ImageData.folder(tmp_path / "split", image_size=16)
    for name in ("gray.png", "palette.png"):                                 # one image per class: nothing to hold out
        (tmp_path / "flat" / ("cat" if name == "gray.png" else "dog") / name).unlink()
    with pytest.raises(DataError, match="none is left for the held-out split"):
        ImageData.folder(tmp_path / "flat", image_size=16)
