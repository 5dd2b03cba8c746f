"""Evidence archive: the frames worth keeping (REJECT and DISCOUNT by default),
with their mask, overlay and result record, pruned by age and total size.

Layout under the archive root (dates and times UTC, from the capture time)::

    <root>/2025-06-01/101112_<result id>_image.png     the source frame as captured
    <root>/2025-06-01/101112_<result id>_mask.png      predicted mask, 0/255, source size
    <root>/2025-06-01/101112_<result id>_overlay.png   mask, boxes and grade drawn
    <root>/2025-06-01/101112_<result id>_record.json   the result (or error) record

The files of one result form an *entry*; pruning deletes whole entries, oldest
capture time first. Every file is written to a temporary name in its folder and
renamed into place, so a crash leaves either the whole file or none (temporary
leftovers are deleted at the next start).

The archive runs beside the inspection loop and never raises into it: a disk
error is logged, counted (``stats()["errors"]``) and ``save`` returns ``[]``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from .config import ArchiveConfig
from .overlay import draw_overlay
from .types import InspectionResult

log = logging.getLogger(__name__)

MIB = 1024 * 1024




# <HHMMSS>_<id>_<part>.<ext>; ids are made filename-safe without '_' (see _safe_id).
_FILE = re.compile(r"^(\d{6})_([A-Za-z0-9.-]+)_(image|mask|overlay|record)\.(png|json)$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TMP_SUFFIX = ".tmp"


def _safe_id(result_id: str) -> str:
    """A result id as one filename-safe token: no separators, no '_' (it splits the name)."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "-", result_id).strip(".-")[:80]
    return safe or "noid"


@dataclass
class _Entry:
    """The files of one archived result, all in ``folder``, with their sizes in bytes."""

    key: tuple[str, str]  # (day folder name, "<HHMMSS>_<id>")
    captured_at: float  # UNIX seconds
    folder: Path
    files: dict[str, int] = field(default_factory=dict)  # file name → bytes
    token: int = 0  # matches the live heap item; older items for this key are stale

    @property
    def size(self) -> int:
        return sum(self.files.values())


