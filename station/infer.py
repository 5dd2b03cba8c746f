"""ONNX Runtime sessions checked against their model card.

An :class:`OnnxModel` refuses a file without a card, or whose card does not
match the session's real tensors, naming the file and the field. It reads
outputs by name, never by position.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from .config import InferenceConfig, Provider
from .errors import ModelError
from .modelcard import METADATA_KEY, DetectionOutputs, MaskOutput, ModelCard

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_ORT_DTYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}


def read_card(session: ort.InferenceSession, where: str) -> ModelCard:
    meta = session.get_modelmeta().custom_metadata_map
    text = meta.get(METADATA_KEY)
    if text is None:
        raise ModelError(f"{where}: no model card (metadata key {METADATA_KEY!r} missing); export the model with export/")
    try:
        return ModelCard.from_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(card)"
        raise ModelError(f"{where}: invalid model card: {field}: {first['msg']}") from exc
    except ValueError as exc:
        raise ModelError(f"{where}: model card is not valid JSON: {exc}") from exc


def _dims_match(actual: Sequence, expected: Sequence[int]) -> bool:
    """Static dims must equal; symbolic (str/None) dims accept anything except for non-batch axes."""
    if len(actual) != len(expected):
        return False
    for i, (a, e) in enumerate(zip(actual, expected)):
        if isinstance(a, int) and a > 0 and a != e:
            return False
        if i > 0 and not (isinstance(a, int) and a > 0):
            return False  # spatial and channel dims must be fixed
    return True


def check_card(session: ort.InferenceSession, card: ModelCard, where: str) -> None:
    """Raise ModelError if the card does not describe the session's tensors."""
    inputs = {i.name: i for i in session.get_inputs()}
    spec = card.input
    if len(inputs) != 1 or spec.name not in inputs:
        raise ModelError(f"{where}: card input.name {spec.name!r} does not match the model inputs {sorted(inputs)}")
    real = inputs[spec.name]
    if real.type != _ORT_DTYPES[spec.dtype]:
        raise ModelError(f"{where}: card input.dtype {spec.dtype!r} but the model input is {real.type}")
    if not _dims_match(real.shape, spec.shape()):
        raise ModelError(
            f"{where}: card input shape {list(spec.shape())} ({spec.layout}) does not match the model input shape {real.shape}"
        )
    outputs = {o.name: o for o in session.get_outputs()}
    for name in card.output_names():
        if name not in outputs:
            raise ModelError(f"{where}: card output {name!r} is not a model output (it has {sorted(outputs)})")
    out = card.output
    if isinstance(out, MaskOutput):
        h, w, c = spec.height, spec.width, len(card.classes)
        want = (1, h, w, c) if out.layout == "NHWC" else (1, c, h, w)
        if not _dims_match(outputs[out.name].shape, want):
            raise ModelError(
                f"{where}: card output {out.name!r} should be {list(want)} ({out.layout}, {c} class(es)) "
                f"but the model gives {outputs[out.name].shape}"
            )
    elif isinstance(out, DetectionOutputs):
        shape = outputs[out.boxes].shape
        if len(shape) != 3 or shape[-1] != 4:
            raise ModelError(f"{where}: card output.boxes {out.boxes!r} should be (1, K, 4), the model gives {shape}")


