"""Command line: ``station run | replay | eval | listen | bench | report | model-info | check-config``.

Exit codes (all subcommands):
  0  success: every input inspected / the file is valid
  1  some inputs could not be inspected (their error records were written)
  2  usage, configuration or model error: nothing was inspected
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from . import __version__
from .errors import EXIT_INPUT_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError, StationError

log = logging.getLogger("station")



def _setup_logging(verbose: int, base: int = logging.WARNING) -> None:
    # stderr: stdout may carry JSONL; journald collects both streams.
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else base
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _cmd_replay(args: argparse.Namespace) -> int:
    from .config import load_config
    from .inspector import Inspector, open_models
    from .replay import replay

    cfg = load_config(args.config)
    models = open_models(cfg, args.seg_model, args.det_model)
    keep_mask = args.masks is not None or args.overlays is not None
    inspector = Inspector(models, cfg, keep_mask=keep_mask)
    for role, model in models.items():
        print(f"{role}: {model.path} [{', '.join(model.providers)}]", file=sys.stderr)
    if args.out is None or str(args.out) == "-":
        summary = replay(args.paths, inspector, sys.stdout, args.masks, args.overlays, progress=not args.quiet)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as out:
            summary = replay(args.paths, inspector, out, args.masks, args.overlays, progress=not args.quiet)
    print(summary.format(), file=sys.stderr)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8")
    if summary.inspected + summary.errors == 0:
        print("no input files found", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_INPUT_ERRORS if summary.errors else EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import Daemon

    cfg = load_config(args.config)
    return Daemon(cfg, args.config, args.state_dir, jsonl=args.jsonl).run()


def _cmd_model_info(args: argparse.Namespace) -> int:
    from .infer import OnnxModel

    model = OnnxModel(args.model, providers=("cpu",))
    if args.json:
        print(json.dumps(model.describe(), indent=2))
    else:
        print(f"file: {model.path}\nsha256: {model.sha256}\nproviders: {', '.join(model.providers)}")
        print(yaml.safe_dump(model.card.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_config
    from .inspector import open_models
    from .preflight import problems_for_run

    args.config = args.config or args.config_option
    cfg = load_config(args.config)
    problems = problems_for_run(cfg, camera_optional=True)
    if cfg.camera is None:  # a config for replay: the rest is checked as run would check it
        print(f"{args.config}: no camera section: fit for `station replay`; `station run` needs one")
    if problems:
        raise ConfigError(f"{args.config}: `station run` refuses it:\n  " + "\n  ".join(problems))
    if not args.no_models:
        models = open_models(cfg)
        for role, m in models.items():
            print(f"{role}: {m.path} ({m.card.name} v{m.card.version})")
    print(f"{args.config}: OK")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="station", description="Edge visual inspection: ONNX models, grading, results.")
    p.add_argument("--version", action="version", version=f"station {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("run", help="run the line daemon", description="Capture, inspect and publish until stopped (SIGTERM/SIGINT; SIGHUP reloads).")
    d.add_argument("-c", "--config", type=Path, required=True, help="config YAML (camera, models, mqtt, ...)")
    d.add_argument("--state-dir", type=Path, help="outbox and archive folder (default: run.state_dir, then $STATE_DIRECTORY)")
    d.add_argument("--jsonl", type=Path, metavar="FILE", help="also append every result to FILE as JSON lines")
    d.set_defaults(func=_cmd_run, log_level=logging.INFO)

    r = sub.add_parser("replay", help="inspect recorded images and videos", description="Run the inspection pipeline on image files, folders (recursive) and video files.")
    r.add_argument("paths", nargs="+", metavar="PATH", help="image file, video file or folder")
    r.add_argument("-c", "--config", type=Path, help="config YAML (default: the bundled default)")
    r.add_argument("--seg-model", type=Path, action="append", metavar="FILE",
                   help="segmentation ONNX model (overrides the config); repeat it to average several")
    r.add_argument("--det-model", type=Path, help="detection ONNX model (overrides the config)")
    r.add_argument("--out", type=Path, help="JSONL output file, one record per frame (default: stdout)")
    r.add_argument("--masks", type=Path, metavar="DIR", help="write each predicted mask as DIR/<stem>.png (0/255, source size)")
    r.add_argument("--overlays", type=Path, metavar="DIR", help="write each frame with mask, boxes and grade drawn")
    r.add_argument("--summary-json", type=Path, metavar="FILE", help="also write the summary as JSON")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_replay)

    m = sub.add_parser("model-info", help="print a model's card", description="Load an ONNX model, check it against its card and print the card.")
    m.add_argument("model", type=Path, metavar="FILE")
    m.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    m.set_defaults(func=_cmd_model_info)

    c = sub.add_parser("check-config", help="validate a config file", description="Validate a config; errors name file, line and field.")
    which = c.add_mutually_exclusive_group(required=True)  # FILE, or -c FILE as for run
    which.add_argument("config", type=Path, nargs="?", metavar="FILE", help="config YAML")
    which.add_argument("-c", "--config", type=Path, dest="config_option", metavar="FILE", help="the same, as for run")
    c.add_argument("--no-models", action="store_true", help="do not open the model files")
    c.set_defaults(func=_cmd_check_config)

    from .bench import add_bench_parser
    from .evaluate import add_eval_parser
    from .listen import add_listen_parser
    from .report import add_report_parser

    add_eval_parser(sub)
    add_listen_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, getattr(args, "log_level", logging.WARNING))
    try:
        return args.func(args)
    except StationError as exc:
        print(f"station: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("station: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
