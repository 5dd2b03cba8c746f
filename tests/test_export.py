"""export/: synthetic data, training data = serving inputs, train → ONNX round trip.

Tests marked ``slow`` import TensorFlow (a tiny U-Net, one epoch on 16 images).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from export import ExportError, synth
from export.card import PreprocessOptions, draft_card, preprocess_ops
from export.data import find_samples, fold_of_groups, fold_split, load_arrays, load_groups, split_samples
from conftest import shared_data
from station.imageio import read_image, read_mask
from station.modelcard import METADATA_KEY, ModelCard, TrainingInfo
from station.preprocess import prepare_mask, preprocess

# Keras converts eager tensors with np.array(x), which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _grade(area_pct: float) -> str:
    return "PASS" if area_pct <= 0.5 else "DISCOUNT" if area_pct <= 2.0 else "REJECT"


def _card(opts: PreprocessOptions | None = None, size: tuple[int, int] = (64, 64)) -> ModelCard:
    return draft_card(name="t", version="1", size=size, preprocess=preprocess_ops(opts or PreprocessOptions()),
                      training=TrainingInfo(data="test"))


# --- synth -------------------------------------------------------------------


def test_plate_same_seed_same_bytes() -> None:
    a = synth.make_plate(np.random.default_rng(42), 256, 256)
    b = synth.make_plate(np.random.default_rng(42), 256, 256)
    c = synth.make_plate(np.random.default_rng(43), 256, 256)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert a.classes == b.classes
    assert a.image.tobytes() != c.image.tobytes()


def test_dataset_same_seed_same_files(tmp_path: Path) -> None:
    synth.write_dataset(tmp_path / "a", 7, seed=5, size=(96, 128))
    synth.write_dataset(tmp_path / "b", 7, seed=5, size=(96, 128))
    synth.write_dataset(tmp_path / "c", 7, seed=6, size=(96, 128))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_dataset_layout(tmp_path: Path) -> None:
    groups = synth.write_dataset(tmp_path, 9, seed=1, size=(80, 112))
    images = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert sorted(groups) == images and len(images) == 9
    assert json.loads((tmp_path / synth.GROUPS_FILE).read_text()) == groups
    for key in images:
        folder, _ = key.split("/")
        assert folder in set(synth.FOLDERS.values()) | {synth.FREE_FOLDER}
        assert groups[key].startswith(folder + "/")
        image = read_image(tmp_path / key)
        mask = cv2.imread(str(tmp_path / key.replace(".jpg", ".png")), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (80, 112) and image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert (folder == synth.FREE_FOLDER) == (not mask.any())


@pytest.mark.parametrize("defective", [0.0, 0.125, 1.0])
def test_dataset_defective_share(tmp_path: Path, defective: float) -> None:
    groups = synth.write_dataset(tmp_path, 64, seed=3, size=(32, 32), shots=(1, 1), defective=defective)
    free = sum(key.startswith(synth.FREE_FOLDER + "/") for key in groups)
    assert abs((len(groups) - free) / len(groups) - defective) <= 0.1


def test_dataset_defective_share_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--defective 1.5"):
        synth.write_dataset(tmp_path, 2, seed=0, defective=1.5)


def test_dataset_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        synth.write_dataset(tmp_path, 2, seed=0)


@pytest.mark.parametrize("height,width", [(256, 256), (120, 200), (300, 90), (16, 16)])
def test_plate_shapes(height: int, width: int) -> None:
    plate = synth.make_plate(np.random.default_rng(0), height, width, "large")
    assert plate.image.shape == plate.mask.shape == (height, width)
    assert plate.mask.any() and plate.classes and set(plate.classes) <= set(synth.CLASSES)


@pytest.mark.parametrize("severity,grade", [("free", "PASS"), ("small", "PASS"), ("medium", "DISCOUNT"),
                                            ("large", "REJECT")])
def test_severity_gives_grade(severity: str, grade: str) -> None:
    for i in range(6):
        plate = synth.make_plate(np.random.default_rng([9, i]), 200, 300, severity)
        assert _grade(plate.area_pct) == grade, (i, plate.area_pct)


def test_all_grades_occur_in_a_sample() -> None:
    grades = [_grade(synth.make_plate(np.random.default_rng([3, i]), 128, 128).area_pct) for i in range(40)]
    assert {"PASS", "DISCOUNT", "REJECT"} <= set(grades)
    kinds = {c for i in range(40) for c in synth.make_plate(np.random.default_rng([3, i]), 128, 128).classes}
    assert kinds == set(synth.CLASSES)


# --- data --------------------------------------------------------------------


def test_find_samples_skips_images_without_mask(tmp_path: Path) -> None:
    synth.write_dataset(tmp_path, 4, seed=2, size=(64, 64))
    lone = tmp_path / "Free" / "extra.jpg"
    lone.parent.mkdir(exist_ok=True)
    cv2.imwrite(str(lone), np.full((64, 64), 90, np.uint8))
    listing = find_samples(tmp_path)
    assert len(listing.samples) == 4 and listing.skipped_no_mask == 1
    assert all(s.mask is not None and s.mask.suffix == ".png" for s in listing.samples)
    listing = find_samples(tmp_path, missing_mask_is_free=True)
    assert len(listing.samples) == 5
    free = next(s for s in listing.samples if s.key == "Free/extra.jpg")
    x = load_arrays([free], _card())
    assert not x.y.any()


def test_find_samples_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        find_samples(tmp_path / "nope")
    with pytest.raises(ExportError, match="no image"):
        find_samples(tmp_path)


def test_split_keeps_groups_together(tmp_path: Path) -> None:
    groups = synth.write_dataset(tmp_path, 30, seed=4, size=(48, 48))
    samples = find_samples(tmp_path).samples
    split = split_samples(samples, 0.3, seed=1, groups=groups)
    train_groups = {groups[s.key] for s in split.train}
    val_groups = {groups[s.key] for s in split.val}
    assert train_groups.isdisjoint(val_groups) and split.val and split.train
    assert len(split.train) + len(split.val) == 30
    assert len(split.val) >= 0.3 * 30
    assert split_samples(samples, 0.3, seed=1, groups=groups) == split
    assert split_samples(samples, 0.3, seed=2, groups=groups).val != split.val
    by_image = split_samples(samples, 0.3, seed=1)
    assert by_image.description.startswith("by image")


@pytest.mark.parametrize("folds", [2, 5])
def test_folds_never_split_a_group_and_cover_every_image_once(tmp_path: Path, folds: int) -> None:
    groups = synth.write_dataset(tmp_path, 40, seed=4, size=(48, 48))
    samples = find_samples(tmp_path).samples
    assignment = fold_of_groups(samples, folds, seed=1, groups=groups)
    assert sorted(assignment) == sorted(s.key for s in samples)
    assert set(assignment.values()) == set(range(folds))
    fold_of_group: dict[str, set[int]] = {}
    for key, fold in assignment.items():
        fold_of_group.setdefault(groups[key], set()).add(fold)
    assert all(len(f) == 1 for f in fold_of_group.values())
    held_out = []
    for fold in range(folds):
        split = fold_split(samples, folds, fold, seed=1, groups=groups)
        assert {groups[s.key] for s in split.train}.isdisjoint({groups[s.key] for s in split.val})
        assert len(split.train) + len(split.val) == 40
        held_out += [s.key for s in split.val]
    assert sorted(held_out) == sorted(s.key for s in samples)  # each image held out exactly once
    assert fold_of_groups(samples, folds, seed=1, groups=groups) == assignment
    with pytest.raises(ExportError, match="--fold 5: must be between 0 and 4"):
        fold_split(samples, 5, 5, seed=1, groups=groups)
    with pytest.raises(ExportError, match="--folds 1: need at least 2"):
        fold_of_groups(samples, 1, seed=1, groups=groups)


def test_tile_folds_keep_each_physical_tile_on_one_side_and_every_class_in_every_fold() -> None:
    data = shared_data("magnetic_tile")
    samples = find_samples(data).samples
    groups = load_groups(data / "tile_groups.json")
    assignment = fold_of_groups(samples, 5, seed=7, groups=groups)
    fold_of_tile: dict[str, set[int]] = {}
    per_class: dict[str, list[int]] = {}
    for key, fold in assignment.items():
        fold_of_tile.setdefault(groups[key], set()).add(fold)
        per_class.setdefault(key.split("/")[0], [0] * 5)[fold] += 1
    assert len(assignment) == 1076 and all(len(f) == 1 for f in fold_of_tile.values())
    assert all(min(counts) >= 1 for counts in per_class.values()), per_class


def test_load_groups_errors(tmp_path: Path) -> None:
    bad = tmp_path / "g.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ExportError, match="--groups"):
        load_groups(bad)


@pytest.mark.parametrize("opts,size", [
    (PreprocessOptions(), (64, 64)),
    (PreprocessOptions(colour="rgb", clahe=None, equalize=True, dilate=5, dilate_shape="ellipse",
                       resize_mode="letterbox", pad_value=17, normalize="unit"), (64, 96)),
    (PreprocessOptions(clahe=(3.0, 4), dilate=0, interpolation="linear"), (96, 64)),
    (PreprocessOptions(dilate=0, resize_mode="letterbox", pad_mode="reflect"), (64, 96)),
    (PreprocessOptions(dilate=0, resize_mode="letterbox", pad_mode="replicate"), (96, 64)),
])
def test_training_inputs_equal_serving_inputs(tmp_path: Path, opts: PreprocessOptions, size: tuple[int, int]) -> None:
    """export/data.py builds exactly what station.preprocess gives the line, bit for bit."""
    synth.write_dataset(tmp_path, 3, seed=8, size=(150, 210))
    colour = tmp_path / "Colour" / "c.png"
    colour.parent.mkdir()
    plate = synth.make_plate(np.random.default_rng(1), 110, 170, "medium")
    cv2.imwrite(str(colour), synth.to_bgr(plate.image))
    cv2.imwrite(str(colour.with_name("c_mask.png")), plate.mask)  # not a sibling mask: c.png is an image
    colour_img = tmp_path / "Colour" / "d.jpg"
    cv2.imwrite(str(colour_img), synth.to_bgr(plate.image))
    cv2.imwrite(str(colour_img.with_suffix(".png")), plate.mask)

    card = _card(opts, size)
    samples = find_samples(tmp_path).samples
    assert len(samples) == 4
    arrays = load_arrays(samples, card)
    assert arrays.x.shape == (4, size[0], size[1], card.input.channels) and arrays.x.dtype == np.float32
    for i, s in enumerate(samples):
        served, geometry = preprocess(read_image(s.image), card)
        assert served.dtype == arrays.x.dtype
        assert np.array_equal(arrays.x[i], served)
        assert np.array_equal(arrays.y[i, :, :, 0], prepare_mask(read_mask(s.mask), card, geometry))
        g = geometry
        assert arrays.content[i].tolist() == [g.top, g.top + g.content_h, g.left, g.left + g.content_w]


def test_preprocess_flags_are_checked() -> None:
    with pytest.raises(ExportError, match="--clahe"):
        preprocess_ops(PreprocessOptions(clahe=(0.0, 8)))
    with pytest.raises(ExportError, match="--dilate 40"):
        preprocess_ops(PreprocessOptions(dilate=40))
    with pytest.raises(ExportError, match="exclusive"):
        preprocess_ops(PreprocessOptions(clahe=(2.0, 8), equalize=True))
    ops = [op.op for op in preprocess_ops(PreprocessOptions())]
    assert ops == ["colour", "clahe", "dilate", "resize", "normalize"]


# --- TensorFlow: U-Net, training, ONNX ----------------------------------------


@pytest.mark.slow
def test_augmented_oversamples_defects_deterministically() -> None:
    from export.train import make_augmented

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 32, 32, 1)).astype(np.float32)
    y = np.zeros((6, 32, 32, 1), np.float32)
    y[[1, 4], 10:12, 10:12] = 1.0  # two defective images
    a = make_augmented(x, y, batch=4, seed=3, defect_repeat=3, jitter=0.1)
    b = make_augmented(x, y, batch=4, seed=3, defect_repeat=3, jitter=0.1)
    assert len(a) == 3  # 6 rows + 2 × 2 repeats = 10 → 3 batches of 4
    batches = [a[i] for i in range(len(a))]
    for (xa, ya), (xb, yb) in zip(batches, (b[i] for i in range(len(b)))):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    labels = np.concatenate([yb for _, yb in batches])
    assert len(labels) == 10 and int((labels.reshape(10, -1).max(axis=1) > 0).sum()) == 6
    assert int(labels.sum()) == 6 * 4  # flips and rotations keep every defect pixel
    plain = make_augmented(x, y, batch=4, seed=3)
    assert len(plain) == 2


@pytest.mark.slow
def test_crops_cover_defects_deterministically() -> None:
    from export.train import make_crops

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 64, 64, 1)).astype(np.float32)
    y = np.zeros((6, 64, 64, 1), np.float32)
    y[1, 50:52, 3:5] = 1.0  # one small defect near a corner
    y[4, 10:30, 20:60] = 1.0  # one large defect
    a = make_crops(x, y, batch=8, seed=3, crop=32, steps=5, defect_share=0.5, jitter=0.1)
    b = make_crops(x, y, batch=8, seed=3, crop=32, steps=5, defect_share=0.5, jitter=0.1)
    assert len(a) == 5
    batches = [a[i] for i in range(len(a))]
    for (xa, ya), (xb, yb) in zip(batches, (b[i] for i in range(len(b)))):
        assert xa.shape == (8, 32, 32, 1) and ya.shape == (8, 32, 32, 1)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    labels = np.concatenate([yb for _, yb in batches]).reshape(40, -1)
    with_defect = int((labels.max(axis=1) > 0).sum())
    assert 12 <= with_defect <= 32  # about half the windows are placed over a defect
    # every window is a symmetry of a window of some image: its label values are 0/1 only
    assert set(np.unique(labels)) <= {0.0, 1.0}
    only_free = make_crops(x, y, batch=8, seed=3, crop=32, steps=3, defect_share=0.0)
    never = make_crops(x, np.zeros_like(y), batch=8, seed=3, crop=32, steps=3, defect_share=1.0)
    assert sum(int(yb.sum()) for _, yb in (never[i] for i in range(3))) == 0  # no defect anywhere: uniform windows
    assert len(only_free) == 3
    with pytest.raises(ExportError, match="--crop 48"):
        make_crops(x, y, batch=8, seed=3, crop=48, steps=1)
    with pytest.raises(ExportError, match="--crop 96"):
        make_crops(x, y, batch=8, seed=3, crop=96, steps=1)


@pytest.mark.slow
def test_zoomed_crops_rescale_image_and_mask_together() -> None:
    from export.train import make_crops

    # a horizontal ramp: a window's left-to-right rise measures the scale it was cut at
    x = np.tile(np.arange(64, dtype=np.float32), (4, 64, 1))[..., None]
    y = np.zeros((4, 64, 64, 1), np.float32)
    y[:, 24:40, 24:40] = 1.0  # a 16 px square defect in every image
    zoomed = make_crops(x, y, batch=16, seed=5, crop=32, steps=4, defect_share=1.0, zoom=2.0)
    again = make_crops(x, y, batch=16, seed=5, crop=32, steps=4, defect_share=1.0, zoom=2.0)
    rises, areas = [], []
    for i in range(len(zoomed)):
        (xb, yb), (xc, yc) = zoomed[i], again[i]
        np.testing.assert_array_equal(xb, xc)
        np.testing.assert_array_equal(yb, yc)
        assert xb.shape == yb.shape == (16, 32, 32, 1) and set(np.unique(yb)) <= {0.0, 1.0}
        for xi, yi in zip(xb[..., 0], yb[..., 0]):
            rises.append(max(abs(xi[:, -1] - xi[:, 0]).max(), abs(xi[-1] - xi[0]).max()) / 31)
            areas.append(yi.sum())
    rises, areas = np.array(rises), np.array(areas)
    assert rises.min() < 0.75 and rises.max() > 1.4  # source sides from ~16 to 64 px squeezed into 32
    assert np.all((rises > 0.45) & (rises < 2.05))
    # the defect scales with the window: magnified (rise < 1) windows show more defect pixels
    assert areas[rises < 0.8].mean() > 1.5 * areas[rises > 1.3].mean()
    with pytest.raises(ExportError, match="--zoom 0.5"):
        make_crops(x, y, batch=8, seed=3, crop=32, steps=1, zoom=0.5)


@pytest.mark.slow
def test_content_windows_stay_over_the_letterboxed_part() -> None:
    from export.card import PreprocessOptions, preprocess_ops
    from export.train import letterboxes, make_crops

    assert letterboxes(preprocess_ops(PreprocessOptions(resize_mode="letterbox", pad_mode="reflect")))
    assert not letterboxes(preprocess_ops(PreprocessOptions(resize_mode="stretch")))
    # narrow parts letterboxed into a wide plane: 3/4 of each image is padding (Arrays.content: where each lies)
    pad = -1.0
    rng = np.random.default_rng(1)
    x = np.full((5, 64, 256, 1), pad, np.float32)
    for i in range(5):
        x[i, :, 40 * i : 40 * i + 64] = rng.uniform(-0.9, 1.0, size=(64, 64, 1))
    x[4] = pad  # an image that is all padding keeps its whole plane
    y = np.zeros((5, 64, 256, 1), np.float32)
    boxes = np.array([[0, 64, 40 * i, 40 * i + 64] for i in range(4)] + [[0, 64, 0, 256]])
    windows = make_crops(x, y, batch=16, seed=2, crop=32, steps=4, defect_share=0.0, content=boxes)
    plain = make_crops(x, y, batch=16, seed=2, crop=32, steps=4, defect_share=0.0)

    def padded_share(crops) -> float:
        return float(np.mean([(xb == pad).mean() for xb, _ in (crops[i] for i in range(len(crops)))]))

    # only the all-padding image (1 in 5) and the margins cut into padding; uniform windows mostly do
    assert padded_share(windows) < 0.35 < 0.6 < padded_share(plain)
    with pytest.raises(ExportError, match="content boxes"):
        make_crops(x, y, batch=4, seed=2, crop=32, steps=1, content=boxes[:3])


@pytest.mark.slow
def test_crop_balance_draws_defect_windows_per_folder() -> None:
    from export.train import make_crops

    # image i holds the value i everywhere, so a window tells which image it was cut from
    x = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None, None], (6, 64, 64, 1)).copy()
    y = np.zeros((6, 64, 64, 1), np.float32)
    y[:5, 20:40, 20:40] = 1.0  # images 0-4 have a defect; 5 is defect-free
    strata = ["Blowhole"] * 4 + ["Fray", "Free"]

    def fray_share(crops) -> float:
        source = np.concatenate([xb[:, 0, 0, 0] for xb, _ in (crops[i] for i in range(len(crops)))])
        assert set(np.unique(source)) <= {0.0, 1.0, 2.0, 3.0, 4.0}  # defect windows only: never image 5
        return float(np.mean(source == 4.0))

    per_image = make_crops(x, y, batch=20, seed=4, crop=32, steps=20, defect_share=1.0)
    per_folder = make_crops(x, y, batch=20, seed=4, crop=32, steps=20, defect_share=1.0, strata=strata)
    again = make_crops(x, y, batch=20, seed=4, crop=32, steps=20, defect_share=1.0, strata=strata)
    assert 0.15 < fray_share(per_image) < 0.25  # 1 of 5 defective images
    assert 0.44 < fray_share(per_folder) < 0.56  # 1 of 2 folders with a defect
    np.testing.assert_array_equal(per_folder[3][0], again[3][0])
    with pytest.raises(ExportError, match="strata: one label per image"):
        make_crops(x, y, batch=4, seed=2, crop=32, steps=1, strata=strata[:3])


@pytest.mark.slow
def test_tversky_term_makes_missed_pixels_cost_more_than_false_ones() -> None:
    from export.train import make_loss

    big, small = np.zeros((2, 32, 32, 1), np.float32), np.zeros((2, 32, 32, 1), np.float32)
    big[:, 8:24, 8:24] = 1.0
    small[:, 8:16, 8:24] = 1.0
    # the same two masks, once as a defect found half (truth big, prediction small), once as a
    # defect flagged twice its size (truth small, prediction big): Dice cannot tell them apart
    bce = make_loss(dice_weight=0.0)

    def overlap_term(loss, truth, pred) -> float:
        return float(loss(truth, pred)) - float(bce(truth, pred))

    dice, tversky = make_loss(), make_loss(tversky_beta=0.7)
    assert overlap_term(dice, big, small) == pytest.approx(overlap_term(dice, small, big), abs=1e-4)
    assert float(make_loss(tversky_beta=0.5)(big, small)) == float(dice(big, small))  # 0.5 is Dice
    assert overlap_term(tversky, big, small) > overlap_term(tversky, small, big) + 0.05
    assert overlap_term(tversky, big, big) < 1e-3
    with pytest.raises(ExportError, match="--tversky-beta 1.0"):
        make_loss(tversky_beta=1.0)


def test_balance_and_tversky_options_reach_the_command_line(tmp_path: Path) -> None:
    from export.train import build_parser, command_of, config_from_args

    argv = [str(tmp_path), "--out", str(tmp_path / "run"), "--crop", "64", "--crop-balance", "folder",
            "--tversky-beta", "0.7", "--resize-mode", "letterbox", "--pad-mode", "reflect"]
    cfg = config_from_args(build_parser().parse_args(argv), "")
    assert (cfg.crop_balance, cfg.tversky_beta) == ("folder", 0.7)
    assert [op.pad_mode for op in cfg.preprocess if op.op == "resize"] == ["reflect"]
    line = command_of(cfg)
    assert "--crop-balance folder" in line and "--tversky-beta 0.7" in line and "--pad-mode reflect" in line
    again = config_from_args(build_parser().parse_args(line.split()[3:]), "")
    assert (again.crop_balance, again.tversky_beta) == ("folder", 0.7)
    assert again.preprocess == cfg.preprocess
    plain = command_of(config_from_args(build_parser().parse_args(argv[:3]), ""))
    assert "--tversky-beta" not in plain and "--pad-mode" not in plain


def test_the_command_line_defaults_to_the_pretrained_recipe_and_its_command_reproduces_any_config(
        tmp_path: Path) -> None:
    """``python -m export.train DATA --weights W`` is the recipe the shipped U-Net was cross-validated
    with; the command a card records parses back to the same config, whatever the CLI defaults."""
    from dataclasses import replace

    from export.card import default_decoder_filters
    from export.train import AUTO_SIZE, TrainConfig, build_parser, command_of, config_from_args

    weights = tmp_path / "w.weights.h5"
    cfg = config_from_args(build_parser().parse_args([str(tmp_path), "--out", "run", "--weights", str(weights)]), "")
    assert (cfg.size, cfg.alpha, cfg.decoder_filters, cfg.crop, cfg.multiscale) == (AUTO_SIZE, 1.0, (128, 64, 48, 32),
                                                                                    128, (2,))
    assert (cfg.freeze_epochs, cfg.finetune_lr, cfg.keep, cfg.crop_content, cfg.crop_balance) == (2, 0.5, "last",
                                                                                                   True, "folder")
    assert [op.op for op in cfg.preprocess] == ["colour", "resize", "normalize"]  # no CLAHE, no dilation
    assert config_from_args(build_parser().parse_args([str(tmp_path), "--out", "run"]), "").freeze_epochs == 0
    # configs built in Python (TrainConfig's own defaults: whole images, no multiscale, best epoch) round-trip
    for made in (TrainConfig(tmp_path, tmp_path / "run"),
                 replace(cfg, crop=None, steps=None, crop_content=False, multiscale=(), zoom=1.0, jitter=0.0,
                         size=(96, 64)),
                 replace(cfg, crop_content=False, decoder_filters=None, alpha=0.35, weights=None, freeze_epochs=0),
                 cfg):
        line = command_of(made)
        again = config_from_args(build_parser().parse_args(line.split()[3:]), "")
        assert command_of(again) == line  # a fixed point: the command says everything
        fields = ("size", "alpha", "crop", "steps", "multiscale", "zoom", "jitter", "keep", "freeze_epochs",
                  "weights", "crop_content", "preprocess", "epochs", "lr")
        assert [getattr(again, f) for f in fields] == [getattr(made, f) for f in fields], line
        assert (again.decoder_filters or default_decoder_filters(again.alpha)) == (
            made.decoder_filters or default_decoder_filters(made.alpha))


def test_crop_content_needs_windows_and_a_letterbox(tmp_path: Path) -> None:
    from export.card import PreprocessOptions, preprocess_ops
    from export.train import TrainConfig, train

    letterbox = tuple(preprocess_ops(PreprocessOptions(resize_mode="letterbox")))
    for cfg in (TrainConfig(tmp_path, tmp_path / "a", preprocess=letterbox, crop_content=True),
                TrainConfig(tmp_path, tmp_path / "b", preprocess=tuple(preprocess_ops(PreprocessOptions())),
                            crop=64, crop_content=True)):
        with pytest.raises(ExportError, match="--crop-content: only with --crop and --resize-mode letterbox"):
            train(cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any output


@pytest.fixture(scope="module")
def crop_run(tiny_run, tmp_path_factory: pytest.TempPathFactory):
    """One crop-training run of the tiny U-Net with the crop recipe's options together (zoomed
    windows, the multi-scale served network, a weight EMA, the last epoch kept, BatchNorm
    re-measured), as the shipped recipe combines them: (config, result), for the two tests below."""
    from dataclasses import replace

    from export.train import train

    cfg, _ = tiny_run
    crop_cfg = replace(cfg, out_dir=tmp_path_factory.mktemp("crop") / "run", crop=32, crop_defect=0.5, steps=2,
                       epochs=2, zoom=2.0, multiscale=(2,), ema=0.9, keep="last", recompute_bn=True)
    return crop_cfg, train(crop_cfg)


@pytest.mark.slow
def test_crop_training_validates_and_exports_at_the_input_size(crop_run) -> None:
    crop_cfg, result = crop_run
    assert result.card.input.height == result.card.input.width == 64
    assert len(result.history) == 2 and all(0.0 <= row["val_iou"] <= 1.0 for row in result.history)
    assert result.best_epoch == 2 and (crop_cfg.out_dir / "last.weights.h5").is_file()
    training = result.card.training
    assert "--crop 32 --crop-defect 0.5 --crop-balance image --no-crop-content --steps 2" in training.command
    assert "--zoom 2 --multiscale 2 --ema 0.9 --keep last --recompute-bn" in training.command
    assert "last epoch's weights" in training.evaluated_by and "moving average" in training.evaluated_by
    assert "BatchNorm statistics re-measured" in training.evaluated_by and "val_iou_before_bn" in training.figures
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    assert tuple(session.get_inputs()[0].shape) == (1, 64, 64, 1)


@pytest.mark.slow
def test_multiscale_network_is_the_maximum_of_its_scales_and_exports_so(crop_run) -> None:
    from dataclasses import replace

    import onnxruntime as ort
    import tensorflow as tf

    from export.train import build_network, load_served, train

    ms_cfg, result = crop_run
    assert "--zoom 2 --multiscale 2" in result.card.training.command
    # the checkpoint (the exported weights) is the plain U-Net's; the served network is rebuilt from it
    weights = ms_cfg.out_dir / "last.weights.h5"
    plain = build_network(ms_cfg, 1, 1, 64, 64)
    plain.load_weights(weights)
    served = load_served(ms_cfg, 1, 1, weights)
    half = build_network(ms_cfg, 1, 1, 32, 32)
    half.set_weights(plain.get_weights())
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 1)).astype(np.float32)
    shrunk = x.reshape(2, 32, 2, 32, 2, 1).mean(axis=(2, 4))
    grown = tf.image.resize(half(shrunk), (64, 64), "bilinear").numpy()
    want = np.maximum(plain(x).numpy(), grown)
    np.testing.assert_allclose(served(x).numpy(), want, atol=1e-5)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:1]})[0]
    np.testing.assert_allclose(got, want[:1], atol=1e-4)
    import onnx

    ops = {node.op_type for node in onnx.load(str(result.onnx_path)).graph.node}
    assert {"AveragePool", "Resize", "Max"} <= ops
    with pytest.raises(ExportError, match="--multiscale 3: each factor"):
        train(replace(ms_cfg, multiscale=(3,)))


@pytest.mark.slow
def test_recompute_bn_measures_the_average_over_all_inputs() -> None:
    import keras

    from export.train import recompute_bn

    inputs = keras.Input((4, 4, 2))
    hidden = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(inputs)
    outputs = keras.Sequential([keras.layers.BatchNormalization(momentum=0.9, name="bn2")])(hidden * 3.0 + 1.0)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(10, 4, 4, 2)) * [1.0, 4.0] + [5.0, -2.0]).astype(np.float32)
    assert recompute_bn(model, x, batch=4) == 2  # batches of 4, 4 and 2, weighted by size
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5)
    batch_vars = [x[s : s + 4].var(axis=(0, 1, 2)) for s in (0, 4, 8)]
    np.testing.assert_allclose(bn1.moving_variance.numpy(), np.average(batch_vars, axis=0, weights=[4, 4, 2]),
                               rtol=1e-4)
    # the nested layer sees its input normalised by the batch statistics, as in training
    bn2 = model.layers[-1].layers[0]
    np.testing.assert_allclose(bn2.moving_mean.numpy(), [1.0, 1.0], atol=1e-3)
    assert bn1.momentum == bn2.momentum == 0.9  # restored


def test_training_options_are_checked(tmp_path: Path) -> None:
    from export.train import TrainConfig, train

    for bad, match in ((dict(defect_repeat=0), "--defect-repeat"), (dict(jitter=1.5), "--jitter"),
                       (dict(loss="hinge"), "--loss"), (dict(crop=48), "--crop 48"),
                       (dict(crop=256), "--crop 256"), (dict(crop_defect=1.5), "--crop-defect"),
                       (dict(steps=0), "--steps"), (dict(steps=10), "--steps 10: only with --crop"),
                       (dict(crop=32, defect_repeat=2), "--defect-repeat 2: not with --crop"),
                       (dict(zoom=1.5), "--zoom 1.5: only with --crop"), (dict(crop=32, zoom=8.0), "--zoom 8"),
                       (dict(ema=1.0), "--ema 1.0"), (dict(keep="worst"), "--keep"),
                       (dict(tversky_beta=1.0), "--tversky-beta 1.0"), (dict(crop_balance="class"), "--crop-balance"),
                       (dict(crop_balance="folder"), "--crop-balance folder: only with --crop")):
        with pytest.raises(ExportError, match=match):
            train(TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "run", **bad))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    from export.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    synth.write_dataset(root / "data", 16, seed=11, size=(96, 128))
    cfg = TrainConfig(data_dir=root / "data", out_dir=root / "run", groups=root / "data" / synth.GROUPS_FILE,
                      size=(64, 64), alpha=0.35, epochs=1, batch=8, seed=3, val_fraction=0.25, name="tiny",
                      eager=True)
    return cfg, train(cfg)


@pytest.mark.slow
def test_train_export_round_trip(tiny_run) -> None:
    import onnx
    import onnxruntime as ort

    from export.onnx_export import io_mismatches, read_card

    cfg, result = tiny_run
    model = onnx.load(str(result.onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    card = ModelCard.from_json(meta[METADATA_KEY])
    assert card == result.card == read_card(result.onnx_path)
    assert io_mismatches(model, card) == []

    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == card.input.name == "image" and out.name == card.output.name == "mask"
    assert tuple(inp.shape) == card.input.shape(1) == (1, 64, 64, 1)
    assert tuple(out.shape) == (1, 64, 64, len(card.classes))

    assert card.export.opset <= 18 and card.export.tensorflow and card.export.tf2onnx and card.export.onnx
    assert card.export.parity["max_abs_diff"] < 1e-4
    assert card.export.parity["mask_agreement"] > 0.999
    assert model.ir_version <= 10
    # Keras' transposed convolutions export with symmetric pads + Slice: the CUDA provider runs them
    assert _asymmetric_conv_transposes(model) == []
    assert any(n.op_type == "ConvTranspose" for n in model.graph.node)

    t = card.training
    assert t.epochs == 1 and t.seed == 3 and t.seconds is not None and t.seconds > 0
    assert {"val_iou", "train_iou"} <= set(t.figures) and 0.0 <= t.figures["val_iou"] <= 1.0
    assert "by group" in t.split and t.command.startswith("python -m export.train ")

    sample = next(iter(sorted((cfg.data_dir / "Scratch").glob("*.jpg"))), None) or next(cfg.data_dir.rglob("*.jpg"))
    x, _ = preprocess(read_image(sample), card)
    (prob,) = session.run(["mask"], {"image": x[None]})
    assert prob.shape == (1, 64, 64, 1) and 0.0 <= prob.min() and prob.max() <= 1.0

    with (cfg.out_dir / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "loss", "iou", "val_loss", "val_iou", "seconds"] and len(rows) == 1
    assert (cfg.out_dir / "curves.png").stat().st_size > 0
    assert (cfg.out_dir / "best.weights.h5").is_file()


@pytest.mark.slow
def test_embed_card_checks_the_graph(tiny_run, tmp_path: Path) -> None:
    from export.onnx_export import embed_card_file, main, read_card

    _, result = tiny_run
    card2 = result.card.model_copy(update={"version": "2"})
    out = embed_card_file(result.onnx_path, card2, tmp_path / "v2.onnx")
    assert read_card(out).version == "2"
    wrong = ModelCard.model_validate({**result.card.model_dump(), "input": {**result.card.input.model_dump(),
                                                                           "height": 96}})
    with pytest.raises(ExportError, match=r"input 'image' has shape \[1, 64, 64, 1\], the card says"):
        embed_card_file(result.onnx_path, wrong, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    card_json = tmp_path / "card.json"
    card_json.write_text(card2.model_copy(update={"version": "3"}).to_json())
    assert main(["embed", str(out), str(card_json)]) == 0
    assert read_card(out).version == "3"


def _without_export(monkeypatch) -> None:
    """train() keeps its card as it goes into the ONNX conversion, and writes no file: for the
    tests of what training does (the conversion is tested with the runs that export)."""
    import export.onnx_export

    monkeypatch.setattr(export.onnx_export, "export_model", lambda model, card, path, parity, opset=None: card)


@pytest.mark.slow
def test_training_is_deterministic(tiny_run, tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace

    from export.train import train

    cfg, result = tiny_run
    _without_export(monkeypatch)
    again = train(replace(cfg, out_dir=tmp_path / "again"))
    assert again.history[0]["loss"] == result.history[0]["loss"]
    assert again.card.training.figures == result.card.training.figures


@pytest.mark.slow
def test_unet_shapes_momentum_and_local_weights(tmp_path: Path) -> None:
    import keras

    from export.unet import SKIP_LAYERS, build_unet

    model = build_unet((64, 96, 1), alpha=0.35)
    assert model.input.shape[1:] == (64, 96, 1) and model.output.shape[1:] == (64, 96, 1)
    assert model.get_layer("mask").activation.__name__ == "sigmoid"
    encoder = model.get_layer("encoder")
    assert [t.name for t in encoder.outputs] and len(encoder.outputs) == len(SKIP_LAYERS)
    bns = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.momentum == 0.9 for layer in bns)

    with pytest.raises(ExportError, match="multiples of 32"):
        build_unet((100, 64, 1))
    with pytest.raises(ExportError, match="--weights .*no such file"):
        build_unet((64, 64, 1), weights=tmp_path / "missing.h5")

    # A local 3-channel weights file with a gray input: the plane is repeated, weights load unchanged.
    base = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None)
    path = tmp_path / "mnv2.weights.h5"
    base.save_weights(path)
    gray = build_unet((64, 64, 1), weights=path)
    assert gray.input.shape[1:] == (64, 64, 1)
    loaded = gray.get_layer("encoder").get_layer("Conv1").get_weights()[0]
    assert loaded.shape[2] == 3 and np.array_equal(loaded, base.get_layer("Conv1").get_weights()[0])


@pytest.mark.slow
def test_pretrained_encoder_is_frozen_then_fine_tuned_on_all_data(tiny_run, tmp_path: Path, monkeypatch) -> None:
    """A local weights file (made here, never the shared one) loads into the encoder; the
    first --freeze-epochs leave it (BatchNorm statistics included) as loaded; the epochs
    after train it; --all-data trains on every image and validates on none."""
    from dataclasses import replace

    import keras

    from export.onnx_export import read_card
    from export.train import load_served, train

    cfg, _ = tiny_run
    keras.utils.set_random_seed(5)
    base = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None)
    weights = tmp_path / "imagenet-like.weights.h5"
    base.save_weights(weights)
    pretrained = {layer.name: layer.get_weights() for layer in base.layers if layer.get_weights()}

    def changed_layers(run_cfg) -> list[str]:
        """The encoder layers whose weights (BatchNorm statistics included) differ from the file's."""
        encoder = load_served(run_cfg, 1, 1, run_cfg.out_dir / "last.weights.h5").get_layer("encoder")
        names = {layer.name for layer in encoder.layers}  # the encoder ends at block_16_project
        return [name for name, values in pretrained.items() if name in names
                and not all(np.array_equal(a, b) for a, b in zip(encoder.get_layer(name).get_weights(), values))]

    frozen_cfg = replace(cfg, out_dir=tmp_path / "frozen", weights=weights, freeze_epochs=1, epochs=2, stop_after=1,
                         all_data=True, keep="last", crop=32, steps=2, val_fraction=0.25)
    with monkeypatch.context() as patch:
        _without_export(patch)
        frozen = train(frozen_cfg)
    assert changed_layers(frozen_cfg) == []
    t = frozen.card.training
    assert "val_iou" not in t.figures and t.split.startswith("all 16 images train")
    assert "--all-data --freeze-epochs 1 --finetune-lr 1" in t.command and "--weights" in t.command

    # The one command of a user with their own data: the pretrained recipe (here shrunk), a grouped
    # split, the threshold calibrated on the validation images under the escape budget, eval.json.
    from export.train import main

    run = tmp_path / "tuned"
    assert main([str(cfg.data_dir), "--out", str(run), "--weights", str(weights), "--groups",
                 str(cfg.groups), "--alpha", "0.35", "--size", "64", "64", "--crop", "32", "--steps", "2",
                 "--epochs", "2", "--freeze-epochs", "1", "--batch", "8", "--multiscale", "--eager",
                 "--val-fraction", "0.5", "--max-escape-rate", "0.5"]) == 0
    tuned_cfg = replace(frozen_cfg, out_dir=run, decoder_filters=(128, 64, 48, 32))  # the command line's
    assert len(changed_layers(tuned_cfg)) > 100
    report = json.loads((run / "eval.json").read_text())
    card = read_card(run / "model.onnx")
    assert card.output.threshold == report["chosen"]["threshold"]
    for key in ("escape_rate", "false_reject_rate", "image_recall"):
        value = report["pooled"][key]
        assert card.training.figures.get(f"val_{key}") == (None if value is None else round(value, 4))
    assert report["pooled"]["truly_defective"] + report["pooled"]["truly_pass"] == report["pooled"]["images"]
    assert report["pooled"]["images"] == len(json.loads((run / "split.json").read_text())["val"])
    assert "by group" in card.training.split and "eval.json" in card.training.evaluated_by

    with pytest.raises(ExportError, match="--freeze-epochs: only with --weights"):
        train(replace(frozen_cfg, weights=None))
    with pytest.raises(ExportError, match="--all-data: keeps the last epoch"):
        train(replace(frozen_cfg, keep="best"))


