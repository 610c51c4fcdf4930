"""collate gathers each example's teacher rows at the targets its loss mask keeps, whatever the mask's shape:
one run (a masked prompt), several runs, none, all. The reference walks positions one by one."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.train.data import collate


def _example(rng: np.random.Generator, kind: str) -> dict:
    T = int(rng.integers(2, 40))
    mask = {"all": np.ones(T - 1, bool), "none": np.zeros(T - 1, bool), "random": rng.random(T - 1) < 0.5}.get(kind)
    if mask is None:  # one run somewhere inside
        a = int(rng.integers(0, T - 1))
        b = int(rng.integers(a, T))
        mask = np.zeros(T - 1, bool)
        mask[a:b] = True
    return {
        "input_ids": rng.integers(1, 100, T).astype(np.int32),
        "loss_mask": mask,
        "topk_ids": rng.integers(0, 1000, (T - 1, 4)).astype(np.int32),
        "topk_logprobs": rng.normal(size=(T - 1, 4)).astype(np.float16),
        "tail_logprob": rng.normal(size=T - 1).astype(np.float32),
    }


@pytest.mark.parametrize("seed", range(30))
def test_teacher_rows_are_the_kept_targets_in_order(seed):
    rng = np.random.default_rng(seed)
    examples = [_example(rng, str(rng.choice(["all", "none", "random", "run"]))) for _ in range(int(rng.integers(1, 6)))]
    examples[0]["loss_mask"][0] = True  # at least one target in the batch
    batch = collate(examples)
    want_ids, want_lp, want_tail, want_labels = [], [], [], []
    for ex in examples:
        for t, keep in enumerate(ex["loss_mask"]):
            if keep:
                want_ids.append(ex["topk_ids"][t])
                want_lp.append(ex["topk_logprobs"][t])
                want_tail.append(ex["tail_logprob"][t])
                want_labels.append(ex["input_ids"][t + 1])
    t = batch.targets
    assert batch.num_tokens == len(want_labels)
    np.testing.assert_array_equal(t.topk_ids.numpy(), np.array(want_ids))
    np.testing.assert_array_equal(t.topk_logprobs.numpy(), np.array(want_lp))
    np.testing.assert_array_equal(t.tail_logprob.numpy(), np.array(want_tail))
    np.testing.assert_array_equal(t.labels.numpy(), np.array(want_labels))
