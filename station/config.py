"""Strict, frozen configuration. Unknown keys are errors; every error names the
file, the line and the field. Validation does no I/O: paths are resolved
relative to the config file's folder but not opened here.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import MAX_PIXELS
from .errors import ConfigError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CONFIG = ASSETS / "default.yaml"
DEMO_MODEL = ASSETS / "demo_seg.onnx"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Reconnecting(_Strict):
    """A section with a reconnect backoff (``reconnect_min_s`` … ``reconnect_max_s``, fields of its own)."""

    @model_validator(mode="after")
    def _backoff_ordered(self) -> Self:
        low, high = getattr(self, "reconnect_min_s"), getattr(self, "reconnect_max_s")  # noqa: B009 - fields of the subclasses
        if low > high:
            raise ValueError(f"reconnect_min_s ({low}) must not exceed reconnect_max_s ({high})")
        return self


class StationInfo(_Strict):
    id: str = Field("station-1", min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
                    description="station identifier, in every result (printable text, at most 128 characters)")


_SHA256 = r"^[0-9a-fA-F]{64}$"


class ModelsConfig(_Strict):
    segmentation: Path | list[Path] | None = Field(
        None, description="segmentation ONNX file, or a list of them whose probabilities are averaged at source "
        "resolution (relative to this file)"
    )
    detection: Path | None = Field(None, description="detection ONNX file (relative to this file)")
    segmentation_sha256: str | list[str] | None = Field(
        None, description="pin: sha256 (hex) the segmentation file must have, or one per file of a list; "
        "another file is refused"
    )
    detection_sha256: str | None = Field(
        None, pattern=_SHA256, description="pin: sha256 (hex) the detection file must have; another file is refused"
    )

    @field_validator("segmentation", mode="after")
    @classmethod
    def _some_files(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list: name at least one file, or null for none")
            if len(set(value)) != len(value):
                raise ValueError("a file is listed twice")
        return value

    @field_validator("segmentation_sha256", "detection_sha256", mode="before")
    @classmethod
    def _hex_text(cls, value: Any) -> Any:
        def one(v: Any) -> Any:
            # YAML reads an all-digit hash (or one like 12e45…) as a number, losing digits.
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                raise ValueError("YAML read this hash as a number: put it in quotes")
            if isinstance(v, str) and not re.fullmatch(_SHA256, v):
                raise ValueError(f"{v!r} is not a sha256: 64 hex digits expected")
            return v.lower() if isinstance(v, str) else v

        return [one(v) for v in value] if isinstance(value, list) else one(value)

    @model_validator(mode="after")
    def _pin_needs_a_file(self) -> "ModelsConfig":
        for role in ("segmentation", "detection"):
            if getattr(self, f"{role}_sha256") is not None and getattr(self, role) is None:
                raise ValueError(f"{role}_sha256 pins a model but {role} names no file")
        pins, files = self.segmentation_sha256, self.segmentation
        if pins is not None and isinstance(pins, list) != isinstance(files, list):
            raise ValueError("segmentation_sha256 must be one hash for one file, a list of hashes for a list of files")
        if isinstance(pins, list) and isinstance(files, list) and len(pins) != len(files):  # both lists: checked above
            raise ValueError(f"segmentation_sha256 lists {len(pins)} hash(es) for {len(files)} segmentation file(s)")
        return self

    @property
    def segmentation_files(self) -> list[Path]:
        """The segmentation files, one or several, in order (empty without any)."""
        seg = self.segmentation
        return [] if seg is None else (list(seg) if isinstance(seg, list) else [seg])

    @property
    def segmentation_pins(self) -> list[str | None]:
        """The pinned sha256 of each of :attr:`segmentation_files` (None: not pinned)."""
        pins = self.segmentation_sha256
        return list(pins) if isinstance(pins, list) else [pins] * len(self.segmentation_files)


Provider = Literal["tensorrt", "cuda", "cpu"]


def _default_providers() -> list[Provider]:
    # a typed function, not a lambda: mypy reads a lambda's ["cuda", "cpu"] as list[str]
    return ["cuda", "cpu"]


class TensorRTConfig(_Strict):
    """TensorRT execution provider options (used when ``tensorrt`` is in providers)."""

    fp16: bool = Field(True, description="let TensorRT run layers in FP16")
    engine_cache: Path | None = Field(
        None, description="folder for built engines (minutes to build; reused across starts); null = no cache"
    )
    workspace_mb: int = Field(2048, ge=64, description="TensorRT builder workspace, MiB")


class InferenceConfig(_Strict):
    providers: list[Provider] = Field(
        default_factory=_default_providers,
        min_length=1,
        description="execution providers in order of preference; those not available are skipped",
    )
    device_id: int = Field(0, ge=0, description="GPU used by the CUDA and TensorRT providers")
    io_binding: bool = Field(
        True, description="on a GPU: bind fixed-shape input buffers on the device instead of copying per call"
    )
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig, description="TensorRT provider options")

    @model_validator(mode="after")
    def _unique(self) -> "InferenceConfig":
        if len(set(self.providers)) != len(self.providers):
            raise ValueError("providers are listed twice")
        return self


class PostprocessConfig(_Strict):
    min_area_px: int = Field(16, ge=0, description="segmentation regions smaller than this (source pixels) are dropped")
    min_score: float = Field(0.0, ge=0, le=1, description="defects with a lower score are dropped")
    mask_threshold: float | None = Field(
        None, gt=0, lt=1, description="segmentation probability above which a pixel is a defect (of the mean "
        "probability with several segmentation models); default: the card's output.threshold, or the mean of "
        "the cards' with several models"
    )


class Thresholds(_Strict):
    """A value above ``discount`` grades at least DISCOUNT, above ``reject`` REJECT. Null disables a level."""

    discount: float | None = Field(None, ge=0)
    reject: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Thresholds":
        if self.discount is not None and self.reject is not None and self.discount > self.reject:
            raise ValueError(f"discount ({self.discount}) must not exceed reject ({self.reject})")
        return self


class ClassRule(_Strict):
    total_area_pct: Thresholds | None = Field(None, description="summed area of this class, % of the frame")
    defect_area_pct: Thresholds | None = Field(None, description="area of any one defect of this class, % of the frame")
    count: Thresholds | None = Field(None, description="number of defects of this class")


class GradingConfig(_Strict):
    total_area_pct: Thresholds = Field(
        default_factory=lambda: Thresholds(discount=0.5, reject=2.0),
        description="total defective area, % of the frame",
    )
    defect_area_pct: Thresholds | None = Field(None, description="area of any one defect, % of the frame")
    classes: dict[str, ClassRule] = Field(default_factory=dict, description="rules per class name")


# --- the line daemon: camera, trigger, queue -------------------------------------------


class InputLimits(_Strict):
    """What one image file may cost, checked before it is decoded: its size from
    ``stat``, its pixels and decoded bytes from its header. A file over a limit
    gets an error record naming the limit; nothing is allocated for it.

    The defaults admit a 100-megapixel 8-bit colour frame (or a 16-bit gray
    one); decoding an input then costs at most the declared array and the
    frame made of it, which keeps any single input well under 1.5 GB."""

    max_file_bytes: int = Field(
        320 * 2**20, ge=1, description="largest file read, in bytes (an uncompressed 100 MP colour frame fits)"
    )
    max_pixels: int = Field(
        MAX_PIXELS, ge=1, le=MAX_PIXELS, description=f"largest width x height declared by a header (at most {MAX_PIXELS})"
    )
    max_decoded_bytes: int = Field(
        300_000_000, ge=1,
        description="largest width x height x channels x bytes per sample declared by a header: the array the "
                    "decoder allocates (300 MB: 100 MP at 8-bit colour, or 16-bit gray)",
    )


class FolderCamera(_Strict):
    """Watch a folder for image files written by a vendor camera SDK.

    Write each file under a temporary name (a name starting with ``.``, or an
    extension not taken, e.g. ``part17.png.tmp``) and rename it when complete:
    a rename is atomic, so the file appears whole. A file written in place is
    taken once its size and modification time have been seen unchanged for
    ``settle_s`` (a writer that pauses longer than that defeats this).
    A file that cannot be inspected gets its error record and is moved to
    ``rejected_to``: it is never taken again, after a restart either."""

    type: Literal["folder"]
    path: Path = Field(description="the watched folder")
    after: Literal["delete", "move", "keep"] = Field(
        "delete", description="what happens to a file once its result is stored"
    )
    move_to: Path | None = Field(None, description="folder for processed files when after: move")
    rejected_to: Path | None = Field(
        None,
        description="folder for files that cannot be inspected (unreadable, undecodable, over a limit), moved there "
                    "once their error record is stored, whatever `after` says; null = the `rejected` subfolder of "
                    "path, made when the first file is rejected",
    )
    extensions: list[str] | None = Field(None, description="file extensions to take, e.g. ['.png']; null = all image types")
    poll_interval_s: float = Field(0.05, gt=0, le=10, description="how often the folder is listed when idle")
    settle_s: float = Field(
        0.2, ge=0, le=60,
        description="a file is taken once its size and modification time have been seen unchanged for this long "
                    "(names starting with '.' are never taken: write there, then rename)",
    )
    limits: InputLimits = Field(
        default_factory=InputLimits,
        description="size limits of one image file, checked before decoding (also applied by `station replay`)",
    )

    @model_validator(mode="after")
    def _move_needs_target(self) -> "FolderCamera":
        if self.after == "move" and self.move_to is None:
            raise ValueError("after: move needs move_to")
        return self


class VideoCamera(_Strict):
    """A video file played as the line camera."""

    type: Literal["video"]
    path: Path = Field(description="video file")
    loop: bool = Field(False, description="start again at the end (otherwise the daemon stops at the end)")
    realtime: bool = Field(False, description="pace frames at the video's frame rate")


class OpenCVCamera(_Strict):
    """A camera opened by OpenCV: V4L2 device index, RTSP/HTTP URL or GStreamer pipeline."""

    type: Literal["opencv"]
    device: int | str = Field(description="device index (0 = /dev/video0), URL, or GStreamer pipeline ending in appsink")
    backend: Literal["any", "v4l2", "gstreamer", "ffmpeg"] = Field("any", description="OpenCV capture backend")
    width: int | None = Field(None, ge=1, description="requested frame width")
    height: int | None = Field(None, ge=1, description="requested frame height")
    fps: float | None = Field(None, gt=0, description="requested frame rate")


class FakeCamera(_Strict):
    """Synthetic light-guide plates: a camera for demos, tests and benchmarks.
    ``fail_after_frames`` simulates a camera that is lost after that many
    frames and comes back after ``fail_for_s``."""

    type: Literal["fake"]
    fps: float | None = Field(
        10.0, gt=0, le=100_000, description="frames per second; null = as fast as inspection takes them (never dropped)"
    )
    height: int = Field(256, ge=32, le=4096)
    width: int = Field(256, ge=32, le=4096)
    seed: int = Field(0, description="random seed of the plates")
    distinct: int | None = Field(
        None, ge=1, le=10_000, description="cycle through this many plates made at start (cheap frames); null = a new plate per frame"
    )
    frames: int | None = Field(None, ge=1, description="stop after this many frames (null = endless)")
    fail_after_frames: int | None = Field(None, ge=1, description="simulate losing the camera after this many frames")
    fail_for_s: float = Field(1.0, ge=0, description="how long a simulated loss lasts")


# The pixel formats the genicam camera converts (unpacked, little-endian): gray and
# 12/16-bit samples keep their top 8 bits; Bayer mosaics are demosaiced to BGR.
GenICamPixelFormat = Literal[
    "Mono8", "Mono10", "Mono12", "Mono14", "Mono16",
    "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8",
    "BayerRG10", "BayerGR10", "BayerGB10", "BayerBG10",
    "BayerRG12", "BayerGR12", "BayerGB12", "BayerBG12",
    "BayerRG16", "BayerGR16", "BayerGB16", "BayerBG16",
    "RGB8", "BGR8",
]
_GENICAM_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class GenICamCamera(_Strict):
    """A GigE Vision or USB3 Vision camera through Aravis (the ``genicam`` extra).

    The camera is chosen by ``serial`` or by ``device``; the features below are
    set in this order at every (re)open: pixel format, region, exposure, gain,
    frame rate, trigger, then ``features`` as written. A feature the camera
    lacks or refuses stops the open with an error naming it (the daemon
    retries with its backoff). Incomplete frames (lost packets) are counted
    and dropped; a camera that stops answering its heartbeat is reopened."""

    type: Literal["genicam"]
    serial: str | None = Field(
        None, min_length=1, max_length=256,
        description="the camera's serial number as discovery reports it (`arv-tool-0.8`, Debian package aravis-tools-cli, "
                    "lists the cameras found)",
    )
    device: str | None = Field(
        None, min_length=1, max_length=1024,
        description="instead of serial: an Aravis device id (`Vendor-Model-Serial`), the camera's IP address or host "
                    "name (GigE Vision, reached without discovery), or a USB3 Vision physical id",
    )
    pixel_format: GenICamPixelFormat | None = Field(
        None,
        description="the camera's PixelFormat; frames become uint8 gray (Mono: 10- to 16-bit samples keep their "
                    "top 8 bits) or BGR (Bayer demosaiced, RGB8, BGR8); null = the camera's current format, "
                    "which must be one of these",
    )
    width: int | None = Field(None, ge=1, le=65_535, description="region of interest width in pixels; null = as the camera is set")
    height: int | None = Field(None, ge=1, le=65_535, description="region of interest height in pixels; null = as the camera is set")
    offset_x: int | None = Field(None, ge=0, le=65_535, description="region of interest left edge (OffsetX); null = as the camera is set")
    offset_y: int | None = Field(None, ge=0, le=65_535, description="region of interest top edge (OffsetY); null = as the camera is set")
    exposure_us: float | None = Field(
        None, gt=0, description="exposure time in microseconds (auto exposure is switched off); null = as the camera is set"
    )
    gain: float | None = Field(
        None, description="gain in the camera's unit (dB on most; raw steps on older ones), auto gain switched off; "
                          "null = as the camera is set",
    )
    frame_rate: float | None = Field(
        None, gt=0, le=100_000, description="acquisition frame rate in Hz (AcquisitionFrameRate); null = as the camera is set"
    )
    trigger_mode: Literal["free-run", "software", "hardware"] = Field(
        "free-run",
        description="free-run: the camera streams at its frame rate; software: one frame per part the station's "
                    "trigger names (TriggerSoftware, needs trigger.type mqtt or plc); hardware: one frame per edge on "
                    "trigger_source",
    )
    trigger_source: str | None = Field(
        None, pattern=_GENICAM_NAME,
        description="hardware: the camera's TriggerSource for FrameStart, e.g. Line1 (needed with trigger_mode hardware)",
    )
    trigger_activation: str | None = Field(
        None, pattern=_GENICAM_NAME,
        description="hardware: TriggerActivation, e.g. RisingEdge or FallingEdge; null = the camera's (rising edge on most)",
    )
    trigger_timeout_s: float = Field(
        1.0, gt=0, le=60,
        description="software: a part's trigger is sent once the previous part's frame arrived (a camera that is "
                    "still exposing ignores a trigger), or after this long without it",
    )
    features: dict[Annotated[str, Field(pattern=_GENICAM_NAME)], bool | int | float | str] = Field(
        default_factory=dict,
        description="further GenICam features set last, in the order written, e.g. {BlackLevel: 4, "
                    "ReverseX: true, LineSelector: Line2, LineInverter: true}; a command is executed when its value "
                    "is true; quote enumeration entries YAML reads as booleans ('Off', 'On')",
    )
    buffers: int = Field(
        8, ge=2, le=1024, description="frame buffers queued to the stream: frames the camera can send ahead of capture"
    )

    @model_validator(mode="after")
    def _one_camera(self) -> "GenICamCamera":
        if (self.serial is None) == (self.device is None):
            raise ValueError("set exactly one of serial and device")
        return self

    @model_validator(mode="after")
    def _trigger_fields(self) -> "GenICamCamera":
        if self.trigger_mode == "hardware" and self.trigger_source is None:
            raise ValueError("trigger_mode hardware needs trigger_source (e.g. Line1)")
        if self.trigger_mode != "hardware" and (self.trigger_source or self.trigger_activation):
            raise ValueError(f"trigger_source and trigger_activation apply to trigger_mode hardware, not {self.trigger_mode}")
        return self


CameraConfig = Annotated[Union[FolderCamera, VideoCamera, OpenCVCamera, FakeCamera, GenICamCamera],
                         Field(discriminator="type")]


class TriggerConfig(_Strict):
    """Which frames become inspected parts.

    free-run: every frame (or every Nth, or at most ``max_fps``).
    mqtt: a message on ``<prefix>/trigger`` carries a part id; the next frame
    is inspected and tagged with it; no frame within ``timeout_s`` gives an
    error result for that part. Every trigger message yields one record: a
    graded result, or an error record naming why it made no part (invalid
    payload, overflow of ``max_pending``, timeout); retained messages are
    ignored (logged and counted) unless ``accept_retained``.
    plc: each rising edge of ``plc.nodes.part_present`` is a part, its id read
    from ``plc.nodes.part_present_id`` (else a counter); the parts wait for
    their frame as under mqtt (``timeout_s``, ``max_pending``).
    """

    type: Literal["free-run", "mqtt", "plc"] = "free-run"
    every_nth: int = Field(1, ge=1, description="free-run: inspect every Nth frame")
    max_fps: float | None = Field(None, gt=0, description="free-run: inspect at most this many frames per second")
    timeout_s: float = Field(2.0, gt=0, le=3600, description="mqtt: a part with no frame within this time gets an error result")
    max_pending: int = Field(
        16, ge=1, le=100_000,
        description="mqtt: parts waiting for a frame, at most (the parts between the trigger and the camera); a "
                    "trigger beyond reports the oldest one at once as an error record (trigger overflow, counted)",
    )
    max_part_id_chars: int = Field(
        256, ge=1, le=65_536, description="mqtt: a longer part id is refused with an error record"
    )
    accept_retained: bool = Field(
        False,
        description="mqtt: take a retained trigger message as a part; false: ignore it (logged and counted), "
                    "since the broker hands it over again at every connect",
    )


class RunConfig(_Reconnecting):
    """The daemon's own behaviour."""

    queue_size: int = Field(4, ge=1, le=1000, description="frames waiting for inspection, at most")
    overflow: Literal["drop_oldest", "drop_newest", "block"] = Field(
        "drop_oldest",
        description="camera frames when the queue is full (counted); triggered parts, folder files and unpaced videos always wait",
    )
    stats_interval_s: float = Field(10.0, gt=0, description="how often …/stats is published")
    reconnect_min_s: float = Field(0.5, gt=0, description="first camera reopen delay; doubles per failure")
    reconnect_max_s: float = Field(30.0, gt=0, description="camera reopen delay cap")
    stop_timeout_s: float = Field(10.0, gt=0, le=300, description="bound on a clean stop: finish parts, flush MQTT")
    stall_s: float = Field(10.0, gt=0, description="an inspection taking longer than this stops the watchdog pings")
    state_dir: Path | None = Field(None, description="outbox and archive root; default $STATE_DIRECTORY or --state-dir")
    include_mask: bool = Field(False, description="put the defect mask (PNG, base64) into each result payload")



class TuningConfig(_Strict):
    """How the station's threads share the CPU (station/priority.py, docs/tuning.md).

    The defaults are what won side by side on a 2-core host with the shipped
    models (docs/tuning.md): the two models of a frame at the same time, each on
    its share of the cores; otherwise ONNX Runtime's own threads, every thread at
    the process's priority on any CPU, glibc's allocator as it is. Each other knob
    helped on some host and cost on another: set one only where ``station bench``
    shows it helps on the line's machine.
    """

    parallel_models: bool = Field(
        True,
        description="run a frame's segmentation and detection models at the same time, each on a thread of its "
        "own; with intra_op_threads 0 each model gets (cores ÷ models) threads instead of all of them",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per operator; 0 = one per core")
    spin: bool = Field(
        False,
        description="let ONNX Runtime's idle threads spin: lowers latency a little, but takes CPU from the "
        "preprocessing and postprocessing threads that run beside inference",
    )
    helper_yield_ms: float = Field(
        0.0, ge=0, le=50,
        description="with parallel_models: a frame's second model waits up to this long before its run for the "
        "frames before it to be finished and acknowledged, so that their Python work and PUBACK run before it "
        "takes a core (it ends before the first model all the same when this is under their difference); 0: off",
    )
    nice_non_inference: int = Field(
        0, ge=0, le=19,
        description="nice increment of every thread but inference (capture, pre/postprocessing, outbox, MQTT), "
                    "so that the models keep the cores; 0: all threads at the process's priority",
    )
    realtime_inference: int = Field(
        0, ge=0, le=99,
        description="SCHED_FIFO priority of the threads that run the models, so that no other process of the "
                    "machine stretches a run (needs CAP_SYS_NICE or LimitRTPRIO=); 0: the ordinary policy",
    )
    infer_cpu: int | None = Field(
        None, ge=0, le=4095,
        description="a CPU given to the infer thread alone (the frame's first model, or every model in turn): "
                    "it runs there and every other thread of the station runs on the other CPUs; null: no pinning",
    )
    infer_nice: int | None = Field(
        None, ge=-20, le=19,
        description="nice value of the infer thread under the ordinary policy instead of SCHED_FIFO "
                    "(realtime_inference then applies to the other models' threads only); below 0 needs "
                    "CAP_SYS_NICE or LimitNICE=; null: as realtime_inference says",
    )
    steady_malloc: bool = Field(
        False,
        description="keep freed memory in the process (glibc mallopt: mmap threshold 32 MiB, trim threshold "
                    "128 MiB) so that each frame reuses the last one's buffers instead of mapping new pages "
                    "(station/memory.py); false: glibc's defaults",
    )


# The keys the tuning section took from the run and inference sections: a config that
# still sets one there is refused with the new key's name (parse_config).
MOVED_TO_TUNING: dict[str, tuple[str, ...]] = {
    "inference": ("parallel_models", "intra_op_threads", "spin", "helper_yield_ms"),
    "run": ("nice_non_inference", "realtime_inference", "infer_cpu", "infer_nice", "steady_malloc"),
}


# --- MQTT and the durable outbox ----------------------------------------------------
#
# No secret is ever part of the config: the MQTT password is read from a file or an
# environment variable when the publisher starts (station/publish.py), so a config
# can be logged or printed as it is. Files named here are not opened during
# validation; relative paths are made absolute by ``MqttConfig.with_base_dir``.

_TOPIC_LEVEL = r"^[^/+#\x00]+$"  # one MQTT topic level: no separator, no wildcard, no NUL


class MqttTlsConfig(_Strict):
    """TLS towards the broker (the section being present turns TLS on)."""

    ca_file: Path | None = Field(
        None, description="CA certificates (PEM) that signed the broker's certificate; null = the system store"
    )
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS; needs key_file")
    key_file: Path | None = Field(None, description="private key (PEM, unencrypted) of cert_file")
    insecure: bool = Field(
        False, description="do not check the broker's host name against its certificate (testing only)"
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> "MqttTlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class _PasswordSource(_Strict):
    """Where to find a password (publish.read_password reads it); never the password itself."""

    password_file: Path | None = Field(
        None, description="file holding the password (its first line); keep it mode 0600"
    )
    password_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the password"
    )


class MqttAuthConfig(_PasswordSource):
    """Username and where to find the password; the password is never written here."""

    username: str = Field(..., min_length=1, description="MQTT username")

    @model_validator(mode="after")
    def _one_password_source(self) -> "MqttAuthConfig":
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        return self


class MqttConfig(_Reconnecting):
    """The broker connection and the topic prefix.

    Topics are ``<prefix>/result`` (QoS 1), ``<prefix>/status`` (retained, Last
    Will "offline") and ``<prefix>/stats`` (QoS 0), where the prefix is
    ``topic_prefix`` or, by default, ISA-95 style
    ``<enterprise>/<site>/<area>/<line>/<station.id>``.
    """

    host: str = Field(..., min_length=1, description="broker host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="broker port; null = 8883 with tls, 1883 without")
    protocol: Literal["3.1.1", "5"] = Field("5", description='MQTT protocol version: "3.1.1" or "5"')
    client_id: str | None = Field(
        None, min_length=1, description="MQTT client id; null = station-<station.id>; unique per broker"
    )
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keep-alive interval, seconds")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="TCP/TLS connect and CONNACK timeout, seconds")
    reconnect_min_s: float = Field(1.0, gt=0, description="first reconnect delay, seconds; doubles per failed attempt")
    reconnect_max_s: float = Field(
        60.0, gt=0, description="reconnect delay cap, seconds; also the retry delay after refused credentials"
    )
    max_inflight: int = Field(
        100, ge=1, le=10_000,  # well below the 65535 packet ids, which paho hands out round-robin
        description="results sent and not yet acknowledged, at most (capped by the broker's Receive Maximum)",
    )
    enterprise: str = Field("enterprise", description="ISA-95 enterprise (first topic level)")
    site: str = Field("site", description="ISA-95 site")
    area: str = Field("area", description="ISA-95 area")
    line: str = Field("line", description="ISA-95 line")
    topic_prefix: str | None = Field(
        None, min_length=1, description="topic prefix replacing <enterprise>/<site>/<area>/<line>/<station.id>"
    )
    tls: MqttTlsConfig | None = Field(None, description="TLS settings; absent = plain TCP")
    auth: MqttAuthConfig | None = Field(None, description="username/password; absent = anonymous")
    persistent_session: bool = Field(
        False,
        description="keep the broker session across restarts (fixed client id; MQTT 3.1.1 clean_session false, "
                    "MQTT 5 clean_start false with session_expiry_s), so QoS 1 triggers sent while the station is "
                    "down are delivered when it is back; false: a clean session at every connect",
    )
    session_expiry_s: int = Field(
        86_400, ge=1, le=4_294_967_295,
        description="MQTT 5 with persistent_session: how long the broker keeps the session of a station that is "
                    "away, seconds (4294967295: for ever)",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an integer and `protocol: 3.1.1` as text.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("enterprise", "site", "area", "line")
    @classmethod
    def _one_level(cls, value: str) -> str:
        if not re.match(_TOPIC_LEVEL, value):
            raise ValueError(f"{value!r}: one topic level: non-empty, without '/', '+', '#' or NUL")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_levels(cls, value: str | None) -> str | None:
        if value is not None and not all(re.match(_TOPIC_LEVEL, level) for level in value.split("/")):
            raise ValueError(
                f"{value!r}: levels must be non-empty, without '+', '#' or NUL, and no leading or trailing '/'"
            )
        return value


    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (8883 if self.tls is not None else 1883)

    def with_base_dir(self, base_dir: Path) -> "MqttConfig":
        """Relative TLS and password file paths made absolute against ``base_dir`` (the config file's folder)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None or p.is_absolute() else base_dir / p

        update: dict[str, Any] = {}
        if self.tls is not None:
            tls_fix = {k: fix(getattr(self.tls, k)) for k in ("ca_file", "cert_file", "key_file")}
            update["tls"] = self.tls.model_copy(update={k: v for k, v in tls_fix.items() if v is not None})
        if self.auth is not None and fix(self.auth.password_file) is not None:
            update["auth"] = self.auth.model_copy(update={"password_file": fix(self.auth.password_file)})
        return self.model_copy(update=update)


OverflowPolicy = Literal["refuse_new", "drop_oldest"]


class OutboxConfig(_Strict):
    """The durable on-disk outbox (SQLite) that holds results until every output that
    confirms delivery (mqtt, plc, sparkplug) confirmed them; a row goes with the last.
    It bounds what all of them hold together: an output away for long fills it.

    When it is full, ``refuse_new`` (the default) refuses the new result with
    OutboxFull and raises the outbox alarm, so nothing already stored is lost
    and the caller knows at once; ``drop_oldest`` deletes the oldest results to
    make room and counts them (alarm raised too).
    """

    path: Path = Field(
        Path("outbox.sqlite3"),
        description="SQLite file; a relative path is relative to the state directory ($STATE_DIRECTORY under systemd)",
    )
    max_rows: int = Field(100_000, ge=1, description="results held at most")
    max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="payload bytes held at most (the file is somewhat larger)"
    )
    policy: OverflowPolicy = Field(
        "refuse_new", description="when full: refuse_new (raise OutboxFull) or drop_oldest (counted)"
    )
    synchronous: Literal["normal", "full"] = Field(
        "normal",
        description="SQLite synchronous mode: normal survives a daemon crash, full also a power cut (one fsync per write)",
    )
    checkpoint_s: float = Field(
        1.0, gt=0, le=3600,
        description="longest time between copies of the write-ahead log into the file, by a background thread of "
        "the daemon (not by the write of a result); at high rates the thread copies sooner, so that the log grows by "
        "at most 4 MiB in between, and starts it over (its file stays at most 16 MiB)",
    )


# --- the line PLC over OPC UA -------------------------------------------------------
#
# `plc` names the role (the line's PLC) and `type` the protocol, as `camera` does: a
# station talks to one PLC, and another protocol (S7, Modbus/TCP) would be one more
# variant of this section rather than one more top-level key. The password is never
# part of the config (read from a file or the environment when the writer starts,
# as for MQTT); certificate and key files are not opened during validation.

# An OPC UA NodeId in its text form: an optional namespace index, then a numeric (i=),
# string (s=), GUID (g=) or opaque base64 (b=) identifier, all on one line.
_NODE_ID = (r"^(ns=\d{1,5};)?(i=\d{1,10}|s=[^\x00-\x1f\x7f]{1,4096}"
            r"|g=[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}|b=[A-Za-z0-9+/]+={0,2})$")


class OpcUaNodes(_Strict):
    """The PLC variables, as OPC UA NodeIds in text form: ``ns=<namespace index>;s=<name>``
    (e.g. ``ns=2;s=Line3.Cam1.PartId``, or ``ns=3;s="DB_Cam1"."PartId"`` on a Siemens
    PLC), ``ns=<index>;i=<number>``, ``g=`` a GUID or ``b=`` base64; an OPC UA browser
    (UaExpert) shows them. The four of a part are written in one request."""

    part_id: str = Field(
        ..., pattern=_NODE_ID,
        description="String variable: the part id of each inspected part (empty text for a part without one)",
    )
    grade: str = Field(
        ..., pattern=_NODE_ID,
        description="integer variable of type grade_type: the grade code, 0 PASS, 1 DISCOUNT, 2 REJECT (error_code "
                    "for a part that could not be inspected)",
    )
    sequence: str = Field(
        ..., pattern=_NODE_ID,
        description="integer variable of type sequence_type: the result's sequence number; last in the write "
                    "request, so that a PLC that takes a part when it changes finds the part's other values written",
    )
    defect_area_pct: str = Field(
        ..., pattern=_NODE_ID,
        description="Double variable: the part's total defect area, % of the inspected surface (-1 for a part that "
                    "could not be inspected)",
    )
    heartbeat: str | None = Field(
        None, pattern=_NODE_ID,
        description="variable of type heartbeat_type written every heartbeat_s while connected (a counter, or a "
                    "toggled Boolean): the PLC's sign that the station is alive; null: none",
    )
    part_present: str | None = Field(
        None, pattern=_NODE_ID,
        description="Boolean variable the station subscribes to: each rising edge (false to true) is a part, "
                    "handed to the daemon's trigger; the value found at each connect is not an edge; null: none",
    )
    part_present_id: str | None = Field(
        None, pattern=_NODE_ID,
        description="String variable read at each rising edge of part_present: the part's id (the PLC writes it "
                    "before it sets part_present); null: such parts come without an id",
    )

    @model_validator(mode="after")
    def _distinct(self) -> "OpcUaNodes":
        named = [v for v in self.model_dump().values() if v is not None]
        if len(set(named)) != len(named):
            raise ValueError("a NodeId is named twice: each value needs a variable of its own")
        if self.part_present_id is not None and self.part_present is None:
            raise ValueError("part_present_id is read at the edges of part_present, which names no variable")
        return self


OpcUaPolicy = Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"]


class OpcUaSecurityConfig(_Strict):
    """Signed (Sign) or signed and encrypted (SignAndEncrypt) messages; the section being
    present turns security on, absent is security mode None. Each side trusts the other's
    application instance certificate: put ``certificate`` in the server's trusted list (on
    most PLCs: accept it once in the engineering tool), and the server's here."""

    mode: Literal["Sign", "SignAndEncrypt"] = Field(
        "SignAndEncrypt", description="message security mode of the endpoint used: Sign or SignAndEncrypt"
    )
    policy: OpcUaPolicy = Field("Basic256Sha256", description="security policy of the endpoint used")
    certificate: Path = Field(
        ..., description="the station's application instance certificate (DER or PEM, RSA); its SubjectAltName URI "
                         "is the application URI the station announces",
    )
    private_key: Path = Field(..., description="private key (PEM or DER, unencrypted) of certificate; keep it mode 0600")
    server_certificate: Path = Field(
        ..., description="the server's application instance certificate (DER or PEM), as exported from the PLC: the "
                         "one trusted; a server that presents another is refused",
    )


class OpcUaAuthConfig(_PasswordSource):
    """Username and where to find the password; the password is never written here."""

    username: str = Field(..., min_length=1, description="OPC UA user name (a UserName identity token)")

    @model_validator(mode="after")
    def _one_password_source(self) -> "OpcUaAuthConfig":
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("give one of password_file and password_env")
        return self


class OpcUaConfig(_Reconnecting):
    """The line PLC, reached as a client of its OPC UA server (the ``opcua`` extra).

    Each inspected part is written to the PLC as part id, grade code, sequence number
    and defect area, in one Write request; it counts as written only when the server
    answered Good for every variable. The parts come from the durable outbox, in
    order: a part not confirmed within ``write_timeout_s`` is reported (log,
    counters) and written again (and the parts after it wait), at once when the
    connection is back, after a backoff while the server refuses it; what was not
    confirmed at a stop is written after the restart. OPC UA has no transaction: a
    server that refuses one variable may have taken the others, which is why
    ``nodes.sequence`` goes last. While connected the station writes its heartbeat
    and follows ``nodes.part_present`` (a trigger with ``trigger.type: plc``); the
    connection is made again with capped exponential backoff when it is lost.
    """

    type: Literal["opcua"] = Field(description="the PLC protocol: opcua (the only one so far)")
    endpoint: str = Field(
        ..., pattern=r"^opc\.tcp://[^\s/?#]+(/\S*)?$", max_length=2048,
        description="the PLC's OPC UA server, e.g. opc.tcp://192.168.0.10:4840",
    )
    nodes: OpcUaNodes = Field(description="the PLC variables written and read")
    grade_type: Literal["Int16", "Int32"] = Field("Int16", description="data type of nodes.grade (INT: Int16, DINT: Int32)")
    sequence_type: Literal["UInt32", "Int64"] = Field(
        "UInt32", description="data type of nodes.sequence (UDINT: UInt32, wrapping to 0 after 4294967295; LINT: Int64)"
    )
    heartbeat_type: Literal["Boolean", "Int16", "Int32", "UInt32"] = Field(
        "UInt32", description="data type of nodes.heartbeat: Boolean is toggled at each beat; an integer counts 1, 2, "
                              "… and wraps to 0 after the type's largest value",
    )
    heartbeat_s: float = Field(1.0, gt=0, le=3600, description="time between two heartbeat writes, seconds")
    error_code: int | None = Field(
        2, ge=-32768, le=32767,
        description="grade code written for a part that could not be inspected (an error record), with defect area "
                    "-1: 2 rejects it, a code of its own (e.g. 3) lets the PLC tell it apart; null: such parts are "
                    "not written",
    )
    part_present_interval_ms: float = Field(
        10.0, ge=0, le=60_000,
        description="how often the server samples nodes.part_present and sends its changes, ms (0: as fast as it "
                    "can); a pulse shorter than this may be missed",
    )
    security: OpcUaSecurityConfig | None = Field(None, description="Sign / SignAndEncrypt; absent = security mode None")
    auth: OpcUaAuthConfig | None = Field(None, description="username/password; absent = anonymous")
    application_uri: str | None = Field(
        None, min_length=1, max_length=1024, pattern=r"^\S+$",
        description="the station's ApplicationUri; null: the URI in security.certificate, else urn:station:<station.id>",
    )
    request_timeout_s: float = Field(2.0, gt=0, le=120, description="an OPC UA request without a reply within this fails, seconds")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="connect, secure channel and session, seconds")
    write_timeout_s: float = Field(
        1.0, gt=0, le=60,
        description="how long one part's write may wait for the connection and the server's reply, seconds",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay, seconds; doubles per failed attempt")
    reconnect_max_s: float = Field(
        30.0, gt=0, description="reconnect delay cap, seconds; also the retry delay after refused credentials or "
                                "certificates, and the longest wait before a refused part is written again",
    )


    def with_base_dir(self, base_dir: Path) -> "OpcUaConfig":
        """Relative certificate, key and password file paths made absolute against ``base_dir``."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else base_dir / p

        update: dict[str, Any] = {}
        if self.security is not None:
            sec = self.security
            update["security"] = sec.model_copy(update={
                "certificate": fix(sec.certificate), "private_key": fix(sec.private_key),
                "server_certificate": fix(sec.server_certificate)})
        if self.auth is not None and self.auth.password_file is not None:
            update["auth"] = self.auth.model_copy(update={"password_file": fix(self.auth.password_file)})
        return self.model_copy(update=update)


# --- Sparkplug B to SCADA ------------------------------------------------------------
#
# A broker connection of its own (SCADA's broker is often not the MES one), with the
# `mqtt` section's TLS and auth models: the password is read when the node starts.


class SparkplugConfig(_Reconnecting):
    """The station as an edge node, its camera as a device (the ``sparkplug`` extra).

    The station is edge node ``edge_node_id`` of group ``group_id``, and its camera the
    device ``device_id``: ``spBv1.0/<group_id>/NBIRTH|NDEATH|NCMD/<edge_node_id>`` and
    ``spBv1.0/<group_id>/DBIRTH|DDATA|DDEATH|DCMD/<edge_node_id>/<device_id>``. Each
    connection announces the node (NBIRTH, with its ``bdSeq``) and the device (DBIRTH)
    and registers the NDEATH as its Last Will; each inspected part is one DDATA (QoS 0,
    as the specification requires); an NCMD ``Node Control/Rebirth`` repeats the births.
    """

    group_id: str = Field(
        ..., max_length=128, pattern=_TOPIC_LEVEL,
        description="Sparkplug group id: the group of edge nodes (a plant, a line), one topic level",
    )
    edge_node_id: str = Field(
        ..., max_length=128, pattern=_TOPIC_LEVEL,
        description="Sparkplug edge node id: this station, unique in its group, one topic level",
    )
    device_id: str | None = Field(
        None, max_length=128, pattern=_TOPIC_LEVEL,
        description="Sparkplug device id: the station's camera, one topic level; null = station.id",
    )
    host: str = Field(..., min_length=1, description="broker host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="broker port; null = 8883 with tls, 1883 without")
    protocol: Literal["3.1.1", "5"] = Field(
        "3.1.1", description='MQTT protocol version: "3.1.1" or "5" (Sparkplug 3.0 allows both; always a clean session)'
    )
    client_id: str | None = Field(
        None, min_length=1, max_length=256,
        description="MQTT client id; null = spb-<group_id>-<edge_node_id>; unique per broker",
    )
    keepalive_s: int = Field(
        30, ge=5, le=65535,
        description="MQTT keep-alive interval, seconds: the broker publishes the NDEATH about 1.5 times this after "
                    "the station vanished without closing its connection",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=120, description="TCP/TLS connect, CONNACK and SUBACK timeout, seconds"
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay, seconds; doubles per failed attempt")
    reconnect_max_s: float = Field(
        30.0, gt=0, description="reconnect delay cap, seconds; also the retry delay after refused credentials"
    )
    tls: MqttTlsConfig | None = Field(None, description="TLS settings, as in mqtt.tls; absent = plain TCP")
    auth: MqttAuthConfig | None = Field(None, description="username/password, as in mqtt.auth; absent = anonymous")
    state_file: Path = Field(
        Path("sparkplug.json"),
        description="where the bdSeq of the last connection is kept, so that it goes on increasing across restarts; "
                    "a relative path is relative to the state directory ($STATE_DIRECTORY under systemd)",
    )
    send_timeout_s: float = Field(
        2.0, gt=0, le=60,
        description="how long a batch of DDATA may wait for the broker to confirm it, seconds; parts not confirmed "
                    "stay in the outbox and are sent again, historical",
    )
    primary_host_id: str | None = Field(
        None, max_length=128, pattern=_TOPIC_LEVEL,
        description="the SCADA primary host application's id: births and parts wait until its STATE "
                    "(spBv1.0/STATE/<id>) says online, and a node whose host goes offline ends its session; "
                    "meanwhile parts wait in the outbox, sent historical later; null: no primary host",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an integer and `protocol: 3.1.1` as text.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (8883 if self.tls is not None else 1883)

    def with_base_dir(self, base_dir: Path) -> "SparkplugConfig":
        """Relative TLS and password file paths made absolute against ``base_dir`` (the config file's folder);
        ``state_file`` stays relative to the state directory."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None or p.is_absolute() else base_dir / p

        update: dict[str, Any] = {}
        if self.tls is not None:
            tls_fix = {k: fix(getattr(self.tls, k)) for k in ("ca_file", "cert_file", "key_file")}
            update["tls"] = self.tls.model_copy(update={k: v for k, v in tls_fix.items() if v is not None})
        if self.auth is not None and fix(self.auth.password_file) is not None:
            update["auth"] = self.auth.model_copy(update={"password_file": fix(self.auth.password_file)})
        return self.model_copy(update=update)


# StationConfig names MqttConfig and OutboxConfig, which are defined after it.


# --- archive and metrics -----------------------------------------------------------

ArchivePart = Literal["image", "mask", "overlay"]
ArchiveGrade = Literal["PASS", "DISCOUNT", "REJECT"]


def _default_archive_grades() -> list[ArchiveGrade]:
    return ["REJECT", "DISCOUNT"]


def _default_archive_parts() -> list[ArchivePart]:
    return ["image", "mask", "overlay"]


class ArchiveConfig(_Strict):
    """Which results are archived, what is written for each, and how long it is kept.

    ``path`` is not opened during validation; the daemon resolves a relative path
    against the state directory and passes the result to :class:`Archive`.
    """

    enabled: bool = Field(False, description="archive results on disk")
    path: Path = Field(
        Path("archive"),
        description="archive root folder; a relative path is relative to the state directory ($STATE_DIRECTORY under systemd)",
    )
    grades: list[ArchiveGrade] = Field(
        default_factory=_default_archive_grades,
        description="grades whose results are archived (PASS, DISCOUNT, REJECT)",
    )
    errors: bool = Field(False, description="also archive frames that could not be inspected (error records)")
    what: list[ArchivePart] = Field(
        default_factory=_default_archive_parts,
        description="files written per result besides the record JSON: image (source frame), mask (0/255 PNG, when the result has one), overlay",
    )
    max_age_days: float | None = Field(
        30.0, gt=0, description="entries captured longer ago than this are deleted; null = no age limit"
    )
    max_total_mb: float | None = Field(
        2048.0, gt=0, description="total size of the archive files, MiB; the oldest entries are deleted above it; null = no size limit"
    )
    fsync: bool = Field(
        False, description="flush each file to disk before renaming it into place: survives a power cut, costs a disk flush per file"
    )

    @model_validator(mode="after")
    def _unique(self) -> "ArchiveConfig":
        if len(set(self.grades)) != len(self.grades):
            raise ValueError("grades: a grade is listed twice")
        if len(set(self.what)) != len(self.what):
            raise ValueError("what: an item is listed twice")
        return self


class MetricsConfig(_Strict):
    """The Prometheus endpoint. Bound to loopback by default: expose it deliberately."""

    enabled: bool = Field(False, description="serve Prometheus metrics over HTTP at /metrics")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on; 0.0.0.0 or :: for every interface")
    port: int = Field(9108, ge=0, le=65535, description="TCP port to listen on; 0 = any free port (tests)")


# --- the operator's live page --------------------------------------------------------

SHIFT_START = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class ViewAuthConfig(_PasswordSource):
    """The operator view's secret: read from ``password_file`` or ``password_env`` when
    the daemon starts (never written in the config). A browser gives it as HTTP Basic
    auth (``username`` and the password), a script as ``Authorization: Bearer <it>``,
    and a panel's bookmark as ``?token=<it>`` once (then a cookie)."""

    username: str = Field("operator", min_length=1, description="user name of HTTP Basic auth")

    @model_validator(mode="after")
    def _exactly_one_password_source(self) -> "ViewAuthConfig":
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("give password_file or password_env (exactly one)")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost); no lookup."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


class OperatorViewConfig(_Strict):
    """The operator's live page (station/view/): the latest parts with their images,
    counts per grade for the shift and per hour, the shift's defect heatmap per
    class, camera / MQTT / outbox / sink health and the models in use, updated live.

    Served on loopback by default. Bound to any other address it needs ``auth``.
    """

    enabled: bool = Field(False, description="serve the live page (off by default)")
    host: str = Field(
        "127.0.0.1", min_length=1,
        description="address to listen on; any address but loopback (127.0.0.1, ::1) needs auth",
    )
    port: int = Field(8088, ge=0, le=65535, description="TCP port to listen on; 0 = any free port (tests)")
    auth: ViewAuthConfig | None = Field(
        None, validate_default=True,
        description="the secret a browser must give; required unless host is a loopback address",
    )
    latest: int = Field(8, ge=1, le=50, description="how many of the latest parts the page shows with their image")
    image_width: int = Field(480, ge=64, le=2048, description="width of the parts' images on the page, pixels")
    shifts: list[Annotated[str, Field(pattern=SHIFT_START)]] = Field(
        default_factory=lambda: ["06:00", "14:00", "22:00"], min_length=1, max_length=24,
        description="local times (HH:MM) at which shifts start: the shift's counts and heatmap start over",
    )
    max_clients: int = Field(8, ge=1, le=256, description="browsers served live at once; more get 503")

    @field_validator("auth")
    @classmethod
    def _auth_off_loopback(cls, value: ViewAuthConfig | None, info: ValidationInfo) -> ViewAuthConfig | None:
        host = info.data.get("host")
        if value is None and host is not None and not is_loopback(host):
            raise ValueError(f"required when host ({host}) is not a loopback address: anyone on the network "
                             "could watch the line; set auth.password_file or auth.password_env")
        return value

    @field_validator("shifts")
    @classmethod
    def _shifts_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a shift start is listed twice")
        return value


class StationConfig(_Strict):
    station: StationInfo = Field(default_factory=StationInfo)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    grading: GradingConfig = Field(default_factory=GradingConfig)
    mqtt: MqttConfig | None = Field(None, description="MQTT broker and topics; absent = no MQTT")
    outbox: OutboxConfig = Field(default_factory=lambda: OutboxConfig(),
                                 description="durable outbox for the results of mqtt, plc and sparkplug")
    camera: CameraConfig | None = Field(None, description="frame source of `station run`")
    trigger: TriggerConfig = Field(default_factory=TriggerConfig, description="which frames are inspected")
    run: RunConfig = Field(default_factory=RunConfig, description="daemon queue, timing and state directory")
    tuning: TuningConfig = Field(
        default_factory=TuningConfig, description="scheduling knobs (threads, priorities, CPUs); off by default"
    )
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig, description="images, masks and overlays kept on disk")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint")
    plc: OpcUaConfig | None = Field(
        None, description="the line PLC: results written to its variables, its part-present signal a trigger; "
        "absent = no PLC"
    )
    sparkplug: SparkplugConfig | None = Field(
        None, description="Sparkplug B edge node for SCADA: births, a DDATA per part; absent = no Sparkplug"
    )
    operator_view: OperatorViewConfig = Field(
        default_factory=OperatorViewConfig, description="the operator's live page (off by default)"
    )


# --- loading with file/line/field errors -----------------------------------------


def _index_lines(node: yaml.Node, path: tuple, out: dict[tuple, int], where: str) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in path + (key,))
                raise ConfigError(f"{where}:{line}: {dotted}: duplicate key (first at line {seen[key]})")
            seen[key] = line
            _index_lines(value_node, path + (key,), out, where)
            out[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), out, where)


def _locate(loc: tuple, lines: dict[tuple, int], data: Any) -> tuple[tuple, int | None]:
    """Map a pydantic error location onto the YAML: (the field path as written,
    the line). Tagged-union tags (``camera.folder.path``) are not in the YAML
    and are skipped; a missing field keeps its name and the line of its parent."""
    path: tuple = ()
    node = data
    rest = list(loc)
    while rest:
        head = rest.pop(0)
        if isinstance(node, dict) and node.get("type") == head and head not in node:
            continue  # a tagged-union tag: `type: <head>` in the YAML
        if path + (head,) in lines:
            path += (head,)
            node = node[head] if isinstance(node, (dict, list)) else None
        else:
            return path + (head, *rest), lines.get(path, lines.get(()))
    return path, lines.get(path)


def format_validation_error(exc: ValidationError, where: str, lines: dict[tuple, int], data: Any = None) -> str:
    msgs = []
    for err in exc.errors():
        path, line = _locate(tuple(err["loc"]), lines, data)
        field = ".".join(str(p) for p in path) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        prefix = f"{where}:{line}" if line else where
        msgs.append(f"{prefix}: {field}: {msg}")
    return "\n".join(msgs)


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a larger file is a mistake or an attack
MAX_CONFIG_VALUES = 20_000  # keys, values and list items, aliases counted each time they are used


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    """Refuse a document whose values, with every alias expanded, exceed MAX_CONFIG_VALUES
    (nested aliases — "billion laughs" — expand exponentially in whatever walks them).
    Stops counting at the limit, so it costs at most that many steps."""
    stack, count = [root], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: more than {MAX_CONFIG_VALUES} values once YAML "
                              "aliases are expanded: refused (nested aliases?)")
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack += (key, value)
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


MAX_CONFIG_DEPTH = 32  # sections nest 3-4 deep; YAML's composer recurses once per level
_OPENS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
          yaml.FlowSequenceStartToken)
_CLOSES = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _check_depth(text: str, where: str) -> None:
    """Refuse a document nested deeper than MAX_CONFIG_DEPTH, from its tokens (the
    scanner does not recurse), before the composer would recurse into it."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPENS):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{where}:{token.start_mark.line + 1}: nested more than {MAX_CONFIG_DEPTH} levels "
                                  "deep: refused")
        elif isinstance(token, _CLOSES):
            depth -= 1


def _refuse_moved_keys(data: dict, lines: dict[tuple, int], where: str) -> None:
    """ConfigError naming each key of MOVED_TO_TUNING still set in its old section, with its line."""
    found: list[tuple[int, str]] = []
    for section, keys in MOVED_TO_TUNING.items():
        body = data.get(section)
        if isinstance(body, dict):
            found += [(lines.get((section, key), 0), f"{section}.{key} moved: use tuning.{key}")
                      for key in keys if key in body]
    if found:
        raise ConfigError("\n".join(f"{where}{f':{line}' if line else ''}: {msg}" for line, msg in sorted(found)))


def parse_config(text: str, where: str = "<config>", base_dir: Path | None = None) -> StationConfig:
    """Parse YAML text into a StationConfig; ConfigError names where, line and field.

    Bounded: a text over MAX_CONFIG_BYTES, or a document over MAX_CONFIG_VALUES values
    with its aliases expanded, is refused before anything walks it."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters: a config is at most {MAX_CONFIG_BYTES} (refused unread)")
    try:
        _check_depth(text, where)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_expanded_size(root, where)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{line}: invalid YAML: {exc.problem or exc}") from exc
    lines: dict[tuple, int] = {}
    if root is not None:
        _index_lines(root, (), lines, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}:1: (top level): expected a mapping of sections, got {type(data).__name__}")
    _refuse_moved_keys(data, lines, where)
    try:
        cfg = StationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, lines, data)) from exc
    # `run` builds the ISA-95 topics from the station id unless a prefix is given: refuse here
    # what it would refuse there.
    if cfg.mqtt is not None and cfg.mqtt.topic_prefix is None and not re.match(_TOPIC_LEVEL, cfg.station.id):
        id_line = lines.get(("station", "id"))
        raise ConfigError(f"{where}{f':{id_line}' if id_line else ''}: station.id: {cfg.station.id!r} cannot be an MQTT "
                          "topic level (no '/', '+', '#'); change it or set mqtt.topic_prefix")
    if base_dir is not None:
        cfg = resolve_paths(cfg, base_dir)
    return cfg


