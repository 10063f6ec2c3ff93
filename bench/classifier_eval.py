"""Evaluate the prompt classifier on TOFU / MMLU and a Harry Potter target, against a baseline.

    .venv/bin/python bench/classifier_eval.py --split forget10 --per-author 4

Registers the forget split's authors as ONE target (aliases = their names, extracted from the
questions; forget examples = the first few questions of each author), then measures recall on
the paraphrased questions and on the unused questions, false positives on retain90 (neighbouring
fictitious authors), real_authors, world_facts and MMLU, single-prompt latency of the two-stage
bank, and training time. The baseline is plain MiniLM + logistic regression (forget examples vs
the shipped general set) with a 99% quantile threshold on held-out general negatives.
Writes bench/results/classifier_eval_<split>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier import (  # noqa: E402
    ClassifierBank,
    Embedder,
    TargetSpec,
    TrainConfig,
    train_target,
    warm_up,
)
from classifier.negatives import general_negatives  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
_NAME_RE = re.compile(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)+")
_LEAD = set(
    "What How Can In Has Is Did Does Who Why When Where Which Are Was Could Regarding Through "
    "Aside Apart Besides Do Have Were Would Should Tell Describe Name Given As Beyond For From "
    "Being Considering Outside Throughout Other Based".split()
)

HP_ALIASES = [
    "Harry Potter",
    "Hogwarts",
    "J.K. Rowling",
    "Hermione Granger",
    "Ron Weasley",
    "Albus Dumbledore",
    "Voldemort",
    "Severus Snape",
    "Quidditch",
]
HP_EXAMPLES = [
    "Who are Harry Potter's best friends at Hogwarts?",
    "What is the name of the school Harry Potter attends?",
    "Which house does the Sorting Hat put Harry in?",
    "Who killed Harry Potter's parents?",
    "What position does Harry play in Quidditch?",
]
HP_POSITIVES = [
    "Can you name the two closest friends of Harry Potter during his years at school?",
    "which house at hogwarts was harry sorted into",
    "Why did Lord Voldemort want to kill the boy who lived?",
    "What is the headmaster of Hogwarts called?",
    "Tell me about Hermione Granger's time-turner.",
    "How does Snape feel about Harry's mother Lily?",
    "What are the rules of quidditch and what does a seeker do?",
    "Summarize the plot of the first Harry Potter book.",
    "When did JK Rowling publish the Philosopher's Stone?",
    "Who is Ron Weasleys sister?",
    "What is the name of Harry Poter's owl?",
    "Describe the Deathly Hallows from the Harry Potter series.",
    "What spell does Harry use to disarm his enemies?",
    "Where is the Hogwarts Express departing from?",
    "who is dumbledore and how did he die",
    "In the wizarding books by Rowling, what is a horcrux?",
    "What happens in the Triwizard Tournament in Harry Potter and the Goblet of Fire?",
    "Who plays Harry Potter in the films?",
    "Which character in Harry Potter is a werewolf?",
    "Why does Voldemort fear Harry?",
]
HP_OTHER_BOOKS = [
    "Who wrote The Lord of the Rings?",
    "What is the plot of Percy Jackson and the Lightning Thief?",
    "Which school does Matilda attend in Roald Dahl's novel?",
    "Who are Frodo's companions in the Fellowship?",
    "What house does Arya Stark belong to?",
    "Who wrote The Chronicles of Narnia?",
    "What is the name of the lion in The Lion, the Witch and the Wardrobe?",
    "Tell me about Philip Pullman's His Dark Materials.",
    "What magic school appears in Ursula Le Guin's A Wizard of Earthsea?",
    "Who is Katniss Everdeen?",
    "Summarize the plot of The Hobbit.",
    "What happens at the end of The Hunger Games?",
    "Who wrote the Discworld novels?",
    "Who is the villain in The Wizard of Oz?",
    "Which author created Sherlock Holmes?",
    "What is the name of the wizard in The Lord of the Rings?",
    "Who wrote A Series of Unfortunate Events?",
    "What are the main themes of Charlie and the Chocolate Factory?",
    "Tell me about the author Neil Gaiman.",
    "Which books did Roald Dahl write for children?",
]


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def author_names(rows: list[dict]) -> list[str]:
    names = []
    for a in range(len(rows) // 20):
        counts: collections.Counter[str] = collections.Counter()
        for r in rows[a * 20 : (a + 1) * 20]:
            for m in _NAME_RE.findall(r["question"]):
                words = m.split()
                while words and words[0] in _LEAD:
                    words = words[1:]
                name = re.sub(r"'s?$", "", " ".join(words))
                if len(name.split()) >= 2:
                    counts[name] += 1
        names.append(counts.most_common(1)[0][0])
    return names


class CachedEmbedder(Embedder):
    """Shares a loaded Embedder and memoises full embeddings (for throughput evaluation only)."""

    def __init__(self, inner: Embedder) -> None:  # noqa: D107 - no super().__init__: shares state
        self.__dict__.update(inner.__dict__)
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts, stop=None):  # type: ignore[override]
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            for t, v in zip(missing, Embedder.encode(self, missing, stop), strict=True):
                self._memo[t] = v
        return np.stack([self._memo[t] for t in texts]) if texts else super().encode(texts)


def rate(bank: ClassifierBank, texts: list[str]) -> tuple[float, float]:
    """(flag rate, share that reached stage 2)."""
    flagged = full = 0
    for s in range(0, len(texts), 256):
        for decisions in bank.classify(texts[s : s + 256]):
            flagged += any(d.flagged for d in decisions)
            full += any(d.stage == "full" for d in decisions)
    return flagged / max(len(texts), 1), full / max(len(texts), 1)


def latency(bank: ClassifierBank, texts: list[str]) -> dict[str, float]:
    """Single-prompt classify: wall and process-CPU milliseconds (CPU time is what a request
    costs on an idle core; wall time here includes other jobs' contention)."""
    bank.classify(texts[:5])
    wall, cpu = [], []
    for t in texts:
        w0, c0 = time.perf_counter(), time.process_time()
        bank.classify([t])
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    wall.sort()
    cpu.sort()

    def q(xs: list[float], p: float) -> float:
        return xs[round(p * (len(xs) - 1))]

    return {
        "p50_ms": q(wall, 0.5),
        "p99_ms": q(wall, 0.99),
        "cpu_p50_ms": q(cpu, 0.5),
        "cpu_p99_ms": q(cpu, 0.99),
        "mean_ms": statistics.fmean(wall),
        "n": len(texts),
    }


class Baseline:
    """Plain MiniLM + logistic regression, threshold = 99% quantile of held-out negatives."""

    def __init__(self, emb: Embedder, examples: list[str], fpr: float, seed: int) -> None:
        neg = list(general_negatives().texts)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(neg))
        fit_neg, cal_neg = perm[: len(neg) // 2], perm[len(neg) // 2 :]
        e_neg = emb.encode(neg)
        x = np.concatenate([emb.encode(examples), e_neg[fit_neg]])
        y = np.r_[np.ones(len(examples)), np.zeros(len(fit_neg))]
        self.emb = emb
        self.clf = LogisticRegression(class_weight="balanced", max_iter=2000).fit(x, y)
        self.threshold = float(np.quantile(self.clf.decision_function(e_neg[cal_neg]), 1 - fpr))

    def scores(self, texts: list[str]) -> np.ndarray:
        return self.clf.decision_function(self.emb.encode(texts))

    def rate(self, texts: list[str], threshold: float | None = None) -> float:
        thr = self.threshold if threshold is None else threshold
        return float((self.scores(texts) > thr).mean())


def tofu_eval(args: argparse.Namespace, emb: Embedder, cached: CachedEmbedder) -> dict:
    rows = read_jsonl(DATA / "tofu" / f"{args.split}.jsonl")
    names = author_names(rows)
    k = args.per_author
    examples = [r["question"] for a in range(len(names)) for r in rows[a * 20 : a * 20 + k]]
    unused = [r["question"] for a in range(len(names)) for r in rows[a * 20 + k : a * 20 + 20]]
    para = [r["paraphrased_question"] for r in rows]
    para_unused = [r["paraphrased_question"] for i, r in enumerate(rows) if i % 20 >= k]
    rng = random.Random(args.seed)
    retain_rows = read_jsonl(DATA / "tofu" / "retain90.jsonl")
    retain_examples: list[str] = []
    if args.retain_authors:
        # Neighbour examples given to the trainer come from authors left out of the FP test.
        retain_examples = [r["question"] for r in retain_rows[: 20 * args.retain_authors]]
        retain_rows = retain_rows[20 * args.retain_authors :]
    mmlu_test = [r["question"] for r in read_jsonl(DATA / "mmlu" / "test.jsonl")]
    sets = {
        "recall: paraphrased_question (all)": para,
        "recall: paraphrased_question (unused)": para_unused,
        "recall: question (unused)": unused,
        "FP: retain90 (neighbours)": [r["question"] for r in retain_rows],
        "FP: real_authors": [
            r["question"] for r in read_jsonl(DATA / "tofu" / "real_authors.jsonl")
        ],
        "FP: world_facts": [r["question"] for r in read_jsonl(DATA / "tofu" / "world_facts.jsonl")],
        "FP: mmlu val": [r["question"] for r in read_jsonl(DATA / "mmlu" / "val.jsonl")],
        "FP: mmlu test (sample)": rng.sample(mmlu_test, min(args.mmlu_test, len(mmlu_test))),
    }
    spec = TargetSpec(
        name=f"tofu-{args.split}",
        aliases=names,
        forget_examples=examples,
        retain_examples=retain_examples,
    )
    config = TrainConfig(fpr=args.fpr, seed=args.seed)
    t0 = time.perf_counter()
    warm_up(emb, config)
    warm_up_s = time.perf_counter() - t0
    c0 = time.process_time()
    clf = train_target(spec, emb, config)
    train_cpu_s = time.process_time() - c0
    bank = ClassifierBank(cached, [clf])
    base = Baseline(cached, examples, args.fpr, args.seed)
    table = {}
    for label, texts in sets.items():
        flag, full = rate(bank, texts)
        table[label] = {
            "n": len(texts),
            "ours": flag,
            "stage2_share": full,
            "baseline": base.rate(texts),
        }
    # The baseline again, its threshold moved (with hindsight) to our paraphrase recall.
    ours = table["recall: paraphrased_question (all)"]["ours"]
    matched = float(np.quantile(base.scores(para), 1.0 - ours))
    for label, texts in sets.items():
        table[label]["baseline_at_our_recall"] = base.rate(texts, matched)
    lat_bank = ClassifierBank(emb, [clf])
    mix = {
        "general (mmlu+world_facts+real_authors)": sets["FP: mmlu val"][:150]
        + sets["FP: world_facts"][:25]
        + sets["FP: real_authors"][:25],
        "neighbours (retain90)": rng.sample(sets["FP: retain90 (neighbours)"], 100),
        "forget (paraphrased)": rng.sample(para, min(50, len(para))),
    }
    lat = {label: latency(lat_bank, texts) for label, texts in mix.items()}
    lat["all of the above"] = latency(lat_bank, [t for v in mix.values() for t in v])
    return {
        "aliases": names,
        "n_examples": len(examples),
        "report": clf.report.to_dict(),
        "warm_up_seconds": warm_up_s,
        "train_cpu_seconds": train_cpu_s,
        "table": table,
        "latency": lat,
    }


def hp_eval(args: argparse.Namespace, emb: Embedder, cached: CachedEmbedder) -> dict:
    spec = TargetSpec("harry-potter", HP_ALIASES, HP_EXAMPLES)
    clf = train_target(spec, emb, TrainConfig(fpr=args.fpr, seed=args.seed))
    bank = ClassifierBank(cached, [clf])
    mmlu = [r["question"] for r in read_jsonl(DATA / "mmlu" / "val.jsonl")]
    real = [r["question"] for r in read_jsonl(DATA / "tofu" / "real_authors.jsonl")]
    real = [q for q in real if "Rowling" not in q and "Potter" not in q]
    sets = {
        "recall: HP paraphrases": HP_POSITIVES,
        "FP: other books/authors": HP_OTHER_BOOKS,
        "FP: real_authors (w/o Rowling)": real,
        "FP: mmlu val": mmlu,
    }
    return {
        "report": clf.report.to_dict(),
        "table": {k: {"n": len(v), "ours": rate(bank, v)[0]} for k, v in sets.items()},
    }


def people_eval(args: argparse.Namespace, emb: Embedder, cached: CachedEmbedder) -> dict:
    """26 real people registered at once (name as the only alias, 5 examples each): recall per
    person on held-out questions, false positives on same-profession neighbours and MMLU."""
    data = json.loads((ROOT / "bench" / "data" / "real_people.json").read_text())
    config = TrainConfig(fpr=args.fpr, seed=args.seed)
    targets = []
    t0 = time.perf_counter()
    for person in data["people"]:
        spec = TargetSpec(person["name"], [person["name"]], person["examples"])
        targets.append(train_target(spec, emb, config))
    train_s = time.perf_counter() - t0
    bank = ClassifierBank(cached, targets)
    per_person = {}
    for person, clf in zip(data["people"], targets, strict=True):
        decided = bank.classify(person["heldout"])
        hits = [next(d for d in ds if d.target == person["name"]).flagged for ds in decided]
        per_person[person["name"]] = {
            "recall": sum(hits) / len(hits),
            "missed": [q for q, hit in zip(person["heldout"], hits, strict=True) if not hit],
            "report_heldout_recall": clf.report.heldout_recall,
            "threshold": clf.report.threshold,
        }
    neighbours = [q for n in data["neighbours"] for q in n["questions"]]
    neighbour_hits = [
        (q, [d.target for d in ds if d.flagged])
        for q, ds in zip(neighbours, bank.classify(neighbours), strict=True)
    ]
    mmlu = [r["question"] for r in read_jsonl(DATA / "mmlu" / "val.jsonl")]
    recalls = [p["recall"] for p in per_person.values()]
    return {
        "n_people": len(targets),
        "train_seconds": train_s,
        "recall_min": min(recalls),
        "recall_mean": statistics.fmean(recalls),
        "per_person": per_person,
        "fp_neighbours": sum(bool(h) for _, h in neighbour_hits) / len(neighbours),
        "fp_neighbours_flagged": [(q, h) for q, h in neighbour_hits if h],
        "n_neighbour_questions": len(neighbours),
        "fp_mmlu_val": rate(bank, mmlu)[0],
        "n_mmlu_val": len(mmlu),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", default="forget10", choices=["forget01", "forget05", "forget10"])
    p.add_argument("--per-author", type=int, default=4, help="forget examples per author")
    p.add_argument(
        "--retain-authors",
        type=int,
        default=0,
        help="retain90 authors given as retain examples (and left out of the FP test)",
    )
    p.add_argument("--mmlu-test", type=int, default=3000, help="MMLU test questions sampled")
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-hp", action="store_true")
    p.add_argument("--skip-tofu", action="store_true")
    p.add_argument("--skip-people", action="store_true")
    p.add_argument(
        "--weights",
        choices=["auto", "fp32"],
        default="auto",
        help="MiniLM's linear weights: fp16 where FBGEMM runs (the gateway's default), or fp32",
    )
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"evaluation data not found at {DATA}")
    if args.threads:
        torch.set_num_threads(args.threads)
    emb = Embedder(half_weights=False if args.weights == "fp32" else None)
    cached = CachedEmbedder(emb)
    result: dict = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    if not args.skip_people:
        result["real_people"] = people_eval(args, emb, cached)
    if not args.skip_tofu:
        result["tofu"] = tofu_eval(args, emb, cached)
    if not args.skip_hp:
        result["harry_potter"] = hp_eval(args, emb, cached)
    out = ROOT / "bench" / "results" / f"classifier_eval_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if "real_people" in result:
        people = result["real_people"]
        print(
            f"real people ({people['n_people']} registered at once, trained in "
            f"{people['train_seconds']:.0f} s): recall per person min {people['recall_min']:.2f}, "
            f"mean {people['recall_mean']:.3f}; FP neighbours {people['fp_neighbours']:.3f} "
            f"(n={people['n_neighbour_questions']}), MMLU val {people['fp_mmlu_val']:.4f} "
            f"(n={people['n_mmlu_val']})"
        )
        for name, row in people["per_person"].items():
            print(
                f"  {name:28s} recall {row['recall']:.2f} (report "
                f"{row['report_heldout_recall']:.2f}, thr {row['threshold']:.4f})"
                + (f" missed: {row['missed']}" if row["missed"] else "")
            )
    if "tofu" not in result:
        print(f"wrote {out}")
        return
    tofu = result["tofu"]
    print(f"TOFU {args.split}: {len(tofu['aliases'])} authors, {tofu['n_examples']} examples")
    print(f"{'set':40s} {'n':>5s} {'ours':>6s} {'stage2':>6s} {'baseline':>8s} {'base@rec':>8s}")
    for label, row in tofu["table"].items():
        print(
            f"{label:40s} {row['n']:5d} {row['ours']:6.3f} {row['stage2_share']:6.3f} "
            f"{row['baseline']:8.3f} {row['baseline_at_our_recall']:8.3f}"
        )
    r = tofu["report"]
    print(
        f"training: shipped negatives embedded once in {tofu['warm_up_seconds']:.1f} s, then "
        f"{r['train_seconds']:.1f} s for the target (CPU {tofu['train_cpu_seconds']:.1f} s; "
        f"{r['n_pos']} pos / {r['n_neg']} neg)"
    )
    print(
        f"report: threshold {r['threshold']:.3f}, held-out recall {r['heldout_recall']:.3f}, "
        f"held-out FPR {r['heldout_fpr']:.4f} {r['heldout_fpr_by_kind']}"
    )
    for label, lat in tofu["latency"].items():
        print(
            f"latency {label:40s} wall p50 {lat['p50_ms']:6.2f} p99 {lat['p99_ms']:6.2f} ms; "
            f"CPU p50 {lat['cpu_p50_ms']:6.2f} p99 {lat['cpu_p99_ms']:6.2f} ms"
        )
    if "harry_potter" in result:
        hp = result["harry_potter"]
        print(f"Harry Potter: train {hp['report']['train_seconds']:.1f} s")
        for label, row in hp["table"].items():
            print(f"  {label:40s} {row['n']:6d} {row['ours']:7.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
