"""Strict config: every error names file, line and field."""

from __future__ import annotations

import pytest

from station.config import DEFAULT_CONFIG, MOVED_TO_TUNING, TuningConfig, load_config, parse_config
from station.errors import ConfigError


def test_bundled_default_loads():
    cfg = load_config(None)
    assert cfg.grading.total_area_pct.discount == 0.5
    assert cfg.grading.total_area_pct.reject == 2.0
    assert load_config(DEFAULT_CONFIG) == cfg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("station:\n  id: a\n  camera: 1\n", "x.yaml:3: station.camera: unknown key"),
        ("cameras: {}\n", "x.yaml:1: cameras: unknown key"),
        ("grading:\n  total_area_pct:\n    discount: 3\n    reject: 2\n", "x.yaml:2: grading.total_area_pct: Value error, discount (3.0) must not exceed reject (2.0)"),
        ("grading:\n  classes:\n    crack:\n      count: {discount: -1}\n", "x.yaml:4: grading.classes.crack.count.discount: Input should be greater than or equal to 0"),
        ("inference:\n  providers: [cuda, gpu]\n", "x.yaml:2: inference.providers.1: Input should be 'tensorrt', 'cuda' or 'cpu'"),
        ("postprocess:\n  min_area_px: many\n", "x.yaml:2: postprocess.min_area_px: Input should be a valid integer"),
        ("tuning:\n  realtime_inference: 100\n", "x.yaml:2: tuning.realtime_inference: Input should be less than or equal to 99"),
        ("station: {id: a}\nstation: {id: b}\n", "x.yaml:2: station: duplicate key (first at line 1)"),
        ("grading: [\n", "x.yaml:2: invalid YAML"),
        ("- a\n- b\n", "x.yaml:1: (top level): expected a mapping"),
        # a list of segmentation models (tests/test_ensemble.py), its pins, the mean's threshold
        ("models:\n  segmentation: [a.onnx, b.onnx]\n  segmentation_sha256: " + "a" * 64 + "\n",
         "x.yaml:1: models: Value error, segmentation_sha256 must be one hash for one file, a list of hashes for a list"),
        ("models:\n  segmentation: [a.onnx, b.onnx]\n  segmentation_sha256: [" + "a" * 64 + "]\n",
         "x.yaml:1: models: Value error, segmentation_sha256 lists 1 hash(es) for 2 segmentation file(s)"),
        ("models:\n  segmentation: [a.onnx, b.onnx]\n  segmentation_sha256: [" + "a" * 64 + ", xyz]\n",
         "x.yaml:3: models.segmentation_sha256: Value error, 'xyz' is not a sha256"),
        ("models:\n  segmentation: []\n", "x.yaml:2: models.segmentation: Value error, an empty list"),
        ("models:\n  segmentation: [a.onnx, a.onnx]\n", "x.yaml:2: models.segmentation: Value error, a file is listed twice"),
        ("postprocess:\n  mask_threshold: 1.0\n", "x.yaml:2: postprocess.mask_threshold: Input should be less than 1"),
        # what `run` would refuse, refused by check-config too: a station id that cannot be a topic level
        ("mqtt: {host: 127.0.0.1}\nstation:\n  id: 'cam#1'\n", "x.yaml:3: station.id: 'cam#1' cannot be an MQTT topic"),
        ("station: {id: a/b}\nmqtt: {host: 127.0.0.1}\n", "x.yaml:1: station.id: 'a/b' cannot be an MQTT topic"),
        # nested aliases ("billion laughs"): refused before anything expands them
        ("".join(f"{k}: &{k} [" + ", ".join([f"*{p}"] * 9 if p else ["x"] * 9) + "]\n"
                 for p, k in zip([None, "a", "b", "c", "d", "e", "f"], "abcdefg")),
         "x.yaml:1: more than 20000 values once YAML aliases are expanded"),
        ("station: {id: " + "x" * (1 << 20) + "}\n", "x.yaml: 1048592 characters: a config is at most 1048576"),
    ],
)
def test_errors_name_file_line_field(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.yaml")
    assert str(info.value).startswith(expected), str(info.value)


def test_a_station_id_with_a_topic_prefix_may_hold_any_character():
    cfg = parse_config("station: {id: 'cam#1'}\nmqtt: {host: 127.0.0.1, topic_prefix: plant/line1/cam1}\n", "x.yaml")
    assert cfg.station.id == "cam#1"


def test_an_alias_bomb_or_a_huge_file_is_refused_at_once(tmp_path):
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("".join(f"{k}: &{k} [" + ", ".join([f"*{p}"] * 9 if p else ["lol"] * 9) + "]\n"
                            for p, k in zip([None, *"abcdefgh"], "abcdefghi")))
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (2 << 20))
    for path, message in ((bomb, "aliases are expanded"), (huge, "2097152 bytes: a config is at most")):
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        assert time.perf_counter() - t0 < 1.0


