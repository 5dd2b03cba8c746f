"""``station listen``: print what stations publish, for integrators.

Subscribes to ``<prefix>/result`` (QoS 1) and ``<prefix>/status`` of one
station, or of many through ``+`` wildcards in the prefix, and prints one table
row per result (or the payloads as JSONL with ``--json``) and each station's
status changes. ``--validate`` checks every result against the shipped JSON
Schema and reports the messages that fail it on stderr.

The broker, TLS, credentials and topic prefix come from a station config
(``-c``, read with the same code as the daemon: ``messages.topics_for``,
``publish.tls_context``, ``publish.read_password``) and/or from options; options
win. The listener always uses its own random client id, never the station's
(the broker would disconnect the station to let the listener in).

Exit codes: 0 done (``--count`` reached, ``--timeout`` passed without
``--count``, or the subscription ended by Ctrl-C in the caller); 1 ``--count``
not reached before ``--timeout``, or ``--validate`` found invalid messages; 2
usage, configuration or connection error (refused, unreachable, bad
credentials, TLS failure, subscription refused).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from .backoff import Backoff
from .errors import StationError
from .messages import STATES, dumps, load_schema

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2

# CONNACK reason codes meaning "these credentials will not do" (paho maps the
# MQTT 3.1.1 return codes 4 and 5 onto 134 and 135).
_CREDENTIAL_REFUSALS = frozenset({134, 135, 138, 140})
_ISA95_ANY_STATION = "+/+/+/+/+"  # <enterprise>/<site>/<area>/<line>/<station>


# --- the command line ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("broker and topics (options override the config)")
    src.add_argument("-c", "--config", type=Path, metavar="FILE",
                     help="station config: broker, TLS, credentials and topic prefix of its station")
    src.add_argument("--all-stations", action="store_true",
                     help="with -c: every station of the config's enterprise/site/area/line (station level '+')")
    src.add_argument("--host", help="broker host (default: the config's, else localhost)")
    src.add_argument("--port", type=int, help="broker port (default: the config's, else 8883 with TLS, 1883 without)")
    src.add_argument("--topic", metavar="PREFIX",
                     help="topic prefix before /result and /status; '+' matches one level "
                          f"(default: the config's station, else {_ISA95_ANY_STATION}: every station, ISA-95 layout)")
    src.add_argument("--protocol", choices=("3.1.1", "5"), help="MQTT version (default: the config's, else 5)")
    src.add_argument("--connect-timeout", type=_positive_float, metavar="S",
                     help="seconds to wait for the connection (default: the config's, else 5)")
    sec = p.add_argument_group("TLS and credentials (the password is never an option: it would show in ps)")
    sec.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-file/--cert-file)")
    sec.add_argument("--ca-file", type=Path, help="CA certificates (PEM) of the broker")
    sec.add_argument("--cert-file", type=Path, help="client certificate (PEM) for mutual TLS")
    sec.add_argument("--key-file", type=Path, help="private key (PEM) of --cert-file")
    sec.add_argument("--insecure", action="store_true", help="do not check the broker's host name (testing only)")
    sec.add_argument("--username", help="MQTT username")
    pw = sec.add_mutually_exclusive_group()
    pw.add_argument("--password-file", type=Path, help="file whose first line is the password")
    pw.add_argument("--password-env", metavar="VAR", help="environment variable holding the password")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print each payload as one JSON line instead of a table row "
                          "(status changes too, as their own objects with a 'state' key, unless --no-status)")
    out.add_argument("--no-status", action="store_true", help="do not subscribe to or print status changes")
    out.add_argument("--validate", action="store_true",
                     help="check results against the shipped JSON Schema; invalid ones are reported on stderr")
    out.add_argument("--count", type=_positive_int, metavar="N",
                     help="exit after N messages on result topics (invalid ones included)")
    out.add_argument("--timeout", type=_positive_float, metavar="S",
                     help="exit after S seconds of listening (exit 1 if --count was not reached)")


def add_listen_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``listen`` to the ``station`` command's subparsers (``func`` = :func:`cmd_listen`)."""
    p = subparsers.add_parser(
        "listen",
        help="print the results and status that stations publish",
        description="Subscribe to the results and status of one station, or of many with '+' wildcards, and "
                    "print them as a table or JSONL. Exit codes: 0 done, 1 --count not reached in --timeout "
                    "(or --validate found invalid messages), 2 usage or connection error.",
    )
    _add_arguments(p)
    p.set_defaults(func=cmd_listen)
    return p


# --- resolving the broker and topics ------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    mqtt: Any  # station.config.MqttConfig
    prefix: str
    connect_timeout: float

    @property
    def where(self) -> str:
        return f"{self.mqtt.host}:{self.mqtt.effective_port}"


def _check_prefix(prefix: str) -> str:
    levels = prefix.split("/")
    for level in levels:
        if not level or "#" in level or "\x00" in level or ("+" in level and level != "+"):
            raise StationError(
                f"--topic {prefix!r}: a prefix of non-empty levels; '+' only as a whole level, no '#' "
                "(/result and /status are appended)"
            )
    return prefix


def _resolve(args: argparse.Namespace) -> _Target:
    """The effective MqttConfig (config file, then options) and the topic prefix."""
    from .config import load_config
    from .messages import topics_for

    base: dict[str, Any] = {}
    prefix: str | None = None
    if args.config is not None:
        cfg = load_config(args.config)
        if cfg.mqtt is None:
            raise StationError(f"{args.config}: no mqtt section: nothing to listen to (or give --host)")
        base = cfg.mqtt.model_dump(exclude_unset=False)
        base["tls"], base["auth"] = cfg.mqtt.tls, cfg.mqtt.auth
        if args.all_stations:
            if cfg.mqtt.topic_prefix is not None:
                raise StationError(
                    f"--all-stations: {args.config} sets mqtt.topic_prefix, so the other stations' topics are "
                    "unknown; give --topic with '+' for the station level"
                )
            prefix = "/".join((cfg.mqtt.enterprise, cfg.mqtt.site, cfg.mqtt.area, cfg.mqtt.line, "+"))
        else:
            prefix = topics_for(cfg.mqtt, cfg.station.id).prefix
    elif args.all_stations:
        raise StationError("--all-stations needs -c CONFIG (without one, every station is the default)")
    if args.topic is not None:
        prefix = args.topic
    prefix = _check_prefix(prefix or _ISA95_ANY_STATION)

    base.setdefault("host", "localhost")
    for key, value in (("host", args.host), ("port", args.port), ("protocol", args.protocol)):
        if value is not None:
            base[key] = value
    try:
        return _apply_options(args, base, prefix)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'mqtt'}: {e['msg']}" for e in exc.errors())
        raise StationError(f"broker options: {problems}") from None


def _apply_options(args: argparse.Namespace, base: dict[str, Any], prefix: str) -> _Target:
    from .config import MqttAuthConfig, MqttConfig, MqttTlsConfig

    if args.tls or args.ca_file or args.cert_file or args.key_file or args.insecure:
        old = base.get("tls")
        tls = old.model_dump() if old is not None else {}
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(args, key) is not None:
                tls[key] = getattr(args, key)
        if args.insecure:
            tls["insecure"] = True
        base["tls"] = MqttTlsConfig(**tls)
    if args.username is not None:
        base["auth"] = MqttAuthConfig(username=args.username, password_file=args.password_file,
                                      password_env=args.password_env)
    elif args.password_file is not None or args.password_env is not None:
        raise StationError("--password-file/--password-env need --username")
    # Not the station's client id: the broker would disconnect the station.
    base["client_id"] = f"station-listen-{uuid.uuid4().hex[:10]}"
    cfg_mqtt = MqttConfig(**{k: v for k, v in base.items() if k in MqttConfig.model_fields})
    timeout = args.connect_timeout if args.connect_timeout is not None else cfg_mqtt.connect_timeout_s
    return _Target(cfg_mqtt, prefix, timeout)


