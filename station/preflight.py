"""What ``station run`` refuses before it starts, checked in one place.

``station check-config`` and the daemon's start both call :func:`check_for_run`,
so a config that passes the one is not refused by the other. The checks read
what the config names (password file, TLS files, this host's CPUs, the GenICam
binding) but change nothing; the models are opened by the caller (``open_models``).
"""

from __future__ import annotations

from typing import Any, Callable

from .camera.genicam import binding as genicam_binding
from .config import StationConfig
from .errors import ConfigError
from .priority import split_cpus
from .publish import read_password, tls_context


def problems_for_run(cfg: StationConfig, camera_optional: bool = False) -> list[str]:
    """Every reason ``station run`` would refuse ``cfg`` (models aside), one line each.
    camera_optional: a missing camera section is not one (a config for ``station replay``)."""
    problems = []
    checks: list[Callable[[], Any]] = [lambda: split_cpus(cfg.tuning.infer_cpu)]
    if cfg.camera is None and not camera_optional:
        problems.append("camera: section missing: `station run` needs a frame source")
    if cfg.trigger.type == "mqtt" and cfg.mqtt is None:
        problems.append("trigger.type: mqtt needs an mqtt section")
    if cfg.trigger.type == "plc" and (cfg.plc is None or cfg.plc.nodes.part_present is None):
        problems.append("trigger.type: plc needs a plc section with nodes.part_present")
    if cfg.camera is not None and cfg.camera.type == "genicam":
        if cfg.camera.trigger_mode == "software" and cfg.trigger.type == "free-run":
            problems.append("camera.trigger_mode: software takes a frame per part named by the trigger: "
                            "it needs trigger.type mqtt or plc")
        checks.append(genicam_binding)
    if cfg.mqtt is not None:
        mqtt = cfg.mqtt
        checks += [lambda: read_password(mqtt.auth), lambda: tls_context(mqtt.tls)]
    view = cfg.operator_view
    if view.enabled and view.auth is not None:
        checks.append(lambda: read_password(view.auth, "operator_view.auth"))
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def check_for_run(cfg: StationConfig, where: str = "config") -> None:
    """ConfigError naming every problem :func:`problems_for_run` finds, if any."""
    problems = problems_for_run(cfg)
    if problems:
        raise ConfigError(f"{where}: `station run` refuses it:\n  " + "\n  ".join(problems))
