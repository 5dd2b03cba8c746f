"""``station run``: the line daemon, and its supervisor.

:class:`Daemon` puts one camera's parts together and watches over them:

* the pipeline (station/pipeline.py): the stage threads, capture → bounded
  queue → infer → finish, under one thread policy (station/priority.py);
* the sinks (station/sinks.py), built from the config in one place: the
  durable outbox feeding MQTT, the metrics, JSONL, the archive;
* with an MQTT trigger (station/trigger.py), the thread that delivers the error
  records of the triggers that made no part.

The supervisor itself runs on the main thread: the signals, the systemd
notifications (READY after the models are warm, WATCHDOG only while frames make
progress), periodic stats, gauges and archive pruning, reloads (on a thread of
their own), and the order of the stop. SIGTERM/SIGINT stop capture, finish the
parts already queued, flush MQTT, publish the "stopped" status and exit within
``run.stop_timeout_s``; a second signal exits at once. SIGHUP reloads the
config: models, grading, postprocessing and trigger rates take effect for the
next frame; other sections need a restart (logged).
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import sdnotify
from .camera.live import SoftwareTriggered, make_source
from .config import StationConfig, load_config
from .errors import StationError
from .infer import OnnxModel
from .inspector import Inspector, open_models
from .memory import steady_malloc
from .messages import stats_record, topics_for
from .metrics import TRIGGER_OUTCOMES, Metrics, MetricsServer, RollingStats
from .pipeline import Pipeline
from .preflight import check_for_run
from .priority import ThreadPolicy
from .sinks import CameraAware, Delivery, ModelsAware, PartSignals, Sink, build_sinks
from .trigger import Trigger, TriggerErrors

log = logging.getLogger(__name__)

_TRIGGER_ERRORS_BATCH = 16  # trigger errors delivered at a time without MQTT (with it: mqtt.max_inflight)


class Daemon:
    """One camera, its models, its sinks. ``run()`` blocks until stopped and returns
    the process exit code.

    jsonl: also append every record to this file (``station run --jsonl``).
    sinks: more sinks, fed after those of the config and before the archive, and
    started and closed with them (``station bench`` observes through one).
    """

    def __init__(self, cfg: StationConfig, config_path: Path | None = None, state_dir: Path | None = None,
                 jsonl: Path | None = None, sinks: Sequence[Sink] = ()):
        check_for_run(cfg, str(config_path) if config_path is not None else "config")
        self.cfg = cfg
        self.config_path = config_path
        self.state_dir = state_dir or cfg.run.state_dir or _env_state_dir()
        self.stop_event = threading.Event()
        self.policy = ThreadPolicy.from_tuning(cfg.tuning)
        assert cfg.camera is not None  # check_for_run refused a config without one
        source = make_source(cfg.camera)
        self.trigger = Trigger(cfg)
        if isinstance(source, SoftwareTriggered) and source.wants_software_trigger:
            self.trigger.on_part = source.fire  # one frame for every part the trigger accepts
        self.stats = RollingStats()
        self.metrics = Metrics()
        self._triggers_counted = dict.fromkeys(TRIGGER_OUTCOMES, 0)  # what metrics counts of self.trigger.counts()
        self._reload = threading.Event()
        self._reloading: threading.Thread | None = None
        self._signals = 0
        self._metrics_server: MetricsServer | None = None
        # A worker thread that died: run() then exits 1, so that systemd's
        # Restart=on-failure restarts the daemon (exit 0 would not).
        self.failed = False
        models = open_models(cfg)
        inspector = Inspector(models, cfg, keep_mask=self._keep_mask(cfg))
        self.providers = {role: m.providers for role, m in models.items()}
        self.metrics.set_models({role: m.describe() for role, m in models.items()})
        self.sinks = build_sinks(cfg, self.state_dir, self.metrics, self.stats, self.policy, self._acked,
                                 self.stop_event, jsonl, sinks)
        self.mqtt = self.sinks.mqtt
        if self.trigger.mode == "plc":  # the PLC's part-present edges are the parts
            for sink in self.sinks.sinks:
                if isinstance(sink, PartSignals):
                    sink.signal_parts(self.trigger.on_signal)
        self._models_changed(models)
        self.pipeline = Pipeline(cfg, source, self.trigger, inspector, self.sinks, self.policy, self.metrics,
                                 self.stop_event, self._camera_changed, self._crashed)
        self.trigger_errors: TriggerErrors | None = None
        if self.trigger.triggered:  # without MQTT (a PLC trigger) the errors go out as they come
            has_room = self.mqtt.has_room if self.mqtt is not None else (lambda: True)
            batch = cfg.mqtt.max_inflight if cfg.mqtt is not None else _TRIGGER_ERRORS_BATCH
            self.trigger_errors = TriggerErrors(self.trigger, cfg.station.id, self._deliver_error, has_room, batch,
                                                cfg.outbox.max_rows)

    @staticmethod
    def _keep_mask(cfg: StationConfig) -> bool:
        # The frame-sized mask is kept only when something uses it (the live page draws it).
        archived = cfg.archive.enabled and bool({"mask", "overlay"} & set(cfg.archive.what))
        return cfg.run.include_mask or archived or cfg.operator_view.enabled

    # --- what the parts report ----------------------------------------------------------

    def _acked(self, seq: int) -> None:
        """The broker acknowledged outbox ``seq`` (paho's network thread): the durable
        sink reports it here, and the pipeline (made after the sinks) hands it on."""
        self.pipeline.acked(seq)

    def _deliver_error(self, record: dict) -> None:
        """A trigger's error record (the trigger-errors thread): no frame, to every sink."""
        self.sinks.deliver(record, Delivery(None))

    def _models_changed(self, models: Mapping[str, OnnxModel]) -> None:
        described = {role: m.describe() for role, m in models.items()}
        for sink in self.sinks.sinks:
            if isinstance(sink, ModelsAware):
                sink.set_models(described)

    def _camera_changed(self, state: str) -> None:
        self.metrics.set_camera_state(state)
        for sink in self.sinks.sinks:
            if isinstance(sink, CameraAware):
                sink.set_camera_state(state)
        if self.mqtt is not None:
            self.mqtt.publisher.set_status(camera=state)

    def _crashed(self) -> None:
        self.failed = True
        self.stop_event.set()

    # --- running ------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Run until stopped (signal, end of a finite source, or ``stop_event``)."""
        cpus = self.policy.cpus
        if cpus is not None:
            # tuning.infer_cpu: every thread started from here on (paho's, the models' helper,
            # the stages) runs off the infer thread's CPU; the infer thread moves there.
            # The calling thread gets its CPUs back at the end.
            log.info("the infer thread runs on CPU %s, every other thread on CPUs %s (tuning.infer_cpu)",
                     ", ".join(map(str, sorted(cpus[0]))), ", ".join(map(str, sorted(cpus[1]))))
        with self.policy.main():
            self._start(install_signals)
            try:
                self._supervise()
            finally:
                self._shutdown()
        return 1 if self.failed else 0

    def _start(self, install_signals: bool) -> None:
        cfg = self.cfg
        if cfg.tuning.steady_malloc:
            steady_malloc()
        log.info("threads but inference at nice +%d (tuning.nice_non_inference)", self.policy.nice)
        if self.mqtt is not None:
            publisher = self.mqtt.publisher
            publisher.set_status(camera=self.pipeline.camera_state, providers=self.providers)
            if self.trigger.mode == "mqtt":
                assert cfg.mqtt is not None  # the MQTT sink is made with the mqtt section
                publisher.subscribe(topics_for(cfg.mqtt, cfg.station.id).trigger, self.trigger.on_message)
        if self.trigger_errors is not None:
            self.trigger_errors.start(self.policy, self._crashed)
        self.sinks.start()
        if cfg.metrics.enabled:
            self._metrics_server = self.metrics.start_server(cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on %s", self._metrics_server.url)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            # `kill -USR1 PID`: every thread's stack to stderr (the journal), for a station that seems stuck.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.pipeline.warm_up()
        # What start-up made (modules, the models' cards, the config) lives as long as the
        # process: out of the cyclic collector's sight, a full collection no longer scans
        # it, which stopped every Python thread for 22-29 ms (docs/lab/benchmarks.md, sitting 2).
        gc.collect()
        gc.freeze()
        self.pipeline.start()
        sdnotify.notify("READY=1")
        log.info("station %s running: camera %s, trigger %s, models %s", cfg.station.id, self.pipeline.source.name,
                 self.trigger.mode, ", ".join(f"{r} on {p[0]}" for r, p in self.providers.items()))

    def _supervise(self) -> None:
        """The main thread's loop, until the stop or the end of a finite source."""
        watchdog = sdnotify.watchdog_period()
        stats_interval = self.cfg.run.stats_interval_s
        next_stats = time.monotonic() + stats_interval
        next_prune = time.monotonic()
        while not self.stop_event.is_set():
            if self.pipeline.end_of_source.is_set() and self.pipeline.finished.is_set():
                break
            self.stop_event.wait(min(watchdog or 1.0, 1.0) / 2)
            if watchdog and self._healthy():
                sdnotify.notify("WATCHDOG=1")
            if self._reload.is_set() and not (self._reloading and self._reloading.is_alive()):
                self._reload.clear()
                self._reloading = threading.Thread(target=self._reload_in_background, name="reload", daemon=True)
                self._reloading.start()
            self._update_gauges()
            if self.sinks.archive is not None and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + 60.0
                self.sinks.archive.prune()
            if time.monotonic() >= next_stats:
                next_stats += stats_interval
                if self.mqtt is not None:
                    self.mqtt.publisher.publish_stats(self.stats_payload())

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
            return
        self._signals += 1
        if self._signals > 1:
            log.error("second signal: exiting now; %d parts in the pipeline are not finished", self.pipeline.in_flight())
            os._exit(1)
        log.info("%s: stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def _healthy(self) -> bool:
        return self.pipeline.healthy(self.cfg.run.stall_s)

    def _update_gauges(self) -> None:
        self.metrics.set_queue_depth(len(self.pipeline.queue))
        store = self.sinks.store
        if store is not None:
            self.metrics.set_outbox(store.outbox.depth(), store.outbox.alarm, store.outbox.waiting())
        links = {sink.sink: sink.link_state() for sink in self.sinks.confirming()}
        for name, (_, up) in links.items():
            self.metrics.set_sink_connected(name, up)
        if self.mqtt is not None:
            self.metrics.set_mqtt_connected(self.mqtt.publisher.connected)
            # the other outputs' links in the retained status (republished when one changes)
            others = {name: state for name, (state, _) in links.items() if name != self.mqtt.sink}
            if others:
                self.mqtt.publisher.set_status(sinks=others)
        if self.trigger.triggered:  # copied here, not counted per message: a flood pays for each count
            counts = self.trigger.counts()
            for outcome, n in counts.items():
                if n > self._triggers_counted[outcome]:
                    self.metrics.trigger(outcome, n - self._triggers_counted[outcome])
            self._triggers_counted = counts

    def stats_payload(self) -> dict:
        snap = self.stats.snapshot()
        outbox = self.sinks.store.outbox.stats() if self.sinks.store is not None else None
        queue = self.pipeline.queue
        return stats_record(
            station_id=self.cfg.station.id,
            uptime_s=time.time() - self.stats.started,
            grades=snap["grades"],
            errors=snap["errors"],
            fps=snap["fps"],
            latency_ms=snap["latency_ms"],
            dropped=queue.dropped,
            queue_depth=len(queue),
            outbox_depth=outbox["depth"] if outbox else 0,
            outbox_alarm=bool(outbox and outbox["alarm"]),
            providers=self.providers,
            camera=self.pipeline.camera_state,
            triggers=self.trigger.counts() if self.trigger.triggered else None,
            sinks={sink.sink: {"state": sink.link_state()[0], "waiting": outbox["waiting"][sink.sink] if outbox else 0}
                   for sink in self.sinks.confirming()},
        )

    def _shutdown(self) -> None:
        """The stop, in order: capture, the frames queued, the triggers' errors, MQTT,
        then what the sinks hold; all by ``run.stop_timeout_s``."""
        deadline = time.monotonic() + self.cfg.run.stop_timeout_s
        sdnotify.notify("STOPPING=1")
        self.stop_event.set()
        self.pipeline.drain(deadline)
        if self.trigger_errors is not None:
            self.trigger_errors.close(deadline)
        if self.mqtt is not None:
            self.mqtt.flush(max(0.5, deadline - time.monotonic()))
        if self.trigger_errors is not None:
            self.trigger_errors.store_rest(deadline)
        self.pipeline.close()
        self.sinks.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        snap = self.stats.snapshot()
        log.info("stopped: %s, %d errors, %d dropped", snap["grades"], snap["errors"], self.pipeline.queue.dropped)

    # --- reload -------------------------------------------------------------------------

    def _reload_in_background(self) -> None:
        """:meth:`reload` off the main thread, which goes on feeding the watchdog and
        sending stats while a config is parsed and models are loaded and warmed up.
        A SIGHUP during a reload is kept and runs the next reload after this one."""
        sdnotify.notify("RELOADING=1")
        try:
            self.reload()
        finally:
            sdnotify.notify("READY=1")

    def reload(self) -> None:
        """Re-read the config: models, grading, postprocessing and trigger rates
        apply to the next frame; an invalid config or model keeps the running one."""
        if self.config_path is None:
            log.warning("reload: no config file to re-read")
            return
        try:
            cfg = load_config(self.config_path)
            models = open_models(cfg)
            inspector = Inspector(models, cfg, keep_mask=self._keep_mask(cfg))
            inspector.warm_up()  # on this thread: the running models keep the infer stage
        except StationError as exc:
            log.error("reload refused, keeping the running config and models: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - MemoryError and the like: a reload never stops the line
            log.error("reload failed, keeping the running config and models: %s: %s", type(exc).__name__, exc)
            return
        restart = [k for k in ("camera", "mqtt", "outbox", "run", "station") if getattr(cfg, k) != getattr(self.cfg, k)]
        if cfg.trigger.type != self.cfg.trigger.type:
            restart.append("trigger.type")
        if restart:
            log.warning("reload: changes to %s take effect after a restart", ", ".join(restart))
        self.pipeline.inspector = inspector
        self.providers = {role: m.providers for role, m in models.items()}
        self._models_changed(models)
        self.trigger.reconfigure(cfg)
        log.info("reloaded %s: models %s", self.config_path, ", ".join(f"{r}={m.card.name}" for r, m in models.items()))


def _env_state_dir() -> Path | None:
    value = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    return Path(value.split(":")[0]) if value else None