# --- validation and formatting -------------------------------------------------------------


class _Checker:
    """Validates result and error records against the shipped schema, with messages
    that name the field (the schema's top-level ``oneOf`` is resolved by whether the
    record has an ``error`` key, so errors are about the branch that was meant)."""

    def __init__(self) -> None:
        try:
            import jsonschema
        except ImportError:
            raise StationError("--validate needs the jsonschema package (pip install jsonschema)") from None
        schema = load_schema()
        defs = schema["$defs"]
        self._result = jsonschema.Draft202012Validator({"$ref": "#/$defs/result", "$defs": defs})
        self._error = jsonschema.Draft202012Validator({"$ref": "#/$defs/error", "$defs": defs})

    def problems(self, record: Any) -> list[str]:
        if not isinstance(record, dict):
            return [f"$: not a JSON object but {type(record).__name__}"]
        validator = self._error if "error" in record else self._result
        errors = sorted(validator.iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{e.json_path}: {e.message}" for e in errors]


def _status_problems(record: Any) -> list[str]:
    if not isinstance(record, dict):
        return [f"$: not a JSON object but {type(record).__name__}"]
    out = []
    if record.get("schema_version") != 1:
        out.append(f"$.schema_version: {record.get('schema_version')!r} is not 1")
    if record.get("state") not in STATES:
        out.append(f"$.state: {record.get('state')!r} is not one of {list(STATES)}")
    for key in ("station_id", "timestamp"):
        if not isinstance(record.get(key), str):
            out.append(f"$.{key}: missing or not a string")
    return out


_COLUMNS = (("captured_at (UTC)", 23), ("station", 16), ("part", 12), ("grade", 8), ("rule", 22))


def _time(value: Any) -> str:
    return value.replace("T", " ").rstrip("Z") if isinstance(value, str) else "-"


def _row(*cells: str) -> str:
    fixed = "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS))
    return "  ".join([fixed, *cells[len(_COLUMNS):]]).rstrip()


def _header() -> str:
    return _row(*(name for name, _ in _COLUMNS), f"{'area %':>8}", f"{'defects':>7}", "late")


def _result_row(record: dict, station: str) -> str:
    late = record.get("late")
    late_text = "-" if late is None else ("yes" if late else "no")
    part = record.get("part_id")
    part_text = "-" if part is None else str(part)
    if "error" in record and "grade" not in record:
        return _row("-", station, part_text, "ERROR", str(record.get("error")), f"{'-':>8}", f"{'-':>7}", late_text)
    area = record.get("defect_area_pct")
    area_text = f"{area:8.3f}" if isinstance(area, (int, float)) else f"{'?':>8}"
    defects = record.get("defects")
    n = f"{len(defects):7d}" if isinstance(defects, list) else f"{'?':>7}"
    return _row(_time(record.get("captured_at")), station, part_text, str(record.get("grade", "?")),
                str(record.get("rule", "?")), area_text, n, late_text)


def _status_row(record: dict, station: str) -> str:
    return _row(_time(record.get("timestamp")), station, f"-- status: {record.get('state')}")


# --- listening ------------------------------------------------------------------------------


@dataclass
class _Tally:
    results: int = 0
    invalid: int = 0
    status_seen: dict[str, Any] = field(default_factory=dict)


def cmd_listen(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``station listen``; returns the exit code (see the module docstring).

    out/err: where rows/JSONL and diagnostics go (default stdout/stderr).
    A KeyboardInterrupt propagates (the CLI maps it to 130) after disconnecting.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def say(text: str) -> None:
        print(f"station listen: {text}", file=err, flush=True)

    try:
        target = _resolve(args)
        checker = _Checker() if args.validate else None
        from .publish import read_password, tls_context

        password = read_password(target.mqtt.auth)
        tls = tls_context(target.mqtt.tls)
    except StationError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE

    topics = [f"{target.prefix}/result"] + ([] if args.no_status else [f"{target.prefix}/status"])
    events: queue.Queue = queue.Queue()
    client = _make_client(target, tls, password, topics, events.put)
    try:
        client.connect(target.mqtt.host, target.mqtt.effective_port, keepalive=target.mqtt.keepalive_s)
    except (OSError, ValueError) as exc:  # refused, unreachable, DNS, timeout, TLS handshake (ssl.SSLError)
        say(f"error: cannot connect to {target.where}: {_why(exc)}")
        return EXIT_USAGE
    client.loop_start()
    try:
        failure = _wait_subscribed(events, target, topics)
        if failure is not None:
            say(f"error: {failure}")
            return EXIT_USAGE
        say(f"listening on {target.where}: {', '.join(topics)}")
        if not args.json:
            print(_header(), file=out, flush=True)
        tally = _Tally()
        try:
            _listen(events, client, target, args, out, say, checker, tally)
        except BrokenPipeError:  # `station listen | head`: the reader has gone
            _silence(out)
            return EXIT_OK
        if args.count is not None and tally.results < args.count:
            say(f"{tally.results} of {args.count} results received within {args.timeout:g} s")
            return EXIT_INCOMPLETE
        if tally.invalid:
            say(f"{tally.invalid} invalid messages (see above)")
            return EXIT_INCOMPLETE
        return EXIT_OK
    finally:
        client.disconnect()
        client.loop_stop()


def _make_client(target: _Target, tls, password, topics: list[str], post: Callable[[tuple], None]) -> mqtt.Client:
    cfg = target.mqtt
    v5 = cfg.protocol == "5"
    kwargs: dict[str, Any] = {} if v5 else {"clean_session": True}
    # Reconnecting is ours (_reconnect): paho's own would sleep through a stop
    # request for up to a second, and would retry refused credentials forever.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, reconnect_on_failure=False, **kwargs)
    client.connect_timeout = target.connect_timeout
    if tls is not None:
        client.tls_set_context(tls)
    if cfg.auth is not None:
        client.username_pw_set(cfg.auth.username, password)

    def on_connect(c, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            c.subscribe([(t, 1) for t in topics])  # again after every reconnect: the session is clean
        post(("connect", reason_code))

    client.on_connect = on_connect
    client.on_subscribe = lambda c, u, mid, codes, props: post(("subscribe", list(codes)))
    client.on_message = lambda c, u, msg: post(("message", msg.topic, bytes(msg.payload), bool(msg.retain)))
    client.on_disconnect = lambda c, u, flags, reason_code, props: post(("disconnect", reason_code))
    return client


def _wait_subscribed(events: queue.Queue, target: _Target, topics: list[str]) -> str | None:
    """Wait for CONNACK and SUBACK; None when subscribed, else what went wrong."""
    deadline = time.monotonic() + target.connect_timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            event = events.get(timeout=max(remaining, 0.0)) if remaining > 0 else events.get_nowait()
        except queue.Empty:
            return f"no answer from the broker at {target.where} within {target.connect_timeout:g} s"
        kind = event[0]
        if kind == "connect" and event[1].is_failure:
            code = event[1]
            hint = ""
            if code.value in _CREDENTIAL_REFUSALS:
                who = f"user {target.mqtt.auth.username!r}" if target.mqtt.auth else "anonymous access"
                hint = f" ({who}: check the username and password)"
            return f"the broker at {target.where} refused the connection: {code}{hint}"
        if kind == "disconnect":
            return f"the broker at {target.where} closed the connection: {event[1]}"
        if kind == "subscribe":
            refused = [t for t, code in zip(topics, event[1]) if code.is_failure]
            if refused:
                return f"the broker at {target.where} refused the subscription to {', '.join(refused)} (not authorised?)"
            return None


def _listen(events: queue.Queue, client: mqtt.Client, target: _Target, args: argparse.Namespace, out: TextIO,
            say: Callable[[str], None], checker: _Checker | None, tally: _Tally) -> None:
    """Print messages until --count results arrived or --timeout passed; reconnect when the connection goes."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def remaining() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    backoff = Backoff(target.mqtt.reconnect_min_s, target.mqtt.reconnect_max_s)
    while args.count is None or tally.results < args.count:
        left = remaining()
        if left is not None and left <= 0:
            return
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            return
        kind = event[0]
        if kind == "message":
            _on_message(event[1], event[2], event[3], args, out, say, checker, tally)
        elif kind == "connect" and event[1].is_failure:
            say(f"the broker at {target.where} refused the reconnection: {event[1]}")
        elif kind == "subscribe":  # after a reconnection (the first SUBACK was awaited before)
            say(f"reconnected to {target.where}; subscribed again")
            backoff.reset()
        elif kind == "disconnect":
            say(f"connection to {target.where} lost ({event[1]}); reconnecting")
            client.loop_stop()  # paho's thread has ended (no automatic reconnect)
            if not _reconnect(client, target, backoff, remaining, say):
                return


def _reconnect(client: mqtt.Client, target: _Target, backoff: Backoff, remaining: Callable[[], float | None],
               say: Callable[[str], None]) -> bool:
    """Reconnect with capped exponential backoff until it works (True) or the deadline passes (False).

    on_connect subscribes again (the session is clean); a refused CONNACK arrives as
    a "connect" event followed by "disconnect", which brings us back here.
    """
    while True:
        wait = backoff.next()
        left = remaining()
        if left is not None and left <= wait:
            return False
        time.sleep(wait)  # the backoff: nothing to wait for but time
        try:
            client.reconnect()
        except (OSError, ValueError) as exc:
            say(f"cannot reconnect to {target.where}: {_why(exc)}; trying again")
            continue
        client.loop_start()
        return True


def _on_message(topic: str, payload: bytes, retained: bool, args: argparse.Namespace, out: TextIO,
                say: Callable[[str], None], checker: _Checker | None, tally: _Tally) -> None:
    levels = topic.rsplit("/", 2)
    kind = levels[-1]
    topic_station = levels[-2] if len(levels) >= 2 else "?"
    if kind == "result":
        tally.results += 1
    try:
        record = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        if checker is not None:
            tally.invalid += 1
        say(f"not JSON on {topic} ({len(payload)} bytes): {exc}")
        return
    station = str(record.get("station_id") or topic_station) if isinstance(record, dict) else topic_station
    if kind == "result":
        problems = checker.problems(record) if checker is not None else []
    else:
        problems = _status_problems(record) if checker is not None else []
    if problems:
        tally.invalid += 1
        rid = record.get("id") if isinstance(record, dict) else None
        say(f"INVALID {kind} on {topic}" + (f" (id {rid})" if rid else "") + ": " + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    if not isinstance(record, dict):
        if checker is None:
            say(f"not a JSON object on {topic}: {payload[:80]!r}")
        return
    if kind == "status":
        if tally.status_seen.get(station) == record.get("state"):
            return  # not a change (e.g. the retained copy after a reconnect)
        tally.status_seen[station] = record.get("state")
    if args.json:
        print(dumps(record), file=out, flush=True)
    elif kind == "result":
        print(_result_row(record, station), file=out, flush=True)
    else:
        print(_status_row(record, station), file=out, flush=True)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc}"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return str(text)


def _silence(out: TextIO) -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not complain."""
    if out is sys.stdout:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass


# --- standalone ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m station.listen …`` (the same as ``station listen …``)."""
    p = argparse.ArgumentParser(prog="station listen", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_listen(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
