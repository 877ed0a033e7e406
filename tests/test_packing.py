"""Padding-free packing (`Collator(packing=True)`) trains on exactly the loss of padded batches.

With the real SmolLM2 in fp32 and eager attention: the summed loss and the trained-token count of a
packed batch equal those of the same rows right-padded, and equal the sum of each row's loss computed
alone (so packed examples don't attend to each other); packing whose position_ids don't restart at
each example (so transformers sees one long sequence and a plain causal mask) gives a different loss,
which shows the test can fail.
"""

import pytest
import torch

from calltune.formats import get_format
from calltune.models import load_model
from calltune.train.trainer import Collator, selected_loss, tokenize_examples

ROWS = 6
REL = 1e-3  # fp32; the padded and packed kernels sum in different orders


@pytest.fixture(scope="module")
def model_and_rows(smollm2_path, viggo_valid):
    model, tokenizer, _ = load_model(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    rows = tokenize_examples(viggo_valid[:ROWS], get_format("viggo"), tokenizer, max_length=256)
    assert len(rows) == ROWS and len({r["length"] for r in rows}) > 1, "rows of different lengths make padding"
    return model, rows, tokenizer.pad_token_id


def loss_of(model, batch):
    with torch.no_grad():
        loss, n = selected_loss(model, batch)
    return float(loss), n


@pytest.mark.slow
def test_packed_and_padded_batches_give_the_same_loss(model_and_rows):
    model, rows, pad = model_and_rows
    padded_loss, padded_n = loss_of(model, Collator(pad, packing=False)(rows))
    total = sum(r["length"] for r in rows)
    one_row = Collator(pad, packing=True, pack_length=10_000)(rows)
    assert one_row["input_ids"].shape == (1, total) and int(one_row["num_tokens"]) == total
    capped = Collator(pad, packing=True, pack_length=400)(rows)  # rows of <= 400 tokens, tails filled with pad
    assert 1 < capped["input_ids"].shape[0] < len(rows) and int(capped["num_tokens"]) == total
    assert capped["input_ids"].shape[1] <= 400
    for packed in (one_row, capped):
        batch = {k: v for k, v in packed.items() if k != "num_tokens"}
        packed_loss, packed_n = loss_of(model, batch)
        assert packed_n == padded_n == sum(sum(t != -100 for t in r["labels"]) for r in rows)
        assert packed_loss == pytest.approx(padded_loss, rel=REL)


@pytest.mark.slow
def test_packed_examples_do_not_attend_to_each_other(model_and_rows):
    model, rows, pad = model_and_rows
    alone = [loss_of(model, Collator(pad, packing=False)([r])) for r in rows]
    packed = Collator(pad, packing=True, pack_length=10_000)(rows)
    packed_loss, packed_n = loss_of(model, {k: v for k, v in packed.items() if k != "num_tokens"})
    assert packed_n == sum(n for _, n in alone)
    assert packed_loss == pytest.approx(sum(loss for loss, _ in alone), rel=REL)


@pytest.mark.slow
def test_packing_without_restarting_positions_changes_the_loss(model_and_rows):
    model, rows, pad = model_and_rows
    packed = Collator(pad, packing=True, pack_length=10_000)(rows)
    packed.pop("num_tokens")
    packed_loss, _ = loss_of(model, packed)
    broken = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    broken_loss, _ = loss_of(model, broken)
    # Later examples now attend to earlier ones and sit at shifted positions: a visibly different loss.
    assert abs(broken_loss - packed_loss) > 20 * REL * packed_loss


def test_flush_denormals_turns_denormal_results_into_zero():
    from calltune.runtime import flush_denormals

    tiny = torch.tensor([1e-30], dtype=torch.float32)
    try:
        torch.set_flush_denormal(False)
        assert float(tiny * 1e-10) > 0  # 1e-40 is a denormal fp32 number, kept by default
        assert flush_denormals()
        assert float(tiny * 1e-10) == 0.0
    finally:
        torch.set_flush_denormal(False)  # as a plain Python process starts


def _rows(*lengths):
    return [{"input_ids": [7] * n, "labels": [7] * n} for n in lengths]


@pytest.mark.parametrize("lengths, pack_length, shape", [
    ((300, 300, 300, 300), 1000, (2, 600)),   # first fit at 1000 would give rows of 900 and 300
    ((700, 200, 200, 100), 1000, (2, 700)),   # the longest row sets the floor
    ((50, 40), 1000, (1, 90)),                # one row, no wider than its tokens
    ((1500, 20), 1000, (2, 1500)),            # a row longer than pack_length sets the capacity
])
def test_packing_uses_the_fewest_narrowest_rows(lengths, pack_length, shape):
    batch = Collator(0, packing=True, pack_length=pack_length)(_rows(*lengths))
    assert tuple(batch["input_ids"].shape) == shape
    assert int(batch["num_tokens"]) == sum(lengths)
    assert int((batch["labels"] != -100).sum()) == sum(lengths) - len(lengths)  # each example's first token
