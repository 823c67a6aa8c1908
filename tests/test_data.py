import os
import shutil

import cv2
import numpy as np
import pytest
import yaml

from compression.data import build_dataset, data_key, label_file, letterbox, load_data_config, split_images, train_shape
from compression.errors import UserError
from conftest import COCO128, needs_shared


def test_yaml_without_path_resolves_beside_itself(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the yaml's folder
    data = load_data_config(tiny_data)
    assert data["nc"] == 2 and data["names"][1] == "disc"
    assert len(split_images(data, "val")) == 4


def test_relative_path_key_resolves_beside_the_yaml(tiny_data, tmp_path):
    cfg = yaml.safe_load(tiny_data.read_text())
    cfg["path"] = tiny_data.parent.name
    other = tiny_data.parent.parent / "moved.yaml"
    other.write_text(yaml.safe_dump(cfg))
    assert len(split_images(load_data_config(other), "train")) == 8


def test_missing_yaml_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data_config(tmp_path / "nope.yaml")


def test_yaml_pointing_at_no_images(tmp_path):
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "a", "val": "b", "names": ["x"]}))
    with pytest.raises(UserError, match="holds no images"):
        load_data_config(tmp_path / "d.yaml")


def test_class_id_outside_names_names_file_and_line(tiny_data, tmp_path):
    cfg = yaml.safe_load(tiny_data.read_text())
    cfg["names"] = {0: "square"}  # labels use class 1 too
    bad = tiny_data.parent / "one_class.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match=r"\.txt:2: class id 1 is outside 0..0"):
        load_data_config(bad)


def test_label_file_follows_yolo_layout(tmp_path):
    assert label_file(tmp_path / "images" / "val" / "a.jpg") == tmp_path / "labels" / "val" / "a.txt"


def test_dataset_letterboxes_to_square_and_keeps_labels(tiny_data):
    ds = build_dataset(load_data_config(tiny_data), "val", imgsz=64)
    item = ds[0]
    assert tuple(item["img"].shape) == (3, 64, 64)
    assert item["cls"].flatten().tolist() == [0.0, 1.0]


def test_dataset_and_letterbox_take_a_height_and_width(tiny_data, wide_data):
    item = build_dataset(load_data_config(tiny_data), "val", imgsz=(64, 96))[0]
    assert tuple(item["img"].shape) == (3, 64, 96)  # 96x96 photos: 64x64, padded left and right
    assert item["cls"].flatten().tolist() == [0.0, 1.0]
    assert tuple(build_dataset(load_data_config(wide_data), "val", imgsz=(48, 64))[0]["img"].shape) == (3, 48, 64)
    assert tuple(letterbox(cv2.imread(str(split_images(load_data_config(wide_data), "val")[0])), (48, 64)).shape) == \
        (1, 3, 48, 64)


def test_the_train_shape_follows_the_train_images(tiny_data, wide_data, tmp_path):
    assert train_shape(load_data_config(tiny_data), 128, 32) == 128  # square photos: square input
    assert train_shape(load_data_config(wide_data), 128, 32) == (96, 128)  # 4:3 landscape
    assert train_shape(load_data_config(wide_data), 96, 32) == 96  # 72 rounds up to the stride: square
    tall = tmp_path / "tall"
    for split in ("images/train", "images/val"):
        (tall / split).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tall / split / f"{i}.jpg"), np.zeros((120 if i else 40, 90, 3), np.uint8))
    (tall / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["x"]}))
    assert train_shape(load_data_config(tall / "data.yaml"), 160, 32) == (160, 128)  # median 120x90: portrait


@pytest.mark.slow
@needs_shared
def test_coco128_reads_read_only_shared_folder():
    data = load_data_config(COCO128)
    assert data["nc"] == 80 and len(split_images(data, "val")) == 128
    build_dataset(data, "val", 640)
    assert not list(COCO128.parent.glob("labels/*.cache"))  # nothing written into the dataset


def test_the_cache_key_of_a_dataset_follows_its_contents_not_its_place(tiny_data, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_data.parent, copy)
    key = data_key(load_data_config(tiny_data, ("train", "val")))
    assert data_key(load_data_config(copy / "data.yaml", ("train", "val"))) == key  # moved: the caches still hit
    label = copy / "labels" / "train" / "0.txt"
    before = label.stat().st_mtime_ns
    label.write_text(label.read_text().replace("0 ", "1 ", 1))  # a class fixed in place: same size
    os.utime(label, ns=(before + 10**9, before + 10**9))
    edited = data_key(load_data_config(copy / "data.yaml", ("train", "val")))
    assert edited != key
    (copy / "images" / "val" / "3.jpg").unlink()
    fewer = data_key(load_data_config(copy / "data.yaml", ("train", "val")))
    assert fewer not in (key, edited)
    cfg = yaml.safe_load((copy / "data.yaml").read_text())
    cfg["names"] = {0: "box", 1: "disc"}
    (copy / "data.yaml").write_text(yaml.safe_dump(cfg))
    assert data_key(load_data_config(copy / "data.yaml", ("train", "val"))) not in (key, edited, fewer)
