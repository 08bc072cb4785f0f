import pytest

from mpiml.collectives._chunks import chunk_bounds, num_pieces, pieces


@pytest.mark.parametrize("n", [0, 1, 2, 7, 13, 1000, 1001])
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8, 17])
def test_chunk_bounds_cover_and_balance(n, parts):
    b = chunk_bounds(n, parts)
    assert len(b) == parts + 1 and b[0] == 0 and b[-1] == n
    sizes = [b[i + 1] - b[i] for i in range(parts)]
    assert max(sizes) - min(sizes) <= 1
    # the remainder goes to the first parts
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == -(-n // parts)


def test_chunk_bounds_rejects_nonsense():
    with pytest.raises(ValueError, match="parts"):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError, match="n must be"):
        chunk_bounds(-1, 2)


def test_pieces_and_num_pieces():
    assert num_pieces(0, 4) == 1
    assert num_pieces(8, 4) == 2
    assert num_pieces(9, 4) == 3
    assert pieces(10, 19, 3) == [(10, 13), (13, 16), (16, 19)]
    assert pieces(5, 5, 2) == [(5, 5), (5, 5)]
    with pytest.raises(ValueError):
        num_pieces(3, 0)
