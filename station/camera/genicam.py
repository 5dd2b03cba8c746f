"""GigE Vision and USB3 Vision cameras through Aravis (``camera.type: genicam``).

Aravis speaks both protocols itself (no vendor GenTL producer); its GObject
binding comes from PyGObject (the ``genicam`` extra) and Debian's
``gir1.2-aravis-0.8``. Nothing here imports it until a source is made, so the
daemon installs and runs without it.

A :class:`GenICamSource` is a live source (:class:`station.camera.live.LiveSource`):

* ``open`` finds the camera (by serial through discovery, or by device id /
  address directly), sets the configured features, queues ``buffers`` frame
  buffers and starts acquisition;
* ``read`` pops the next complete buffer and converts it once into the frame
  format every stage expects (:func:`convert`). A buffer that is not complete
  (lost packets, timeout) is counted and dropped, with one log line per
  ``DROP_LOG_PERIOD_S`` at most. A camera that stops answering its heartbeat
  (Aravis's ``control-lost``) raises CameraError, and the daemon reopens it
  with its backoff;
* with ``trigger_mode: software``, :meth:`GenICamSource.fire` sends the
  camera's TriggerSoftware for one part. ``wants_software_trigger`` tells the
  station's trigger to call it for every part it accepts.

Each Frame carries the camera's own timestamp of the exposure
(``camera_timestamp_ns``, the device clock in ns) beside the host time the
frame arrived (``captured_at``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..config import GenICamCamera
from ..errors import CameraError, ConfigError, InputError
from ..types import Frame, FrameError

log = logging.getLogger(__name__)

INSTALL_HINT = ("apt-get install gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev pkg-config, then "
                "pip install 'station[genicam]' (README: GenICam cameras)")
DROP_LOG_PERIOD_S = 10.0  # incomplete frames: one log line per period at most, with the count


@dataclass(frozen=True)
class _Layout:
    """How a pixel format lays out one row: ``channels`` samples per pixel of
    ``bits`` significant bits (8-bit samples in one byte, more in two, little
    endian), then ``to_bgr``: the OpenCV conversion to BGR (None: gray, or BGR already)."""

    bits: int
    channels: int
    to_bgr: int | None


_BAYER = {"RG": cv2.COLOR_BayerRGGB2BGR, "GR": cv2.COLOR_BayerGRBG2BGR,
          "GB": cv2.COLOR_BayerGBRG2BGR, "BG": cv2.COLOR_BayerBGGR2BGR}
LAYOUTS: dict[str, _Layout] = {
    **{f"Mono{bits}": _Layout(bits, 1, None) for bits in (8, 10, 12, 14, 16)},
    **{f"Bayer{p}{bits}": _Layout(bits, 1, code) for p, code in _BAYER.items() for bits in (8, 10, 12, 16)},
    "RGB8": _Layout(8, 3, cv2.COLOR_RGB2BGR),
    "BGR8": _Layout(8, 3, None),
}


def convert(data: bytes, width: int, height: int, pixel_format: str, x_padding: int = 0) -> np.ndarray:
    """One GenICam image buffer → uint8 gray (H, W) or BGR (H, W, 3).

    data: the image bytes, ``height`` rows of ``width`` pixels, each row
    followed by ``x_padding`` bytes. Samples of 10 to 16 bits keep their top 8
    bits (as :func:`station.imageio.to_frame_image` does for 16-bit files);
    Bayer mosaics are demosaiced after that. Mono8 and BGR8 without padding
    are viewed, not copied; every other format costs one output frame (Bayer
    and RGB8 one 8-bit plane more). InputError for a format not in
    :data:`LAYOUTS` or a buffer too short for its size."""
    layout = LAYOUTS.get(pixel_format)
    if layout is None:
        raise InputError(f"pixel format {pixel_format} is not converted (supported: {', '.join(LAYOUTS)})")
    sample = 1 if layout.bits == 8 else 2
    row_bytes = width * layout.channels * sample
    stride = row_bytes + x_padding
    if width < 1 or height < 1 or len(data) < stride * height:
        raise InputError(f"{pixel_format} buffer of {len(data)} bytes is too short for {width}x{height} "
                         f"(+{x_padding} bytes per row)")
    rows = np.frombuffer(data, np.uint8, count=stride * height).reshape(height, stride)[:, :row_bytes]
    if layout.bits == 16:
        rows = rows[:, 1::2]  # the high byte of each little-endian sample, as a strided view
    elif sample == 2:
        samples = np.ascontiguousarray(rows).view("<u2")
        rows = (samples >> (layout.bits - 8)).astype(np.uint8)
    image: np.ndarray = np.ascontiguousarray(rows)
    if layout.channels == 3:
        image = image.reshape(height, width, 3)
    if layout.to_bgr is not None:
        image = cv2.cvtColor(image, layout.to_bgr)
    return image


def binding() -> tuple[Any, Any]:
    """(Aravis, GLib) from the GObject binding, or ConfigError saying what to install."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as exc:  # no PyGObject; no Aravis typelib (ValueError from require_version)
        raise ConfigError(f"camera.type genicam needs Aravis 0.8 and its GObject binding ({exc}): {INSTALL_HINT}") from exc
    return Aravis, GLib


