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

    python bench/registration.py [--dtype bfloat16|float32]
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


def row(label: str, target: dict[str, Any]) -> dict[str, Any]:
    calibration = target.get("calibration") or {}
    corruption = calibration.get("corruption") or {}
    out = {
        "target": label,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "registration.json")
    args = p.parse_args()
    model = resolve_model(None, auto_pull=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = gateway_argv(port, "--model", str(model), "--data-dir", str(data), dtype=args.dtype)
        for phase, targets in (
            ("first", [("Harry Potter", HARRY_POTTER), ("Tolkien", TOLKIEN)]),
            ("restarted", [("Sherlock Holmes (after a restart)", SHERLOCK)]),
        ):
            with running(argv, ready_url=f"{url}/ready", log=Path(tmp) / f"{phase}.log") as proc:
                wait_idle(proc.pid)  # the gateway embeds its shipped negatives after it starts
                for label, body in targets:
                    rows.append(row(label, register(url, ADMIN_TOKEN, body)))
                    wait_idle(proc.pid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {"dtype": args.dtype}, "rows": rows}, indent=2))
    print(f"{'target':40s} {'live s':>7s} {'answers':>8s} {'classif':>8s} {'corrupt':>8s} "
          f"{'load':>6s} {'search':>7s} {'fluency':>8s} {'evals':>6s} {'σ/std':>6s}")  # fmt: skip
    for r in rows:
        s, c = r["stages_s"], r["corruption_stages_s"]
        print(
            f"{r['target']:40s} {r['registration_s']:7.1f} {s.get('answers', 0):8.1f} "
            f"{s.get('classifier', 0):8.1f} {s.get('corruption', 0):8.1f} "
            f"{c.get('load_model', 0):6.1f} {c.get('search', 0):7.1f} {c.get('fluency', 0):8.1f} "
            f"{r['evaluations'] or 0:6d} {r['strength_in_std'] or 0:6.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
