"""The assistant's tool questions asked in phrasings written blind: a check that its held-out scores are not an
artefact of the test phrasings having been read while tuning the mixture.

    python benchmarks/blind_phrasings.py [--models latest] [--phrasings benchmarks/blind_phrasings_2.yaml]
    # after the main job; ~4 min on 2 cores for one model

The phrasings are `blind_phrasings.yaml` or another such file (none in configs/data.yaml, train or test). The
questions are the test set's: the held-out projects', each family's asks with the same values (statuses, categories,
dates, periods, poles), each asked in every blind phrasing, once (a phrasing with only {name} is left out for a
project whose name the tools do not resolve, as the test set does). They go to `var/blind_test.jsonl`, the test
set's own tool questions to `var/blind_reference.jsonl`, and both through `fibreflow eval --test-set` (an MLflow run
each); the scores of each model in the test set's phrasings and in the blind ones are printed side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from fibreflow.core.config import resolve_path
from fibreflow.core.db import open_db
from fibreflow.datasets import assistant as asst
from fibreflow.datasets.build import TEST_SET, load_data_config, version_dir, write_test_row
from fibreflow.eval.run import main as evaluate

PHRASINGS = Path(__file__).with_name("blind_phrasings.yaml")  # read for tuning on 2026-12-06: see its header
METRICS = ("tool_call_accuracy", "tool_grounded_accuracy", "numbers_grounded", "model_numbers_grounded",
           "loop_answered")  # fmt: skip


def blind_test_set(phrasings: Path, out: Path, reference: Path) -> int:
    """Write the blind test set and the test set's tool questions it mirrors; the blind set's rows."""
    cfg = load_data_config()
    blind: dict[str, list[str]] = yaml.safe_load(phrasings.read_text())
    for family, said in blind.items():
        used = {t.lower() for t in (*cfg.assistant.questions[family].train, *cfg.assistant.questions[family].test)}
        if reused := [t for t in said if t.lower() in used]:
            raise SystemExit(f"{family}: {reused} are train or test phrasings already, not blind ones")
    tests = [json.loads(line) for line in (version_dir(cfg) / TEST_SET).read_text().splitlines()]
    tool_rows = [t for t in tests if {"tool_call", "grounded"} & set(t.get("tags", [])) and "assistant" in t["tags"]]
    reference.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tool_rows), encoding="utf-8")
    held_out = sorted({t["tags"][2] for t in tool_rows})
    seen: set[tuple[str, str]] = set()
    with open_db() as conn, out.open("w", encoding="utf-8") as fh:
        projects = list(conn.execute("SELECT id, name FROM projects WHERE id = ANY(%s) ORDER BY id", [held_out]))
        for turn in range(max(len(v) for v in blind.values())):  # each ask in the next phrasing, turn by turn
            questions = {f: q.model_copy(update={"test": blind[f][turn:] + blind[f][:turn]})
                         for f, q in cfg.assistant.questions.items()}  # fmt: skip
            a = cfg.assistant.model_copy(update={"questions": questions})
            for pid, name in projects:
                for _, asked in asst.grounded(conn, a, cfg.system_prompt, {"id": pid, "name": name}, "test", False):
                    for t in asked:  # two asks without values (a BOQ total) in one phrasing are one question
                        if (t["question"], t["kind"]) not in seen:
                            seen.add((t["question"], t["kind"]))
                            write_test_row(fh, t | {"id": f"blind{turn}-{t['id']}"})
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="latest", help="one model, or champion,challenger (as fibreflow eval)")
    ap.add_argument("--phrasings", type=Path, default=PHRASINGS, help="a YAML of phrasings per family")
    args = ap.parse_args()
    out, reference = resolve_path("var/blind_test.jsonl"), resolve_path("var/blind_reference.jsonl")
    rows = blind_test_set(args.phrasings, out, reference)
    models = args.models.split(",")
    print(f"{rows} rows ({rows // 2} questions) in blind phrasings -> {out}")
    known = evaluate(test_set=str(reference), models=models, reuse=True)
    blind = evaluate(test_set=str(out), models=models, reuse=True)
    print("\n| model | metric | test phrasings | blind phrasings |\n|---|---|---|---|")
    for role, spec in blind.models.items():
        for k in METRICS:
            a, b = known.scores[role].get(k), blind.scores[role].get(k)
            print(f"| {spec} | {k} | {'-' if a is None else f'{a:.3f}'} | {'-' if b is None else f'{b:.3f}'} |")


if __name__ == "__main__":
    main()