class _SoftwareTrigger:
    """Sends TriggerSoftware once per part, from a thread of its own so that
    whoever names the part (the MQTT client's network thread) never waits on
    the camera. Parts are triggered one at a time: the next trigger goes out
    when the previous frame arrived (:meth:`arrived`), or ``timeout_s`` after
    it was sent, because a camera still exposing ignores a trigger and the
    part would get no frame. Started by the source's ``open``, stopped by its
    ``close``."""

    def __init__(self, send: Any, name: str, timeout_s: float):
        self._send = send
        self._name = name
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._pending = 0
        self._due = 0.0  # time.monotonic() until which the last trigger's frame is awaited; 0: none awaited
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="genicam-trigger", daemon=True)
        self.sent = 0
        self.failed = 0

    def start(self) -> None:
        self._thread.start()

    def fire(self) -> None:
        with self._cond:
            self._pending += 1
            self._cond.notify()

    def arrived(self) -> None:
        with self._cond:
            self._due = 0.0
            self._cond.notify()

    def stop(self) -> int:
        """Stop the thread (after a trigger being sent, if any); the parts not triggered."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        return self._pending

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._pending and now >= self._due:
                        break
                    self._cond.wait(self._due - now if self._pending else None)
                if self._stopping:
                    return
                if self._due:
                    log.warning("%s: no frame within %.3g s of the last software trigger (camera.trigger_timeout_s); "
                                "triggering the next part", self._name, self._timeout_s)
                self._pending -= 1
                self._due = time.monotonic() + self._timeout_s
            try:
                self._send()
                self.sent += 1
            except Exception as exc:  # GLib.Error from the camera: that part gets no frame (its trigger times out)
                self.failed += 1
                log.error("%s: software trigger failed: %s", self._name, getattr(exc, "message", exc))
                with self._cond:
                    self._due = 0.0


class GenICamSource:
    """A GigE Vision or USB3 Vision camera through Aravis (see the module docstring)."""

    def __init__(self, cfg: GenICamCamera):
        self.cfg = cfg
        self.name = f"genicam:{cfg.serial if cfg.serial is not None else cfg.device}"
        self.lossless = False
        # The station's trigger calls fire() for every part it accepts when this is set.
        self.wants_software_trigger = cfg.trigger_mode == "software"
        self._aravis, self._glib = binding()
        self._lock = threading.Lock()  # open/close against fire() from another thread
        self._camera: Any = None
        self._stream: Any = None
        self._device: Any = None
        self._lost_handler: int | None = None
        self._lost = threading.Event()
        self._trigger: _SoftwareTrigger | None = None
        self._pixel_format = ""
        self._pixel_code = 0
        self._seq = 0
        # Incomplete buffers by status (missing-packets, timeout, …), since the source was made.
        self.dropped: collections.Counter[str] = collections.Counter()
        self._drops_logged = 0
        self._drops_logged_at = 0.0
        self._fired_closed = 0
        self._fired_closed_logged_at = 0.0

    # --- open ----------------------------------------------------------------------

    def _device_id(self) -> str:
        """What Aravis opens: the configured device, or the id of the camera whose serial matches."""
        if self.cfg.device is not None:
            return self.cfg.device
        Aravis = self._aravis
        Aravis.update_device_list()
        found = [(Aravis.get_device_serial_nbr(i), Aravis.get_device_id(i)) for i in range(Aravis.get_n_devices())]
        for serial, device_id in found:
            if serial == self.cfg.serial:
                return str(device_id)
        seen = ", ".join(f"{s} ({d})" for s, d in found) or "none"
        raise CameraError(f"{self.name}: no camera with serial {self.cfg.serial} found (cameras found: {seen})")

    def open(self) -> None:
        Aravis, GLib = self._aravis, self._glib
        try:
            camera = Aravis.Camera.new(self._device_id())
        except GLib.Error as exc:
            raise CameraError(f"{self.name}: cannot open: {exc.message}") from exc
        lost = threading.Event()
        device = camera.get_device()
        handler = device.connect("control-lost", lambda _device: lost.set())
        try:
            self._configure(camera)
            self._pixel_format = camera.get_pixel_format_as_string()
            self._pixel_code = camera.get_pixel_format()
            if self._pixel_format not in LAYOUTS:
                raise CameraError(f"{self.name}: the camera delivers {self._pixel_format}, which is not converted; "
                                  f"set camera.pixel_format to one of {', '.join(LAYOUTS)}")
            camera.set_acquisition_mode(Aravis.AcquisitionMode.CONTINUOUS)
            stream = camera.create_stream(None, None)
            payload = camera.get_payload()
            for _ in range(self.cfg.buffers):
                stream.push_buffer(Aravis.Buffer.new_allocate(payload))
            camera.start_acquisition()
        except GLib.Error as exc:
            device.disconnect(handler)
            raise CameraError(f"{self.name}: cannot start: {exc.message}") from exc
        except CameraError:
            device.disconnect(handler)
            raise
        trigger = None
        if self.wants_software_trigger:
            trigger = _SoftwareTrigger(camera.software_trigger, self.name, self.cfg.trigger_timeout_s)
            trigger.start()
        with self._lock:
            self._camera, self._device, self._stream = camera, device, stream
            self._lost, self._lost_handler, self._trigger = lost, handler, trigger
        region = camera.get_region()
        log.info("%s: opened %s %s (%s), %dx%d at (%d, %d), %s, trigger %s, %d buffers of %d bytes", self.name,
                 camera.get_vendor_name(), camera.get_model_name(), camera.get_device_id(), region.width,
                 region.height, region.x, region.y, self._pixel_format, self.cfg.trigger_mode, self.cfg.buffers, payload)

    def _configure(self, camera: Any) -> None:
        """Set the configured features, in the documented order; CameraError naming the one refused."""
        Aravis, cfg = self._aravis, self.cfg
        steps: list[tuple[str, Any]] = []
        if cfg.pixel_format is not None:
            steps.append(("pixel_format", lambda: camera.set_pixel_format_from_string(cfg.pixel_format)))
        if (cfg.width, cfg.height, cfg.offset_x, cfg.offset_y) != (None, None, None, None):
            def region() -> None:
                now = camera.get_region()
                camera.set_region(now.x if cfg.offset_x is None else cfg.offset_x,
                                  now.y if cfg.offset_y is None else cfg.offset_y,
                                  now.width if cfg.width is None else cfg.width,
                                  now.height if cfg.height is None else cfg.height)
            steps.append(("width/height/offset_x/offset_y", region))
        if cfg.exposure_us is not None:
            def exposure() -> None:
                if camera.is_exposure_auto_available():
                    camera.set_exposure_time_auto(Aravis.Auto.OFF)
                camera.set_exposure_time(cfg.exposure_us)
            steps.append(("exposure_us", exposure))
        if cfg.gain is not None:
            def gain() -> None:
                if camera.is_gain_auto_available():
                    camera.set_gain_auto(Aravis.Auto.OFF)
                camera.set_gain(cfg.gain)
            steps.append(("gain", gain))
        if cfg.frame_rate is not None:  # before the trigger: Aravis switches FrameStart triggering off here
            steps.append(("frame_rate", lambda: camera.set_frame_rate(cfg.frame_rate)))
        steps.append(("trigger_mode", lambda: self._set_trigger(camera)))
        for feature, value in cfg.features.items():
            steps.append((f"features.{feature}", lambda f=feature, v=value: self._set_feature(camera, f, v)))
        for field, step in steps:
            try:
                step()
            except self._glib.Error as exc:
                raise CameraError(f"{self.name}: camera.{field}: {exc.message}") from exc
            except (OverflowError, TypeError, ValueError) as exc:  # a value the binding cannot pass (a 65-bit integer)
                raise CameraError(f"{self.name}: camera.{field}: {exc}") from exc

    def _set_trigger(self, camera: Any) -> None:
        cfg = self.cfg
        if cfg.trigger_mode == "free-run":
            camera.clear_triggers()
        elif cfg.trigger_mode == "software":
            camera.set_trigger("Software")
        else:
            camera.set_trigger(cfg.trigger_source)
            if cfg.trigger_activation is not None:
                camera.set_string("TriggerActivation", cfg.trigger_activation)

    def _set_feature(self, camera: Any, name: str, value: bool | int | float | str) -> None:
        """One entry of ``features``, set as the camera's node type asks."""
        Aravis = self._aravis
        node = camera.get_device().get_feature(name)
        where = f"{self.name}: camera.features.{name}"
        if node is None:
            raise CameraError(f"{where}: no such feature on this camera")
        kind = type(value).__name__
        if isinstance(node, Aravis.GcCommand):
            if not isinstance(value, bool):
                raise CameraError(f"{where}: a command: write true to execute it, not {value!r}")
            if value:
                camera.execute_command(name)
        elif isinstance(node, Aravis.GcEnumeration):  # before integer and string, which it also is
            if isinstance(value, bool):
                raise CameraError(f"{where}: an enumeration, given {value!r}: quote the entry (YAML reads Off, On, "
                                  "Yes and No as booleans)")
            if isinstance(value, float):
                raise CameraError(f"{where}: an enumeration, given a number ({value!r})")
            if isinstance(value, int):
                camera.set_integer(name, value)
            else:
                camera.set_string(name, value)
        elif isinstance(node, Aravis.GcBoolean):
            if not isinstance(value, bool):
                raise CameraError(f"{where}: a boolean, given a {kind} ({value!r})")
            camera.set_boolean(name, value)
        elif isinstance(node, Aravis.GcFloat):
            if isinstance(value, (bool, str)):
                raise CameraError(f"{where}: a number, given a {kind} ({value!r})")
            camera.set_float(name, float(value))
        elif isinstance(node, Aravis.GcInteger):
            if isinstance(value, (bool, str)) or (isinstance(value, float) and not value.is_integer()):
                raise CameraError(f"{where}: an integer, given a {kind} ({value!r})")
            camera.set_integer(name, int(value))
        elif isinstance(node, Aravis.GcString):
            if not isinstance(value, str):
                raise CameraError(f"{where}: a string, given a {kind} ({value!r}): quote it")
            camera.set_string(name, value)
        else:
            raise CameraError(f"{where}: a {type(node).__name__} node, which cannot be set from the config")

    # --- frames --------------------------------------------------------------------

    def read(self, timeout: float) -> Frame | FrameError | None:
        stream = self._stream
        if stream is None:
            raise CameraError(f"{self.name}: not open")
        deadline = time.monotonic() + timeout
        while True:
            if self._lost.is_set():
                raise CameraError(f"{self.name}: camera lost (no answer to the heartbeat)")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            buffer = stream.timeout_pop_buffer(max(1, int(left * 1e6)))  # releases the GIL while it waits
            if buffer is None:
                continue
            if self._trigger is not None:
                self._trigger.arrived()
            try:
                status = buffer.get_status()
                if status != self._aravis.BufferStatus.SUCCESS:
                    self._drop(status.value_nick)
                    continue
                return self._frame(buffer)
            finally:
                stream.push_buffer(buffer)

    def _frame(self, buffer: Any) -> Frame | FrameError:
        """A complete buffer → a Frame (a FrameError for one that cannot be converted)."""
        seq, self._seq = self._seq, self._seq + 1
        source = f"{self.name}#frame={buffer.get_frame_id()}"
        code = buffer.get_image_pixel_format()
        if code != self._pixel_code:
            return FrameError(source, seq, f"{source}: pixel format 0x{code:08x} instead of {self._pixel_format} "
                                           f"(0x{self._pixel_code:08x})")
        try:
            image = convert(buffer.get_image_data() or b"", buffer.get_image_width(), buffer.get_image_height(),
                            self._pixel_format, buffer.get_image_padding().x_padding)
        except InputError as exc:
            return FrameError(source, seq, f"{source}: {exc}")
        received_ns = buffer.get_system_timestamp()
        camera_ns = buffer.get_timestamp()
        return Frame(image, source, seq, received_ns / 1e9 if received_ns else time.time(),
                     camera_timestamp_ns=camera_ns or None)

    def _drop(self, status: str) -> None:
        """An incomplete buffer: counted, and logged once per DROP_LOG_PERIOD_S at most."""
        self.dropped[status] += 1
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_PERIOD_S:
            total = sum(self.dropped.values())
            log.warning("%s: %d incomplete frame(s) dropped since the last report (%s; %d in all since start)",
                        self.name, total - self._drops_logged,
                        ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())), total)
            self._drops_logged, self._drops_logged_at = total, now

    # --- software trigger ----------------------------------------------------------

    def fire(self) -> None:
        """Trigger one frame for a part (trigger_mode software; does nothing otherwise).

        Thread-safe and returns at once: the trigger is sent by the source's own
        thread. Parts fired while the camera is not open get no frame (their
        trigger times out in the station); they are counted and logged."""
        with self._lock:
            trigger = self._trigger
            if trigger is None:
                if self.wants_software_trigger:
                    self._fired_closed += 1
                    now = time.monotonic()
                    if now - self._fired_closed_logged_at >= DROP_LOG_PERIOD_S:
                        self._fired_closed_logged_at = now
                        log.warning("%s: part triggered while the camera is not open: no frame for it "
                                    "(%d such parts since start)", self.name, self._fired_closed)
                return
            trigger.fire()

    # --- close ---------------------------------------------------------------------

    def done(self, frame: Frame | FrameError) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            camera, device, stream, trigger = self._camera, self._device, self._stream, self._trigger
            self._camera = self._device = self._stream = self._trigger = None
        if camera is None:
            return
        if trigger is not None:
            untriggered = trigger.stop()
            if untriggered:
                log.warning("%s: closed with %d part(s) not triggered", self.name, untriggered)
        if not self._lost.is_set():  # a lost camera does not answer: each command would wait its timeout
            try:
                camera.stop_acquisition()
            except self._glib.Error as exc:
                log.warning("%s: stopping acquisition: %s", self.name, exc.message)
        if self._lost_handler is not None:
            device.disconnect(self._lost_handler)
            self._lost_handler = None
        if stream is not None:
            log.info("%s: closed (%d frames complete, %d failed, %d underruns since open; %d dropped since start)",
                     self.name, *(stream.get_info_uint64_by_name(k) for k in ("n_completed_buffers", "n_failures",
                                                                             "n_underruns")), sum(self.dropped.values()))
        # The stream's thread and the device's heartbeat end when the last references go.
        del stream, camera, device
