"""Evaluation through the tool loop: the tool_call kind and its argument normalisation, the invented-number
check, and a real model (tests/toolchat.py) asked through the loop on the seeded records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fibreflow.datasets.agent import NO_ANSWER, Called, Loop
from fibreflow.eval.loop import answer_of, numbers_grounded
from fibreflow.eval.scorers import call_matches, score
from fibreflow.eval.testset import Sample
from toolchat import ARGS, QUESTION

CALL = json.dumps({"name": "pole_counts", "arguments": ARGS})


def test_tool_calls_match_after_the_tools_own_normalisation() -> None:
    same = [{"project_id": "prj-3", "status": "permission_pending"}, {"status": "permission_pending",
            "project_id": "project 3"}, {"project_id": "PRJ-0003", "status": "permission_pending"}]  # fmt: skip
    for args in same:
        assert call_matches(CALL, json.dumps({"name": "pole_counts", "arguments": args})), args
    for name, args in (("pole_counts", {"project_id": "PRJ-0003"}), ("pole_counts", {"project_id": "PRJ-0004",
                       "status": "permission_pending"}), ("project_status", {"project_id": "PRJ-0003"}),
                       ("pole_counts", {"project_id": "PRJ-0003", "status": "lost"})):  # fmt: skip
        assert not call_matches(CALL, json.dumps({"name": name, "arguments": args})), (name, args)
    assert not call_matches(CALL, "Project PRJ-0003 has 14 poles.")  # an answer instead of a call
    dates = json.dumps({"name": "progress", "arguments": {"project_id": "PRJ-0001", "start": "2026-06-01",
                                                          "end": "2026-06-07"}})  # fmt: skip
    swapped = {"name": "progress", "arguments": {"end": "2026-06-07", "start": "2026-06-01", "project_id": "prj-1"}}
    assert call_matches(dates, json.dumps(swapped))
    search = json.dumps({"name": "search_records", "arguments": {"query": "pole 0001-P0007", "project_id": "PRJ-0001",
                                                                 "record_type": "pole"}})  # fmt: skip
    other_words = {"name": "search_records", "arguments": {"query": "status of 0001-P0007", "project_id": "prj-1",
                                                           "record_type": "pole"}}  # fmt: skip
    assert call_matches(search, json.dumps(other_words))  # the free-text query is not compared, the filters are
    assert not call_matches(search, json.dumps(other_words | {"arguments": {"query": "x", "record_type": "task"}}))
    by_name = json.dumps({"name": "boq_totals", "arguments": {"project_id": "Umhlanga Central FTTH Phase 3"}})
    assert call_matches(
        by_name, json.dumps({"name": "boq_totals", "arguments": {"project_id": "umhlanga central FTTH  phase 3"}})
    )
    assert not call_matches(by_name, json.dumps({"name": "boq_totals", "arguments": {"project_id": "Umhlanga"}}))
    period = json.dumps({"name": "progress", "arguments": {"project_id": "PRJ-0007", "period": "last_week"}})
    assert call_matches(period, json.dumps({"name": "progress", "arguments": {"project_id": "prj-7",
                                                                              "period": "Last week"}}))  # fmt: skip
    assert not call_matches(
        period, json.dumps({"name": "progress", "arguments": {"project_id": "PRJ-0007", "period": "this_week"}})
    )


def test_a_tool_call_sample_needs_a_valid_call_and_the_tools() -> None:
    ok = Sample(id="1", question=QUESTION, reference=CALL, kind="tool_call", tools=True)
    assert score(ok, CALL) == 1.0 and score(ok, "14") == 0.0
    unknown_tool = json.dumps({"name": "nope", "arguments": {}})
    bad = ((CALL, False, "needs `tools: true`"), ("pole_counts", True, "is not JSON"), (unknown_tool, True, "valid"))
    for reference, tools, message in bad:
        with pytest.raises(ValueError, match=message):
            Sample(id="1", question=QUESTION, reference=reference, kind="tool_call", tools=tools)
    refusal = Sample(id="2", question="What is a Zentrix drop coupler?", reference="", kind="open", tools=True,
                     tags=["assistant", "made_up_term"])  # fmt: skip
    assert score(refusal, "I don't know that term.") == 1.0 and score(refusal, "A coupler.") == 0.0
    silent = Loop.start("s", refusal.question, max_steps=0)
    silent.take({"content": None}, lambda n, a: None)  # type: ignore[arg-type,return-value]
    assert silent.answer == NO_ANSWER and answer_of(refusal, silent) == ""  # the platform's words earn no refusal
    assert score(refusal, answer_of(refusal, silent)) == 0.0 and score(ok, answer_of(ok, silent)) == 0.0


def test_numbers_not_in_the_tools_results_are_invented() -> None:
    loop = Loop.start("s", "How many poles on PRJ-0003 wait for permission?")
    loop.messages.append({"role": "tool", "content": json.dumps({"poles_by_status": {"permission_pending": 14},
                                                                 "total": 14, "amount_zar": 1234.5})})  # fmt: skip
    loop.calls.append(Called("pole_counts", ARGS, ["PRJ-0003"]))
    for answer, grounded in (("Project PRJ-0003 has 14 poles waiting [PRJ-0003].", 1.0), ("R 1,234.50 in all.", 1.0),
                             ("Project PRJ-0003 has 15 poles waiting.", 0.0), ("No numbers at all.", 1.0),
                             ("14 poles, 3 of them late.", 0.0)):  # fmt: skip
        assert numbers_grounded(loop, answer) == grounded, answer
    loop.take({"content": "Project PRJ-0003 has 15 poles waiting."}, lambda n, a: None)  # type: ignore[arg-type,return-value]
    assert not loop.answered and loop.unsupported == [15]  # withheld: the caller got "I don't know"
    assert numbers_grounded(loop) == 1.0 and numbers_grounded(loop, loop.said) == 0.0  # the model's text is scored too


@pytest.mark.integration
def test_a_model_is_asked_through_the_loop_on_the_records(tool_llama: Path, seeded_url: str, serve) -> None:
    """...and a judge holds the loop's answer to the tool results the model read (not to RAG contexts)."""
    from fibreflow.eval.config import Judge, load_eval_config
    from fibreflow.eval.loop import contexts_of
    from fibreflow.eval.metrics import judge
    from fibreflow.eval.rag import build_prompts
    from fibreflow.eval.run import answers_of
    from test_judge import Judge_, handler
    from toolchat import PLAIN_ANSWER, PLAIN_QUESTION, SYSTEM

    cfg = load_eval_config({"generation.dtype": "float32", "tools.max_steps": 2})
    samples = [
        Sample(id="call", question=QUESTION, reference=CALL, kind="tool_call", tools=True, tags=["tool_call"]),
        Sample(id="answer", question=QUESTION, reference="14", kind="numeric", tools=True, tags=["grounded"]),
        Sample(id="plain", question=PLAIN_QUESTION, reference=PLAIN_ANSWER, kind="exact"),
    ]
    prompts = build_prompts(samples, SYSTEM, cfg.rag.model_copy(update={"mode": "off"}))
    answers, settings, loops = answers_of(str(tool_llama), cfg, prompts, samples, False, SYSTEM, seeded_url)
    assert score(samples[0], answers[0]) == 1.0  # its first call, normalised
    assert loops[0] is loops[1] and set(loops) == {0, 1}  # one loop per question, shared by its samples
    loop = loops[0]
    assert loop.done and 1 <= loop.rounds <= 2 and loop.calls[0].name == "pole_counts"
    assert loop.messages[3]["role"] == "tool" and answers[1] == loop.answer
    assert answers[2] == PLAIN_ANSWER  # asked plainly, without tools
    assert settings["max_new_tokens"] == cfg.generation.max_new_tokens  # the loop's budget was the turn's only

    state = Judge_()
    judge_cfg = Judge(base_url=serve(handler(state, slow_s=0)), model="judge", repeats=1, metrics=["faithfulness"])
    contexts = [contexts_of(loops[i]) if i in loops else [] for i in range(len(samples))]
    assert contexts[1] == [m["content"] for m in loop.messages if m["role"] == "tool"] != []
    faithful = judge(judge_cfg, samples, answers, contexts, None).scores["faithfulness"]
    assert faithful[0] is None and faithful[1] is not None and faithful[2] is None  # a call is not an answer
    assert any(contexts[1][0] in text for text in state.seen)  # the judge read the tool's result
