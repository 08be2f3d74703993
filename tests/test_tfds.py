"""TFDS: fsad datasets written as TFDS array_record and read back through tfds.data_source,
and the one-vs-rest reader of TFDS image-classification datasets. No TensorFlow needed."""

import io
import os
import sys

import numpy as np
import pytest
from ml_collections import config_dict
from PIL import Image

from conftest import SIZE, assert_same_rows
from fsad.data import dataset_without_pixels, load_imageset, read_elpv, read_folder
from fsad.data.synthetic import write_synthetic_dataset
from fsad.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")
from fsad.data import tfds_io  # noqa: E402


def assert_same_imageset(a, b):
    assert a.name == b.name
    for field in ("images", "labels", "classes", "split", "file_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None:
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.has_mask(), b.has_mask())


def undecoded_rows(monkeypatch, **data_cfg):
    """`dataset_without_pixels` of a data.name=tfds config (no cache), with TFDS's image
    decode and fsad's resize made to fail: the rows come from the records, none decoded."""
    def fail(*args, **kwargs):
        raise AssertionError("an image was decoded")
    cfg = config_dict.ConfigDict({"name": "tfds", "tfds_dir": "", "normal_class": "",
                                  "img_size": SIZE, "cache_dir": "", **data_cfg})
    with monkeypatch.context() as m:
        m.setattr(tfds.features.Image, "decode_example_np", fail)
        m.setattr(tfds_io, "resize_rgb", fail)
        m.setattr(tfds_io, "resize_mask", fail)
        return dataset_without_pixels(cfg)


@pytest.fixture(scope="module")
def written(synthetic_root, tmp_path_factory):
    """The synthetic dataset written as the TFDS dataset fsad_synthetic."""
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    target = tfds_io.write_tfds(tfds_io.folder_source(synthetic_root), "fsad_synthetic", tfds_dir)
    return tfds_dir, target


def test_roundtrip_equals_folder_reader(synthetic_root, written):
    tfds_dir, target = written
    assert sorted(f for f in os.listdir(target) if "array_record" in f) == [
        "fsad_synthetic-test.array_record-00000-of-00001",
        "fsad_synthetic-train.array_record-00000-of-00001"]
    for size in (SIZE, 24):  # stored at 32 px; read at the stored and a smaller size
        back = tfds_io.read_tfds("fsad_synthetic", tfds_dir, size, cache_dir="")
        assert_same_imageset(back, read_folder(synthetic_root, size, cache_dir=""))
    # the released localisation's masks (OpenCV's bilinear resize, > 0) from either reader
    near = back  # at 24 px, resized nearest
    back = tfds_io.read_tfds("fsad_synthetic", tfds_dir, 24, "", "opencv_linear")
    assert_same_imageset(back, read_folder(synthetic_root, 24, "", "opencv_linear"))
    assert np.all(back.masks >= near.masks) and back.masks.sum() > near.masks.sum()
    # a plain tfds.data_source reads it too, with the documented features
    ds = tfds.data_source("fsad_synthetic", data_dir=tfds_dir)
    assert (len(ds["train"]), len(ds["test"])) == (60, 56)
    ex = ds["test"][55]
    assert ex["image"].shape == (SIZE, SIZE, 3) and ex["mask"].shape == (SIZE, SIZE, 1)
    assert ex["class_name"] == b"stain" and ex["label"] == 1 and ex["index"] == 115
    assert "tensorflow" not in sys.modules


