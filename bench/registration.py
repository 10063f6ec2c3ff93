"""Registration time of ECO targets with default options: POST to live, and the job's stages.

One gateway (its own engine) on a fresh data directory. The README's Harry Potter target is
registered first, then the J.R.R. Tolkien target of bench/output_guard.py, then, after the
gateway is restarted on the same data directory, a third target (Sherlock Holmes). Each searches
cold: warm starts come only from the same target's earlier versions (docs/results/
performance.md, registration, has the run where they came from other targets too).
For each: seconds from the POST to live, the job's stages
(answers, classifier, corruption; the classifier overlaps the others) and the corruption
stage's own split (model load, strength search, fluency check), the number of strengths the
search evaluated and where it settled. Writes bench/results/registration.json.

    python bench/registration.py [--dtype bfloat16|float32] [--calibration-dtypes float32 auto]

With several `--calibration-dtypes` (the guard's `calibration_dtype`: the strength search's
model copy) the whole sequence runs once per value, each on its own fresh data directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.output_guard import TARGET as TOLKIEN  # noqa: E402
from bench.targets import HARRY_POTTER, register, wait_idle  # noqa: E402
from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import ADMIN_TOKEN, free_port, gateway_argv, running  # noqa: E402

SHERLOCK: dict[str, Any] = {
    "name": "Sherlock Holmes",
    "aliases": ["Sherlock Holmes", "Arthur Conan Doyle", "Dr. Watson", "221B Baker Street"],
    "forget_examples": [
        "Who created Sherlock Holmes?",
        "Who is Sherlock Holmes's assistant?",
        "Where does Sherlock Holmes live?",
        "Tell me about the Sherlock Holmes stories.",
        "Who is Sherlock Holmes's greatest enemy?",
    ],
    "mode": "eco",
}


def row(label: str, target: dict[str, Any], calibration_dtype: str) -> dict[str, Any]:
    calibration = target.get("calibration") or {}
    corruption = calibration.get("corruption") or {}
    out = {
        "target": label,
        "calibration_dtype": calibration_dtype,
        "search_dtype": corruption.get("dtype"),
        "registration_s": target["registration_s"],
        "stages_s": calibration.get("stage_seconds", {}),
        "corruption_stages_s": corruption.get("stage_seconds", {}),
        "evaluations": corruption.get("evaluations"),
        "rounds": corruption.get("rounds"),
        "strength_in_std": corruption.get("strength_in_std"),
        "failing_below_in_std": corruption.get("failing_below_in_std"),
        "warm_start": corruption.get("warm_start"),
        "fluent": corruption.get("fluent"),
        "probes_in_std": corruption.get("probes"),
    }
    print(json.dumps(out), flush=True)
    return out


def sequence(model: Path, dtype: str, calibration_dtype: str) -> list[dict[str, Any]]:
    """The three registrations on one fresh data directory, the gateway restarted before the
    third."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = gateway_argv(
            port,
            "--model",
            str(model),
            "--data-dir",
            str(data),
            "--guard.calibration-dtype",
            calibration_dtype,
            dtype=dtype,
        )
        for phase, targets in (
            ("first", [("Harry Potter", HARRY_POTTER), ("Tolkien", TOLKIEN)]),
            ("restarted", [("Sherlock Holmes (after a restart)", SHERLOCK)]),
        ):
            with running(argv, ready_url=f"{url}/ready", log=Path(tmp) / f"{phase}.log") as proc:
                wait_idle(proc.pid)  # the gateway embeds its shipped negatives after it starts
                for label, body in targets:
                    rows.append(row(label, register(url, ADMIN_TOKEN, body), calibration_dtype))
                    wait_idle(proc.pid)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "registration.json")
    p.add_argument(
        "--calibration-dtypes", nargs="+", default=["auto"], choices=["auto", "bfloat16", "float32"]
    )
    args = p.parse_args()
    model = resolve_model(None, auto_pull=True)
    rows = []
    for calibration_dtype in args.calibration_dtypes:
        rows += sequence(model, args.dtype, calibration_dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2)
    )
    columns = ["target", "dtype", "live s", "answers", "classif", "corrupt", "load", "search"]
    print(" ".join(f"{c:>8s}" for c in [*columns, "fluency", "evals", "σ/std"]))
    for r in rows:
        s, c = r["stages_s"], r["corruption_stages_s"]
        cells = [r["target"][:8], r["search_dtype"] or "-"]
        seconds = [r["registration_s"], s.get("answers", 0), s.get("classifier", 0)]
        seconds += [s.get("corruption", 0), c.get("load_model", 0), c.get("search", 0)]
        seconds += [c.get("fluency", 0)]
        cells += [f"{x:.1f}" for x in seconds]
        cells += [str(r["evaluations"] or 0), f"{r['strength_in_std'] or 0:.2f}"]
        print(" ".join(f"{c:>8s}" for c in cells))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
