"""Chat -> labels on assistant tokens only; packing keeps examples apart; bad datasets fail before any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fibreflow.core.errors import ConfigError, DatasetBuildError
from fibreflow.training.data import IGNORE, Collator, check_examples, count_tokens, pack, prepare, tokenize_chat

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a PON?"},
    {"role": "assistant", "content": "A passive optical network."},
    {"role": "user", "content": "And an ONT?"},
    {"role": "assistant", "content": "The optical network terminal at the customer."},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    from fibreflow.training.models import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def test_only_assistant_turns_carry_labels(tok) -> None:
    ex = tokenize_chat(tok, CHAT, 512)
    labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    text = tok.decode(labelled)
    assert "A passive optical network.<|im_end|>" in text
    assert "The optical network terminal at the customer.<|im_end|>" in text
    assert "What is a PON" not in text and "Be brief" not in text and "And an ONT" not in text
    assert all(lab in (IGNORE, t) for t, lab in zip(ex["input_ids"], ex["labels"], strict=True))


def test_truncation_keeps_ids_and_labels_aligned(tok) -> None:
    ex = tokenize_chat(tok, CHAT, 20)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 20


def test_packing_restarts_positions_and_never_predicts_across_examples(tok) -> None:
    examples = [tokenize_chat(tok, CHAT[:3], 512) for _ in range(5)]
    n = len(examples[0]["input_ids"])
    rows = pack(examples, row_len=2 * n + 1, seed=0)
    assert [len(r["input_ids"]) for r in rows] == [2 * n, 2 * n, n]
    row = rows[0]
    assert row["position_ids"] == list(range(n)) * 2
    assert row["shift_labels"][n - 1] == IGNORE  # the last token of example 1 predicts nothing of example 2
    assert sum(t != IGNORE for t in row["shift_labels"]) == 2 * sum(t != IGNORE for t in examples[0]["labels"][1:])


def test_short_packed_rows_keep_a_longer_example_whole_in_its_own_row(tok) -> None:
    short, long = CHAT[:3], CHAT + CHAT[1:]  # rows of `pack_len` tokens; a longer example is not cut, it is alone
    rows = prepare([{"messages": m} for m in (short, short, long, short)], tok, seq_len=512, packing=True, seed=0,
                   pack_len=len(tokenize_chat(tok, short, 512)["input_ids"]) * 2)  # fmt: skip
    n_short, n_long = (len(tokenize_chat(tok, m, 512)["input_ids"]) for m in (short, long))
    assert sorted(len(r["input_ids"]) for r in rows) == sorted([n_short, 2 * n_short, n_long])
    assert n_long > 2 * n_short  # the long example was kept whole, in a row of its own
    with pytest.raises(ConfigError, match=r"pack_len must be at most optim\.seq_len"):
        from fibreflow.training.config import default_train_config, load_train_config

        load_train_config(str(default_train_config()), {"optim.pack_len": 4096})


def test_packed_batch_computes_what_separate_examples_compute(tok, tiny_llama: Path) -> None:
    """Attention stays inside each packed example: per-token logits equal those of each example alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    a, b = tokenize_chat(tok, CHAT[:3], 512), tokenize_chat(tok, CHAT, 512)
    packed = Collator(tok.pad_token_id, packed=True)(pack([a, b], row_len=4096, seed=1))
    first_len = packed["position_ids"][0].tolist()[1:].index(0) + 1
    ids = packed["input_ids"]
    with torch.no_grad():  # use_cache=False as in training: with a cache the model ignores the packing
        together = model(input_ids=ids, position_ids=packed["position_ids"], use_cache=False).logits[0]
        first = model(input_ids=ids[:, :first_len], use_cache=False).logits[0]
        rest = model(input_ids=ids[:, first_len:], use_cache=False).logits[0]
    torch.testing.assert_close(together[:first_len], first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[first_len:], rest, atol=1e-4, rtol=1e-4)


def test_padded_batches_mask_padding(tok) -> None:
    rows = prepare([{"messages": CHAT[:3]}, {"messages": CHAT}], tok, 512, packing=False, seed=0)
    batch = Collator(tok.pad_token_id, packed=False)(rows)
    short = len(rows[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["shift_labels"][0, short:] == IGNORE).all()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "split is empty"),
        ([{"id": "x", "messages": CHAT[:2]}], r"row 0 \(x\): no assistant turn"),
        ([{"id": "y", "messages": []}], "row 0: no `messages`"),
        ([{"messages": [*CHAT[:2], {"role": "assistant", "content": ""}]}], "no assistant turn"),
    ],
)
def test_unusable_examples_are_refused(rows: list, message: str) -> None:
    with pytest.raises(DatasetBuildError, match=message):
        check_examples(rows, "train")