@pytest.mark.parametrize("module, trial", [("magnetic_tile", ["--epochs", "3"]), ("neu_det", ["--epochs", "3"])])
def test_a_trial_of_a_shipped_recipe_leaves_the_shipped_files(module, trial, tmp_path: Path, monkeypatch) -> None:
    """``train --epochs`` is a trial: its model stays in the run directory; only the
    recipe as it is replaces the shipped model (and its curves).
    (The TensorFlow run itself is replaced by one that writes a run directory's files.)"""
    import importlib
    from types import SimpleNamespace

    mod = importlib.import_module(f"export.{module}")
    cards = {}

    def fake_train(cfg):
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "split.json", "curves.png"):
            (cfg.out_dir / name).write_text(name)
        figures = {"val_iou": 0.5, "val_ap50": 0.5, "val_map": 0.25, "train_iou": 0.6}
        card = _card().model_copy(update={"training": TrainingInfo(data="d", command="python -m export.train x",
                                                                   figures=figures)})
        cards[cfg.out_dir] = cfg
        return SimpleNamespace(onnx_path=cfg.out_dir / "model.onnx", kept_epoch=3, seconds=1.0, card=card)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mod, "train", fake_train)
    run = tmp_path / "run"
    extra: list[str] = []
    if module == "magnetic_tile":  # the shipped U-Net takes its threshold from the cross-validation report
        monkeypatch.setattr(mod, "embed_card_file", lambda path, card: cards.__setitem__(path, card))
        data, weights, report = tmp_path / "data", tmp_path / "w.weights.h5", tmp_path / "cv.json"
        data.mkdir()
        (data / "tile_groups.json").write_text("{}")
        weights.write_text("w")
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "magnetic_tile.yaml").write_text("postprocess: {min_area_px: 32}\n")
        report.write_text(json.dumps({
            "chosen": {"threshold": 0.35, "min_area_px": 32}, "command": "python -m export.magnetic_tile cv",
            "config": "config/magnetic_tile.yaml", "max_escape_rate": 0.05, "per_fold": [{}, {}],
            "pooled": {"iou": 0.6, "agreement_pct": 95.0, "escape_rate": 0.05, "false_reject_rate": 0.02,
                       "images": 10, "escapes": 1, "false_rejects": 1},
            "fold_mean_sd": {"iou": {"mean": 0.6, "sd": 0.1}}}))
        extra = ["--data", str(data), "--weights", str(weights), "--cv-report", str(report)]
    assert mod.main(["train", "--run", str(run), *extra, *trial]) == 0
    assert (run / "model.onnx").is_file() and not mod.MODEL_PATH.exists()
    assert not mod.DOCS.exists()
    assert mod.main(["train", "--run", str(run), *extra]) == 0
    assert mod.MODEL_PATH.read_text() == "model.onnx"
    if module == "magnetic_tile":
        card = cards[run / "model.onnx"]
        assert card.output.threshold == 0.35 and card.training.figures["oof_escape_rate"] == 0.05
        assert card.training.figures["cv_iou_mean"] == 0.6 and "train_iou" in card.training.figures
        assert card.training.command.startswith("python -m export.magnetic_tile train")
    else:
        assert mod.SPLIT_PATH.read_text() == "split.json"