def test_load_imageset_tfds_and_cache(synthetic_root, written, tmp_path, monkeypatch):
    tfds_dir, _ = written
    cfg = config_dict.ConfigDict({"name": "tfds", "tfds_name": "fsad_synthetic",
                                  "tfds_dir": tfds_dir, "normal_class": "", "img_size": SIZE,
                                  "cache_dir": str(tmp_path / "cache")})
    a = load_imageset(cfg)
    assert len(os.listdir(tmp_path / "cache")) == 1
    b = load_imageset(cfg)  # from the cache
    assert_same_imageset(a, b)
    assert_same_imageset(a, read_folder(synthetic_root, SIZE, cache_dir=""))
    # a run's rows come from that cache, no record read; from the records when it is torn
    with monkeypatch.context() as m:
        m.setattr(tfds_io, "_sources", None)
        assert_same_rows(dataset_without_pixels(cfg), a)
    (tmp_path / "cache" / os.listdir(tmp_path / "cache")[0]).write_bytes(b"torn")
    assert_same_rows(dataset_without_pixels(cfg), a)
    cfg.tfds_name = ""
    with pytest.raises(UserError, match="tfds_name"):
        load_imageset(cfg)


def test_the_rows_without_pixels_are_those_it_decodes(written, monkeypatch):
    tfds_dir, _ = written
    data = tfds_io.read_tfds("fsad_synthetic", tfds_dir, SIZE, cache_dir="")
    assert_same_rows(undecoded_rows(monkeypatch, tfds_name="fsad_synthetic",
                                    tfds_dir=tfds_dir), data)
    with pytest.raises(UserError, match="tfds_name"):
        undecoded_rows(monkeypatch, tfds_name="")
    with pytest.raises(UserError, match="no TFDS dataset 'nope'"):
        undecoded_rows(monkeypatch, tfds_name="nope", tfds_dir=tfds_dir)


def test_no_test_good_and_no_masks(tmp_path):
    root = write_synthetic_dataset(str(tmp_path / "d"), size=16, n_train=9, n_test_good=3,
                                   n_per_class=2, defects=("spot", "scratch"), test_good=False)
    import shutil
    shutil.rmtree(os.path.join(root, "ground_truth"))
    tfds_io.write_tfds(tfds_io.folder_source(root), "plain", str(tmp_path / "t"))
    back = tfds_io.read_tfds("plain", str(tmp_path / "t"), 16, cache_dir="")
    assert back.masks is None
    assert back.counts() == {"train_normal": 9, "test_normal": 3, "anomaly_scratch": 2,
                             "anomaly_spot": 2}
    assert_same_imageset(back, read_folder(root, 16, cache_dir=""))
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        tfds_io.write_tfds(tfds_io.folder_source(root), "plain", str(tmp_path / "t"))
    tfds_io.write_tfds(tfds_io.folder_source(root), "plain", str(tmp_path / "t"), overwrite=True)
    with pytest.raises(UserError, match="snake case"):
        tfds_io.write_tfds(tfds_io.folder_source(root), "Plain-Set", str(tmp_path / "t"))
    with pytest.raises(UserError, match="no TFDS dataset 'nowhere_xyz'"):
        tfds_io.read_tfds("nowhere_xyz", str(tmp_path / "t"), 16, cache_dir="")


