"""The SASL parsers as pure functions."""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ofmipd import mechanisms
from ofmipd.mechanisms import MalformedResponse


def test_plain_splits_authzid_user_password():
    creds = mechanisms.parse_plain(b"\0alice\0s3cret")
    assert (creds.user, creds.password) == (b"alice", b"s3cret")


def test_plain_with_same_authzid_is_accepted():
    assert mechanisms.parse_plain(b"alice\0alice\0pw").user == b"alice"


def test_plain_acting_as_another_user_is_refused():
    with pytest.raises(MalformedResponse, match="^535 5.7.8"):
        mechanisms.parse_plain(b"root\0alice\0pw")


def test_plain_keeps_a_nul_in_the_password_for_the_door_check():
    assert mechanisms.parse_plain(b"\0a\0b\0c").password == b"b\0c"


@pytest.mark.parametrize("blob", [b"", b"alice", b"\0alice"])
def test_plain_wrong_shape_is_501(blob):
    with pytest.raises(MalformedResponse, match="^501 5.5.2"):
        mechanisms.parse_plain(blob)


def test_base64_equals_sign_is_empty_response():
    assert mechanisms.decode_base64(b"=") == b""


@pytest.mark.parametrize("text", [b"!!!", b"YWJj=x", b"a"])
def test_bad_base64_is_501_552(text):
    with pytest.raises(MalformedResponse, match="^501 5.5.2"):
        mechanisms.decode_base64(text)


def test_cram_md5_response_parses_user_with_spaces():
    digest = "0123456789abcdef0123456789ABCDEF"
    response = mechanisms.parse_cram_md5(f"jo smith {digest}".encode())
    assert response.user == b"jo smith"
    assert response.digest == digest.lower()


def test_cram_md5_challenge_is_unique_and_names_host():
    one = mechanisms.cram_md5_challenge("mx.example.org")
    assert one != mechanisms.cram_md5_challenge("mx.example.org")
    assert one.startswith(b"<") and one.endswith(b"@mx.example.org>")


@given(st.binary(max_size=300))
def test_parsers_raise_only_malformed_response(blob):
    try:
        creds = mechanisms.parse_plain(blob)
    except MalformedResponse:
        pass
    else:  # what was parsed is what was sent, NULs in the password included
        authzid, user, password = blob.split(b"\0", 2)
        assert (creds.user, creds.password) == (user, password)
        assert authzid in (b"", user)
    try:
        mechanisms.parse_cram_md5(blob)
    except MalformedResponse:
        pass
    try:
        decoded = mechanisms.decode_base64(base64.b64encode(blob))
    except MalformedResponse:
        pytest.fail("valid base64 refused")
    assert decoded == blob


@given(st.binary(max_size=100), st.binary(max_size=100).filter(lambda b: b"\0" not in b))
def test_plain_round_trips_user_and_password(password, user):
    blob = base64.b64encode(b"\0" + user + b"\0" + password)
    creds = mechanisms.parse_plain(mechanisms.decode_base64(blob))
    assert (creds.user, creds.password) == (user, password)
