"""Property tests for the primitive types every Tenant field is built from."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from bitbuilder.hostshim.api import (
    DNS1123_LABEL_PATTERN,
    QUANTITY_PATTERN,
    GitRef,
    parse_duration,
    parse_quantity,
)
from bitbuilder.operator.api import ObjectMeta

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}
UNITS = {"h": 3600, "m": 60, "s": 1}


@given(st.integers(0, 10**6), st.sampled_from(sorted({**BINARY, **DECIMAL})))
def test_quantity_is_number_times_suffix(number: int, suffix: str) -> None:
    assert parse_quantity(f"{number}{suffix}") == number * {**BINARY, **DECIMAL}[suffix]


@given(st.integers(0, 10**6))
def test_millis_and_integers(number: int) -> None:
    assert parse_quantity(f"{number}m") == Decimal(number) / 1000
    assert parse_quantity(number) == number


@given(st.text(min_size=1, max_size=12))
# Examples hypothesis once found (the CRD pattern refused them, parse_quantity accepted them).
@example("0\r")
@example(" 1")
@example("1\n")
@example("\t2Gi ")
def test_quantity_refuses_what_the_crd_pattern_refuses(text: str) -> None:
    """The CRD carries QUANTITY_PATTERN; the models must agree with it on every input."""
    if re.fullmatch(QUANTITY_PATTERN, text):
        parse_quantity(text)
    else:
        with pytest.raises(ValueError, match="invalid quantity"):
            parse_quantity(text)


@given(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(sorted(UNITS))), min_size=1))
def test_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == sum(n * UNITS[u] for n, u in parts)


@pytest.mark.parametrize("text", ["", "5", "m5", "5d", "-5m", "1h 30m"])
def test_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


ref_names = st.from_regex(r"[a-z][a-z0-9._/-]{0,20}[a-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s and "//" not in s and "/." not in s and not s.endswith(".lock")
)
commits = st.from_regex(r"[0-9a-f]{40}", fullmatch=True)


@given(
    st.fixed_dictionaries({}, optional={"branch": ref_names, "tag": ref_names, "commit": commits})
)
def test_exactly_one_ref_kind(ref: dict[str, str]) -> None:
    if len(ref) == 1:
        [(kind, value)] = ref.items()
        parsed = GitRef.model_validate(ref)
        assert (parsed.kind, parsed.value) == (kind, value)
    else:
        with pytest.raises(ValidationError, match="exactly one of branch, tag or commit"):
            GitRef.model_validate(ref)


@pytest.mark.parametrize("name", ["-main", "a..b", "a b", "x.lock", "a/.hidden", "a~1", "@"])
def test_ref_names_git_would_refuse(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid git ref name"):
        GitRef(branch=name)


@given(st.from_regex(DNS1123_LABEL_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 63))
def test_dns_labels_are_tenant_names(name: str) -> None:
    assert ObjectMeta(name=name).name == name