def _asymmetric_conv_transposes(model) -> list[str]:
    import onnx

    out = []
    for n in model.graph.node:
        pads = next((list(onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name == "pads"), [])
        if n.op_type == "ConvTranspose" and pads and pads[: len(pads) // 2] != pads[len(pads) // 2:]:
            out.append(n.name)
    return out


def _conv_transpose_model(pads: list[int], size: tuple[int, int] = (5, 7)):
    """image (1, 2, H, W) → ConvTranspose (3 out channels, kernel 3, stride 2) with ``pads`` → mask."""
    from onnx import TensorProto, helper, numpy_helper

    h, w = size
    oh, ow = 2 * (h - 1) + 3 - pads[0] - pads[2], 2 * (w - 1) + 3 - pads[1] - pads[3]
    weight = np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["image", "w"], ["mask"], name="up", kernel_shape=[3, 3],
                          strides=[2, 2], pads=pads)],
        "ct", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, h, w])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 3, oh, ow])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _down_up_file(path: Path, size: int = 8, seed: int = 2, activation: str = "none") -> None:
    """A U-Net's shape in two nodes, card embedded: Conv stride 2 → ConvTranspose stride 2 with
    Keras' 'same' pads [0, 0, 1, 1] → a (1, 1, size, size) mask."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx_builders import threshold_card

    from export.onnx_export import embed_card

    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "wd"], ["down"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["down", "wu"], ["mask"], name="up", kernel_shape=[3, 3], strides=[2, 2],
                          pads=[0, 0, 1, 1])],
        "down_up", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, size, size])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, size, size])],
        [numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "wd"),
         numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "wu")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    card = threshold_card(size, input={"name": "image", "layout": "NCHW", "height": size, "width": size,
                                       "channels": 1, "dtype": "float32", "colour": "gray"},
                          output={"type": "mask", "name": "mask", "threshold": 0.5, "layout": "NCHW",
                                  "activation": activation})
    embed_card(model, card)
    onnx.save(model, str(path))


@pytest.mark.parametrize("pads", [[0, 0, 1, 1], [1, 0, 0, 1], [1, 1, 2, 0]])
def test_asymmetric_conv_transpose_becomes_symmetric_with_the_same_outputs(pads) -> None:
    """The CUDA provider moves asymmetric-pad ConvTranspose to the CPU; the rewrite
    (no pads, then a Slice) must give the padded node's values exactly."""
    import onnx
    import onnxruntime as ort

    from export.onnx_export import symmetric_conv_transpose

    model = _conv_transpose_model(pads)
    src = model.SerializeToString()
    assert symmetric_conv_transpose(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert _asymmetric_conv_transposes(model) == [] and [n.op_type for n in model.graph.node] == ["ConvTranspose", "Slice"]
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)
    (want,) = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"image": x})
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-6)
    assert symmetric_conv_transpose(model) == 0  # idempotent


