"""Packed attention on a tiny Llama: the same logits and gradients as transformers' masked `sdpa`, examples kept
apart, and generation unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fibreflow.training.attention import PACKED_SDPA, packed_sdpa_forward, segments
from transformers import AutoModelForCausalLM, AutoTokenizer

LENGTHS = (7, 12, 5)  # three examples in one row; the last one stands for a padding tail (positions from 0 too)


def _model(tiny: Path, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation=attn)


def _row() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, 2000, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat(examples).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    return ids, pos, examples


def test_segments_start_wherever_the_position_does_not_go_up_by_one() -> None:
    assert segments(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])) == [(0, 3), (3, 5), (5, 6), (6, 8)]
    assert segments(torch.arange(4)) == [(0, 4)]


def test_a_packed_row_gives_each_example_its_own_logits_and_sdpas_gradients(tiny_llama: Path) -> None:
    ids, pos, examples = _row()
    packed, masked = _model(tiny_llama, PACKED_SDPA), _model(tiny_llama, "sdpa")
    out = packed(input_ids=ids, position_ids=pos, use_cache=False).logits[0]  # as in training
    alone = torch.cat([masked(input_ids=e.unsqueeze(0)).logits[0] for e in examples])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)
    # without the cut, later examples would see earlier ones: the comparison above can tell
    whole = masked(input_ids=ids).logits[0]
    assert not torch.allclose(whole[LENGTHS[0] :], alone[LENGTHS[0] :], atol=1e-3)

    reference = masked(input_ids=ids, position_ids=pos, use_cache=False).logits[0]  # sdpa's block-diagonal mask
    target = ids[0, 1:]
    torch.nn.functional.cross_entropy(out[:-1], target).backward()
    torch.nn.functional.cross_entropy(reference[:-1], target).backward()
    for (name, a), (_, b) in zip(packed.named_parameters(), masked.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_model_loaded_for_packing_generates_as_sdpa_does(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama, padding_side="left")
    prompts = ["Pole PL-0042 is", "The BOQ of project PRJ-0003 lists civil works and"]  # left-padded: a 4D mask
    batch = tok(prompts, return_tensors="pt", padding=True)
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    packed = _model(tiny_llama, PACKED_SDPA).generate(**batch, **greedy)
    plain = _model(tiny_llama, "sdpa").generate(**batch, **greedy)
    assert torch.equal(packed, plain)


def test_a_model_that_keeps_position_ids_from_its_attention_is_refused() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"optim\.packing: false"):
        packed_sdpa_forward(torch.nn.Module(), q, q, q, None, position_ids=None, scaling=1.0)
