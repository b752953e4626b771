"""Block matching between models of different depths."""
import itertools
import random

import pytest

from prolora.families.sd.rules import block_of as split_block
from prolora.matching import assign


def brute(score):
    n, m = len(score), len(score[0])
    return max(sum(score[i][c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))


@pytest.mark.parametrize("n,m", [(1, 1), (1, 5), (3, 3), (4, 10), (5, 7)])
def test_assignment_is_optimal(n, m):
    rng = random.Random(n * 100 + m)
    for _ in range(20):
        score = [[rng.random() for _ in range(m)] for _ in range(n)]
        cols = assign(score)
        assert len(set(cols)) == n and all(0 <= c < m for c in cols)
        assert sum(score[i][c] for i, c in enumerate(cols)) == pytest.approx(brute(score))


def test_assignment_recovers_a_permuted_subset():
    truth = [7, 2, 9, 0]
    score = [[0.9 if c == t else 0.5 for c in range(10)] for t in truth]
    assert assign(score) == truth
    with pytest.raises(ValueError):
        assign([[1.0], [1.0]])


def test_split_block():
    assert split_block("unet.up_blocks.0.attentions.1.transformer_blocks.3.attn1.to_q") == \
        ("unet.up_blocks.0.attentions.1", 3, "attn1.to_q")
    assert split_block("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj")[1:] == (0, "ff.net.0.proj")
    assert split_block("unet.down_blocks.1.resnets.0.conv1") is None