def test_unnamed_conv_transposes_get_distinct_slices() -> None:
    import onnx
    from onnx import helper

    from export.onnx_export import symmetric_conv_transpose

    model = _conv_transpose_model([0, 0, 1, 1])
    first = model.graph.node[0]
    first.name = ""
    second = helper.make_node("ConvTranspose", ["image", "w"], ["mask2"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[0, 0, 1, 1])
    model.graph.node.append(second)
    model.graph.output.append(helper.make_tensor_value_info("mask2", onnx.TensorProto.FLOAT, [1, 3, 10, 14]))
    assert symmetric_conv_transpose(model) == 2
    onnx.checker.check_model(model, full_check=True)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))


def test_symmetric_pads_command_rewrites_a_file_and_keeps_its_card(tmp_path: Path, caplog) -> None:
    from export.onnx_export import main, read_card

    src, out = tmp_path / "ct.onnx", tmp_path / "ct_gpu.onnx"
    _down_up_file(src)
    assert main(["symmetric-pads", str(src), "-o", str(out)]) == 0
    assert read_card(out) == read_card(src)
    import onnx

    assert _asymmetric_conv_transposes(onnx.load(str(out))) == []
    assert _asymmetric_conv_transposes(onnx.load(str(src))) == ["up"]  # -o leaves the source alone
    assert main(["symmetric-pads", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: cannot read" in caplog.text


@pytest.mark.parametrize("name", ["magnetic_tile_unet.onnx", "neu_det_detector.onnx"])
def test_shipped_models_have_no_asymmetric_conv_transpose(name: str) -> None:
    """Every node of the shipped models can run on ONNX Runtime's CUDA provider's ConvTranspose."""
    import onnx

    assert _asymmetric_conv_transposes(onnx.load(str(Path(__file__).resolve().parents[1] / "models" / name))) == []


def test_average_joins_members_into_one_graph_whose_mask_is_their_mean(tmp_path: Path) -> None:
    """An ensemble runs as one model: one input, one card, the members' mean probability
    (a member giving logits gets its sigmoid first)."""
    import onnxruntime as ort

    from export.onnx_export import main, read_card

    a, b, c, out = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx", tmp_path / "avg.onnx"
    _down_up_file(a, seed=2)
    _down_up_file(b, seed=3)
    _down_up_file(c, seed=4, activation="sigmoid")
    assert main(["average", str(a), str(b), str(c), "-o", str(out)]) == 0
    x = np.random.default_rng(5).standard_normal((1, 1, 8, 8)).astype(np.float32)

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["mask"], {"image": x})[0]

    logits = run(c)
    want = (run(a) + run(b) + 1 / (1 + np.exp(-logits))) / 3
    assert np.allclose(run(out), want, atol=1e-6)
    card = read_card(out)
    assert card.output.activation == "none" and card.input == read_card(a).input
    assert "mean probability of 3 models" in card.description
    # a card given for the result must say the mask holds probabilities
    logits_card = tmp_path / "card.json"
    logits_card.write_text(read_card(c).to_json())
    assert main(["average", str(a), str(b), "--card", str(logits_card), "-o", str(tmp_path / "bad.onnx")]) == 2
    assert not (tmp_path / "bad.onnx").exists()
    named = read_card(c).model_copy(update={"name": "tiles-ensemble", "output": read_card(a).output})
    logits_card.write_text(named.to_json())
    assert main(["average", str(a), str(b), "--card", str(logits_card), "-o", str(out)]) == 0
    assert read_card(out).name == "tiles-ensemble"


def test_average_refuses_members_that_do_not_share_an_input(tmp_path: Path, caplog) -> None:
    from export.onnx_export import main

    a, b = tmp_path / "a.onnx", tmp_path / "b16.onnx"
    _down_up_file(a)
    _down_up_file(b, size=16)
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "avg.onnx")]) == 2
    assert "member 2" in caplog.text and "input or preprocessing differs" in caplog.text
    assert main(["average", str(a), "-o", str(tmp_path / "one.onnx")]) == 2
    assert "two models or more" in caplog.text
    import onnx
    from onnx import helper

    looped = onnx.load(str(a))  # a graph attribute (an If's branches) makes control flow
    body = helper.make_graph([], "branch", [], [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, None)])
    looped.graph.node.append(helper.make_node("If", ["image"], ["unused"], then_branch=body, else_branch=body))
    onnx.save(looped, str(tmp_path / "if.onnx"))
    assert main(["average", str(a), str(tmp_path / "if.onnx"), "-o", str(tmp_path / "avg.onnx")]) == 2
    assert "member 2" in caplog.text and "control flow" in caplog.text
    detector = Path(__file__).resolve().parents[1] / "models" / "neu_det_detector.onnx"
    assert main(["average", str(detector), str(detector), "-o", str(tmp_path / "det.onnx")]) == 2
    assert "only segmentation models" in caplog.text
    assert not any(tmp_path.glob("avg.onnx*")) and not (tmp_path / "det.onnx").exists()


@pytest.mark.slow
def test_average_of_an_exported_unet_with_itself_is_that_unet(tiny_run, tmp_path: Path) -> None:
    """The prefixing keeps a real tf2onnx graph intact: the mean of a model and itself is the model."""
    import onnxruntime as ort

    from export.onnx_export import average_files

    _, result = tiny_run
    out = average_files([result.onnx_path, result.onnx_path], tmp_path / "twice.onnx")
    x = np.random.default_rng(0).random((1, 64, 64, 1), dtype=np.float32)
    (one,) = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    (two,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert np.allclose(one, two, atol=1e-6)
