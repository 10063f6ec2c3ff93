"""What `obliviate targets` prints: rich tables and progress for people, plain JSON for scripts.

With `--json` stdout carries only the API's JSON (one document per command) and every note goes
to stderr. Without it, tables and a live progress bar (on a terminal; one line per stage change
otherwise, e.g. in CI logs).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.prompt import Confirm
from rich.table import Table
from rich.text import Text

from server.console.views import figures, highlight, num, pct

Json = dict[str, Any]


def _clock(elapsed: float) -> str:
    """Elapsed time as m:ss."""
    s = int(elapsed)
    return f"{s // 60}:{s % 60:02d}"


def _applied(t: Json) -> str:
    if t.get("active"):
        return "applied"
    return "disabled" if not t.get("enabled") else "not applied"


class Output:
    """One command's output channel."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        # Piped output is read by people in logs too: wide enough that ids are never cut.
        width = None if sys.stdout.isatty() else 200
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def _json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def error(self, message: str) -> None:
        self.err.print(Text(f"error: {message}", style="bold red"))

    def note(self, message: str) -> None:
        (self.err if self.json_mode else self.out).print(Text(message))

    def confirm(self, question: str) -> bool:
        return Confirm.ask(question, console=self.err, default=False)

    # --- jobs ------------------------------------------------------------------------------

    def job_queued(self, job: Json) -> None:
        if self.json_mode:
            return self._json(job)
        self.out.print(Text(f"Queued registration job {job['id']} (target {job['target_id']})."))
        self.out.print(Text(f"Follow it with: obliviate targets wait {job['id']}", style="dim"))

    @contextmanager
    def job_progress(self) -> Iterator[Callable[[Json], None]]:
        """A callback for every job state read: a live bar on a terminal, else stage lines."""
        started = time.monotonic()
        if self.json_mode:
            yield lambda job: None
            return
        if not self.out.is_terminal:
            last: list[tuple[str, float]] = []

            def line(job: Json) -> None:
                # A line per change of stage, and one every 10 s while a stage runs on.
                key, now = f"{job['status']} {job['stage']}", time.monotonic()
                if not last or last[-1][0] != key or now - last[-1][1] >= 10:
                    last.append((key, now))
                    self.out.print(
                        Text(
                            f"{_clock(time.monotonic() - started):>6}  {job['status']:<9} "
                            f"{job['stage'] or '-':<14} {pct(job['progress'], 0):>4}"
                        )
                    )

            yield line
            return
        columns = (
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.out, transient=False) as progress:
            task = progress.add_task("queued", total=1.0)

            def bar(job: Json) -> None:
                progress.update(
                    task,
                    completed=float(job["progress"]),
                    description=job["stage"] or job["status"],
                )

            yield bar

    def job_done(self, job: Json, target: Json) -> None:
        if self.json_mode:
            return self._json({"job": job, "target": target})
        if job["status"] != "succeeded":
            self.out.print(
                Text(f"✗ Registration of {target['name']!r} failed: {job['error']}", "red")
            )
            return
        f = figures(target.get("calibration"))
        self.out.print(
            Text(
                f"✓ {target['name']} is active (version {target['version']}): threshold "
                f"{num(target.get('threshold'))}, held-out recall {pct(f.heldout_recall)}, "
                f"false positives {pct(f.heldout_fpr, 2)}, corruption σ {num(f.strength)}",
                style="green",
            )
        )

    def jobs(self, jobs: list[Json], names: dict[str, str]) -> None:
        if self.json_mode:
            return self._json({"object": "list", "data": jobs})
        table = Table("JOB", "TARGET", "STATUS", "STAGE", "PROGRESS", "CREATED", box=None)
        for j in jobs:
            table.add_row(
                j["id"],
                names.get(j["target_id"], j["target_id"]),
                j["status"],
                j["stage"] or "-",
                pct(j["progress"], 0),
                str(j["created_at"])[:19],
            )
        self.out.print(table)

    # --- targets ---------------------------------------------------------------------------

    def targets(self, targets: list[Json]) -> None:
        if self.json_mode:
            return self._json({"object": "list", "data": targets})
        if not targets:
            self.out.print("No targets yet: register one with `obliviate targets add`.")
            return
        table = Table(
            "ID", "NAME", "STATUS", "MODE", "VER", "APPLIED", "THRESHOLD", "RECALL", "FPR", box=None
        )
        for t in targets:
            f = figures(t.get("calibration"))
            table.add_row(
                t["id"],
                t["name"],
                t["status"],
                t["mode"],
                str(t["version"]),
                _applied(t),
                num(t.get("threshold")),
                pct(f.heldout_recall),
                pct(f.heldout_fpr, 2),
            )
        self.out.print(table)

    def target(self, t: Json, jobs: list[Json]) -> None:
        if self.json_mode:
            return self._json(t)
        f = figures(t.get("calibration"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        override = " (operator override)" if t.get("threshold_override") is not None else ""
        rows = [
            ("Name", t["name"]),
            ("Id", t["id"]),
            ("Status", f"{t['status']}, {_applied(t)}"),
            ("Mode", t["mode"]),
            ("Version", str(t["version"])),
            ("Aliases", ", ".join(t.get("aliases") or []) or "-"),
            ("Examples", f"{t['n_forget_examples']} to forget, {t['n_retain_examples']} to keep"),
            ("Threshold", num(t.get("threshold")) + override),
            ("Held-out recall", pct(f.heldout_recall)),
            ("False positives", f"{pct(f.heldout_fpr, 2)} (goal {pct(f.fpr_target)})"),
            ("Corruption", f"{f.method or '-'}, σ {num(f.strength)}"),
            ("Error", t.get("error") or "-"),
            ("Jobs", ", ".join(f"{j['id']} {j['status']}" for j in jobs) or "-"),
        ]
        for key, value in rows:
            grid.add_row(key, Text(value))
        self.out.print(grid)

    def changed(self, t: Json) -> None:
        if self.json_mode:
            return self._json(t)
        threshold = f"threshold {num(t.get('threshold'))}"
        if t.get("threshold_override") is not None:
            threshold = f"threshold override {num(t['threshold_override'])}"
        self.out.print(Text(f"{t['name']}: {_applied(t)}, {threshold}"))

    def deleted(self, t: Json) -> None:
        if self.json_mode:
            return self._json({"id": t["id"], "object": "target", "deleted": True})
        self.out.print(Text(f"Deleted {t['name']!r}: it is no longer applied."))

    # --- classify --------------------------------------------------------------------------

    def classification(self, result: Json) -> None:
        if self.json_mode:
            return self._json(result)
        flagged = [r for r in result["results"] if r["flagged"]]
        if flagged:
            names = ", ".join(r["target"] for r in flagged)
            self.out.print(Text(f"FLAGGED: {names}", style="bold red"))
        else:
            self.out.print(Text("passes: no target flagged", style="bold green"))
        spans = [(s["start"], s["end"], r["target"]) for r in flagged for s in r["spans"]]
        text = Text()
        for seg in highlight(result["text"], spans):
            text.append(seg.text, style="bold black on yellow" if seg.targets else "")
        self.out.print(text)
        if not result["results"]:
            self.out.print("(no target is active)")
            return
        table = Table("TARGET", "SCORE", "THRESHOLD", "DECISION", "STAGE", "CORRUPTED", box=None)
        for r in result["results"]:
            positions = r.get("corrupted_positions")
            table.add_row(
                r["target"],
                num(r["score"], 4),
                num(r["threshold"], 4),
                "flagged" if r["flagged"] else "passes",
                r["stage"],
                str(positions) if positions is not None else "-",
            )
        self.out.print(table)
