"""The results card: a Markdown table (one row per mode), JSON with every number, and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evaluation.config import RunState, config_card

COLUMNS = (
    ("forget_quality", "forget quality ↑"),
    ("forget_quality_folded", "FQ folded ↑"),
    ("forget_quality_b", "FQ (b) ↑"),
    ("forget_quality_b_folded", "FQ (b) folded ↑"),
    ("model_utility", "model utility ↑"),
    ("forget_rouge", "forget ROUGE-L ↓"),
    ("paraphrased_rouge", "paraphrased ROUGE-L ↓"),
    ("forget_prob", "forget prob ↓"),
    ("forget_truth_ratio", "forget TR"),
    ("retain_rouge", "retain ROUGE-L"),
    ("real_authors_rouge", "real authors ROUGE-L"),
    ("world_facts_rouge", "world facts ROUGE-L"),
    ("mmlu_accuracy", "MMLU acc"),
    ("wall_s", "eval s"),
)
GUARD_COLUMNS = (
    ("flagged_forget", "flagged forget"),
    ("flagged_paraphrased", "flagged paraphrased"),
    ("fp_retain", "FP retain"),
    ("fp_real_authors", "FP real authors"),
    ("fp_world_facts", "FP world facts"),
    ("fp_mmlu", "FP MMLU"),
    ("mmlu_unflagged_accuracy", "MMLU acc (unflagged)"),
    ("mmlu_unflagged_bare", "bare MMLU acc (same prompts)"),
    ("mmlu_unflagged_same", "same MMLU answer as bare"),
)
PROTOCOLS = """\
Two scoring protocols. **(a) generation-time** (forget quality, FQ folded, forget prob, forget
TR): the answer is scored after the prompt as the gateway sends it for a chat request (for eco:
the question classified, its target tokens corrupted), the answer tokens clean. **(b) as read by
the gateway** (FQ (b), eco only): question and answer go to the gateway as one prompt (the
answer as the assistant's continued turn, `prompt_logprobs`), which it classifies and corrupts
like any prompt, target mentions in the answer included (the ECO paper's teacher-forced
protocol); its per-token numbers are `forget_prob_b` and
`forget_truth_ratio_b` in the JSON. The other modes corrupt no prompt (delta+npo classifies it
to switch its offset on: the answer is then scored under the offset), so (b) is (a) for them.
Forget quality is TOFU's KS test on the raw truth ratio R; *folded* is the ECO paper's variant,
on min(R, 1/R). The output guard changes what (a)'s generations say (ROUGE), never (a)'s
teacher-forced scores: it watches generated text, and scoring generates none.
"""
ORDER = ("none", "prompt", "eco", "delta", "snap", "snap+npo", "delta+npo", "reference")
DIFFERENCES = """\
- Model: SmolLM2-135M-Instruct (the paper fine-tunes Llama-2-7B-chat and Phi-1.5).
- Data: the forget split's authors plus {retain_authors} retain authors sampled with seed {seed}
  (authors {retain_ids}), {target_pairs} QA pairs for the target and {reference_pairs} for the
  reference; the paper trains on all 4,000 pairs (reference: the whole retain split).
- Training: {epochs} epochs, lr {lr}, batch {batch}, AdamW with warm-up and linear decay
  (the paper: 5 epochs, lr 1e-5, effective batch 32, on GPUs).
- Utility: retain measured on {retain_eval} retain_perturbed questions of the sampled authors
  (the paper: all 400); the first {real} of 100 real_authors and {world} of 117 world_facts
  questions; MMLU on {mmlu} val questions (seeded sample, zero-shot, first-token letter; not part
  of TOFU).
- Greedy generations of at most {max_tokens} tokens (the paper: 200).
- MMLU reads the first token's top-20 logprobs from the gateway, except for delta and the
  questions delta+npo flags: the gateway refuses logprobs for δ requests (vLLM takes them before
  the offset), so their first token comes from the combined logits in transformers.
- Answer probabilities are computed with transformers on the weights and prompts each mode
  serves: eco feeds the corrupted prompt embeddings the gateway sends for flagged prompts
  (`--eco-scoring gateway` instead asks the gateway's own prompt logprobs, where the guard also
  reads the answer and corrupts its target mentions: the ECO paper's protocol); delta combines
  the logits as the engine does (the gateway refuses logprobs for δ requests).
- δ and SNAP (the paper has neither: they are obliviate's modes): the SNAP copy of the target is
  trained once by `python -m offset.snap` with the arguments a δ registration job passes (target
  name, aliases, the operator's examples, the retain authors' prompts as hard positives, lr 1e-4)
  and handed to the δ registration as `options.unlearned_model` (big = small_base = the target,
  scope `all`, α = {alpha}); the snap mode serves that same copy. snap+npo serves a second
  copy trained with the same arguments plus the forget split's question-answer pairs as forget
  examples with their answers, which a δ job trains on with NPO (their likelihood pushed below
  the target's); at α = 1 with big = small base it is also what delta would serve with them at
  scope `all`. delta+npo registers δ with that copy at scope `flagged`: the offset is added
  only to requests the target's classifier flags, every other request gets the target's own
  answer (scored so: the flag from the gateway's /admin/classify).
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def _table(rows: dict[str, dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    head = "| mode | " + " | ".join(title for _, title in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [head, rule]
    for mode in [m for m in ORDER if m in rows]:
        cells = [_fmt(rows[mode].get(key)) for key, _ in columns]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Forget quality (log scale) against model utility, one point per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    points: dict[tuple[float, float], list[str]] = {}  # modes on one point share a label
    for mode in [m for m in ORDER if m in rows]:
        x, y = rows[mode]["model_utility"], max(rows[mode]["forget_quality"], 1e-30)
        points.setdefault((round(x, 4), float(f"{y:.3g}")), []).append(mode)
    for (x, y), modes in points.items():
        ax.scatter([x], [y], s=60)
        ax.annotate(" = ".join(modes), (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_yscale("log")
    ax.set_xlabel("model utility (harmonic mean, higher is better)")
    ax.set_ylabel("forget quality (KS p-value vs reference, higher is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(state: RunState, versions: dict[str, str]) -> dict[str, Any]:
    """Write tofu-<split>.md/.json/.png under the output folder; returns the JSON data."""
    cfg, subset = state.config, state.subset
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tofu-{cfg.forget_split}"
    rows = {m: r.row for m, r in state.results.items()}
    data = {
        "run_key": run_key(cfg, subset),
        "command": cfg.command,
        "earlier_commands": state.earlier_commands,
        "config": config_card(cfg),
        "subset": subset.describe(),
        "versions": versions,
        "timings_s": state.timings,
        "cards": state.cards,
        "rows": rows,
        "failures": state.failures,
        "samples": {m: r.samples for m, r in state.results.items()},
        "forget_truth_ratios": {m: r.forget_truth_ratios for m, r in state.results.items()},
        "gateway_truth_ratios": {
            m: r.gateway_truth_ratios for m, r in state.results.items() if r.gateway_truth_ratios
        },
        "mmlu_predictions": {m: r.mmlu_predictions for m, r in state.results.items()},
        "measured_now": sorted(m for m, r in state.results.items() if not r.loaded),
    }
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    plot(rows, out / f"{stem}.png", f"TOFU {cfg.forget_split}, SmolLM2-135M-Instruct")
    ft = cfg.finetune
    differences = DIFFERENCES.format(
        retain_authors=len(subset.retain_authors),
        seed=cfg.seed,
        retain_ids=", ".join(map(str, subset.retain_authors)),
        target_pairs=len(subset.target_train),
        reference_pairs=len(subset.reference_train),
        epochs=ft.epochs,
        lr=ft.lr,
        batch=ft.batch_size,
        retain_eval=len(subset.retain_eval),
        real=len(subset.real_authors),
        world=len(subset.world_facts),
        mmlu=len(state.mmlu),
        max_tokens=cfg.max_tokens,
        alpha=cfg.alpha,
    )
    not_run = [m for m in cfg.modes if m not in rows]
    failures = "".join(
        f"- **{m}** did not run: {state.failures.get(m, 'not run (yet)').splitlines()[0]}\n"
        for m in not_run
    )
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in state.timings.items())
    training = ", ".join(
        f"{name} {card['train_seconds']:.0f} s"
        + (f" ({card['tokens_per_second']} tokens/s)" if card.get("tokens_per_second") else "")
        for name, card in state.cards.items()
        if isinstance(card, dict) and card.get("train_seconds")
    )
    version_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    earlier = "".join(
        f" (rows {', '.join(c['modes'])} from an earlier run of the same setting: `{c['command']}`)"
        for c in state.earlier_commands
    )
    text = f"""# TOFU {cfg.forget_split}: forget quality and model utility per mode

Command: `{cfg.command}`{earlier}

Forget authors: {", ".join(subset.author_names)} (registered through the admin API with
{len(subset.author_names) * 8} operator-written example prompts, not the test questions).

{_table(rows, COLUMNS)}

{PROTOCOLS}
The guard (eco and delta+npo, the modes that classify; the others serve every prompt alike):

{_table({m: r for m, r in rows.items() if "fp_mmlu" in r}, GUARD_COLUMNS)}

{failures}
![forget quality against model utility]({stem}.png)

Every number, per split, is in [{stem}.json]({stem}.json).

## How this differs from the paper's setting

{differences}
## Run

Wall times ({versions.get("cpus", "?")} cores; cached fine-tunes and SNAP copies: 0 s): {timings}.
Training (also when reused from the cache): {training}.
Versions: {version_line}.
"""
    (out / f"{stem}.md").write_text(text)
    return data


def run_key(config: Any, subset: Any) -> str:
    """What must match for two runs' rows to share a table: the setting, not the modes."""
    return run_key_of(config_card(config), subset.describe())


def run_key_of(card: dict[str, Any], subset: dict[str, Any]) -> str:
    """`run_key` from a results file's `config` and `subset` entries."""
    import hashlib

    kept = {k: v for k, v in card.items() if k not in ("modes", "command")}
    if kept.get("eco_scoring", "transformers") == "transformers":
        kept.pop("eco_scoring", None)  # the default: runs from before the option still match
    blob = json.dumps({"config": kept, "subset": subset}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
