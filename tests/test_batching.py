"""Per-batch padding and the multi-task batch schedule."""
import numpy as np
import pyarrow as pa
from scipy import stats

from pipeline.batching import collate_inputs, length_sorted_batches, pad_tokens, task_schedule


def test_collate_pads_to_the_batch_longest_row():
    table = pa.table({
        "example_id": pa.array([7, 3], pa.int64()),
        "input_ids": pa.array([[101, 5, 102], [101, 102]], pa.list_(pa.int32())),
        "token_type_ids": pa.array([[0, 0, 0], [0, 0]], pa.list_(pa.int8())),
        "label": pa.array([1, 0], pa.int64()),
    })
    b = collate_inputs(table)
    assert b["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["example_id"].tolist() == [7, 3] and b["labels"].tolist() == [1, 0]


def test_pad_tokens_with_width_keeps_row_order():
    lengths = np.array([2, 1])
    col = pa.array([[1, 2, 3, 4], [5, 6]], pa.list_(pa.float16()))
    out = pad_tokens(col, lengths, width=2)
    assert out.shape == (2, 2, 2)
    assert out[0].tolist() == [[1, 2], [3, 4]] and out[1].tolist() == [[5, 6], [0, 0]]


def test_length_sorted_batches_cover_every_row_once():
    lengths = np.random.default_rng(0).integers(1, 50, 1000)
    batches = length_sorted_batches(lengths, 64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in batches)


def test_proportional_schedule_is_mtdnn_pooling():
    counts = {"a": 300, "b": 100, "c": 20}
    sched = task_schedule(counts, alpha=1.0, seed=0)
    assert {t: sched.count(t) for t in counts} == counts  # every batch exactly once
    assert sched != task_schedule(counts, alpha=1.0, seed=1)  # reshuffled per epoch


def test_temperature_sampling_follows_requested_proportions():
    counts = {"a": 900, "b": 100}
    alpha = 0.5
    sched = task_schedule(counts, alpha=alpha, seed=0) + task_schedule(counts, alpha=alpha, seed=1)
    p = np.array([900**alpha, 100**alpha]) / (900**alpha + 100**alpha)  # 0.75 / 0.25
    observed = np.array([sched.count("a"), sched.count("b")])
    chi2 = stats.chisquare(observed, p * len(sched))
    assert chi2.pvalue > 0.001, (observed, p * len(sched))
    # and clearly not the proportional 0.9 / 0.1
    assert stats.chisquare(observed, np.array([0.9, 0.1]) * len(sched)).pvalue < 1e-6


def test_table_batches_split_equal_shares_by_length():
    """A table's rows for 3 workers: equal shares (remainder left out), each row at most once,
    batches of similar length, a fresh order every epoch."""
    import pyarrow as pa

    from pipeline.train_data import num_batches, table_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=1001)
    table = pa.table({"example_id": np.arange(1001), "input_ids": [list(range(n)) for n in lengths]})
    epochs = []
    for seed in (0, 1):
        ids = []
        for rank in range(3):
            batches = list(table_batches(table, rank, 3, 8, seed))
            assert len(batches) == num_batches(1001, 3, 8) == 42
            assert sum(len(b) for b in batches) == 333
            ids += [int(e) for b in batches for e in b.column("example_id").to_numpy()]
            spread = [np.ptp(lengths[b.column("example_id").to_numpy()]) for b in batches[:-1]]
            assert np.mean(spread) < 3, spread
        assert len(set(ids)) == len(ids) == 999
        epochs.append(ids)
    assert epochs[0] != epochs[1]


def test_prefetched_keeps_order_raises_producer_errors_and_stops_early():
    import threading
    import time

    import pytest

    from pipeline.train_data import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad shard 7")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard 7"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    it = prefetched(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # a loop that breaks early: the producer thread must end, not block forever
    assert threading.active_count() == before
    assert len(produced) <= 3 + 2 + 2  # consumed + queue depth + the one in hand

    # Made ahead of time (the next epoch's reader), it reads before its first `next`; dropped
    # without ever being iterated, its thread still ends.
    produced.clear()
    ahead = prefetched(endless(), depth=2)
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) >= 2
    del ahead
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