def resolve_paths(cfg: StationConfig, base_dir: Path) -> StationConfig:
    """Model, TLS, certificate and password paths relative to ``base_dir`` (the config file's folder) made absolute."""

    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base_dir / p))

    update: dict[str, Any] = {
        "models": cfg.models.model_copy(
            update={"segmentation": [fix(p) for p in cfg.models.segmentation]
                    if isinstance(cfg.models.segmentation, list) else fix(cfg.models.segmentation),
                    "detection": fix(cfg.models.detection)}
        )
    }
    if cfg.mqtt is not None:
        update["mqtt"] = cfg.mqtt.with_base_dir(base_dir)
    if cfg.plc is not None:
        update["plc"] = cfg.plc.with_base_dir(base_dir)
    if cfg.sparkplug is not None:
        update["sparkplug"] = cfg.sparkplug.with_base_dir(base_dir)
    view_auth = cfg.operator_view.auth
    if view_auth is not None and view_auth.password_file is not None:
        auth = view_auth.model_copy(update={"password_file": fix(view_auth.password_file)})
        update["operator_view"] = cfg.operator_view.model_copy(update={"auth": auth})
    cam = cfg.camera
    if isinstance(cam, (FolderCamera, VideoCamera)):
        changes = {"path": fix(cam.path)}
        if isinstance(cam, FolderCamera) and cam.move_to is not None:
            changes["move_to"] = fix(cam.move_to)
        if isinstance(cam, FolderCamera) and cam.rejected_to is not None:
            changes["rejected_to"] = fix(cam.rejected_to)
        update["camera"] = cam.model_copy(update=changes)
    if cfg.inference.tensorrt.engine_cache is not None:
        trt = cfg.inference.tensorrt.model_copy(update={"engine_cache": fix(cfg.inference.tensorrt.engine_cache)})
        update["inference"] = cfg.inference.model_copy(update={"tensorrt": trt})
    if cfg.run.state_dir is not None:
        update["run"] = cfg.run.model_copy(update={"state_dir": fix(cfg.run.state_dir)})
    return cfg.model_copy(update=update)


