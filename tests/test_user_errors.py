"""The catalogue of bad input: each answered by one line ``fsad: error: <what>; <fix>``
on stderr and exit status 2, before training (or, for what only training can meet, with
the step and the last good checkpoint); the inputs that must work (mixed image sizes and
modes, 16-bit images, masks of another size, masks without images) are read correctly.

Most cases call `fsad.main.execute`, the command line's body, in-process; three run the
real command line as a subprocess (flag parsing, a config file's variant, a data error).
"""

import asyncio
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SIZE, parse_command_line, tiny_config
from fsad.data import read_folder
from fsad.data.synthetic import write_synthetic_dataset
from fsad.errors import UserError
from fsad.main import execute


def dataset(root, **kw):
    """A small procedural MVTec-layout dataset (8 train normals, 4 test normals, 3 classes
    of 5 with masks: the 10-image shot pool leaves 5 test anomalies)."""
    args = dict(size=SIZE, n_train=8, n_test_good=4, n_per_class=5, seed=0)
    args.update(kw)
    return write_synthetic_dataset(str(root), **args)


def folder_config(root, method="devnet", **overrides):
    return tiny_config(method, **{"data.name": "folder", "data.root": str(root),
                                  "data.n_anomaly": 2, "explain.enabled": False,
                                  "epochs": 1, "steps_per_epoch": 2, "batch_size": 8,
                                  **overrides})


def run(config, workdir, capsys, **kw):
    """(exit status, the fsad error lines on stderr)."""
    code = execute(config, str(workdir), **kw)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("fsad: error:")]


def expect_error(config, workdir, capsys, *fragments, **kw):
    code, lines = run(config, workdir, capsys, **kw)
    assert code == 2 and len(lines) == 1, (code, lines)
    line = lines[0]
    assert "; " in line, line  # what is wrong; how to fix it
    for f in fragments:
        assert f in line, line
    catalogue = os.environ.get("FSAD_ERROR_CATALOGUE")  # a path: collect the messages
    if catalogue:
        with open(catalogue, "a") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
            f.write(json.dumps({"case": test, "message": line}) + "\n")
    return line


def expect_error_before_decoding(config, tmp_path, capsys, *fragments):
    """expect_error, said from the folder's listing: no image decoded into the cache
    (tmp_path/cache) and no workdir (tmp_path/w) made."""
    config.data.cache_dir = str(tmp_path / "cache")
    line = expect_error(config, tmp_path / "w", capsys, *fragments)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "w").exists()
    return line


# ---- the dataset folder ----

def test_missing_dataset_folder(tmp_path, capsys):
    expect_error(folder_config(tmp_path / "nope"), tmp_path / "w", capsys, "does not exist",
                 "--config.data.root")


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_error(folder_config(tmp_path / "empty"), tmp_path / "w", capsys,
                 "train/good' is missing")


def test_a_root_of_several_datasets_without_a_subset_names_them(tmp_path, capsys):
    """A converter's output root (one folder per dataset) given without data.subset."""
    dataset(tmp_path / "root" / "headct")
    expect_error(folder_config(tmp_path / "root"), tmp_path / "w", capsys,
                 "train/good' is missing, and", "holds datasets in subfolders (headct); "
                 f"point at one of them, e.g. '{tmp_path / 'root' / 'headct'}' (data.root, "
                 "with data.subset")


def test_a_workdir_or_input_path_that_is_not_what_it_must_be(tmp_path, capsys):
    """A file given as --workdir; an --input path that does not exist (it may be an image
    or a folder: the error said 'folder')."""
    root = dataset(tmp_path / "d")
    (tmp_path / "run.log").write_text("")
    expect_error(folder_config(root), tmp_path / "run.log", capsys, "--workdir",
                 "is a file; pass a folder")
    from fsad.workdir import config_json
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps(config_json(folder_config(root))))
    expect_error(folder_config(root), tmp_path / "w", capsys, "--input",
                 "missing.png' does not exist; pass an image or a folder of images",
                 mode="score", input_dir=str(tmp_path / "missing.png"))