def _provider_options(provider: str, settings: InferenceConfig) -> dict[str, Any]:
    if provider == "TensorrtExecutionProvider":
        trt = settings.tensorrt
        opts: dict[str, Any] = {"device_id": settings.device_id, "trt_fp16_enable": trt.fp16,
                "trt_max_workspace_size": trt.workspace_mb * 2**20}
        if trt.engine_cache is not None:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt.engine_cache))
        return opts
    if provider == "CUDAExecutionProvider":
        # Fixed input shapes: the exhaustive cuDNN search runs once, at warm-up.
        return {"device_id": settings.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    return {}


_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
_preloaded: bool = False
# ONNX Runtime prints (preload_dlls, the "EP Error" banner); sys.stdout is swapped while a
# session opens, one at a time, so that concurrent opens (a reload beside a start) cannot
# leave stdout pointing at another one's buffer.
_quiet = threading.Lock()


def preload_gpu_libraries() -> None:
    """Load CUDA and cuDNN from the NVIDIA wheels (``pip install station[cuda]``) before the
    first GPU session: onnxruntime-gpu finds them there only through ``preload_dlls``, and
    otherwise only on the system's library path. Once per process; what it cannot load is
    logged (at debug: on a machine without a GPU that is the normal case) and the provider
    check below reports the fallback."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    said = io.StringIO()  # preload_dlls prints; keep stdout for the commands' own output
    try:
        with _quiet, contextlib.redirect_stdout(said):
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 — a failed preload only means no GPU here
        log.debug("onnxruntime.preload_dlls: %s", exc)
    for line in said.getvalue().splitlines():
        log.debug("onnxruntime.preload_dlls: %s", line)


def _open_session(path: Path, options: ort.SessionOptions, wanted: list[str],
                  settings: InferenceConfig) -> ort.InferenceSession:
    """An InferenceSession on the first of ``wanted`` that starts, the others after it.

    A provider whose libraries are missing (CUDA on a machine without a GPU)
    makes ONNX Runtime log loading errors and leave it out; we report the
    providers really in use instead. One that fails at session creation
    (TensorRT without its libraries) makes ONNX Runtime's Python API print an
    "EP Error" banner and retry on CUDA and CPU with *default* options: we keep
    the banner out of stdout, log it, and retry ourselves without that provider,
    so the CUDA options (device, cuDNN search) still apply. Real failures raise.
    """
    where = str(path)
    while True:
        said = io.StringIO()
        ort.set_default_logger_severity(4)
        try:
            with _quiet, contextlib.redirect_stdout(said):
                session = ort.InferenceSession(
                    str(path), sess_options=options, providers=[(p, _provider_options(p, settings)) for p in wanted]
                )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelError(f"{where}: ONNX Runtime cannot load the model: {exc}") from exc
        finally:
            ort.set_default_logger_severity(2)
        banner = said.getvalue()
        if "EP Error" not in banner or len(wanted) == 1:
            return session
        reason = next((line for line in banner.splitlines() if line.startswith("EP Error")), banner.strip())
        log.warning("%s: %s cannot start here (%s); trying %s", where, wanted[0], reason[:300], wanted[1:])
        wanted = wanted[1:]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OnnxModel:
    """One ONNX model, its card, and a warmed-up session.

    providers: preference order among 'tensorrt', 'cuda', 'cpu'; providers this
    onnxruntime build lacks are skipped. ``self.providers`` reports what the
    session really uses (onnxruntime-gpu falls back to CPU silently when CUDA
    cannot start).

    sha256: the pinned hash (hex) the file must have, or None. A file with
    another hash is refused before ONNX Runtime parses it.

    intra_op_threads and spin: ``tuning.intra_op_threads`` (as
    :func:`~station.inspector.model_threads` resolves it) and ``tuning.spin``.
    """

    def __init__(self, path: str | Path, providers: Sequence[Provider] = ("cuda", "cpu"), intra_op_threads: int = 0,
                 sha256: str | None = None, settings: InferenceConfig | None = None, spin: bool = False):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_file():
            raise ModelError(f"{where}: model file not found")
        self.sha256 = sha256_file(self.path)
        if sha256 is not None and sha256.lower() != self.sha256:
            raise ModelError(
                f"{where}: sha256 mismatch: expected {sha256.lower()} (pinned in the config), actual {self.sha256}; "
                "the file was changed or replaced"
            )
        settings = settings or InferenceConfig(providers=list(providers))
        available = set(ort.get_available_providers())
        wanted = [PROVIDERS[p] for p in providers if PROVIDERS[p] in available]
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        if _GPU_PROVIDERS & set(wanted):
            preload_gpu_libraries()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not spin:
            # Idle intra-op threads would busy-wait for the next run and take the
            # cores that pre/postprocessing of neighbouring frames need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = _open_session(self.path, options, wanted, settings)
        self.card = read_card(self.session, where)
        check_card(self.session, self.card, where)
        self.providers: list[str] = list(self.session.get_providers())
        if wanted[0] not in self.providers:
            log.warning("%s: %s requested but not usable here; running on %s", where, wanted[0], self.providers)
        self.input_name = self.card.input.name
        self.output_names = self.card.output_names()
        self._binding = None
        if settings.io_binding and self.providers[0] != "CPUExecutionProvider":
            self._bind("cuda", settings.device_id)
        self._warm_up()

    def _bind(self, device: str, device_id: int) -> None:
        """Fixed-shape input buffer on the device, updated in place per frame;
        outputs bound to host memory so ONNX Runtime copies them back once."""
        dtype = np.float32 if self.card.input.dtype == "float32" else np.uint8
        self._device_input = ort.OrtValue.ortvalue_from_shape_and_type(self.card.input.shape(), dtype, device, device_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, self._device_input)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self._binding = binding

    def _warm_up(self) -> None:
        """Run once on zeros: the first run allocates ONNX Runtime's memory arena
        and (on CUDA) chooses convolution algorithms, which would otherwise land
        on the first real part's latency."""
        dtype = np.float32 if self.card.input.dtype == "float32" else np.uint8
        self.run(np.zeros(self.card.input.shape(), dtype))

    @property
    def task(self) -> str:
        return self.card.task

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """tensor: the card's input shape with batch 1 → {output name: array}."""
        if self._binding is not None:
            self._device_input.update_inplace(tensor)
            self.session.run_with_iobinding(self._binding)
            values = self._binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(self.output_names, {self.input_name: tensor})
        return dict(zip(self.output_names, values))

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "providers": self.providers, "card": self.card.model_dump(mode="json")}