def test_an_anomaly_without_a_mask_stays_without_one(tmp_path, caplog):
    """An anomaly without a mask file came back from TFDS with an all-zero mask, which
    the pixel metrics then scored (the folder reader leaves it out): a walkthrough's
    pixel AUROC 0.9252 against the folder's 0.9209."""
    import shutil
    root = write_synthetic_dataset(str(tmp_path / "d"), size=16, n_train=6, n_test_good=2,
                                   n_per_class=2, defects=("spot", "scratch"))
    shutil.rmtree(os.path.join(root, "ground_truth", "scratch"))
    folder = read_folder(root, 16, cache_dir="")
    assert folder.has_mask().sum() == 2 and folder.labels.sum() == 4
    tfds_io.write_tfds(tfds_io.folder_source(root), "half_masked", str(tmp_path / "t"))
    back = tfds_io.read_tfds("half_masked", str(tmp_path / "t"), 16, cache_dir="")
    assert_same_imageset(back, folder)
    assert "2 anomaly image(s) of TFDS dataset 'half_masked' have no mask (e.g. " \
        "test/scratch/" in caplog.text
    # one against the rest on it: its label is normal/anomaly, its classes and masks lost
    with pytest.raises(UserError, match="was written by fsad, with its normals, anomaly "
                                        "classes and masks; read it without data.normal_class"):
        tfds_io.read_tfds_one_vs_rest("half_masked", str(tmp_path / "t"), "normal", 16,
                                      cache_dir="")


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _write_classification(tfds_dir, name, splits):
    """A prepared TFDS classification dataset (grey 8x8 images, classes cat/dog/bird),
    written as TFDS's own builders write one; splits: {split: [label, ...]}."""
    class ClassificationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, **kw):
            self.name = name
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "bird"])}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in splits}

        def _generate_examples(self, split):
            for i, y in enumerate(splits[split]):
                yield i, {"image": _png(np.full((8, 8), 10 * y + i, np.uint8)), "label": y}

    with tfds_io._temporary_folders_removed():  # TFDS's stray one (fsad's own calls too)
        builder = ClassificationBuilder(data_dir=tfds_dir, file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(tfds_dir, "downloads"))


def test_one_vs_rest_train_test(tmp_path, monkeypatch):
    d = str(tmp_path)
    _write_classification(d, "pets", {"train": [0, 1, 1, 2, 1, 0], "test": [1, 0, 2, 2, 1]})
    with pytest.raises(UserError, match="normal_class"):
        tfds_io.read_tfds("pets", d, 16, cache_dir="")
    data = tfds_io.read_tfds_one_vs_rest("pets", d, "dog", 16, cache_dir="")
    assert data.name == "pets:dog"
    # train normals: the dogs of train; test: the whole test split
    assert data.counts() == {"train_normal": 3, "test_normal": 2, "anomaly_bird": 2,
                             "anomaly_cat": 1}
    # file ids are "<split>/<record index>"; TFDS shuffled the records when writing
    ds = tfds.data_source("pets", data_dir=d)
    y = {s: [int(ds[s][i]["label"]) for i in range(len(ds[s]))] for s in ("train", "test")}
    by = lambda s, c: [f"{s}/{i}" for i, v in enumerate(y[s]) if v == c]  # noqa: E731
    assert list(data.file_ids) == by("train", 1) + by("test", 1) + by("test", 2) + by("test", 0)
    assert data.images.shape == (8, 16, 16, 3) and data.masks is None
    i = int(data.file_ids[0].split("/")[1])
    expected = ds["train"][i]["image"][..., 0]  # grey -> RGB, resized (a flat image)
    assert np.all(data.images[0] == expected[0, 0]) and np.all(expected == expected[0, 0])
    same = tfds_io.read_tfds_one_vs_rest("pets", d, "1", 16, cache_dir="")  # by index
    np.testing.assert_array_equal(same.file_ids, data.file_ids)
    with pytest.raises(UserError, match="not a class of 'pets'"):
        tfds_io.read_tfds_one_vs_rest("pets", d, "fish", 16, cache_dir="")
    # the rows a run checks its protocol on, from the labels with the images undecoded
    assert_same_rows(undecoded_rows(monkeypatch, tfds_name="pets", tfds_dir=d,
                                    normal_class="dog"), data, splits=False)
    with pytest.raises(UserError, match="not a class of 'pets'"):
        undecoded_rows(monkeypatch, tfds_name="pets", tfds_dir=d, normal_class="fish")


