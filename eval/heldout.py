"""Did fine-tuning teach the terminology? Base vs tuned on held-out phrasings, paired: the check the CLI and the
pipeline run after training (`check`, handed to `fibreflow.training.train.main` as an after-training hook).

Known terms are asked with test-split phrasings that training never saw; an answer is correct when it
contains every key term of the reference definition (its rarest content words, as whole words). Made-up terms
must be answered with an admission of not knowing. Scoring is `fibreflow.eval.scorers.score`, the same as
`fibreflow eval`. The base model is the same network with the adapter disabled.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fibreflow.eval.generate import generate_local
from fibreflow.eval.scorers import score
from fibreflow.eval.stats import PairedDiff, paired_bootstrap
from fibreflow.eval.testset import Sample, load_test_set
from fibreflow.training.config import Heldout
from fibreflow.training.train import Trained


def sample(test_set: Path, cfg: Heldout, seed: int) -> list[Sample]:
    """A fixed sample of terminology test rows: `cfg.known` known-term and `cfg.unknown` made-up-term questions."""
    terms = [r for r in load_test_set(test_set) if "terminology" in r.tags]
    known = [r for r in terms if "unknown_term" not in r.tags and r.keywords]
    unknown = [r for r in terms if "unknown_term" in r.tags]
    rng = random.Random(seed)
    return rng.sample(known, min(cfg.known, len(known))) + rng.sample(unknown, min(cfg.unknown, len(unknown)))


def compare(model: Any, tok: Any, rows: list[Sample], system: str, cfg: Heldout) -> dict[str, Any]:
    """Answers and scores of base (adapter disabled) and tuned for each row, and paired CIs of the gain."""
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": r.question}] for r in rows]
    kw = {"batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens}
    with model.disable_adapter():
        base = generate_local(model, tok, conversations, **kw)
    tuned = generate_local(model, tok, conversations, **kw)
    table = [
        {
            "id": r.id,
            "question": r.question,
            "reference": r.reference,
            "base_answer": b,
            "tuned_answer": t,
            "base_score": score(r, b),
            "tuned_score": score(r, t),
            "unknown_term": "unknown_term" in r.tags,
        }
        for r, b, t in zip(rows, base, tuned, strict=True)
    ]
    out: dict[str, Any] = {"table": table}
    for name, want in (("known", False), ("unknown", True)):
        part = [x for x in table if x["unknown_term"] is want]
        if part:
            out[name] = paired_bootstrap([x["base_score"] for x in part], [x["tuned_score"] for x in part])
    return out


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: accuracy of base and tuned, the gain and its 95% CI, per group."""
    out: dict[str, float] = {}
    for name in ("known", "unknown"):
        d: PairedDiff | None = result.get(name)
        if d is not None:
            prefix = f"heldout_{name}"
            out |= {f"{prefix}_base": d.a, f"{prefix}_tuned": d.b, f"{prefix}_gain": d.diff}
            out |= {f"{prefix}_gain_ci_low": d.low, f"{prefix}_gain_ci_high": d.high}
    return out


def check(trained: Trained) -> dict[str, Any]:
    """The held-out check of a finished training (configured by its `heldout` section); logged to the active
    MLflow run (metrics, the answers table, a plot). Returns `{"heldout": metrics}`, or {} when off or empty."""
    import mlflow

    cfg = trained.cfg
    if not cfg.heldout.enabled or not trained.test_set.is_file():
        return {}
    rows = sample(trained.test_set, cfg.heldout, cfg.optim.seed)
    if not rows:
        return {}
    found = compare(trained.model, trained.tok, rows, trained.system or "", cfg.heldout)
    result = metrics(found)
    if mlflow.active_run() is not None:
        mlflow.log_metrics(result)
        mlflow.log_table({k: [row[k] for row in found["table"]] for k in found["table"][0]}, "heldout/answers.json")
        mlflow.log_figure(plot(found), "heldout/accuracy.png")
    return {"heldout": result}


def plot(found: dict[str, Any]) -> Any:
    """Bars: base vs tuned accuracy per group, the tuned bar with the 95% CI of the paired gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("known", "unknown") if g in found]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, g in enumerate(groups):
        d = found[g]
        ax.bar(i - 0.2, d.a, 0.4, color="#999", label="base" if i == 0 else None)
        err = [[d.diff - d.low], [d.high - d.diff]]
        ax.bar(i + 0.2, d.b, 0.4, color="#2a7", yerr=err, capsize=4, label="tuned" if i == 0 else None)
    ax.set_xticks(range(len(groups)), [f"{g} terms (n={found[g].n})" for g in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on held-out phrasings")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig
