"""Batch fingerprints: content hash, sequence lengths and distinct-token ratios, and their step rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spikedoc
from spikedoc.monitor.fingerprint import Fingerprint, content_hash, flatten_inputs, sequence_stats
from tests.common.models import char_text, make_model

PAD = char_text().vocab_size  # an id no character has; the model gets one extra embedding row


def _padded_batch(index: int, batch_size: int = 8, seq_len: int = 32):
    """Real text rows, right-padded to random lengths: (input_ids, labels, attention_mask, lengths)."""
    input_ids, labels = char_text().batch(index, batch_size, seq_len)
    gen = torch.Generator().manual_seed(index)
    lengths = torch.randint(4, seq_len + 1, (batch_size,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()  # (B, T)
    input_ids = torch.where(mask.bool(), input_ids, PAD)
    labels = torch.where(mask.bool(), labels, -100)
    return input_ids, labels, mask, lengths


def _distinct_ratio(input_ids: torch.Tensor, lengths: torch.Tensor) -> float:
    return float(np.mean([len(set(row[:n].tolist())) / n for row, n in zip(input_ids, lengths.tolist())]))


def test_content_hash_is_equal_for_equal_content_and_differs_otherwise():
    ids, _ = char_text().batch(0)
    changed = ids.clone()
    changed[3, 17] += 1
    assert content_hash(ids).item() == content_hash(ids.clone()).item()
    assert content_hash(ids).item() != content_hash(changed).item()
    assert content_hash(ids).item() != content_hash(ids.reshape(16, 16)).item()  # same values, other shape
    swapped = ids[[1, 0, *range(2, 8)]]
    assert content_hash(ids).item() != content_hash(swapped).item()  # sample order matters


def test_content_hash_reads_float_bits_and_covers_large_inputs():
    x = torch.zeros(5)
    y = x.clone()
    y[2] = -0.0  # equal as numbers, different bits
    assert content_hash(x).item() != content_hash(y).item()
    big = torch.arange(3 * 4096 + 5, dtype=torch.int32)  # several rows and a padded tail
    tweaked = big.clone()
    tweaked[-1] += 1
    assert content_hash(big).item() != content_hash(tweaked).item()


def test_sequence_stats_match_direct_count_with_padding():
    input_ids, _, mask, lengths = _padded_batch(1)
    got_len, got_distinct = sequence_stats(input_ids, mask)
    assert got_len.tolist() == lengths.tolist()
    expected = [len(set(row[:n].tolist())) for row, n in zip(input_ids, lengths.tolist())]
    assert got_distinct.tolist() == expected


def test_sequence_stats_without_padding_count_every_token():
    ids = torch.tensor([[3, 3, 3, 3], [1, 2, 3, 4]])
    lengths, distinct = sequence_stats(ids, None)
    assert lengths.tolist() == [4, 4] and distinct.tolist() == [1, 4]


def test_flatten_inputs_names_positional_keyword_and_dict_inputs():
    a, b = torch.zeros(2), torch.ones(3)
    got = flatten_inputs((a, {"input_ids": b}), {"labels": a, "extra": [b], "flag": True})
    assert [n for n, _ in got] == ["arg0", "input_ids", "labels", "extra.0"]


def test_inputs_without_a_flat_view_are_left_out_of_the_hash():
    input_ids, labels = char_text().batch(0)
    jagged = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], layout=torch.jagged)
    with_ragged, plain = Fingerprint(), Fingerprint()
    with_ragged.observe((input_ids,), {"labels": labels, "ragged": jagged})
    plain.observe((input_ids,), {"labels": labels})
    assert torch.equal(with_ragged.hash, plain.hash)
    assert with_ragged.shapes.startswith("arg0:8x32,labels:8x32,ragged:")


def _train_padded(tmp_path, batches, *, use_mask: bool, pad_token_id=None, accumulate: int = 1):
    model = make_model(vocab_size=PAD + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path, pad_token_id=pad_token_id):
        for step in range(len(batches) // accumulate):
            for input_ids, labels, mask, _ in batches[step * accumulate : (step + 1) * accumulate]:
                kwargs = {"attention_mask": mask} if use_mask else {}
                model(input_ids=input_ids, labels=labels, **kwargs).loss.backward()
            opt.step()
            opt.zero_grad()
    return spikedoc.load(tmp_path).steps


@pytest.mark.parametrize("use_mask", [True, False], ids=["attention_mask", "pad_token_id"])
def test_step_rows_carry_length_and_distinct_token_statistics(tmp_path, use_mask):
    batches = [_padded_batch(i) for i in range(3)]
    steps = _train_padded(tmp_path, batches, use_mask=use_mask, pad_token_id=None if use_mask else PAD)
    for row, (input_ids, _, _, lengths) in zip(steps.to_dict("records"), batches):
        assert row["seq_len_min"] == lengths.min().item()
        assert row["seq_len_max"] == lengths.max().item()
        assert row["seq_len_median"] == pytest.approx(float(np.median(lengths.numpy())))
        assert row["distinct_token_ratio"] == pytest.approx(_distinct_ratio(input_ids, lengths), rel=1e-6)
        assert row["tokens"] == input_ids.numel() and row["samples"] == 8
    assert steps["input_shapes"][0] == "input_ids:8x32,labels:8x32" + (",attention_mask:8x32" if use_mask else "")


def test_statistics_span_all_micro_batches_of_a_step(tmp_path):
    batches = [_padded_batch(i, batch_size=3) for i in range(4)]
    steps = _train_padded(tmp_path, batches, use_mask=True, accumulate=2)
    for step, row in enumerate(steps.to_dict("records")):
        lengths = torch.cat([b[3] for b in batches[2 * step : 2 * step + 2]])
        assert row["seq_len_median"] == pytest.approx(float(np.median(lengths.numpy())))
        assert row["seq_len_max"] == lengths.max().item()
        assert row["samples"] == 6 and row["micro_batches"] == 2


def test_batch_hash_repeats_exactly_when_the_same_batch_repeats(tmp_path):
    a, b = _padded_batch(0), _padded_batch(1)
    steps = _train_padded(tmp_path, [a, b, a], use_mask=True)
    hashes = steps["batch_hash"].tolist()
    assert hashes[0] == hashes[2] != hashes[1]
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)
