"""Console session cookies and CSRF tokens: signed, expiring, tied to the admin token."""

from __future__ import annotations

from server.console.session import ConsoleSessions

TOKEN = "test-admin-token-0123456789"


def test_a_cookie_carries_no_token_and_verifies_until_it_expires() -> None:
    sessions = ConsoleSessions(TOKEN, max_age_s=60)
    cookie = sessions.issue(now=1000.0)
    assert TOKEN not in cookie
    session = sessions.verify(cookie, now=1059.0)
    assert session is not None and session.expires == 1060
    assert sessions.verify(cookie, now=1060.0) is None


def test_forged_and_foreign_cookies_are_refused() -> None:
    sessions = ConsoleSessions(TOKEN, max_age_s=60)
    cookie = sessions.issue(now=1000.0)
    session_id, expires, signature = cookie.split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for forged in (
        f"{session_id}.{expires}.{flipped}",
        f"{session_id}.{int(expires) + 3600}.{signature}",  # a later expiry
        f"other.{expires}.{signature}",
        f"{session_id}.{expires}",
        "",
        "x" * 500,
    ):
        assert sessions.verify(forged, now=1001.0) is None, forged
    # Another admin token (rotated, or another deployment) signs differently: all logged out.
    assert ConsoleSessions(TOKEN + "-rotated", max_age_s=60).verify(cookie, now=1001.0) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    sessions = ConsoleSessions(TOKEN, max_age_s=60)
    one = sessions.verify(sessions.issue(now=1000.0), now=1000.0)
    two = sessions.verify(sessions.issue(now=1000.0), now=1000.0)
    assert one is not None and two is not None and one.id != two.id
    assert sessions.check_csrf(one, sessions.csrf_token(one))
    assert not sessions.check_csrf(one, sessions.csrf_token(two))
    assert not sessions.check_csrf(one, "")
    assert not sessions.check_csrf(one, None)


def test_the_admin_token_is_checked_in_constant_time_on_digests() -> None:
    sessions = ConsoleSessions(TOKEN, max_age_s=60)
    assert sessions.check_token(TOKEN) and sessions.check_token(f" {TOKEN}\n")
    assert not sessions.check_token(TOKEN[:-1]) and not sessions.check_token("")
    assert not sessions.open
    assert ConsoleSessions(None, max_age_s=60).open