def test_no_train_good(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    os.rename(os.path.join(root, "train", "good"), os.path.join(root, "train", "normal"))
    expect_error(folder_config(root), tmp_path / "w", capsys, "train/good' is missing")


def test_empty_train_good(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    for f in os.listdir(os.path.join(root, "train", "good")):
        os.remove(os.path.join(root, "train", "good", f))
    expect_error(folder_config(root), tmp_path / "w", capsys, "holds no images")


def test_no_test_folder(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    os.rename(os.path.join(root, "test"), os.path.join(root, "testing"))
    expect_error(folder_config(root), tmp_path / "w", capsys, "test' is missing")


def test_test_class_folder_without_images(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    os.makedirs(os.path.join(root, "test", "crack"))
    expect_error(folder_config(root), tmp_path / "w", capsys, "crack' holds no images",
                 "remove the folder")


def test_no_anomaly_class(tmp_path, capsys):
    root = dataset(tmp_path / "d", defects=())
    expect_error(folder_config(root), tmp_path / "w", capsys, "has no anomaly class folder")


def test_truncated_image(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    path = os.path.join(root, "test", "spot", "001.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    expect_error(folder_config(root), tmp_path / "w", capsys, "cannot decode image",
                 "001.png", "remove or replace the file")


def test_an_image_over_pillows_size_guard_is_named(tmp_path, monkeypatch):
    """An image over Pillow's guard against decompression bombs (179 Mpx; here the guard
    lowered to 100 pixels) is an unreadable file named with a fix, in a scoring or a
    training set alike; it was a traceback (a walkthrough's 14000 x 14000 scan)."""
    from PIL import Image
    from fsad.data.decode import decode_image, decode_many, decode_mask
    path = str(tmp_path / "scan.png")
    Image.new("L", (32, 32), 128).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for kind, read in (("image", lambda: decode_image(path, 16)),
                       ("image", lambda: decode_many([path], 16)),
                       ("mask", lambda: decode_mask(path, 16))):
        with pytest.raises(UserError, match=rf"cannot decode {kind} .*scan.png' \(Image size "
                                            r"\(1024 pixels\) exceeds limit .*downscale it"):
            read()


def test_file_with_an_image_suffix_that_is_not_an_image(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    with open(os.path.join(root, "train", "good", "notes.png"), "w") as f:
        f.write("not a picture")
    expect_error(folder_config(root), tmp_path / "w", capsys, "cannot decode image", "notes.png")


def test_every_unreadable_file_is_named_in_one_error(tmp_path):
    """Several bad files: one error names the first three and counts the rest, so one
    rerun follows the fix (before: one file per error, a rerun each)."""
    from fsad.data.decode import decode_many
    root = dataset(tmp_path / "d")
    good = sorted(os.listdir(os.path.join(root, "train", "good")))
    bad = [os.path.join(root, "train", "good", f"bad{i}.png") for i in range(5)]
    for path in bad:
        with open(path, "w") as f:
            f.write("not a picture")
    paths = [os.path.join(root, "train", "good", f) for f in good[:4]] + bad
    with pytest.raises(UserError) as err:
        decode_many(paths, 32)
    line = str(err.value)
    assert line.startswith("5 of 9 files cannot be read: cannot decode image ")
    assert all(f"bad{i}.png" in line for i in range(3)) and "bad3.png" not in line
    assert line.endswith("; and 2 more; remove, replace or make readable each of them, "
                         "then rerun")
    assert decode_many(paths[:4], 32).shape == (4, 32, 32, 3)


def test_unreadable_image(tmp_path, capsys, monkeypatch):
    """chmod 000; as root (who reads it anyway: CI runs as root) PIL's open is made to
    fail with the permission error the file system would give any other user."""
    root = dataset(tmp_path / "d")
    path = os.path.join(root, "train", "good", "003.png")
    os.chmod(path, 0)
    if os.geteuid() == 0:
        from PIL import Image as PILImage
        real_open = PILImage.open

        def deny(fp, *a, **k):
            if os.path.abspath(str(fp)) == os.path.abspath(path):
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *a, **k)
        monkeypatch.setattr(PILImage, "open", deny)
    expect_error(folder_config(root), tmp_path / "w", capsys, "permission denied",
                 "003.png", "chmod a+r")


def test_float_and_32_bit_grey_images_are_refused(tmp_path, capsys):
    """A float TIFF (Pillow mode F, 0..1) decoded all black, a 32-bit integer one past
    65535 all white, each trained on or scored without a word: refused, named."""
    root = dataset(tmp_path / "d")
    good = os.path.join(root, "train", "good")
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(os.path.join(good, "float.tif"))
    Image.fromarray((ramp * 2 ** 20).astype(np.int32), "I").save(os.path.join(good, "i32.tif"))
    expect_error(folder_config(root), tmp_path / "w", capsys, "2 of ", "float.tif",
                 "float pixels (Pillow mode F)", "i32.tif", "32-bit integer pixels")


# ---- inputs that must work ----

def test_mixed_sizes_and_modes_are_read(tmp_path):
    root = dataset(tmp_path / "d")
    good = os.path.join(root, "train", "good")
    ramp = (np.arange(40 * 50).reshape(40, 50) % 256).astype(np.uint8)
    Image.fromarray(ramp, "L").save(os.path.join(good, "grey.png"))
    Image.fromarray(np.dstack([ramp] * 3 + [np.full_like(ramp, 128)]), "RGBA").save(
        os.path.join(good, "rgba.png"))
    Image.fromarray(ramp.astype(np.uint16) * 257).save(os.path.join(good, "deep.png"))  # I;16
    # 16-bit samples within 0..255: read as the released loader's convert("RGB") reads them
    Image.fromarray(ramp.astype(np.uint16)).save(os.path.join(good, "shallow.png"))
    Image.fromarray(ramp, "L").convert("P").save(os.path.join(good, "palette.png"))
    Image.fromarray(np.zeros((70, 20, 3), np.uint8)).save(os.path.join(good, "tall.jpg"))
    data = read_folder(root, SIZE, cache_dir="")
    ids = list(data.file_ids)
    for name in ("grey.png", "rgba.png", "deep.png", "shallow.png", "palette.png", "tall.jpg"):
        img = data.images[ids.index(f"train/good/{name}")]
        assert img.shape == (SIZE, SIZE, 3)
    deep = data.images[ids.index("train/good/deep.png")].astype(int)
    grey = data.images[ids.index("train/good/grey.png")].astype(int)
    assert np.abs(deep - grey).max() <= 1  # 16 bits scaled to 8, not clipped to white
    np.testing.assert_array_equal(data.images[ids.index("train/good/shallow.png")], grey)
    # RGBA's alpha dropped (the released convert("RGB")), a palette's levels looked up:
    # the grey image's pixels; the tall black JPEG black
    for name in ("rgba.png", "palette.png"):
        np.testing.assert_array_equal(data.images[ids.index(f"train/good/{name}")], grey)
    assert data.images[ids.index("train/good/tall.jpg")].max() == 0


def test_what_the_layout_leaves_out_is_said(tmp_path, caplog):
    """Files the folder reader and scoring leave out were left out without a word (a
    walkthrough's test/stray.png, test/good/nested/, and .webp files to score)."""
    from fsad.data import folder_without_pixels
    from fsad.scoring import images_to_score
    root = dataset(tmp_path / "d")
    read_folder(root, SIZE, cache_dir=str(tmp_path / "cache"))  # decoded before the strays
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    image.save(os.path.join(root, "test", "stray.png"))
    os.makedirs(os.path.join(root, "test", "good", "nested"))
    image.save(os.path.join(root, "test", "good", "nested", "001.png"))
    for junk in ("notes.txt", "Thumbs.db", ".DS_Store"):  # only the first is named
        with open(os.path.join(root, "train", "good", junk), "w") as f:
            f.write("x")
    assert "not in the dataset" not in caplog.text
    folder_without_pixels(root)  # every run's listing, the decoded set cached or not
    assert ("3 file(s) and folder(s) under " in caplog.text and "are not in the dataset "
            "(train/good/notes.txt, test/good/nested/, test/stray.png): images go directly "
            "into train/good/ and test/<class>/" in caplog.text), caplog.text
    caplog.clear()
    image.save(os.path.join(root, "test", "good", "nested", "x.webp"))
    files, _ = images_to_score(os.path.join(root, "test"))
    assert "good/nested/001.png" in files
    assert ("1 file(s) under --input are not images fsad reads and are not scored "
            "(good/nested/x.webp)" in caplog.text), caplog.text


def test_mask_of_another_size_is_resized(tmp_path):
    root = dataset(tmp_path / "d")
    mask = np.zeros((SIZE * 3, SIZE * 3), np.uint8)
    mask[:SIZE * 3 // 2] = 255  # the top half
    Image.fromarray(mask).save(os.path.join(root, "ground_truth", "spot", "000_mask.png"))
    data = read_folder(root, SIZE, cache_dir="")
    m = data.masks[list(data.file_ids).index("test/spot/000.png")]
    assert m.shape == (SIZE, SIZE) and m[:SIZE // 2].all() and not m[SIZE // 2:].any()


def test_mask_without_image_and_image_without_mask(tmp_path, caplog):
    root = dataset(tmp_path / "d")
    gt = os.path.join(root, "ground_truth", "spot")
    os.rename(os.path.join(gt, "002_mask.png"), os.path.join(gt, "099_mask.png"))
    data = read_folder(root, SIZE, cache_dir="")
    assert "099_mask.png has no image" in caplog.text
    assert "1 anomaly image(s) have no mask" in caplog.text and "002.png" in caplog.text
    idx = list(data.file_ids).index("test/spot/002.png")
    assert not data.has_mask()[idx] and data.has_mask().sum() == 14


# ---- the protocol ----

def test_more_shots_than_anomalies(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    expect_error_before_decoding(folder_config(root, **{"data.n_anomaly": 20}), tmp_path,
                                 capsys, "data.n_anomaly=20", "has only 15 anomalies", "lower")



def test_more_shots_than_the_synthetic_set_has(tmp_path, capsys):
    """data.name=synthetic writes its folder when missing, then is checked from the
    listing like any folder (it was decoded first, and the workdir made)."""
    cfg = folder_config(tmp_path / "synth", **{"data.name": "synthetic",
                                               "data.n_anomaly": 40})
    expect_error_before_decoding(cfg, tmp_path, capsys, "data.n_anomaly=40",
                                 "has only 36 anomalies", "lower")
    assert (tmp_path / "synth" / "train" / "good").is_dir()  # the set itself is written


def test_a_tfds_protocol_error_comes_before_any_decode(tmp_path, capsys):
    """data.name=tfds is checked from its records with the images left encoded (it was
    decoded first, and the workdir made): too many shots, an unknown known class, an
    unknown dataset."""
    pytest.importorskip("tensorflow_datasets")
    from fsad.data import tfds_io
    tfds_dir = str(tmp_path / "tfds")
    tfds_io.write_tfds(tfds_io.folder_source(dataset(tmp_path / "d")), "fsad_small", tfds_dir)
    tfds_data = {"data.name": "tfds", "data.root": "", "data.tfds_name": "fsad_small",
                 "data.tfds_dir": tfds_dir}
    for overrides, fragments in [
            ({"data.n_anomaly": 16}, ("data.n_anomaly=16", "has only 15 anomalies")),
            ({"data.setting": "hard", "data.known_class": "crack"},
             ("'crack' is not an anomaly class", "scratch, spot, stain")),
            ({"data.tfds_name": "fsad_other"}, ("no TFDS dataset 'fsad_other'",))]:
        cfg = folder_config(tmp_path, **{**tfds_data, **overrides})
        expect_error_before_decoding(cfg, tmp_path, capsys, *fragments)


@pytest.mark.parametrize("n", [0, -1])
def test_no_or_negative_shots(tmp_path, capsys, n):
    expect_error(folder_config(tmp_path, **{"data.n_anomaly": n}), tmp_path / "w", capsys,
                 f"data.n_anomaly={n}", "at least one labelled anomaly")


def test_unknown_known_class(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    cfg = folder_config(root, **{"data.setting": "hard", "data.known_class": "crack"})
    expect_error_before_decoding(cfg, tmp_path, capsys, "'crack' is not an anomaly class",
                                 "scratch, spot, stain")


def test_hard_setting_without_a_known_class(tmp_path, capsys):
    expect_error(folder_config(tmp_path, **{"data.setting": "hard"}), tmp_path / "w", capsys,
                 "needs a seen class", "--config.data.known_class")


def test_known_class_without_the_hard_setting(tmp_path, capsys):
    """It was silently a general run, on every anomaly class."""
    expect_error(folder_config(tmp_path, **{"data.known_class": "spot"}), tmp_path / "w",
                 capsys, "data.known_class='spot' is read only in the hard setting",
                 "--config.data.setting=hard")


def test_hard_setting_on_one_anomaly_class(tmp_path, capsys):
    root = dataset(tmp_path / "d", defects=("spot",))
    cfg = folder_config(root, **{"data.setting": "hard", "data.known_class": "spot"})
    expect_error_before_decoding(cfg, tmp_path, capsys, "at least two anomaly classes",
                                 "setting=general")


def test_contamination_outside_its_range(tmp_path, capsys):
    expect_error(folder_config(tmp_path, **{"data.contamination": 1.5}), tmp_path / "w", capsys,
                 "data.contamination=1.5 is not a rate")


def test_contamination_beyond_the_test_anomalies(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    expect_error_before_decoding(folder_config(root, **{"data.contamination": 0.6}), tmp_path,
                                 capsys, "unlabelled anomalies but the test set has")


# ---- the config ----

def test_image_smaller_than_the_trunk_stride(tmp_path, capsys):
    expect_error(folder_config(tmp_path, **{"data.img_size": 16}), tmp_path / "w", capsys,
                 "smaller than the trunk's stride")


def test_batch_the_devices_cannot_split(tmp_path):
    """The nearest batches that split; a batch too small, or an anomaly share that leaves
    no normals (or no anomalies), said as such (the advice was a multiple of 1, or to
    raise the batch, which never helps a share of 1)."""
    from fsad.validate import check_config
    with pytest.raises(UserError, match=r"batch_size=12 cannot be split over the 8 devices; "
                                        r"use a multiple of 8, e.g. 8 or 16"):
        check_config(folder_config(tmp_path, batch_size=12), n_devices=8)
    with pytest.raises(UserError, match=r"batch_size=16 .* 3 devices; .*, e.g. 15 or 18, "
                       r"or \(a run of this batch_size to resume, which another batch would "
                       r"change\) run on 2 or 1 devices \(CUDA_VISIBLE_DEVICES, or "):
        check_config(folder_config(tmp_path, batch_size=16), n_devices=3)
    with pytest.raises(UserError, match=r"batch_size=1: a batch holds normals and seen"):
        check_config(folder_config(tmp_path, batch_size=1))
    for share in (1.0, 0.0):
        with pytest.raises(UserError, match=rf"anomaly_fraction={share:g} is not a share"):
            check_config(folder_config(tmp_path, anomaly_fraction=share))


@pytest.mark.parametrize("field,value,fragment", [
    ("num_seeds", 0, "num_seeds=0; a run trains at least one seed"),  # was an IndexError
    ("seed", -1, "seed=-1; seeds are non-negative"),  # was numpy's ValueError
    ("explain.batch_size", 0, "explain.batch_size=0; a batch holds at least one image"),
    ("eval_batch_size", 0, "eval_batch_size=0; a batch holds at least one image"),
    # after training, the blur's MLIR error; in scoring, black (NaN) heat maps
    ("explain.kernel_size", 0, "explain.kernel_size=0; the saliency's blur needs a kernel"),
    ("explain.sigma", 0.0, "explain.sigma=0.0; the blur's Gaussian needs a positive sigma"),
    ("explain.num_overlays", -1, "explain.num_overlays=-1; use 0 (none) or more"),  # drew
    # all but one
    ("explain.curve_points", 0, "explain.curve_points=0; the AUROC-F1 curve needs 1 or more"),
    ("checkpoint_seconds", -1.0, "checkpoint_seconds=-1.0; use 0 (a checkpoint every epoch)"),
    ("keep_checkpoints", -1, "keep_checkpoints=-1; use 0 (keep none) or more"),
    ("ahl.inner_lr", -1e-4, "ahl.inner_lr=-0.0001; use 0 (no adaptation) or a positive"),
    # above their ranges, or not finite (a config fuzz's findings): each ended in a
    # traceback, a hang or a run that went through with the value
    ("ahl.inner_lr", float("inf"), "ahl.inner_lr=inf; use 0 (no adaptation)"),
    ("ahl.loss_scale", float("inf"), "ahl.loss_scale=inf, ahl.query_batches=1; use a finite "
     "positive scale"),
    ("model.n_scales", 10 ** 20, "model.n_scales=100000000000000000000; use 1 (paper) or 2 "
     "(released), at most 8"),  # hung on 2 ** (n - 1)
    ("data.img_size", 10 ** 6, "data.img_size=1000000: every image is resized to this "
     "side; use at most 8192"),  # numpy's MemoryError writing the synthetic set
    ("seed", 10 ** 20, "seeds go up to 2147483647"),  # an OverflowError in JAX's key
    ("dra.residual_stride", 0, "dra.residual_stride=0, dra.residual_padding=1: the residual "
     "head's 3x3 conv takes stride 1 to 3 and padding 0 or 1"),  # a ZeroDivisionError
    ("dra.residual_padding", -5, "dra.residual_padding=-5: the residual head's 3x3 conv"),
    # (AHL's residual head) a traceback in the first trace, after the decode
    ("dra.residual_padding", 0, "dra.residual_padding=0 with data.img_size=32 and "
     "model.n_scales=2: the smallest level's 16 px give a 1x1 trunk map, and the residual "
     "head's 3x3 conv needs 3x3 or more without padding"),
    ("ahl.psi_weight_decay", float("inf"), "ahl.psi_weight_decay=inf; use a dropout"),
    ("explain.kernel_size", 100000, "at most the image's 32"),  # a 74.5 GiB kernel
    ("explain.curve_points", 10 ** 8, "at most 10000"),  # hung after training
    ("augment.rotate_degrees", float("nan"), "augment.rotate_degrees=nan; images are "
     "rotated by U(-d, d): use 0 (off) to 180"),  # cast to an integer angle, silently
    ("optim.clip_norm", -1.0, "optim.clip_norm=-1.0; use 0 (no clipping) or a positive"),
    ("optim.weight_decay", -1.0, "optim.weight_decay=-1.0; use 0 (none) or a positive"),
    ("optim.decay_factor", 0.0, "optim.decay_factor=0.0; use a positive factor"),
    ("ahl.optim.decay_factor", -2.0, "ahl.optim.decay_factor=-2.0; use a positive factor"),
    ("loss.margin", -5.0, "loss.margin=-5.0; the anomalies' deviations are pushed past it"),
    ("loss.prior_mu", float("nan"), "loss.prior_mu=nan; use a finite mean"),
    ("eval_batch_size", 10 ** 8, "eval_batch_size=100000000; a batch holds at least one "
     "image, at most 4096 (every batch is padded to it)"),  # 5 images padded to 1e8 copies
    ("ahl.psi_hidden", 0, "ahl.psi_hidden=0, ahl.psi_fc=14"),  # was a traceback in flax
    ("ahl.pseudo_frac", 1.5, "ahl.pseudo_frac=1.5 is not a fraction"),
    ("ahl.pseudo_frac", 1.0, "1 leaves the tasks no normal"),  # it ran, weights at 1e14
    ("ahl.chunk_size", -1, "ahl.chunk_size=-1; use 0 (the whole set where it fits)"),
    ("ahl.task_batching", "loop", "ahl.task_batching='loop'; use vmap (a device's tasks as "
     "one batched program) or map"),
    ("loss.prior_sigma", 0.0, "loss.prior_sigma=0.0: the deviation divides by it"),  # was
    # "training diverged ... lower --config.optim.lr"
    ("loss.prior_size", 1, "loss.prior_size=1: the deviation divides by the std"),  # a
    # NaN loss blamed on the lr before, as prior_sigma's
    ("dra.outlier_root", "/no/such", "dra.outlier_root='/no/such' is not a folder"),
    ("ahl.texture_root", "/no/such", "ahl.texture_root='/no/such' is not a folder"),
    # " " and "a" checked a file's digest against nothing, or one hex digit
    ("model.pretrained_sha256", " ", "model.pretrained_sha256=' ' is not a sha256 or the "
     "start of one; give 8 to 64 of its hex digits"),
    ("model.pretrained_sha256", "a", "model.pretrained_sha256='a' is not a sha256"),
    ("model.pretrained_sha256", "xyz12345", "model.pretrained_sha256='xyz12345' is not"),
])
def test_values_out_of_their_range(tmp_path, field, value, fragment):
    from fsad.validate import check_config
    method = {"ahl": "ahl_dra", "dra": "dra"}.get(field.split(".")[0], "devnet")
    with pytest.raises(UserError, match=re.escape(fragment)):
        check_config(folder_config(tmp_path, method, **{field: value}))


def test_a_method_is_its_config_files_and_a_root_is_a_folder(tmp_path, capsys):
    """--config.method=ahl on configs/devnet.py was a KeyError's traceback (--check and
    the run), =dra ran DRA without its fields, =foo passed --check; a data.root that is a
    file was a NotADirectoryError's traceback when the synthetic set was written."""
    from fsad.validate import check_config

    def with_method(file, method):
        config = folder_config(tmp_path, file)
        config.method = method
        return config

    expect_error(with_method("devnet", "ahl"), tmp_path / "w", capsys,
                 "method='ahl' on a config of devnet (configs/devnet.py)",
                 "use --config configs/ahl_dra.py or configs/ahl_devnet.py", check=True)
    for file, method, fragment in (("devnet", "foo", "method='foo' is not a method fsad has"),
                                   ("devnet", "dra", "use --config configs/dra.py instead"),
                                   ("ahl_dra", "dra", "on a config of ahl")):
        with pytest.raises(UserError, match=re.escape(fragment)):
            check_config(with_method(file, method))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"data.root='.*a_file' is a file; pass the dataset's"):
        check_config(folder_config(tmp_path / "a_file"))


@pytest.mark.parametrize("file,variants", [("devnet", "paper,quick"), ("dra", "localization"),
                                            ("ahl_dra", "paper")])
def test_a_runs_own_config(tmp_path, capsys, file, variants):
    """--config configs/run.py:WORKDIR is the config a run was made with (its config.json
    over its method's file), flags on top: a user who forgot the variants (nothing
    records them) could not score the run, and config.json as --config was a NameError's
    traceback."""
    made = parse_command_line([f"--config=configs/{file}.py:{variants}",
                               "--config.data.n_anomaly=3", "--config.data.cache_dir="])
    work = tmp_path / "w"
    work.mkdir()
    (work / "config.json").write_text(made.to_json_best_effort())
    again = parse_command_line([f"--config=configs/run.py:{work}", "--config.seed=2"])
    made.seed = 2
    assert again.to_json_best_effort() == made.to_json_best_effort()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")  # cut short
    for args, fragment in (
            ([f"--config=configs/run.py:{bad}"], f"cannot read {bad / 'config.json'} ("),
            ([f"--config={work / 'config.json'}"], f"is a run's record, not a config file; "
             f"to use the config of the run it belongs to, pass --config configs/run.py:{work}"),
            ([f"--config=configs/run.py:{tmp_path}"], "holds no run (no config.json)"),
            (["--config=configs/run.py"], "name the run's folder after a colon")):
        with pytest.raises(SystemExit):
            parse_command_line(args)
        assert fragment in capsys.readouterr().err


def test_scoring_checks_the_fields_it_may_change(tmp_path, capsys):
    """--mode score takes explain.* and the batches as given; a value no scoring could
    use is refused in one line before the run is read (a sigma of 0 wrote black heat maps,
    an eval_batch_size of 0 went through)."""
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for field, value in (("explain.sigma", -1.0), ("eval_batch_size", 0)):
        expect_error(folder_config(tmp_path, **{field: value}), tmp_path / "no_run", capsys,
                     f"{field}={value}", mode="score", input_dir=str(image))


@pytest.mark.parametrize("field", ["ahl.texture_root", "dra.outlier_root"])
def test_an_image_folder_without_images_that_open_is_refused_before_training(
        tmp_path, capsys, field):
    """An empty texture folder, or one whose file is no image, passed --check and
    stopped the run only after base training (a walkthrough saw it): refused in one line
    by --check and before the run's first step (headers read, nothing decoded)."""
    from PIL import Image
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    cfg = folder_config(tmp_path, "ahl_dra", **{field: str(folder)})
    for check in (True, False):
        expect_error(cfg, tmp_path / "w", capsys, f"--config.{field}: no images (.png",
                     f"under {str(folder)!r}", check=check)
    (folder / "sub" / "a.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    for check in (True, False):
        expect_error(cfg, tmp_path / "w", capsys, f"--config.{field}: cannot decode image "
                     f"{str(folder / 'sub' / 'a.png')!r}", check=check)
    assert not (tmp_path / "w").exists()
    (folder / "sub" / "a.png").unlink()
    np.save(folder / "c.npy", np.zeros((4, 4, 2), np.uint8))  # no image's channels
    expect_error(cfg, tmp_path / "w", capsys, f"--config.{field}: cannot decode image "
                 f"{str(folder / 'c.npy')!r} (expected an [H, W, C] array with C = 1 or "
                 f"C >= 3, got (4, 4, 2))")
    np.save(folder / "c.npy", np.zeros((4, 4), np.uint8))
    from fsad.validate import check_config
    check_config(cfg)


def test_batch_the_class_mix_cannot_split(tmp_path, capsys):
    expect_error(folder_config(tmp_path, batch_size=8, anomaly_fraction=0.9), tmp_path / "w",
                 capsys, "gives 8 seen anomalies and 0 normals", "a batch needs both")


@pytest.mark.parametrize("name,field,value,fragment", [
    # it trained on ELPV, the configs' default, and said nothing of the folder
    ("elpv", "root", "{tmp}", "read only by the folder and synthetic readers, and data.name "
     "is 'elpv'; add --config.data.name=folder"),
    ("folder", "tfds_name", "mnist", "data.tfds_name='mnist' is read only by the tfds reader, "
     "and data.name is 'folder'; add --config.data.name=tfds"),
])
def test_a_data_field_that_the_reader_does_not_read(tmp_path, capsys, name, field, value,
                                                   fragment):
    cfg = folder_config(tmp_path, **{"data.name": name, f"data.{field}": value.format(
        tmp=tmp_path)})
    expect_error(cfg, tmp_path / "w", capsys, fragment)
    assert not (tmp_path / "w").exists()


def test_unknown_dataset_reader_dtype_depthwise_route_and_dra_variant(tmp_path, capsys):
    expect_error(folder_config(tmp_path, **{"data.name": "mvtec"}), tmp_path / "w", capsys,
                 "data.name='mvtec' is not a dataset reader")
    expect_error(folder_config(tmp_path, **{"data.mask_resize": "bilinear"}), tmp_path / "w",
                 capsys, "data.mask_resize='bilinear' is not a mask resize")
    expect_error(folder_config(tmp_path, **{"model.dtype": "float16"}), tmp_path / "w", capsys,
                 "is not a compute dtype")
    expect_error(folder_config(tmp_path, **{"model.depthwise_conv": "fft"}), tmp_path / "w",
                 capsys, "model.depthwise_conv='fft' is not a route fsad has; use one of auto, "
                 "slices, grouped")
    expect_error(folder_config(tmp_path, "dra", **{"dra.variant": "DRA5"}), tmp_path / "w",
                 capsys, "'DRA5' is not a DRA variant")


@pytest.mark.parametrize("method,base", [("ahl_devnet", "dra"), ("ahl_dra", "devnet")])
def test_ahl_base_comes_with_its_config_file(tmp_path, capsys, method, base):
    """configs/ahl_devnet.py with --config.ahl.base=dra passed --check and failed in the
    run with a KeyError (it has no dra.* fields); ahl_dra.py with base=devnet trained a
    hybrid of DRA's data and optimiser defaults. Both refused, the config file named."""
    cfg = folder_config(tmp_path, method, **{"ahl.base": base})
    for check in (True, False):
        expect_error(cfg, tmp_path / "w", capsys, f"ahl.base='{base}' on a config of AHL on "
                     f"{method[4:]} (configs/{method}.py)", f"use --config "
                     f"configs/ahl_{base}.py instead of --config.ahl.base", check=check)
    assert not (tmp_path / "w").exists()
    # a base that is none, on a dataset of the papers' protocol notes (headct): the note
    # looked the method up first and said "no paper figures for method 'ahl_foo'"
    headct = tmp_path / "headct"
    shutil.copytree(dataset(tmp_path / "d"), headct)
    cfg = folder_config(headct, method, **{"ahl.base": "foo"})
    expect_error(cfg, tmp_path / "w", capsys, "ahl.base='foo'; use dra or devnet", check=True)


def test_workdir_of_another_config(tmp_path, capsys, caplog):
    """A workdir holds one config once a run saved something there (a checkpoint, a
    finished seed); the config of a run that saved nothing (it stopped at a failed
    download or out of memory) gives way to the next run's, and the fields that only batch
    the evaluation or pace the checkpoints may change, and so may the number of seeds."""
    from fsad.workdir import check_workdir, saved_in
    root = dataset(tmp_path / "d")
    work = tmp_path / "w"
    work.mkdir()
    config = folder_config(root)
    stored = folder_config(root, **{"data.img_size": 64, "seed": 123})
    (work / "config.json").write_text(stored.to_json_best_effort())
    (work / "seed_0" / "checkpoints" / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert saved_in(str(work)) == []  # a half-written checkpoint is not one
    from fsad.workdir import workdir_change_lines
    assert workdir_change_lines(str(work), config) == [  # what --check says of it
        "workdir: held the config of a run that saved nothing (no checkpoint, no finished "
        "seed); this run's config replaces it (it differed in data.img_size, seed)"]
    check_workdir(str(work), config)
    assert "saved nothing" in caplog.text and "data.img_size, seed" in caplog.text
    assert json.loads((work / "config.json").read_text())["seed"] == config.seed
    (work / "seed_0" / "checkpoints" / "10").mkdir()
    assert saved_in(str(work)) == ["seed_0/checkpoints step 10"]
    expect_error(stored, work, capsys, "holds a run with a different config (fields "
                 "data.img_size, seed; in the run: 32, 0); give it those values to resume "
                 f"or extend that run (--config configs/run.py:{work} gives them all), or use "
                 "a new --workdir for these (deleting this one discards")
    config.eval_batch_size, config.explain.batch_size = 3, 5
    config.checkpoint_seconds = 600.0  # how often it saves: no other state
    check_workdir(str(work), config)  # no error: the same trained run
    config.num_seeds = 3  # more seeds of the same run: the stored config takes the count
    check_workdir(str(work), config)
    assert json.loads((work / "config.json").read_text())["num_seeds"] == 3
    # fewer seeds: one that holds work and is left out is said aloud (results.json was
    # rewritten without it, silently; seed 1, with none, is not named)
    (work / "seed_2" / "checkpoints" / "5").mkdir(parents=True)
    config.num_seeds = 1
    from fsad.workdir import workdir_change_lines
    assert workdir_change_lines(str(work), config) == [
        "workdir: the run goes on with num_seeds=1; finished seeds are kept, the others "
        "trained; seed 2 keeps its work but stays out of results.json (raise "
        "--config.num_seeds to take it in)"]
    with caplog.at_level("WARNING"):
        check_workdir(str(work), config)
    assert "seed 2 keeps its work but stays out of results.json" in caplog.text
    config.num_seeds, config.seed = 2, 5  # a count, and another first seed: refused (for
    # the seed: the count may change, and is not named)
    expect_error(config, work, capsys, "holds a run whose seeds start at 0, and --config.seed=5 "
                 "starts another run; to add seeds to it, keep --config.seed=0 and raise "
                 "--config.num_seeds (to 7: seeds 0 to 6), or use a new --workdir")
    per_batch = folder_config(root, "dra", **{"dra.test_reference": "per_batch"})
    (work / "config.json").write_text(per_batch.to_json_best_effort())
    per_batch.eval_batch_size = 3  # here the batch changes the scores
    expect_error(per_batch, work, capsys, "different config (field eval_batch_size; in the "
                 "run: 32)")



@pytest.mark.parametrize("method", ["devnet", "dra", "ahl_dra", "ahl_devnet"])
def test_a_run_saved_before_a_field_existed_goes_on_with_its_default(tmp_path, capsys,
                                                                    method):
    """A config.json written before fsad had a field (data.mask_resize, new in this
    version) holds a run made as that field's default makes it: the run resumes and
    scores with the default, another value of the field is another config, and such a
    run serves as an AHL run's trained base."""
    import importlib

    from fsad.config import method_defaults
    from fsad.workdir import check_stored_config, stored_config_diff
    root = dataset(tmp_path / "d")
    work = tmp_path / "w"
    work.mkdir()
    config = folder_config(root, method, **{"data.img_size": 64})
    # the defaults it compares with are the config file's
    assert method_defaults(config).to_json_best_effort() == importlib.import_module(
        f"configs.{method}").get_config().to_json_best_effort()
    old = json.loads(config.to_json_best_effort())
    del old["data"]["mask_resize"]
    (work / "config.json").write_text(json.dumps(old))
    assert check_stored_config(str(work), config)
    # scoring takes the heat maps' and the decision's settings as given: they change no
    # trained weight and no score (a walkthrough's run trained without explanations)
    config.explain.enabled, config.explain.sigma = False, 2.0
    assert check_stored_config(str(work), config)
    config.data.cache_dir = str(tmp_path / "elsewhere")  # another cache: the same images
    config.data.mask_resize = "opencv_linear"  # another config to train, but scoring
    config.data.root = str(tmp_path / "moved")  # reads no mask (`:localization`), no image
    assert stored_config_diff(str(work), config) == ["data.mask_resize", "data.root",
                                                     "explain.sigma"]
    assert check_stored_config(str(work), config)  # of the training data
    config.data.root = str(root)
    config.data.n_anomaly += 1
    with pytest.raises(UserError, match=r"different config \(field data.n_anomaly; in "
                                        r"the run: 2\); "
                                        r"score with the config it was trained with"):
        check_stored_config(str(work), config)
    config.data.n_anomaly -= 1
    if method.startswith("ahl_"):  # an older base run serves AHL (ahl.base_workdir)
        from fsad.workdir import base_fields_that_differ
        base = folder_config(root, method[4:], **{"data.img_size": 64})
        base_json = json.loads(base.to_json_best_effort())
        del base_json["data"]["mask_resize"]
        # the masks' resize is evaluation: it does not make another base model
        assert base_fields_that_differ(config, base_json) == []
        config.epochs += 1
        assert base_fields_that_differ(config, base_json) == ["epochs"]


def test_more_clusters_than_normals(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    expect_error_before_decoding(folder_config(root, "ahl_devnet", **{"ahl.clusters": 4}),
                                 tmp_path, capsys,
                                 "ahl.clusters=4 asks k-means for more clusters than 8")


def test_more_dra_references_than_normals(tmp_path, capsys):
    root = dataset(tmp_path / "d")  # was numpy's "Cannot take a larger sample" traceback
    expect_error_before_decoding(
        folder_config(root, "dra", **{"dra.n_ref": 9}), tmp_path, capsys,
        "dra.n_ref=9 asks for more reference images than the 8 training normals")


def test_score_flags_without_score_mode(tmp_path, capsys):
    """--input without --mode score was ignored, and a run trained in the workdir."""
    cfg = folder_config(dataset(tmp_path / "d"))
    expect_error(cfg, tmp_path / "w", capsys, "--input is a score-mode flag and --mode is "
                 "train; add --mode score", input_dir=str(tmp_path / "d" / "test"))
    expect_error(cfg, tmp_path / "w", capsys, "--output, --heatmaps are score-mode flags",
                 "leave them out", output=str(tmp_path / "s.csv"), heatmaps=True)
    assert not (tmp_path / "w").exists()


def test_scoring_without_a_trained_run_or_images(tmp_path, capsys, monkeypatch):
    root = dataset(tmp_path / "d")
    cfg = folder_config(root)
    expect_error(cfg, tmp_path / "w", capsys, "holds no trained run", mode="score",
                 input_dir=root)
    work = tmp_path / "w2"
    work.mkdir()
    from fsad import scoring
    from fsad.workdir import config_json
    (work / "config.json").write_text(json.dumps(config_json(cfg)))
    with monkeypatch.context() as m:  # said before the folder is decoded (it was after)
        m.setattr(scoring, "decode_many", lambda *a, **k: pytest.fail("decoded first"))
        expect_error(cfg, work, capsys, "no checkpoints", mode="score", input_dir=root)
    # a first save cut short (Orbax's temporary folder) is no checkpoint either: before,
    # it read as one that "could not be read"
    (work / "seed_0" / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir(parents=True)
    expect_error(cfg, work, capsys, "no checkpoints in", "train this workdir first",
                 mode="score", input_dir=root)
    empty = tmp_path / "nothing"
    empty.mkdir()
    expect_error(cfg, work, capsys, "no images", "point it at a folder that holds images",
                 mode="score", input_dir=str(empty))
    (empty / "notes.txt").write_text("not an image")
    expect_error(cfg, work, capsys, "is not an image file fsad reads", "pass one (another "
                 "format converted, e.g. to .png) or a folder", mode="score",
                 input_dir=str(empty / "notes.txt"))
    # a folder of formats fsad does not read says which; a broken link says so
    (empty / "a.gif").write_bytes(b"GIF89a")
    expect_error(cfg, work, capsys, "no images", "it holds only files fsad does not read as "
                 "images (a.gif, notes.txt): convert them", mode="score", input_dir=str(empty))
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    expect_error(cfg, work, capsys, f"link.png' is a link to '{tmp_path / 'gone.png'}', which "
                 f"does not exist", mode="score", input_dir=str(tmp_path / "link.png"))


def test_scoring_takes_any_seed_of_the_run(tmp_path, capsys):
    """--mode score reads the model of seed --config.seed: any seed of the stored run,
    with any num_seeds (before, only the stored first seed and count were taken: another
    seed of a three-seed run could not be scored); its default outputs are named by the
    seed after the first, so the first's are kept."""
    from fsad.scoring import default_scores_path, heatmap_dir
    from fsad.workdir import check_stored_config, config_json
    root = dataset(tmp_path / "d")
    work = tmp_path / "w"
    work.mkdir()
    stored = folder_config(root, **{"seed": 3, "num_seeds": 3})
    (work / "config.json").write_text(json.dumps(config_json(stored)))
    cfg = folder_config(root, **{"seed": 5})  # num_seeds 1
    assert check_stored_config(str(work), cfg)
    assert default_scores_path(str(work), 5) == str(work / "scores_seed5.csv")
    assert heatmap_dir(str(work), 5) == str(work / "heatmaps_seed5")
    assert default_scores_path(str(work), 3) == str(work / "scores.csv")
    assert heatmap_dir(str(work), 3) == str(work / "heatmaps")
    cfg.seed = 6
    expect_error(cfg, work, capsys, "holds a run of seeds 3, 4, 5, and --config.seed=6 is "
                 "not one of them; pass --config.seed=3 (or another of them)",
                 mode="score", input_dir=root)
    cfg.seed, cfg.data.n_anomaly = 4, 3  # another seed does not let other fields through
    expect_error(cfg, work, capsys, "different config (field data.n_anomaly; in the run: 2)",
                 mode="score", input_dir=root)
    (work / "config.json").write_text(json.dumps(config_json(folder_config(root))))
    cfg.data.n_anomaly = 2
    expect_error(cfg, work, capsys, "holds a run of seed 0, and --config.seed=4 is another; "
                 "pass --config.seed=0 to score", mode="score", input_dir=root)
    cfg.data.img_size = 64  # a seed not of the run, and another field: both said at once
    expect_error(cfg, work, capsys, "--config.seed=4 is another (and the config differs in "
                 "field data.img_size; in the run: 32); pass --config.seed=0", mode="score",
                 input_dir=root)
    cfg.data.img_size = 32
    # a run rerun with fewer seeds (config.json's num_seeds 1) keeps its other seeds' models
    (work / "seed_4" / "checkpoints" / "10").mkdir(parents=True)
    assert check_stored_config(str(work), cfg)
    assert default_scores_path(str(work), 4) == str(work / "scores_seed4.csv")


# ---- weights ----

def _weights_file(tmp_path, name="resnet18"):
    from test_resnet_weights import torchvision_state_dict
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **torchvision_state_dict(name))
    return path


def test_weights_whose_sha256_differs(tmp_path, synthetic_root, capsys):
    """The fix names the user's own file, not a deletion of it (that is for a cached
    download)."""
    path = _weights_file(tmp_path)
    cfg = folder_config(synthetic_root, **{"model.pretrained": path,
                                           "model.pretrained_sha256": "ab" * 32})
    expect_error(cfg, tmp_path / "w", capsys, "sha256 of", "asked for: pass the right file")
    cfg.model.pretrained = f"file://{path}"  # a download: checked before it is kept
    expect_error(cfg, tmp_path / "w2", capsys, f"the download from file://{path} has sha256",
                 "nothing was kept: check the URL and --config.model.pretrained_sha256")
    from fsad.weights import download_path, weights_cache
    kept = download_path(cfg.model.pretrained, "ab" * 32, weights_cache())
    assert not os.path.exists(kept)
    shutil.copy(path, kept)  # a copy kept before (or put there by hand) that differs
    expect_error(cfg, tmp_path / "w3", capsys, "sha256 of", "delete that copy to download it")


def test_weights_that_do_not_fit_the_backbone(tmp_path, synthetic_root, capsys):
    cfg = folder_config(synthetic_root, **{"model.pretrained": _weights_file(tmp_path),
                                           "model.backbone": "resnet50"})
    expect_error(cfg, tmp_path / "w", capsys, "another trunk", "--config.model.backbone")


@pytest.mark.parametrize("make", ["text", "cut short", "downloaded cut short"])
def test_weights_file_that_is_not_a_checkpoint(tmp_path, synthetic_root, capsys, make):
    """A text file named .pth, and a real checkpoint cut short (a stopped download): one
    line naming the file (both were tracebacks from the unpickler), and the fix: the
    cached copy of a download is deleted to fetch it again (a rerun reused it)."""
    path = tmp_path / "resnet18.pth"
    if make == "text":
        path.write_text("not a checkpoint\n")
    else:
        whole = open(_weights_file(tmp_path), "rb").read()
        path = tmp_path / f"resnet18_{len(make)}.npz"
        path.write_bytes(whole[: len(whole) // 2])
    source, fix = str(path), "replace the file"
    if make.startswith("downloaded"):
        from fsad.weights import download_path, weights_cache
        source, fix = f"file://{path}", "delete that copy of the download to fetch it again"
        path = download_path(source, None, weights_cache())
    cfg = folder_config(synthetic_root, **{"model.pretrained": source})
    expect_error(cfg, tmp_path / "w", capsys, f"cannot read the weights in '{path}'",
                 f"{fix}, or pass another --config.model.pretrained")


def test_weights_download_cut_mid_stream(tmp_path, synthetic_root, capsys):
    """A server that promises 1,000,000 bytes and closes after 10 is a failed download in
    one line, and leaves no file in the cache (the 10 bytes were kept as the weights, and
    every later run took them from the cache and failed to read them)."""
    import http.server
    import threading

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"0123456789")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/resnet18.pth"
        cfg = folder_config(synthetic_root, **{"model.pretrained": url})
        expect_error(cfg, tmp_path / "w", capsys, f"cannot download the weights of resnet18 "
                     f"from {url} (the download stopped after 10 of 1000000 bytes)",
                     "pretrained=none")
    finally:
        server.shutdown()
    from fsad.weights import weights_cache
    assert weights_cache().startswith(os.environ["FSAD_CACHE"])  # the suite's own cache
    assert not [f for f in os.listdir(weights_cache()) if f.startswith("resnet18.pth")]


def test_unreachable_weights_url(tmp_path, synthetic_root, capsys):
    cfg = folder_config(synthetic_root, **{"model.pretrained": "http://127.0.0.1:9/resnet18.pth"})
    expect_error(cfg, tmp_path / "w", capsys, "cannot download", "lite0", "pretrained=none")


def test_check_says_where_the_weights_come_from(tmp_path, synthetic_root, capsys):
    """--check names the weights a run would load, or the download it would need (nothing
    fetched), and refuses a weights file that does not exist, as the run does (it passed
    before, and the run failed in its first seconds); a file here it reads, and refuses
    one of another trunk, as the run does."""
    from fsad.weights import download_path, weights_cache
    url = "http://127.0.0.1:9/resnet18.pth"  # nothing listens: --check does not fetch
    cfg = folder_config(synthetic_root, **{"model.pretrained": url})
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    local = download_path(url, None, weights_cache())
    assert (f"weights: the run downloads them from {url} into {local} (on a machine without "
            f"network, put the file there first") in capsys.readouterr().out
    assert not os.path.exists(local)
    cfg.model.pretrained = path = _weights_file(tmp_path)
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    read = "; read: its keys and shapes fit the model\n"
    assert f"\nweights: {path}{read}" in capsys.readouterr().out
    # a file the run would refuse, read (--check passed a ResNet-34 given as a ResNet-18)
    cfg.model.pretrained = _weights_file(tmp_path, "resnet34")
    expect_error(cfg, tmp_path / "w", capsys, "has no place in the model", check=True)
    cfg.model.pretrained = path
    cfg.model.pretrained = str(tmp_path / "nope.pth")
    expect_error(cfg, tmp_path / "w", capsys, "nope.pth' does not exist; check "
                 "--config.model.pretrained", check=True)
    cfg.model.pretrained = f"file://{tmp_path / 'nope.pth'}"  # a URL, but no download
    expect_error(cfg, tmp_path / "w", capsys, f"nope.pth' (--config.model.pretrained=file://"
                 f"{tmp_path / 'nope.pth'}) does not exist", check=True)
    cfg.model.pretrained = f"file://{path}"
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    assert f"\nweights: file://{path} (copied into " in capsys.readouterr().out
    # a sha256 given is checked on the file, as the run checks it (it was not: the run
    # failed after --check passed)
    from fsad.weights import sha256_of
    cfg.model.pretrained, cfg.model.pretrained_sha256 = path, sha256_of(path)[:8]
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    assert f"\nweights: {path} (its sha256 checked){read}" in capsys.readouterr().out
    cfg.model.pretrained_sha256 = "00000000"
    expect_error(cfg, tmp_path / "w", capsys, "expected 00000000...; the file is corrupt or "
                 "not the one asked for: pass the right file", check=True)
    cfg.model.pretrained = f"file://{path}"  # and a file:// source (or the copy of it
    # that an earlier test's run left in the suite's cache: "delete that copy")
    expect_error(cfg, tmp_path / "w", capsys, "expected 00000000...; the file is corrupt or "
                 "not the one asked for", check=True)
    # a download kept from before is checked too
    cfg.model.pretrained = url = "http://127.0.0.1:9/check_sha_resnet18.npz"
    local = download_path(url, "00000000", weights_cache())
    os.makedirs(os.path.dirname(local), exist_ok=True)
    shutil.copy(path, local)
    try:
        expect_error(cfg, tmp_path / "w", capsys, "expected 00000000...; the file is corrupt "
                     "or not the one asked for: delete that copy to download it again",
                     check=True)
        cfg.model.pretrained_sha256 = sha256_of(path)[:8]
        assert execute(cfg, str(tmp_path / "w"), check=True) == 0
        assert (f"\nweights: {local} (downloaded before, from {url}, its sha256 checked)"
                f"{read}" in capsys.readouterr().out)
    finally:
        os.remove(local)
    assert not (tmp_path / "w").exists()


# ---- writing and training ----

def test_workdir_that_cannot_be_written(tmp_path, synthetic_root, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    expect_error(folder_config(synthetic_root), blocker / "run", capsys,
                 "cannot write to --workdir", "writable folder")


def test_a_seed_resumes_only_on_the_images_it_started_with(tmp_path, capsys, monkeypatch):
    """A seed's checkpoints were trained on its split's training images; when the dataset
    changed since (here: two normals added), the rerun is refused (it went on training
    the old checkpoint on other images), from the folder's listing: before the weights
    are loaded or any image is decoded (it came after both)."""
    from fsad import experiment
    from fsad.data import read_folder
    from fsad.experiment import check_split_unchanged, split_stage
    root = dataset(tmp_path / "d")
    config = folder_config(root, **{"data.cache_dir": str(tmp_path / "cache")})
    seed_dir = tmp_path / "w" / "seed_0"
    data = read_folder(root, SIZE, "")
    check_split_unchanged(data, split_stage(config, data, 0), 0, str(seed_dir))
    (seed_dir / "checkpoints" / "2").mkdir(parents=True)  # a checkpoint of this split
    check_split_unchanged(data, split_stage(config, data, 0), 0, str(seed_dir))  # the same
    good = os.path.join(root, "train", "good")
    for i, name in enumerate(sorted(os.listdir(good))[:2]):
        shutil.copy(os.path.join(good, name), os.path.join(good, f"added_{i}.png"))
    monkeypatch.setattr(experiment, "build_runner",
                        lambda *a: pytest.fail("weights loaded before the split check"))
    expect_error(config, tmp_path / "w", capsys, "the training images of seed 0 differ",
                 "(8 normals and 2 seen anomalies then, 10 and 2 now: the dataset changed "
                 "since, e.g. train/good/added_0.png and train/good/added_1.png new)",
                 "use a new --workdir")
    assert not (tmp_path / "cache").exists()  # no image decoded
    # one image swapped for another: the same counts, so the files are named
    for i in range(2):
        os.remove(os.path.join(good, f"added_{i}.png"))
    first = sorted(os.listdir(good))[0]
    os.rename(os.path.join(good, first), os.path.join(good, "zz_renamed.png"))
    expect_error(config, tmp_path / "w", capsys, "(8 normals and 2 seen anomalies then, 8 and "
                 f"2 now: the dataset changed since, e.g. train/good/{first} gone, "
                 "train/good/zz_renamed.png new)")


def test_more_seeds_on_a_dataset_changed_since_a_finished_seed(tmp_path, capsys, caplog):
    """A run given more seeds after its folder changed trained them on the new images and
    averaged them with the finished seed's, without a word (a walkthrough's 40 and 41
    normals): refused, from the listing, while the finished run alone is still read back.
    The finished seed's split.json records the dataset it started on."""
    from fsad.data import folder_without_pixels
    from fsad.experiment import check_resumed_splits, check_split_unchanged, split_stage
    root = dataset(tmp_path / "d")
    work = tmp_path / "w"
    config = folder_config(root, num_seeds=2)
    rows = folder_without_pixels(root)
    check_split_unchanged(rows, split_stage(config, rows, 0), 0, str(work / "seed_0"))
    (work / "seed_0" / "metrics.json").write_text("{}")  # finished
    check_resumed_splits(config, rows, [0, 1], str(work))  # the same dataset: no word
    good = os.path.join(root, "train", "good")
    shutil.copy(os.path.join(good, sorted(os.listdir(good))[0]), os.path.join(good, "new.png"))
    changed = folder_without_pixels(root)
    with caplog.at_level(logging.WARNING):  # read back alone: no mix, but said
        check_resumed_splits(config, changed, [0], str(work))
    assert ("the dataset changed since seed 0 of " in caplog.text and "(27 images then, 28 "
            "now): its results are read back as they were, of the dataset then; to evaluate "
            "on the dataset as it is now, use a new --workdir") in caplog.text
    expect_error(config, work, capsys, "the dataset changed since seed 0 of",
                 "(27 images then, 28 now) and seed 1 would train on it",
                 "results.json would average seeds of two datasets", "use a new --workdir")


def test_a_workdir_another_run_is_training_in(tmp_path, capsys):
    """The same command started again while the first still trains (a job submitted
    twice) is refused at its start, naming the holder; two runs would write the same
    checkpoint steps (the first died on "File exists"). The lock goes with its holder:
    the end-to-end tests restart runs killed by SIGKILL and Ctrl-C in their workdirs."""
    from fsad.lock import workdir_lock
    root = dataset(tmp_path / "d")
    work = tmp_path / "w"
    with workdir_lock(str(work)):
        expect_error(folder_config(root), work, capsys, "another fsad run is training in",
                     f"pid {os.getpid()} on ", "wait for it to end")
        assert not (work / "config.json").exists()  # refused before the workdir check
        # --check says so too (it said what the refused run would train)
        expect_error(folder_config(root), work, capsys, "another fsad run is training in",
                     check=True)
    execute(folder_config(root), str(work), check=True)  # released: --check goes on
    assert "checked: nothing was written" in capsys.readouterr().out
    with workdir_lock(str(work)):  # released with its block
        pass


def test_ctrl_c_twice_during_a_save_waits_for_it(tmp_path, capsys):
    """A second Ctrl-C a moment after the first cut short the save the first one had
    started, and the run lost every step since its last checkpoint (a walkthrough lost
    13 meta-epochs so). A press during a save now waits for it: said once, raised after;
    and the half-written save a killed run leaves is removed by the next run's manager."""
    import signal
    import time
    from fsad.checkpoints import checkpoint_manager, save_checkpoint
    folder = tmp_path / "c"
    for stale in ("13.orbax-checkpoint-tmp", "7.orbax-checkpoint-tmp-1"):
        (folder / stale).mkdir(parents=True)
    mngr = checkpoint_manager(str(folder), clean_tmp=True)
    assert sorted(os.listdir(folder)) == []
    real_save = mngr.save

    def pressed_twice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # (both delivered by now)
        return real_save(*args, **kwargs)

    mngr.save = pressed_twice
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as fsad.main's
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(mngr, 3, {"w": jnp.ones(2)})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert mngr.all_steps() == [3] and os.listdir(folder) == ["3"]
    assert capsys.readouterr().err.count(
        f"fsad: Ctrl-C: saving the checkpoint of step 3 in {folder} first; the run stops "
        f"after it") == 1
    assert signal.getsignal(signal.SIGINT) is previous
    mngr.close()


# ---- memory ----

def test_a_train_step_larger_than_free_memory_is_refused_before_a_step(tmp_path, capsys):
    """XLA plans a program's memory when it compiles it: a train step that needs more than
    the machine has free (batch 2**18 at 32 px: about 220 GiB) is refused in one line
    that names the settings to lower, before it runs; the run saved nothing, so the
    same --workdir takes the fixed config."""
    from fsad.workdir import saved_in
    from fsad.memory import free_bytes
    if (free_bytes(jax.devices()[:1]) or 0) > 300 * 2**30:
        pytest.skip("this machine has more than 300 GiB free")
    root = dataset(tmp_path / "d")
    big = folder_config(root, batch_size=2**18, **{"model.n_scales": 1})
    expect_error(big, tmp_path / "w", capsys, "the train step of devnet (batch 262144, 32 px) "
                 "needs ", " GiB free; lower --config.batch_size (now 262144) or "
                 "--config.data.img_size (now 32)")
    assert saved_in(str(tmp_path / "w")) == []


def test_out_of_memory_inside_a_stage_is_one_line():
    """A program that asks for more memory than there is (256 TiB, more than a process
    can address) fails with XLA's RESOURCE_EXHAUSTED; inside a stage that becomes a
    UserError naming the stage and the fix, and other errors pass unchanged.
    `check_fits` refuses the same program before it runs."""
    from fsad.memory import check_fits, hint_on_oom
    huge = jax.jit(lambda x: jnp.broadcast_to(x, (2**46,)) * 2)
    with pytest.raises(UserError, match=r"^out of memory in scoring \(Out of memory "
                       r"allocating 281474976710656 bytes\.?\); lower it$"):
        with hint_on_oom("scoring", "lower it"):
            huge(jnp.float32(1)).block_until_ready()
    with pytest.raises(ZeroDivisionError), hint_on_oom("scoring", "lower it"):
        1 / 0
    # the words of a CPU call that could not get its buffers at dispatch (seen from
    # benchmarks/throughput.py's train step at batch 2**18)
    from fsad.memory import is_out_of_memory, oom_words
    dispatch = jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Out of "
                                          "memory allocating 325884887040 bytes.")
    assert is_out_of_memory(dispatch)
    assert oom_words(dispatch) == "Out of memory allocating 325884887040 bytes."
    assert not is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: something else"))
    compiled = huge.lower(jnp.float32(1)).compile()
    with pytest.raises(UserError, match=r"^the step needs 262144\.0 GiB of memory and this "
                       r"machine has [0-9.]+ GiB free; lower it$"):
        check_fits(compiled, jax.devices()[:1], "the step", "lower it")
    small = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
    check_fits(small, jax.devices()[:1], "the step", "lower it")  # fits: no error


def left_unretrieved(kind: str, exc: Exception) -> None:
    """A Future, a Task or an asyncio.gather of a task (kind: its class's name) of a
    fresh asyncio loop that ended with `exc`, which nobody retrieved, let go: asyncio
    logs it when it is garbage-collected, "<kind> exception was never retrieved"."""
    loop = asyncio.new_event_loop()

    async def fail():
        raise exc
    try:
        if kind == "Future":
            done = loop.create_future()
            done.set_exception(exc)
        else:
            done = loop.create_task(fail())
            if kind == "_GatheringFuture":  # it retrieves the task's exception, not its own
                done = asyncio.gather(done)
            loop.run_until_complete(asyncio.wait([done]))
        assert type(done).__name__ == kind
    finally:
        loop.close()
    del done
    gc.collect()


# an unraisable exception (of which the failed save's abandoned writes made over a
# thousand lines of tracebacks) fails the test, not only warns
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_at_the_first_checkpoint(tmp_path, capsys, caplog):
    """RLIMIT_FSIZE makes every file write past 2 MB fail (EFBIG) as a full disk would
    (ENOSPC), for root too; the config and images are written, the 8 MB checkpoint not.
    The failed save's other writes, which finish later, leave futures and tasks whose
    failure nobody retrieves; asyncio logs each one when it is collected, as late as the
    process's exit (10 such tracebacks once ended a pytest-xdist worker's output): after
    a failed save, those of a failed write are not logged, any other still is."""
    resource = pytest.importorskip("resource")
    root = dataset(tmp_path / "d")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, hard))
    try:
        expect_error(folder_config(root, **{"model.n_scales": 1}), tmp_path / "w", capsys,
                     "cannot write the checkpoint of step 2", "File too large",
                     "free disk space")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    ckpts = tmp_path / "w" / "seed_0" / "checkpoints"
    assert not [d for d in os.listdir(ckpts) if d.isdigit()]  # no half checkpoint as a step

    write_failed = ValueError("OUT_OF_RANGE: Failed to write 4 bytes to file 14: File too "
                              "large [os_error_code='27']")  # as TensorStore words it
    # the save's own (orbax gathers its writes: "_GatheringFuture exception was never
    # retrieved") may be collected here too
    kinds = ("Future", "Task", "_GatheringFuture")
    with caplog.at_level("ERROR", logger="asyncio"):
        for kind in kinds:
            left_unretrieved(kind, write_failed)
            left_unretrieved(kind, KeyError("not a write"))
    logged = [(r.getMessage().splitlines()[0], type(r.exc_info[1]).__name__)
              for r in caplog.records if r.name == "asyncio"]
    assert logged == [(f"{kind} exception was never retrieved", "KeyError")
                      for kind in kinds], logged


def test_checkpoint_folder_that_cannot_be_made(tmp_path, capsys, monkeypatch):
    """Refused before any model is built or compiled."""
    from fsad import experiment
    monkeypatch.setattr(experiment, "init_state",
                        lambda *a, **k: pytest.fail("model built before the folder check"))
    root = dataset(tmp_path / "d")
    work = tmp_path / "w"
    (work / "seed_0").mkdir(parents=True)
    (work / "seed_0" / "checkpoints").write_text("")  # a file where the folder must go
    expect_error(folder_config(root), work, capsys, "cannot create the checkpoint folder",
                 "writable --workdir")


def test_loss_that_is_not_finite(tmp_path, capsys):
    root = dataset(tmp_path / "d")
    cfg = folder_config(root, **{"optim.lr": 1e30, "optim.clip_norm": 0.0, "epochs": 2,
                                 "optim.decay_every_epochs": 0, "model.n_scales": 1})
    line = expect_error(cfg, tmp_path / "w", capsys, "training diverged", "at step",
                        "lower --config.optim.lr", "in a new --workdir")
    step = int(line.split("at step ")[1].split(" ")[0])
    ckpts = [int(d) for d in os.listdir(tmp_path / "w" / "seed_0" / "checkpoints")
             if d.isdigit()]
    assert all(c < step for c in ckpts)  # no checkpoint of the diverged state


def test_ahl_scores_that_are_not_finite_name_ahls_settings(tmp_path, monkeypatch):
    """AHL's scores not finite after a meta-training whose losses were (its last update
    diverged) is AHL's to fix, on the base models it keeps: the error said "training
    diverged; lower --config.optim.lr", the base's setting (a review's finding)."""
    from types import SimpleNamespace
    from fsad.methods.ahl import stage
    monkeypatch.setattr(stage, "run_ahl", lambda *a: {"scores": np.array([0.0, np.nan]),
                                                      "base_scores": np.array([0.0, 1.0])})
    config = tiny_config("ahl_dra")
    data = SimpleNamespace(images=np.zeros((4, 1, 1, 3), np.uint8),
                           labels=np.array([0, 1, 0, 1]))
    split = SimpleNamespace(train_normal=[0], train_anomaly=[1], test=[2, 3])
    runner = SimpleNamespace(config=config, method=None, mesh=None)
    work = tmp_path / "w"
    for base, named in (("", work), (str(tmp_path / "base"), tmp_path / "base")):
        config.ahl.base_workdir = base
        with pytest.raises(UserError) as err:
            stage.ahl_stage(runner, data, split, {}, {"score": np.zeros(2)}, {}, 0,
                            str(work / "seed_0"))
        assert str(err.value) == (
            f"the anomaly scores are not finite: AHL's meta-training diverged; lower "
            f"--config.ahl.optim.lr or --config.ahl.inner_lr in a new --workdir with "
            f"--config.ahl.base_workdir={named}, which keeps the trained base models")


def test_gradients_that_are_not_finite_under_a_finite_loss_are_a_divergence():
    """The step's parameters are then not finite: only the loss was checked before a
    checkpoint, so one of them was saved, and its resumed run diverged at once, "from
    before it" (a review's finding)."""
    from fsad.train import check_finite
    assert check_finite(0.5, 3, 1e3) == 0.5
    with pytest.raises(UserError, match=r"training diverged: the gradients' norm became "
                                        r"inf at step 3, its loss 0.5 \(the checkpoints "
                                        r"kept are from before it\); lower --config.optim.lr"):
        check_finite(0.5, 3, float("inf"))


def test_scoring_a_run_stopped_by_ctrl_c_says_it_is_unfinished(tmp_path, capsys, caplog,
                                                               monkeypatch):
    """Ctrl-C (a KeyboardInterrupt, raised here right after the first checkpoint; the
    end-to-end tests send a real SIGINT) ends the run with exit status 130 and one line;
    --mode score then scores with that checkpoint and warns that training is not done."""
    from fsad import checkpoints
    root = dataset(tmp_path / "d")
    # one scale, as the disk-full test: its init and train step are compiled already
    cfg = folder_config(root, **{"epochs": 2, "model.n_scales": 1})
    real_save = checkpoints.save_checkpoint

    def save_then_ctrl_c(mngr, step, state):
        real_save(mngr, step, state)
        raise KeyboardInterrupt

    # where the loop's checkpoints call it (fsad.checkpoints.PacedCheckpoints)
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_ctrl_c)
    work = tmp_path / "w"
    assert execute(cfg, str(work)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fsad: interrupted (checkpoints kept in {work}: seed_0/checkpoints step 2); run "
        f"the same command to resume from there")
    monkeypatch.undo()
    code, lines = run(cfg, work, capsys, mode="score", input_dir=os.path.join(root, "test"))
    assert code == 0 and not lines
    assert f"scoring with the checkpoint of step 2 of 4 in {work}" in caplog.text
    assert "has not finished training" in caplog.text


# ---- the real command line ----

def cli(*args):
    return subprocess.run([sys.executable, "-m", "fsad.main", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args,fragment", [
    (["--config", "configs/devnet.py:quick,bogus"], "variant 'bogus' is not known"),
    (["--config", "configs/devnet.py", "--config.data.sizee=3"],
     "--config.data.sizee is not a config field"),
    # with the default ImageNet ResNet-18 weights, which no test downloads: the folder is
    # checked first, before any weight is looked for
    (["--config", "configs/devnet.py", "--config.data.name=folder",
      "--config.data.root=/no/such/folder"], "'/no/such/folder' does not exist"),
    # and ELPV's protocol from its label table, before the weights and any decode
    (["--config", "configs/devnet.py", "--config.data.setting=hard",
      "--config.data.known_class=crack"], "'crack' is not an anomaly class of elpv"),
    (["--config", "configs/nope.py:quick"], "cannot load config file 'configs/nope.py' ([Errno "
     "2] No such file or directory"),
    (["--config", "{tmp}/mine.py"], "defines no get_config()"),
    ([], "--config is required; pass a config file, e.g. --config configs/devnet.py"),
])
def test_command_line_answers_in_one_line(tmp_path, args, fragment):
    (tmp_path / "mine.py").write_text("config = {}\n")  # a config file without get_config
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = cli(*args, "--workdir", str(tmp_path / "w"))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsad: error: ") and fragment in lines[0], \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()  # refused before the workdir is made


@pytest.mark.parametrize("config, override, line", [
    # ml_collections names a close field at the misspelt part's level; fsad names the flag
    ("devnet.py", "--config.num_seed=3", "--config.num_seed is not a config field (did you "
     "mean --config.num_seeds?)"),
    ("devnet.py", "--config.dat.img_size=64", "--config.dat.img_size is not a config field "
     "(did you mean --config.data.img_size?)"),
    ("devnet.py", "--config.data.sizee=3", "--config.data.sizee is not a config field; check "
     "its spelling"),
    ("devnet.py:quik", "--config.seed=1", "variant 'quik' is not known (did you mean quick?); "
     "use any of quick, lite0"),
    # spelt right, but another method's field: where it belongs
    ("devnet.py", "--config.ahl.base_workdir=runs/x", "--config.ahl.base_workdir is a field "
     "of configs/ahl_devnet.py and configs/ahl_dra.py, not of this --config; use one of"),
    ("dra.py", "--config.devnet.variant=DS", "--config.devnet.variant is a field of "
     "configs/devnet.py and configs/ahl_devnet.py"),
])
def test_a_misspelt_field_or_variant_is_named_with_the_one_it_likely_meant(config, override,
                                                                          line, capsys):
    """Parsed as fsad.main parses it (absl, ml_collections), in this process. Before, a
    name close to a field came out as "--config.*.\\'num_seed\\'\\nDid you mean ...". """
    with pytest.raises(SystemExit) as exit_:
        parse_command_line(["--config", f"configs/{config}", "--workdir", "w", override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fsad: error: {line}"), err


def test_check_says_what_each_seed_trains_on_and_writes_nothing(tmp_path, capsys):
    """--check (execute(check=True)) runs the checks a run makes before its first step,
    prints the fields the config changed from its method's defaults, one line per seed
    and the way on, and leaves no workdir, cache or decoded image; what a run would
    refuse it refuses in the same one line, and --mode score takes no --check. (On a
    trained run: tests/test_end_to_end.py.)"""
    root = dataset(tmp_path / "data", n_train=18)  # 18 + 4 normals; 3 classes of 5
    cfg = folder_config(root, **{"num_seeds": 2, "data.cache_dir": str(tmp_path / "cache"),
                                 "data.contamination": 0.1})
    capsys.readouterr()
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    out = capsys.readouterr().out.splitlines()
    changed = [line for line in out if line.startswith("  ")]
    assert out[0] == f"config: DevNet, its config file's defaults but {len(changed)} fields:"
    assert out[1:len(changed) + 1] == changed == sorted(changed)
    assert {"  num_seeds = 2 (default 1)", "  data.contamination = 0.1 (default 0.0)",
            "  data.name = 'folder' (default 'elpv')"} <= set(changed)
    assert not any(line.startswith(("  optim.", "  model.topk")) for line in changed)
    assert out[len(changed) + 1] == "weights: random init (resnet18)"
    # the devices and the batch's share of each (not said before: a walkthrough on 4)
    assert out[len(changed) + 2] == (f"devices: {jax.device_count()} cpu; batch_size 8: "
                                     f"{8 // jax.device_count()} images per device "
                                     f"(model.dtype=auto: float32 here)")
    out = out[len(changed) + 3:]
    # the 10-image shot pool leaves 5 test anomalies, floor(18 / 0.9 * 0.1) = 2 of them
    # join the training normals unlabelled
    assert out == [f"seed {s}: trains on 20 normals (of them 2 unlabelled anomalies) and 2 "
                   f"seen anomalies, tests on 7 images (3 anomalies); starts"
                   for s in (0, 1)] + [
        "checked: nothing was written or trained; run the same command without --check to "
        "train"]
    assert not (tmp_path / "w").exists() and not (tmp_path / "cache").exists()
    # seeds stopped after their training (its evaluation left) and within it: the first
    # read as a training to resume before (a walkthrough)
    from fsad.workdir import config_json, write_json_atomic
    os.makedirs(tmp_path / "w")
    write_json_atomic(str(tmp_path / "w" / "config.json"), config_json(cfg))
    total = cfg.epochs * cfg.steps_per_epoch
    for seed, step in ((0, total), (1, total - 1)):
        os.makedirs(tmp_path / "w" / f"seed_{seed}" / "checkpoints" / str(step))
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    states = [line.split("; ")[-1] for line in capsys.readouterr().out.splitlines()
              if line.startswith("seed ")]
    assert states == [f"resumes from checkpoints step {total} (its training done: the "
                      f"evaluation and the stages after it)",
                      f"resumes from checkpoints step {total - 1}"]
    shutil.rmtree(tmp_path / "w")
    # an AHL seed without ahl.base_workdir trains its base first (with it: the end-to-end
    # tests)
    assert execute(folder_config(root, "ahl_devnet"), str(tmp_path / "w"), check=True) == 0
    assert capsys.readouterr().out.splitlines()[-2].endswith(
        "; starts, training its base model first")
    cfg.data.n_anomaly = 20
    expect_error(cfg, tmp_path / "w", capsys, "data.n_anomaly=20", check=True)
    expect_error(cfg, tmp_path / "w", capsys, "--check checks a training run and --mode is "
                 "score", mode="score", input_dir=str(root), check=True)
    # the procedural set: listed as a run would write it, and not written (it was)
    cfg = folder_config(str(tmp_path / "synthetic"), **{
        "data.name": "synthetic", "data.img_size": 32, "data.n_anomaly": 10})
    assert execute(cfg, str(tmp_path / "w"), check=True) == 0
    assert [line for line in capsys.readouterr().out.splitlines()
            if not line.startswith(("config:", "  ", "weights:", "devices:"))][0] == (
        "seed 0: trains on 60 normals and 10 seen anomalies, tests on 46 images (26 "
        "anomalies); starts")
    assert not (tmp_path / "synthetic").exists() and not (tmp_path / "w").exists()


def test_dra_on_a_medical_dataset_without_its_outlier_images_is_told_the_papers_protocol(
        tmp_path, capsys, caplog):
    """The DRA paper's HeadCT, BrainMRI and Hyper-Kvasir figures took their pseudo
    anomalies from LAG (outlier exposure): a DRA run there with CutPaste says so, with the
    field that sets the external images; DevNet's, and DRA's with the field set, do not."""
    dataset(tmp_path / "d" / "headct")
    for method, overrides, told in (("dra", {}, True), ("devnet", {}, False),
                                    ("dra", {"dra.outlier_root": str(tmp_path)}, False)):
        cfg = folder_config(tmp_path / "d", method, **{"data.subset": "headct", **overrides})
        caplog.clear()
        assert execute(cfg, str(tmp_path / "w"), check=True) == 0, capsys.readouterr().err
        said = "LAG (outlier exposure)" in caplog.text
        assert said is told, (method, caplog.text)
        assert ("--config.dra.outlier_root=<a folder of LAG images>" in caplog.text) is told


def test_a_config_file_with_a_syntax_error_is_named_with_its_line():
    from fsad.main import config_problem
    try:
        compile("def get_config(:\n", "mine.py", "exec")
    except SyntaxError as err:
        assert config_problem(err, ["fsad", "--config", "mine.py"]) == (
            "config file 'mine.py' line 1: invalid syntax; fix the file, or start from one "
            "of configs/*.py")
    assert config_problem(RuntimeError("a bug"), []) is None  # not the user's: a traceback


def test_an_output_that_cannot_be_written_is_refused_before_scoring(tmp_path):
    from fsad.scoring import writable_output
    with pytest.raises(UserError, match="is a folder; pass a file path"):
        writable_output(str(tmp_path))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"cannot write the scores to .*a_file/s.csv"):
        writable_output(str(tmp_path / "a_file" / "s.csv"))
    path = str(tmp_path / "new" / "sub" / "s.csv")  # made when the CSV is written: a
    assert writable_output(path) == path and not (tmp_path / "new").exists()  # failed
    # scoring left them empty
    with pytest.raises(UserError, match=r"cannot write the scores to .*a_file/x/s.csv"):
        writable_output(str(tmp_path / "a_file" / "x" / "s.csv"))


def test_the_scores_csv_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A scoring's CSV replaces one there before only once complete: a walkthrough saw a
    name that is not UTF-8 fail the writing half-way (a traceback, and the earlier CSV
    cut to its first rows), and a full disk give a traceback. Such a name is written as
    its bytes; a failed write is one line, the earlier CSV kept; a non-file path
    (/dev/stdout) is written to as it is, a link through."""
    import builtins
    from fsad.scoring import write_csv, writable_output
    write_csv(str(tmp_path / "new" / "s.csv"), [["a"]])  # its folder made
    assert (tmp_path / "new" / "s.csv").read_bytes() == b"a\r\n"
    shutil.rmtree(tmp_path / "new")
    path = tmp_path / "scores.csv"
    path.write_text("precious\n")
    name = os.fsdecode(b"x\xff.png")  # (a surrogate: as os.listdir gives it)
    write_csv(str(path), [["file", "score"], ["ok.png", "0.5"], [name, "1"]])
    assert path.read_bytes() == b"file,score\r\nok.png,0.5\r\nx\xff.png,1\r\n"
    path.write_text("precious\n")
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).startswith(str(path)):
            def write(*_):
                raise OSError(28, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(UserError, match=r"cannot write the scores to .*scores.csv' \(No "
                                        r"space left on device\); nothing was written"):
        write_csv(str(path), [["file", "score"], ["ok.png", "0.5"]])
    monkeypatch.undo()
    assert path.read_text() == "precious\n" and os.listdir(tmp_path) == ["scores.csv"]
    link = tmp_path / "link.csv"
    link.symlink_to(path)
    write_csv(str(link), [["a"]])
    assert link.is_symlink() and path.read_bytes() == b"a\r\n"
    os.chmod(path, 0o640)  # the replaced file's permissions kept
    write_csv(str(path), [["b"]])
    assert path.read_bytes() == b"b\r\n" and os.stat(path).st_mode & 0o777 == 0o640
    assert writable_output("/dev/null") == "/dev/null"  # a device: written to, not replaced
    write_csv("/dev/null", [["a"]])
    assert not os.path.isfile("/dev/null")
    # standard output: a pipe (its path resolves to pipe:[N], which was refused), and a
    # shell's `>> all.csv` (renamed over before: its earlier rows lost)
    def to_stdout(target_fd):
        saved = os.dup(1)
        os.dup2(target_fd, 1)
        try:
            write_csv(writable_output("/dev/stdout"), [["file", "score"], ["a.png", "1"]])
        finally:
            os.dup2(saved, 1)
            os.close(saved)

    rows = b"file,score\r\na.png,1\r\n"
    read_end, write_end = os.pipe()
    to_stdout(write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        assert f.read() == rows
    (tmp_path / "all.csv").write_bytes(b"earlier\r\n")
    with open(tmp_path / "all.csv", "ab") as f:
        to_stdout(f.fileno())
    assert (tmp_path / "all.csv").read_bytes() == b"earlier\r\n" + rows
    from fsad.scoring import is_stream  # streams, and files where streams are
    assert all(map(is_stream, ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "/dev/null")))
    assert not is_stream("/dev/shm/scores.csv") and not is_stream(str(path))
    # a named pipe: its reader gets the rows (the check before opened and closed it, and
    # the reader, given its end, left the writing blocked for good)
    fifo = str(tmp_path / "fifo.csv")
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", fifo], stdout=subprocess.PIPE)
    write_csv(writable_output(fifo), [["x"]])
    assert reader.communicate(timeout=30)[0] == b"x\r\n"


def test_ctrl_c_line_names_each_folders_newest_checkpoint(tmp_path):
    """The line a Ctrl-C prints (tests/test_end_to_end.py stops a real run with it)."""
    from fsad.main import interrupted_line
    work = tmp_path / "w"
    assert interrupted_line(str(work), "train") == (
        f"fsad: interrupted (no checkpoint was written yet in {work}); run the same command "
        f"to start it again")
    for folder, steps in [("seed_10/checkpoints", [40]), ("seed_2/checkpoints", [20, 30]),
                          ("seed_2/ahl_checkpoints", [1, 2]), ("seed_3/checkpoints", [])]:
        for step in steps:
            (work / folder / str(step)).mkdir(parents=True)
        (work / folder / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a half save
    assert interrupted_line(str(work), "train") == (
        f"fsad: interrupted (checkpoints kept in {work}: seed_2/checkpoints step 30, "
        f"seed_2/ahl_checkpoints step 2, seed_10/checkpoints step 40); run the same "
        f"command to resume from there")
    assert "run the command again" in interrupted_line(str(work), "score")
    # a finished seed is said so, not among the checkpoints to resume from
    (work / "seed_10" / "metrics.json").write_text("{}")
    assert interrupted_line(str(work), "train") == (
        f"fsad: interrupted (seed_10 finished; checkpoints kept in {work}: seed_2/checkpoints "
        f"step 30, seed_2/ahl_checkpoints step 2); run the same command to resume from there")


def test_meta_training_too_short_for_psi_is_said():
    """ahl.epochs no longer than psi's first use (epoch K + 2 with the paper's weighting,
    K + 3 with the released one, 1-based) runs with equal task weights throughout: a
    warning says so (as the README's 3-epoch checks do with K = 5)."""
    from fsad.validate import config_warnings
    config = tiny_config("ahl_dra")
    config.ahl.epochs, config.ahl.history = 3, 5
    (line,) = config_warnings(config)
    assert "ahl.epochs=3 with ahl.history=5" in line and "meta-epoch 7" in line
    config.ahl.epochs = 7
    assert config_warnings(config) == []
    config.ahl.weighting = "released"
    assert "meta-epoch 8 (ahl.weighting=released)" in config_warnings(config)[0]
    assert config_warnings(tiny_config("dra")) == []
    # settings a walkthrough ran without a word: psi never trained but used, and a
    # :released run of one meta-epoch, whose update is dropped
    config.ahl.epochs, config.ahl.psi_steps = 9, 0
    (line,) = config_warnings(config)
    assert line.startswith("ahl.psi_steps=0 (ahl.psi_fit=pool): psi is never trained")
    config.ahl.psi_fit = "query_sets"  # (psi_steps unused)
    assert config_warnings(config) == []
    config.ahl.epochs, config.ahl.update_last_epoch, config.ahl.head_init = 1, False, "fresh"
    assert config_warnings(config)[0].startswith(
        "ahl.epochs=1 with ahl.update_last_epoch=False (`:released`): the one meta-epoch's "
        "update is dropped, so the unified heads are scored as they start (fresh)")


@pytest.mark.parametrize("variants", ["released,paper", "paper,quick,released"])
def test_paper_and_released_together_are_refused(variants):
    """Both set the same fields, so the later one won field by field, silently."""
    import importlib
    with pytest.raises(UserError, match="variants paper and released both given"):
        importlib.import_module("configs.ahl_dra").get_config(variants)


def test_ahl_fields_may_change_before_meta_training_starts(tmp_path, caplog):
    """An AHL error after base training asks for another ahl.* value (ahl.cluster_on=auto
    after k-means left one cluster): the same workdir takes it while no seed has started
    meta-training, keeping the trained base and making the AHL features again; once a
    seed meta-trained, or for a field the base depends on, it is refused as before."""
    from fsad.workdir import check_workdir, config_json, write_json_atomic
    work = tmp_path / "w"
    config = tiny_config("ahl_devnet", **{"ahl.cluster_on": "features"})
    os.makedirs(work / "seed_0" / "checkpoints" / "30")  # the trained base
    write_json_atomic(str(work / "config.json"), config_json(config))
    (work / "seed_0" / "ahl_features.npz").write_bytes(b"features")
    config.ahl.cluster_on, config.num_seeds = "auto", 2  # with more seeds too
    from fsad.workdir import workdir_change_lines
    assert workdir_change_lines(str(work), config) == [  # what --check says of it
        "workdir: AHL's fields changed (ahl.cluster_on) before any seed's meta-training; the "
        "base models' checkpoints are kept, their AHL features made again"]
    assert (work / "seed_0" / "ahl_features.npz").exists()  # (it reads only)
    with caplog.at_level("WARNING"):
        check_workdir(str(work), config)
    assert "AHL's fields changed (ahl.cluster_on)" in caplog.text
    assert not (work / "seed_0" / "ahl_features.npz").exists()
    with open(work / "config.json") as f:
        assert json.load(f)["ahl"]["cluster_on"] == "auto"
    config.epochs += 1  # the base's own field
    with pytest.raises(UserError, match=r"different config \(field epochs; in the run"):
        check_workdir(str(work), config)
    config.epochs -= 1
    os.makedirs(work / "seed_0" / "ahl_checkpoints" / "2")  # meta-training started
    config.ahl.clusters = 2
    with pytest.raises(UserError, match=re.escape(
            "holds an AHL run whose meta-training has started, and AHL's fields may change "
            "only before that (field ahl.clusters; in the run: 3); to meta-train with the "
            f"new ones on its trained base models, use a new --workdir with "
            f"--config.ahl.base_workdir={work}")):
        check_workdir(str(work), config)
    # no AHL features yet (base training stopped): none said to be made again
    shutil.rmtree(work / "seed_0" / "ahl_checkpoints")
    assert workdir_change_lines(str(work), config)[0].endswith("checkpoints are kept")
    # a run that saved nothing (keep_checkpoints=0 keeps no checkpoint), killed after its
    # AHL features were made: another config replaces it, and its features, made by the
    # old base model, go too (they were read as the new run's; a review's finding)
    shutil.rmtree(work / "seed_0" / "checkpoints")
    (work / "seed_0" / "ahl_features.npz").write_bytes(b"features")
    config.epochs += 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_workdir(str(work), config)
    assert "replac" in caplog.text
    assert not (work / "seed_0" / "ahl_features.npz").exists()


def test_a_ctrl_c_in_a_gc_callback_still_stops_the_run(monkeypatch):
    """A Ctrl-C raised in a callback C code calls (JAX's gc callback) is printed as
    "Exception ignored" and dropped by Python, after cutting the callback short (a
    walkthrough saw an AHL run and scorings go on to their end, and scorings crash with
    SIGSEGV as they ended). fsad's handler records it and raises nothing there; the next
    step of a progress bar raises it."""
    import signal
    from fsad import interrupts
    from fsad.hosts import progress
    previous = signal.getsignal(signal.SIGINT)
    armed, dropped = [], []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)

    def in_gc(phase, info):
        if armed and phase == "start":
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # Python runs the handler here, inside the callback
                pass

    interrupts.install()
    gc.callbacks.append(in_gc)
    try:
        for way in ("iterated", "updated"):  # a bar over an iterable; fit's, updated
            armed.append(True)
            gc.collect()  # the handler ran inside in_gc: nothing raised there
            assert not armed and dropped == []
            with pytest.raises(KeyboardInterrupt):
                if way == "iterated":
                    for _ in progress(range(3), disable=True):
                        pass
                else:
                    with progress(total=3, disable=True) as bar:
                        bar.update(1)
            for _ in progress(range(3), disable=True):  # raised once, not again
                pass
    finally:
        gc.callbacks.remove(in_gc)
        signal.signal(signal.SIGINT, previous)
        interrupts.delivered()


@pytest.mark.parametrize("signum,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_during_the_start_up_stops_the_command(tmp_path, signum, status):
    """A Ctrl-C (or SIGTERM) in the command line's first seconds (JAX's import) stops it
    with one line: raised there, it landed in JAX's garbage-collection callback and Python
    dropped it, so the run went on to its end (3 presses in 3), or it crashed (SIGSEGV)
    or printed an import's traceback. The press is recorded until the run starts
    (`interrupts.defer`, before any import of JAX: `fsad` and `fsad.main` import none)."""
    import signal
    import time
    code = ("import sys, fsad, fsad.main; print('jax' in sys.modules); "
            "print(fsad.losses.__name__, fsad.topk_mean.__name__)")  # on first use
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120).stdout == "False\nfsad.losses topk_mean\n"
    workdir = str(tmp_path / "run")
    child = subprocess.Popen(
        [sys.executable, "-m", "fsad.main", "--config", "configs/devnet.py:quick",
         "--workdir", workdir, "--config.model.pretrained=none"], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps, start = f"/proc/{child.pid}/maps", time.monotonic()
    while time.monotonic() - start < 60:  # until the child loads jaxlib: JAX's import
        try:
            with open(maps) as f:
                if "jaxlib" in f.read():
                    break
        except OSError:  # no /proc: a moment into the start-up instead
            time.sleep(0.5)
            break
        time.sleep(0.01)
    child.send_signal(getattr(signal, signum))
    try:
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == status, (out, err)
    assert err == "fsad: interrupted before the run started; nothing was written\n", err
    assert "results" not in out and not os.path.exists(workdir)


def test_ctrl_c_after_the_run_stopped_ends_the_process_at_once():
    """Once the command line has handled a Ctrl-C (its checkpoints saved, its line
    printed), another one ends the process at once with 130: raised in the teardown, it
    printed a traceback from a garbage collection (a walkthrough saw it)."""
    code = ("import os, signal, time; from fsad import interrupts; interrupts.install(); "
            "interrupts.delivered(); os.kill(os.getpid(), signal.SIGINT); time.sleep(30); "
            "print('not stopped')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")
    # SIGTERM (a cluster's time limit) is taken as Ctrl-C, the newest step saved: it
    # killed the run, losing the steps since the last checkpoint; a second one during a
    # save waits for it; 143 (128 + SIGTERM)
    code = ("import os, signal, time; from fsad import interrupts; interrupts.install()\n"
            "try:\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
            "except KeyboardInterrupt:\n    print('stopping', interrupts.exit_status())\n"
            "try:\n    with interrupts.shielded('saving'):\n"
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); print('saved')\n"
            "except KeyboardInterrupt:\n    interrupts.delivered()\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30); print('not stopped')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert (done.returncode, done.stdout.split("\n")) == (143, ["stopping 143", "saved", ""])
    assert done.stderr == "\nfsad: Ctrl-C: saving first; the run stops after it\n"


def test_a_base_run_trained_on_other_images_is_refused(tmp_path, capsys):
    """ahl.base_workdir's run trained its base on its split's images; a dataset changed
    since reused it without a word (a walkthrough's: its seen anomalies then among the
    test images). Refused, before the workdir is made, as a resumed seed's own
    checkpoints are."""
    from fsad.data import folder_without_pixels
    from fsad.experiment import check_bases, check_split_unchanged, split_stage
    root = dataset(tmp_path / "d")
    base = folder_config(root, "devnet")
    config = folder_config(root, "ahl_devnet")
    for field, value in base.items():  # the base model's fields: the base run's
        if field != "method":
            config[field] = value
    config.ahl.base_workdir = str(tmp_path / "base")
    seed_dir = tmp_path / "base" / "seed_0"
    rows = folder_without_pixels(root)
    check_split_unchanged(rows, split_stage(base, rows, 0), 0, str(seed_dir))
    (seed_dir / "checkpoints" / "2").mkdir(parents=True)
    (seed_dir / "metrics.json").write_text("{}")
    (tmp_path / "base" / "config.json").write_text(base.to_json_best_effort())
    work = tmp_path / "ahl"
    check_bases(config, rows, [0], str(work))  # the same images
    good = os.path.join(root, "train", "good")
    shutil.copy(os.path.join(good, sorted(os.listdir(good))[0]), os.path.join(good, "new.png"))
    expect_error(config, work, capsys, "the training images of seed 0 differ from those the "
                 f"base model in {seed_dir} (ahl.base_workdir) was trained on (8 normals and "
                 "2 seen anomalies then, 9 and 2 now", "leave ahl.base_workdir empty")
    assert not work.exists()


def test_a_started_seed_needs_its_base_run_no_more(tmp_path):
    """AHL with ahl.base_workdir: a seed that holds a base checkpoint of its own (the
    adopted start) resumes without the base run, which may be gone; one that holds none
    still needs it, and says so."""
    from fsad.workdir import base_source
    config = tiny_config("ahl_devnet", **{"ahl.base_workdir": str(tmp_path / "gone")})
    with pytest.raises(UserError, match="holds no run"):
        base_source(config, str(tmp_path / "w"), 0)
    os.makedirs(tmp_path / "w" / "seed_0" / "checkpoints" / "30")
    assert base_source(config, str(tmp_path / "w"), 0) is None