def test_one_vs_rest_single_split_is_split_3_to_1(tmp_path, monkeypatch):
    d = str(tmp_path)
    labels = [0, 1, 0, 0, 2, 0, 0, 0, 1]
    _write_classification(d, "pets_all", {"train": labels})
    data = tfds_io.read_tfds_one_vs_rest("pets_all", d, "cat", 8, cache_dir="")
    assert data.counts() == {"train_normal": 4, "test_normal": 2, "anomaly_bird": 1,
                             "anomaly_dog": 2}
    ds = tfds.data_source("pets_all", data_dir=d)["train"]
    normals = [f"train/{i}" for i in range(len(ds)) if ds[i]["label"] == 0]
    from fsad.data.folders import split_normals_3_to_1
    train, test = split_normals_3_to_1(len(normals))
    # marked as read_folder marks a folder without test/good: rows stay in record order
    assert list(data.file_ids[:6]) == ([normals[i] for i in sorted(train)]
                                       + [normals[i] for i in sorted(test)])
    assert_same_rows(undecoded_rows(monkeypatch, tfds_name="pets_all", tfds_dir=d,
                                    normal_class="cat"), data, splits=False)
    # one bird: no 3:1 split (scikit-learn's ValueError and its traceback, before)
    with pytest.raises(UserError, match="1 normal image: too few to split 3:1 into training "
                                        "and test normals"):
        undecoded_rows(monkeypatch, tfds_name="pets_all", tfds_dir=d, normal_class="bird")


def test_a_normal_class_without_training_images_is_refused(tmp_path, monkeypatch):
    """A one-vs-rest set whose training split holds none of the normal class: DevNet
    trained on no normal at all and printed an AUROC (a walkthrough's finding)."""
    from conftest import tiny_config
    from fsad.experiment import check_protocol
    d = str(tmp_path)
    _write_classification(d, "pets_split", {"train": [1, 1, 2, 1], "test": [0, 1, 2, 0]})
    data_cfg = {"tfds_name": "pets_split", "tfds_dir": d, "normal_class": "cat"}
    rows = undecoded_rows(monkeypatch, **data_cfg)
    assert rows.counts()["train_normal"] == 0
    config = tiny_config(**{"data.name": "tfds", "data.n_anomaly": 1, "data.shot_pool": 1,
                            **{f"data.{k}": v for k, v in data_cfg.items()}})
    with pytest.raises(UserError, match="the split leaves no normal image to train on"):
        check_protocol(config, rows, [0])


def test_one_vs_rest_on_mocked_mnist():
    with tfds.testing.mock_data(num_examples=40):
        with tfds_io._temporary_folders_removed():  # TFDS leaves an empty one behind
            builder = tfds.builder("mnist")
        labels = {}
        for s in ("train", "test"):
            source = builder.as_data_source(split=s)
            labels[s] = [int(source[i]["label"]) for i in range(40)]
        cfg = config_dict.ConfigDict({"name": "tfds", "tfds_name": "mnist", "tfds_dir": "",
                                      "normal_class": "3", "img_size": 16, "cache_dir": ""})
        data = load_imageset(cfg)
        # the mock hands images over encoded only through TensorFlow: without it, decoded
        assert_same_rows(dataset_without_pixels(cfg), data, splits=False)
    c = data.counts()
    assert c["train_normal"] == labels["train"].count(3) > 0
    assert c["test_normal"] == labels["test"].count(3) > 0
    assert sum(v for k, v in c.items() if k.startswith("anomaly_")) == 40 - labels["test"].count(3)
    assert data.images.shape[1:] == (16, 16, 3) and "3" not in data.anomaly_classes


