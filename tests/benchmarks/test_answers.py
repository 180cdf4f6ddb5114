"""The quickstart-answers check (benchmarks/answers.py): where two greedy answers part."""

from __future__ import annotations

import pytest

from pagedllm.benchmarks.answers import compare, first_difference


@pytest.mark.parametrize("answer, reference, expected", [
    ([1, 2, 3], [1, 2, 3], None),
    ([7, 2, 3], [1, 2, 3], 0),
    ([1, 2, 4, 5], [1, 2, 3, 5], 2),
    ([1, 2], [1, 2, 3], 2),  # one answer ended (EOS) where the other went on
    ([1, 2, 3], [1, 2], 2),
])
def test_first_difference(answer, reference, expected):
    assert first_difference(answer, reference) == expected


def test_compare_counts_equal_answers_and_reports_the_first_prompt():
    reference = [{"tokens": [1, 2], "text": "a", "first_top2": {1: -0.1, 5: -2.0}},
                 {"tokens": [3, 4], "text": "b", "first_top2": {3: -0.5, 6: -1.0}}]
    rows = [{"tokens": [5, 2], "text": "c", "first_top2": {5: -0.2, 1: -0.3}},
            {"tokens": [3, 4], "text": "b", "first_top2": {3: -0.5, 6: -1.0}}]
    result = compare(rows, reference)
    assert result["equal"] == 1 and result["prompts"] == 2
    assert result["first_difference"] == [0, None]
    assert result["first_answer"] == "c" and result["first_top2"] == {5: -0.2, 1: -0.3}
