"""DataStream: a saved position replays exactly the batches that followed it, minus the skipped ones."""

from __future__ import annotations

import warnings

import pytest
import torch

from spikedoc.guard.data import DataStream
from tests.common.guarded import TextWindows, garbage, loader, nan_grads, run_guarded


def _ids(batch) -> list[int]:
    return batch["idx"].tolist() if isinstance(batch, dict) else batch


def _draw(stream: DataStream, n: int) -> list[tuple[int, list[int]]]:
    return [(pos, _ids(batch)) for pos, batch in (stream.next() for _ in range(n))]


@pytest.mark.parametrize("kind", ["list", "dataloader", "dataloader_workers", "stateful_dataloader"])
def test_a_saved_position_replays_the_same_batches_across_an_epoch_boundary(kind):
    if kind == "list":
        data = [[i, i + 1] for i in range(0, 40, 2)]
    elif kind == "stateful_dataloader":
        stateful = pytest.importorskip("torchdata.stateful_dataloader")
        data = stateful.StatefulDataLoader(TextWindows(160), batch_size=8, shuffle=True)
    else:
        data = loader(160, num_workers=1 if kind == "dataloader_workers" else 0)
    stream = DataStream(data, seed=0, epochs=3)
    _draw(stream, 15)
    saved = stream.state_dict()
    after = _draw(stream, 12)  # crosses into the second epoch (20 batches each)
    stream.load_state_dict(saved)
    assert _draw(stream, 12) == after
    assert [pos for pos, _ in after] == list(range(15, 27))


def test_a_shuffling_dataloader_gets_a_seeded_order_and_a_new_one_each_epoch():
    first = DataStream(loader(160), seed=0, epochs=2)
    second = DataStream(loader(160), seed=0, epochs=2)
    a, b = _draw(first, 40), _draw(second, 40)
    assert a == b
    assert sorted(i for _, ids in a[:20] for i in ids) == list(range(160))  # one epoch: every sample once
    assert [ids for _, ids in a[:20]] != [ids for _, ids in a[20:]]


def test_skipped_positions_are_never_handed_out():
    stream = DataStream(list(range(10)), seed=0, epochs=1)
    stream.skip.update({2, 3, 7})
    assert _draw(stream, 7) == [(0, 0), (1, 1), (4, 4), (5, 5), (6, 6), (8, 8), (9, 9)]
    with pytest.raises(StopIteration):
        stream.next()


def test_something_that_is_no_data_source_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="a loader, an iterable, an iterator or a function"):
        DataStream(3, seed=0, epochs=1)


def test_a_rollback_with_a_stateful_dataloader_replays_the_original_order(tmp_path):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def data():
        return stateful.StatefulDataLoader(TextWindows(2000), batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(5))  # fmt: skip

    _, clean = run_guarded(tmp_path / "clean", steps=45, data=data(), checkpoint_every=20)
    corrupt = {i for _, ids in clean[25:30] for i in ids}  # garbage wherever read, with NaN gradients on the first pass

    def fault(step, guard, batch):
        return garbage(batch, guard.model.cfg.vocab_size) if set(batch["idx"].tolist()) <= corrupt else batch

    guard, healed = run_guarded(tmp_path / "healed", steps=40, data=data(), checkpoint_every=20, fault=fault,
                                after_backward=nan_grads(set(range(25, 30))))  # fmt: skip
    assert guard.rollbacks == 1 and guard.skipped_positions == [25, 26, 27, 28, 29]
    by_position = [ids for _, ids in clean]
    replay = [ids for _, ids in healed[32:]]  # after two replay steps on the checkpoint
    assert replay == [by_position[p] for p in range(20, 45) if p not in range(25, 30)][: len(replay)]


def test_a_source_whose_replay_differs_is_said_to_be_inexact_once_with_the_position():
    class Unseeded:
        """A re-iterable that shuffles with its own generator, unseeded: a rewind cannot repeat its order."""

        def __init__(self) -> None:
            self.own = torch.Generator().manual_seed(0)

        def __iter__(self):
            return iter(torch.randperm(50, generator=self.own).split(5))

    stream = DataStream(Unseeded(), seed=0, epochs=2)
    start = stream.state_dict()
    [stream.next() for _ in range(4)]
    stream.load_state_dict(start)
    with pytest.warns(RuntimeWarning, match="position 0 differs"):
        [stream.next() for _ in range(4)]
    assert stream.inexact_at == 0


def test_an_exact_replay_raises_no_warning():
    stream = DataStream([torch.arange(i, i + 4) for i in range(0, 40, 4)], seed=0, epochs=1)
    start = stream.state_dict()
    first = [stream.next() for _ in range(5)]
    stream.load_state_dict(start)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = [stream.next() for _ in range(5)]
    assert [p for p, _ in again] == [p for p, _ in first] and stream.inexact_at is None
