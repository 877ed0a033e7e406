"""`calltune.evaluate.runner.confusion_counts` / `confusion_png`: bounded size whatever the number of names."""

from __future__ import annotations

from collections import Counter

import pytest

from calltune.evaluate.runner import NO_CALL, OTHER, UNPARSEABLE, confusion_counts, confusion_png

DPI = 110  # confusion_png's


def test_hand_made_counts_with_and_without_folding():
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("c", NO_CALL), (NO_CALL, NO_CALL), ("a", UNPARSEABLE)]
    rows, cols, matrix = confusion_counts(pairs)  # 3 names <= top: nothing folded
    assert rows == ["a", "b", "c", NO_CALL]  # most frequent first (a: 3), ties by name
    assert cols == ["a", "b", "c", NO_CALL, UNPARSEABLE]
    assert matrix == [[1, 1, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]

    rows, cols, matrix = confusion_counts(pairs, top=1)  # b and c fold into (other)
    assert rows == ["a", NO_CALL, OTHER] and cols == ["a", NO_CALL, UNPARSEABLE, OTHER]
    assert matrix == [[1, 0, 1, 1],   # a -> a, a -> (unparseable), a -> b (other)
                      [0, 1, 0, 0],   # (no call) -> (no call)
                      [0, 1, 0, 1]]   # c -> (no call), b -> b (other)
    assert confusion_counts([]) == ([], [NO_CALL, UNPARSEABLE], [])


def _many_names() -> tuple[list[tuple[str, str]], Counter]:
    """2,000 pairs over 1,000 function names (plus no-call references); fn_0000..fn_0024 are the frequent ones."""
    refs = [f"fn_{i:04d}" for i in range(1000)]                              # every name once
    refs += [f"fn_{i:04d}" for i in range(25) for _ in range(50 - i)]      # fn_0000 +50, ..., fn_0024 +26: 950
    refs += [NO_CALL] * 50
    pairs = []
    for k, ref in enumerate(refs):
        other = NO_CALL if ref == NO_CALL else f"fn_{(int(ref[3:]) + 500) % 1000:04d}"
        pairs.append((ref, [ref, UNPARSEABLE, NO_CALL, other][k % 4]))
    return pairs, Counter(refs)


def test_a_thousand_names_fold_into_other_and_keep_every_pair():
    pairs, ref_counts = _many_names()
    assert len(pairs) == 2000 and len(set(ref_counts) - {NO_CALL}) == 1000
    rows, cols, matrix = confusion_counts(pairs, top=20)
    kept = [f"fn_{i:04d}" for i in range(20)]
    assert rows == kept + [NO_CALL, OTHER]
    assert cols == kept + [NO_CALL, UNPARSEABLE, OTHER]
    assert sum(map(sum, matrix)) == len(pairs)
    for name, row in zip(rows, matrix):
        if name != OTHER:
            assert sum(row) == ref_counts[name]
    assert sum(matrix[-1]) == len(pairs) - sum(ref_counts[n] for n in kept) - ref_counts[NO_CALL]
    column = {c: sum(row[j] for row in matrix) for j, c in enumerate(cols)}
    predicted = Counter(p for _, p in pairs)
    assert column[UNPARSEABLE] == predicted[UNPARSEABLE] and column[NO_CALL] == predicted[NO_CALL]
    assert column[OTHER] == sum(n for p, n in predicted.items() if p not in set(kept) | {NO_CALL, UNPARSEABLE})
    exact = Counter(pairs)  # the kept block holds exactly the unfolded counts
    assert all(matrix[i][j] == exact[(a, b)] for i, a in enumerate(kept) for j, b in enumerate(kept))
    assert len(confusion_counts(pairs, top=5)[0]) == 5 + 2


@pytest.mark.parametrize("top", [20, 5])
def test_png_of_a_thousand_names_is_written_with_a_bounded_size(tmp_path, top):
    from matplotlib.image import imread

    pairs, _ = _many_names()
    path = confusion_png(pairs, tmp_path / "confusion.png", "function names: test", top=top)
    assert path.is_file() and path.stat().st_size > 0
    height, width = imread(path).shape[:2]
    # (top + 3) columns, (top + 2) rows at most, whatever the 1,000 names
    assert width <= round(DPI * (1.0 + 0.7 * (top + 3))) and height <= round(DPI * (1.0 + 0.55 * (top + 2)))
    small = confusion_png(pairs[:3], tmp_path / "small.png", "few names", top=top)
    assert imread(small).shape[1] < width  # the size follows the rows and columns drawn