def test_every_error_is_reported():
    text = "station:\n  idd: a\npostprocess:\n  min_area_px: -1\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.yaml")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("x.yaml:2: station.idd: unknown key")
    assert lines[1].startswith("x.yaml:4: postprocess.min_area_px:")


def test_model_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "station.yaml"
    path.write_text("models:\n  segmentation: ../models/seg.onnx\n  detection: /abs/det.onnx\n")
    cfg = load_config(path)
    assert cfg.models.segmentation == tmp_path / "conf" / ".." / "models" / "seg.onnx"
    assert str(cfg.models.detection) == "/abs/det.onnx"


def test_unreadable_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((DEFAULT_CONFIG.parents[2] / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path):
    cfg = load_config(path)
    assert cfg.station.id


def test_check_config_names_file_line_field(tmp_path, capsys):
    from station.cli import main

    bad = tmp_path / "station.yaml"
    bad.write_text("station: {id: cam1}\ncamera:\n  type: folder\n  path: /x\n  after: shred\n")
    assert main(["check-config", "--no-models", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:5: camera.after: Input should be 'delete', 'move' or 'keep'" in err


def test_check_config_takes_the_file_as_run_does_or_alone(tmp_path, capsys):
    from station.cli import main

    good = tmp_path / "station.yaml"
    good.write_text("station: {id: cam1}\ncamera: {type: fake}\n")
    assert main(["check-config", "--no-models", "-c", str(good)]) == 0
    assert main(["check-config", "--no-models", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: OK\n{good}: OK\n"
    for argv in (["check-config"], ["check-config", "-c", str(good), str(good)]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2


@pytest.mark.parametrize("value", [-21, 20])
def test_an_infer_nice_outside_the_nice_range_is_refused(value):
    """tuning.infer_nice is a nice value: -20 to 19; outside, the error names the field."""
    with pytest.raises(ConfigError, match=r"tuning\.infer_nice"):
        parse_config(f"tuning: {{infer_nice: {value}}}\n")
    assert parse_config("tuning: {infer_nice: -20}\n").tuning.infer_nice == -20


def test_tuning_is_off_unless_asked():
    """Every scheduling knob but parallel_models is off unless asked (docs/tuning.md)."""
    assert parse_config("station: {id: a}\n").tuning == TuningConfig(
        parallel_models=True, intra_op_threads=0, spin=False, helper_yield_ms=0, nice_non_inference=0,
        realtime_inference=0, infer_cpu=None, infer_nice=None, steady_malloc=False)


@pytest.mark.parametrize(("section", "key"), [(s, k) for s, keys in MOVED_TO_TUNING.items() for k in keys])
def test_a_knob_left_in_its_old_section_names_its_new_key(section, key):
    with pytest.raises(ConfigError) as err:
        parse_config(f"station: {{id: a}}\n{section}:\n  {key}: 1\n", "x.yaml")
    assert str(err.value) == f"x.yaml:3: {section}.{key} moved: use tuning.{key}"


def test_every_moved_knob_is_named_with_its_line():
    with pytest.raises(ConfigError) as err:
        parse_config("run:\n  infer_cpu: 0\n  queue_size: 2\ninference: {spin: true}\n", "x.yaml")
    assert str(err.value) == ("x.yaml:2: run.infer_cpu moved: use tuning.infer_cpu\n"
                              "x.yaml:4: inference.spin moved: use tuning.spin")