def test_tool_conversations_learn_the_call_and_the_answer_not_the_result(tok) -> None:
    """A row with `tools` is rendered with FibreFlow's tools offered; the loss is on the assistant's call and its
    answer, never on the system turn, the question or the tool's result (the records', not the model's)."""
    from fibreflow.core.chat import chat_ids
    from fibreflow.datasets.tools import schemas
    from toolchat import ANSWER, RESULT, answered

    messages = [*answered(), {"role": "assistant", "content": ANSWER}]
    (row,) = prepare([{"messages": messages, "tools": True}], tok, 1024, packing=False, seed=0)
    assert row["input_ids"] == chat_ids(tok, messages, schemas(), generation_prompt=False)
    learned = tok.decode([t for t, lab in zip(row["input_ids"], shifted_back(row["shift_labels"]), strict=True)
                          if lab != IGNORE])  # fmt: skip
    assert '<tool_call>{"name": "pole_counts"' in learned and ANSWER in learned
    assert json.dumps(RESULT) not in learned and "Tools" not in learned and "How many poles" not in learned
    check_examples([{"messages": messages[:3]}], "train")  # a call alone is something to learn


def test_a_generation_prompt_that_tokenizes_otherwise_before_the_answer_is_refused(tok) -> None:
    """Llama 3's template on SmolLM2's tokenizer: the prompt ends in "\\n\\n", one token, but before an answer that
    starts with "<" the same characters are two; a model trained so would be asked with a token it never saw there
    (it answered with noise). The dataset stage says so instead."""
    from toolchat import LLAMA3
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(tok.name_or_path)
    llama.chat_template = LLAMA3
    with pytest.raises(DatasetBuildError, match="generation prompt does not tokenize"):
        tokenize_chat(llama, [*CHAT[:2], {"role": "assistant", "content": "<tool_call>{}</tool_call>"}], 512)


def shifted_back(shift_labels: list[int]) -> list[int]:
    return [IGNORE, *shift_labels[:-1]]


def test_chats_render_the_system_turn_once_and_learn_every_question_the_same(tok) -> None:
    """Questions merged into multi-turn chats: the system turn and tool block once per chat, the learned tokens
    exactly those of the questions one by one; rows with another system turn or without tools stay apart, and no
    chat outgrows seq_len."""
    from fibreflow.datasets.tools import schemas
    from fibreflow.training.data import chats
    from toolchat import ANSWER, answered

    tool_rows = [{"messages": [*answered(), {"role": "assistant", "content": f"{ANSWER} ({i})"}], "tools": True}
                 for i in range(5)]  # fmt: skip
    plain = [{"messages": CHAT[:3]}, {"messages": CHAT[:3]}, {"messages": [{"role": "system", "content": "Other."},
                                                                            *CHAT[1:3]]}]  # fmt: skip
    rows = tool_rows + plain
    one = prepare(rows, tok, 1024, packing=False, seed=0)
    merged = prepare(rows, tok, 1024, packing=False, seed=0, turns=4)

    def learned(prepared: list) -> list[str]:
        text = "".join(tok.decode([t for t, lab in zip(r["input_ids"], shifted_back(r["shift_labels"]), strict=True)
                                   if lab != IGNORE]) for r in prepared)  # fmt: skip
        return sorted(s.strip() for s in text.split("<|im_end|>"))

    assert learned(merged) == learned(one)
    # 5 tool questions in chats of at most 4 (2 chats), the 2 "Be brief." rows in one, "Other." alone
    assert len(merged) == 4
    tool_head = len(tokenize_chat(tok, [tool_rows[0]["messages"][0]], 1024, schemas())["input_ids"])
    brief_head = len(tokenize_chat(tok, CHAT[:1], 1024)["input_ids"])
    assert count_tokens(one)[0] - count_tokens(merged)[0] == 3 * tool_head + brief_head
    texts = [tok.decode(r["input_ids"]) for r in merged]
    assert sorted(t.count("Tools (") for t in texts) == [0, 0, 1, 1]
    size = len(tokenize_chat(tok, tool_rows[0]["messages"], 1024, schemas())["input_ids"])
    capped = chats(tool_rows, tok, schemas(), turns=4, seq_len=2 * size - tool_head, seed=0)
    assert [sum(m["role"] == "user" for m in c["messages"]) for c in capped] == [2, 2, 1]


def test_a_turn_of_weight_zero_is_context_not_learned(tok) -> None:
    """An assistant turn marked `weight: 0` (a call that failed, kept so the model learns what comes after it)
    carries no labels; the turns after it do."""
    wrong = {"role": "assistant", "content": "A passive optical splitter.", "weight": 0}
    ex = tokenize_chat(tok, [*CHAT[:2], wrong, *CHAT[3:]], 512)
    text = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])
    assert "splitter" not in text and "The optical network terminal at the customer." in text