class Archive:
    """Writes archive entries under ``root`` and prunes them.

    The index (entries by capture time, running byte total) is built by one scan
    of ``root`` at construction and then kept up to date by :meth:`save` and
    :meth:`prune`, so pruning costs nothing when there is nothing to delete. Files
    deleted behind the archive's back are tolerated. Thread-safe.

    With ``cfg.enabled`` false the archive touches nothing: ``save`` returns ``[]``
    and ``prune`` returns ``(0, 0)``.
    """

    def __init__(self, cfg: ArchiveConfig, root: Path):
        self.cfg = cfg
        self.root = Path(root)
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._heap: list[tuple[float, int, tuple[str, str]]] = []  # (captured_at, token, key), lazily cleaned
        self._tokens = itertools.count(1)
        self._total = 0
        self._per_day: Counter[str] = Counter()  # day folder name → entries indexed in it
        self._counts = {"saved": 0, "files_written": 0, "errors": 0, "pruned_entries": 0, "pruned_files": 0, "bytes_freed": 0}
        self._max_bytes = None if cfg.max_total_mb is None else int(cfg.max_total_mb * MIB)
        if cfg.enabled:
            self._scan()

    # --- what is archived ---------------------------------------------------------------

    def wants(self, result: InspectionResult) -> bool:
        """True when ``save`` would archive this result (lets the caller skip drawing)."""
        return self.cfg.enabled and result.decision.grade in self.cfg.grades

    def wants_errors(self) -> bool:
        return self.cfg.enabled and self.cfg.errors

    # --- writing --------------------------------------------------------------------------

    def save(self, frame_image: np.ndarray, result: InspectionResult, record: dict) -> list[Path]:
        """Archive one result if its grade is selected; returns the files written.

        frame_image: the source frame, uint8 gray (H, W) or BGR (H, W, 3).
        record: the result payload (``messages.result_record(result)``), written as JSON.
        Returns ``[]`` when the result is not selected or a disk error occurred
        (logged and counted; files already written for this entry are removed).
        """
        if not self.wants(result):
            return []
        try:
            images: dict[str, np.ndarray] = {}
            if "image" in self.cfg.what:
                images["image"] = frame_image
            if "mask" in self.cfg.what and result.mask is not None:
                images["mask"] = result.mask.astype(np.uint8) * 255
            if "overlay" in self.cfg.what:
                images["overlay"] = draw_overlay(frame_image, result)
        except Exception as exc:  # a bad frame or mask must not reach the inspection loop
            self._failed(result.id, f"cannot draw: {exc}")
            return []
        return self._write_entry(result.id, result.captured_at, images, record)

    def save_error(self, record: dict, frame_image: np.ndarray | None = None, captured_at: float | None = None) -> list[Path]:
        """Archive an error record (and its frame, when there was one) if ``cfg.errors``.

        captured_at: UNIX seconds used for the folder and name; default now.
        """
        if not self.wants_errors():
            return []
        images = {"image": frame_image} if frame_image is not None and "image" in self.cfg.what else {}
        result_id = str(record.get("id") or uuid.uuid4())
        return self._write_entry(result_id, time.time() if captured_at is None else captured_at, images, record)

    def _write_entry(self, result_id: str, captured_at: float, images: dict[str, np.ndarray], record: dict) -> list[Path]:
        when = datetime.fromtimestamp(captured_at, timezone.utc)
        day, stem = when.strftime("%Y-%m-%d"), f"{when.strftime('%H%M%S')}_{_safe_id(result_id)}"
        folder = self.root / day
        written: list[Path] = []
        sizes: dict[str, int] = {}
        with self._lock:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for part, image in images.items():
                    ok, buf = cv2.imencode(".png", image)
                    if not ok:
                        raise ValueError(f"PNG encoding of the {part} failed")
                    path = folder / f"{stem}_{part}.png"
                    sizes[path.name] = self._write_atomic(path, buf.tobytes())
                    written.append(path)
                data = (json.dumps(record, ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode("utf-8")
                path = folder / f"{stem}_record.json"
                sizes[path.name] = self._write_atomic(path, data)
                written.append(path)
            except (OSError, ValueError, TypeError, cv2.error) as exc:
                for path in written:  # no half entries: the caller is told nothing was archived
                    _unlink(path)
                self._failed(result_id, str(exc))
                return []
            self._add(_Entry((day, stem), captured_at, folder, sizes))
            self._counts["saved"] += 1
            self._counts["files_written"] += len(written)
        log.debug("archived %s in %s (%d files)", result_id, folder, len(written))
        return written

    def _write_atomic(self, path: Path, data: bytes) -> int:
        """Write ``data`` to a temporary name beside ``path``, then rename it into place."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.cfg.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        return len(data)

    def _failed(self, result_id: str, why: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            n = self._counts["errors"]
        log.error("archive: cannot archive result %s under %s: %s (%d archive errors so far)", result_id, self.root, why, n)

    # --- the index ------------------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        old = self._entries.get(entry.key)
        if old is not None:  # the same result archived again: its files were replaced
            self._total -= old.size
            entry.files = {**old.files, **entry.files}
        else:
            self._per_day[entry.key[0]] += 1
        entry.token = next(self._tokens)
        self._entries[entry.key] = entry
        self._total += entry.size
        heapq.heappush(self._heap, (entry.captured_at, entry.token, entry.key))

    def _scan(self) -> None:
        """Index what a previous run left; delete temporary leftovers of a crash."""
        try:
            days = sorted(p for p in self.root.iterdir() if p.is_dir() and _DAY.match(p.name))
        except FileNotFoundError:
            return
        except OSError as exc:
            self._counts["errors"] += 1
            log.error("archive: cannot read %s: %s; archiving will fail until it is fixed", self.root, exc)
            return
        found: dict[tuple[str, str], _Entry] = {}
        for folder in days:
            try:
                names = os.listdir(folder)
            except OSError as exc:
                log.error("archive: cannot list %s: %s", folder, exc)
                continue
            try:
                day_start = datetime.strptime(folder.name, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
            except ValueError:
                continue  # e.g. 2025-13-40: not a day folder of ours
            indexed_here = False
            for name in names:
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    _unlink(folder / name)
                    continue
                m = _FILE.match(name)
                if m is None:
                    continue  # not ours: neither indexed nor deleted
                hhmmss = m.group(1)
                h, mi, sec = int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:])
                if h > 23 or mi > 59 or sec > 60:
                    continue
                try:
                    size = (folder / name).stat().st_size
                except OSError:
                    continue
                captured_at = day_start + h * 3600 + mi * 60 + sec
                key = (folder.name, f"{m.group(1)}_{m.group(2)}")
                entry = found.setdefault(key, _Entry(key, captured_at, folder))
                entry.files[name] = size
                indexed_here = True
            if not indexed_here:
                try:
                    folder.rmdir()  # an empty day folder left by a crash during pruning
                except OSError:
                    pass
        for entry in found.values():
            self._add(entry)
        log.info("archive %s: %d entries, %.1f MiB", self.root, len(self._entries), self._total / MIB)

    # --- pruning --------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> tuple[int, int]:
        """Delete whole entries, oldest first, while the oldest is older than
        ``max_age_days`` or the total exceeds ``max_total_mb``; empty day folders go too.

        now: UNIX seconds (default: the current time). Returns (files removed,
        bytes freed). Costs O(1) when nothing is due; never raises.
        """
        if not self.cfg.enabled:
            return 0, 0
        now = time.time() if now is None else now
        cutoff = None if self.cfg.max_age_days is None else now - self.cfg.max_age_days * 86400.0
        files_removed = bytes_freed = 0
        with self._lock:
            while self._heap:
                captured_at, token, key = self._heap[0]
                entry = self._entries.get(key)
                if entry is None or entry.token != token:
                    heapq.heappop(self._heap)  # superseded by a later save of the same entry
                    continue
                too_old = cutoff is not None and captured_at < cutoff
                too_big = self._max_bytes is not None and self._total > self._max_bytes
                if not (too_old or too_big):
                    break
                heapq.heappop(self._heap)
                del self._entries[key]
                self._total -= entry.size
                n, freed = self._delete(entry)
                files_removed += n
                bytes_freed += freed
                self._counts["pruned_entries"] += 1
            self._counts["pruned_files"] += files_removed
            self._counts["bytes_freed"] += bytes_freed
        if files_removed:
            log.info("archive: pruned %d files (%.1f MiB); %.1f MiB kept", files_removed, bytes_freed / MIB, self._total / MIB)
        return files_removed, bytes_freed

    def _delete(self, entry: _Entry) -> tuple[int, int]:
        removed = freed = 0
        for name, size in entry.files.items():
            try:
                os.unlink(entry.folder / name)
            except FileNotFoundError:
                continue  # deleted by someone else: its bytes are already gone
            except OSError as exc:
                self._counts["errors"] += 1
                log.error("archive: cannot delete %s: %s", entry.folder / name, exc)
                continue
            removed += 1
            freed += size
        day = entry.key[0]
        self._per_day[day] -= 1
        if self._per_day[day] <= 0:
            del self._per_day[day]
            try:
                entry.folder.rmdir()  # fails (and the folder stays) if anything else lives there
            except OSError:
                pass
        return removed, freed

    # --- reporting ------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return self._total

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        """Entries and bytes held, and counters: saved, files_written, errors,
        pruned_entries, pruned_files, bytes_freed."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._total, **self._counts}

    def __repr__(self) -> str:
        return f"Archive({str(self.root)!r}, {len(self._entries)} entries, {self._total / MIB:.1f} MiB)"


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def entry_files(root: Path) -> dict[str, dict[str, Path]]:
    """What an archive holds, for readers (``station report``): the result id as its file
    names spell it (:func:`file_id`) → {"image" | "mask" | "overlay" | "record": path}.
    One listing of the day folders; files not of the archive's naming are left out."""
    out: dict[str, dict[str, Path]] = {}
    try:
        days = sorted(p for p in Path(root).iterdir() if p.is_dir() and _DAY.match(p.name))
    except OSError:
        return out
    for folder in days:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            m = _FILE.match(name)
            if m is not None:
                out.setdefault(m.group(2), {})[m.group(3)] = folder / name
    return out


def file_id(result_id: str) -> str:
    """A result id as the archive's file names spell it (the key of :func:`entry_files`)."""
    return _safe_id(result_id)
