"""The contract's rules, held to their plain definitions (the fast checks must mean exactly the spec)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from consumer.contract import MAX_ID, validate_batch, validate_body

SESSION_SPEC = re.compile(r"[A-Za-z0-9]{1,50}")
VECTORS = Path(__file__).resolve().parents[1] / "docs" / "contract-vectors.json"


@given(st.text(max_size=60) | st.from_regex(SESSION_SPEC, fullmatch=True))
def test_a_session_id_is_valid_exactly_when_it_is_1_to_50_ascii_letters_and_digits(session: str) -> None:
    violation = validate_body("view", {"sessionExternalId": session, "productId": 1})
    assert (violation is None) == bool(SESSION_SPEC.fullmatch(session)), session


@given(st.text(max_size=40))
def test_a_timestamp_is_valid_exactly_when_it_parses_as_iso_8601_with_an_offset(text: str) -> None:
    try:
        ok = datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        ok = False
    violation = validate_body("view", {"sessionExternalId": "a1", "productId": 1, "timestamp": text})
    assert (violation is None) == ok, text


@given(st.integers(min_value=-(2**64), max_value=2**64))
def test_ids_are_valid_from_0_to_2_to_the_53_minus_1(product: int) -> None:
    violation = validate_body("view", {"sessionExternalId": "a1", "productId": product})
    assert (violation is None) == (0 <= product <= MAX_ID)


def test_the_relay_and_the_emulator_share_one_verdict_on_every_contract_vector() -> None:
    for vector in json.loads(VECTORS.read_text())["vectors"]:
        method, body = vector["method"], vector["body"]
        if method == "visitorEvents":
            valid = validate_batch(body) is None
        elif method == "nosuchMethod":
            continue
        else:
            valid = validate_body(method, body) is None
        assert valid == (vector["status"] == 200), vector["why"]


#: Whitespace as ``str.strip()`` and ``str.isspace()`` know it, beyond ASCII: what trimming removes.
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2003\u2028\u2029\u202f\u205f\u3000"


@given(st.text(max_size=8) | st.text(alphabet=WHITESPACE, max_size=8) | st.text(alphabet=WHITESPACE + "ab"))
def test_a_search_phrase_is_valid_exactly_when_something_is_left_once_it_is_trimmed(phrase: str) -> None:
    violation = validate_body("search", {"sessionExternalId": "a1", "searchPhrase": phrase})
    assert (violation is None) == (phrase.strip() != ""), repr(phrase)
    if violation is not None:
        assert violation.field == "searchPhrase"