def load_config(path: str | Path | None) -> StationConfig:
    """Load a config file, or the bundled default when ``path`` is None.

    Logs a warning (never fails) when the file is writable by anyone, or is
    readable by anyone and configures credentials (``mqtt.auth``, ``plc.auth``,
    ``sparkplug.auth``, a TLS or OPC UA key): see :func:`warn_if_exposed`.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes: a config is at most {MAX_CONFIG_BYTES} (refused unread)")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    cfg = parse_config(text, str(path), path.resolve().parent)
    secrets = _credentials(cfg)
    warn_if_exposed(path, "config file", secret=bool(secrets), why=f"it configures credentials ({', '.join(secrets)})")
    return cfg


def _credentials(cfg: StationConfig) -> list[str]:
    """The sections of ``cfg`` that say where a password or a private key is."""
    found = [f"{name}.auth" for name, section in (("mqtt", cfg.mqtt), ("plc", cfg.plc), ("sparkplug", cfg.sparkplug))
             if section is not None and section.auth is not None]
    found += [f"{name}.tls.key_file" for name, section in (("mqtt", cfg.mqtt), ("sparkplug", cfg.sparkplug))
              if section is not None and section.tls is not None and section.tls.key_file is not None]
    if cfg.plc is not None and cfg.plc.security is not None:
        found.append("plc.security.private_key")
    return found


def warn_if_exposed(path: Path, what: str, secret: bool, why: str = "it holds a secret") -> None:
    """Log a WARNING naming ``path`` and its mode when anyone may write it (any file
    station trusts), or, for a ``secret`` file, when anyone may read it. Never raises."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & stat.S_IWOTH:
        log.warning("%s: %s is world-writable (mode %04o): anyone can change it; remove the write bit (chmod o-w)",
                    path, what, mode)
    if secret and mode & stat.S_IROTH:
        log.warning("%s: %s is world-readable (mode %04o) and %s: restrict it (chmod o-r, e.g. 0640 root:station)",
                    path, what, mode, why)

