"""Hypothesis strategies shared by the wire tests and the fuzz run."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import strategies as st

# Everything msgpack round-trips exactly (tuples come back as lists, so none here).
_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
msgpack_scalars = (
    st.none()
    | st.booleans()
    | _ints
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=50)
)
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10) | _ints, children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at random places (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
