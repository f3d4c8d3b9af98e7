"""What a batch job leaves behind and how it stops: the signal policy (SIGINT, SIGTERM), the
space reserved for the manifest, outputs of inputs that are gone, the manifest and the
compacted done-log, and the summary a run prints and logs. Used by :mod:`pipelines.edit_batch`.
"""

from __future__ import annotations

import io
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from hfedit.editing.editor import RECONSTRUCTION
from hfedit.files import is_temporary
from hfedit.storage import Location
from pipelines.batch_job import (COMPACTED, LOG_DIR, MANIFEST, RETRIED, DoneIndex, Entry,
                                 log_line, output_relpath, to_display)

if TYPE_CHECKING:
    from pipelines.edit_batch import JobResult


class StopOnSignals:
    """One policy for SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, ``kill``, a scheduler)
    while the job runs: raise KeyboardInterrupt in the driver, remember the signal (so that when
    Ray Data's iterator absorbs the KeyboardInterrupt and goes on, the driver still stops at the
    next batch it receives: seen once after SIGINT), and let the job write its manifest and
    summary and exit with 128 + the signal's number (130, 143). Outside the main thread (no
    signal handlers there) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.signum = self.signum or signum
        raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handler)

    def stopped(self) -> tuple[str, int]:
        """(error text, exit status) for a job this stopped (a KeyboardInterrupt without a
        signal, e.g. raised by a test, counts as SIGINT)."""
        signum = self.signum or signal.SIGINT
        return f"interrupted ({signal.Signals(signum).name})", 128 + signum

    def __enter__(self) -> "StopOnSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def _reserve_space(out: Path, rows: int) -> Path:
    """A file holding the space the manifest needs (``512 B`` a row, at least 256 kB), deleted
    to write it when the disk fills up (ENOSPC) during the job; nothing when it cannot be made."""
    path = out / ".edit_batch.reserve"
    try:
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(256 << 10, 512 * rows))
    except OSError:
        path.unlink(missing_ok=True)
    return path


def stale_outputs(out: Location, entries: list[Entry], attributes: list[str],
                  manifest: pd.DataFrame) -> list[str]:
    """PNGs under ``<out>/<attribute>/`` that no current input writes: its input was deleted,
    or is refused now (a reason a rerun would repeat). Sorted ``<attribute>/<name>`` paths."""
    refused = {(i, a) for i, a, s, r in zip(manifest.id, manifest.attribute, manifest.status,
                                            manifest.reason) if s != "ok" and r not in RETRIED}
    keep = {output_relpath(a, e.name) for e in entries if e.name for a in attributes
            if (to_display({"id": e.id})["id"], a) not in refused}
    if out.local is None:
        found = (rel for a in attributes for rel in out.files(a) if rel.endswith(".png"))
        return sorted(rel for rel in found if rel not in keep)
    root = out.local  # walked with pathlib: names that are not UTF-8 are files too
    paths = (p for a in attributes for p in (root / a).rglob("*.png") if (root / a).is_dir())
    return sorted(rel for p in paths if p.is_file() and not is_temporary(p)
                  and (rel := p.relative_to(root).as_posix()) not in keep)


def _write_manifest(df: pd.DataFrame, out: Location) -> str:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return out.write_bytes(MANIFEST, buf.getvalue())


def _compact_logs(out: Location, done: DoneIndex) -> None:
    """Replace the per-process logs (or a store's per-image objects) by one file of the rows
    that stand (bounded growth)."""
    keep = [r for r in done.refresh().rows.values()
            if r["status"] == "ok" or r.get("reason") not in RETRIED]
    text = "".join(log_line(r) for r in keep)
    out.write_bytes(f"{LOG_DIR}/{COMPACTED}", text.encode())
    for rel in out.files(LOG_DIR, recursive=False):
        if rel.endswith(".jsonl") and rel != f"{LOG_DIR}/{COMPACTED}":
            out.delete(rel)


# ---------------------------------------------------------------------------- summary
def count(df: pd.DataFrame, run: str, scheduled: int) -> dict:
    """Counts per input (an input is edited when all its attributes are)."""
    per = df.groupby("id", sort=False).agg(ok=("status", lambda s: bool((s == "ok").all())),
                                           now=("run", lambda r: bool((r == run).any())))
    reasons = (df[df.status == "error"].groupby("id")["reason"].first().value_counts())
    return {"inputs": int(len(per)), "edited": int(per.ok.sum()),
            "edited_now": int((per.ok & per.now).sum()), "edited_before": int((per.ok & ~per.now).sum()),
            "failed": int((~per.ok).sum()), "scheduled": scheduled,
            "reasons": {str(k): int(v) for k, v in sorted(reasons.items())}}


def summary_table(df: pd.DataFrame, run: str) -> str:
    head = f"{'attribute':<16}{'edited':>7}{'now':>6}{'before':>7}{'failed':>7}{'L1':>9}{'SSIM':>8}" \
           f"{'max err':>10}{'edit s/img':>11}"
    lines = [head, "-" * len(head)]
    for attr, g in df.groupby("attribute", sort=True):
        ok = g[g.status == "ok"]
        now = ok[ok.run == run]
        max_err = f"{ok.max_error.max():.1e}" if ok.max_error.notna().any() else "-"
        lines.append(f"{attr:<16}{len(ok):>7}{len(now):>6}{len(ok) - len(now):>7}{len(g) - len(ok):>7}"
                     f"{ok.l1.mean():>9.4f}{ok.ssim.mean():>8.4f}{max_err:>10}"
                     f"{now.edit_s.mean() if len(now) else float('nan'):>11.3f}")
    bad = df[df.status == "error"].groupby("reason")["id"].nunique()
    if len(bad):
        lines.append("failed inputs by reason: " + ", ".join(f"{r} {n}" for r, n in bad.items()))
    return "\n".join(lines)


def summary_line(result: JobResult, out: Location) -> str:
    c = result.counts
    rate = c["edited_now"] / result.seconds if result.seconds > 0 and c["edited_now"] else 0.0
    reasons = ", ".join(f"{k} {v}" for k, v in c["reasons"].items())
    return (f"edit_batch: {c['inputs']} inputs, {c['edited']} edited ({c['edited_now']} now, "
            f"{c['edited_before']} before), {c['failed']} failed" + (f" ({reasons})" if reasons else "")
            + (f"; {len(result.ignored)} other files ignored (not images by their suffix: "
               f"{', '.join(result.ignored[:3])}{', ...' if len(result.ignored) > 3 else ''})"
               if result.ignored else "")
            + (f"; {len(result.stale)} stale outputs {'removed' if result.stale_removed else 'kept'}"
               f" (inputs deleted or refused: {', '.join(result.stale[:3])}"
               f"{', ...' if len(result.stale) > 3 else ''}"
               f"{'' if result.stale_removed else '; --remove-stale deletes them'})"
               if result.stale else "")
            + f"; {result.seconds:.1f} s, {rate:.2f} images/s; manifest {out.name(MANIFEST)}"
            + (f"; stopped: {result.error}" if result.error else ""))


def metrics_dict(result: JobResult) -> dict:
    ok = result.manifest[result.manifest.status == "ok"]
    per_attr = {a: {"l1": float(g.l1.mean()), "ssim": float(g.ssim.mean()),
                    **({"max_error": float(g.max_error.max())} if a == RECONSTRUCTION else {})}
                for a, g in ok.groupby("attribute")}
    return {**result.counts, "seconds": result.seconds, "attributes": per_attr}