def test_command_line(synthetic_root, tmp_path, capsys):
    assert tfds_io.main([synthetic_root, str(tmp_path), "--name", "cli_set"]) == 0
    out = capsys.readouterr().out
    assert "60 train + 56 test examples, with masks" in out and "tfds_name=cli_set" in out
    assert tfds_io.main([str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "neither 'elpv' nor a folder" in capsys.readouterr().err


def test_elpv_rows_round_trip_through_tfds(tmp_path):
    """elpv_source lists ELPV's rows as its reader does, and a few of each kind come
    back from TFDS with their pixels as the files hold them (the whole round trip below
    is opt-in: a minute; this ran in no test by default)."""
    import dataclasses

    from fsad.data.decode import load_rgb
    from fsad.data.elpv import elpv_without_pixels
    table = tfds_io.elpv_source()
    rows = elpv_without_pixels()
    for field in ("classes", "split", "file_ids"):
        np.testing.assert_array_equal(getattr(table, field), getattr(rows, field))
    keep = sorted(i for c in np.unique(table.classes) for s in ("train", "test")
                  for i in np.flatnonzero((table.classes == c) & (table.split == s))[:2])
    part = dataclasses.replace(table, paths=[table.paths[i] for i in keep],
                               classes=table.classes[keep], split=table.split[keep],
                               file_ids=table.file_ids[keep])
    tfds_io.write_tfds(part, "fsad_elpv_part", str(tmp_path))
    back = tfds_io.read_tfds("fsad_elpv_part", str(tmp_path), SIZE, cache_dir="")
    assert back.counts() == {"train_normal": 2, "test_normal": 2, "anomaly_mono": 2,
                             "anomaly_poly": 2}
    ds = tfds.data_source("fsad_elpv_part", data_dir=str(tmp_path))
    for split in ("train", "test"):
        for ex in ds[split]:
            np.testing.assert_array_equal(ex["image"], load_rgb(table.paths[keep[ex["index"]]]))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FSAD_TEST_ELPV_TFDS"),
                    reason="ELPV round trip (2,624 images, about a minute): set "
                           "FSAD_TEST_ELPV_TFDS=1")
def test_elpv_roundtrip(tmp_path, monkeypatch):
    tfds_io.write_tfds(tfds_io.elpv_source(), "fsad_elpv", str(tmp_path))
    back = tfds_io.read_tfds("fsad_elpv", str(tmp_path), SIZE, cache_dir="")
    assert back.counts() == {"train_normal": 1131, "test_normal": 377, "anomaly_mono": 313,
                             "anomaly_poly": 402}
    assert_same_imageset(back, read_elpv(SIZE, cache_dir=""))
    assert_same_rows(undecoded_rows(monkeypatch, tfds_name="fsad_elpv",
                                    tfds_dir=str(tmp_path)), back)


def test_writing_and_a_dataset_not_prepared_leave_no_temporary_folder(tmp_path, monkeypatch):
    """TFDS leaves an empty temporary folder behind each time it makes the builder of a
    dataset not written yet (a conversion; a catalogue name with no files): fsad's calls
    leave none."""
    import tempfile
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    root = write_synthetic_dataset(str(tmp_path / "d"), size=16, n_train=4, n_test_good=2,
                                   n_per_class=1, defects=("spot",))
    tfds_io.write_tfds(tfds_io.folder_source(root), "tiny", str(tmp_path / "t"))
    cfg = config_dict.ConfigDict({"name": "tfds", "tfds_name": "mnist", "img_size": 16,
                                  "tfds_dir": str(tmp_path), "normal_class": "3",
                                  "cache_dir": ""})
    with pytest.raises(UserError, match="not prepared"):
        load_imageset(cfg)
    assert os.listdir(temp) == []


def test_a_dataset_tfds_knows_but_has_not_prepared_says_so(tmp_path):
    """Offline, a catalogue name with no files (the README's CIFAR-10 example before
    `tfds build`) read as a wrong class name or an unreadable format; the error now says
    the dataset is not prepared there and how to prepare it."""
    for normal_class, first in (("cat", "normal_class 'cat' is not a class of 'mnist'"),
                                ("3", "TFDS dataset 'mnist' cannot be read as a data source")):
        cfg = config_dict.ConfigDict({"name": "tfds", "tfds_name": "mnist",
                                      "tfds_dir": str(tmp_path), "normal_class": normal_class,
                                      "img_size": 16, "cache_dir": ""})
        with pytest.raises(UserError, match=rf"{first}.*; 'mnist' is not prepared in "
                           rf".*tfds build mnist --file_format=array_record"):
            load_imageset(cfg)
