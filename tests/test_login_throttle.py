"""Sign-in throttling (django-axes): by username and address, with a cool-off."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.test import override_settings
from pytest_django.asserts import assertContains, assertRedirects

pytestmark = pytest.mark.django_db

PASSWORD = "pw-for-tests-123"
ATTACKER = "198.51.100.66"
ELSEWHERE = "203.0.113.9"
COOL_OFF = timedelta(minutes=15)


@pytest.fixture
def alice(make_user):
    return make_user("alice")


def sign_in(client, password, *, username="alice", path="/accounts/login/", **extra):
    extra.setdefault("REMOTE_ADDR", ATTACKER)
    return client.post(path, {"username": username, "password": password}, **extra)


def signed_in(client):
    return client.session.get("_auth_user_id")


def attempts():
    return list(
        AccessAttempt.objects.values_list(
            "username", "ip_address", "failures_since_start"
        )
    )


def wrong_passwords(client, count, **extra):
    return [sign_in(client, f"wrong-{n}", **extra).status_code for n in range(count)]


def test_five_wrong_passwords_lock_out_even_the_right_one(client, alice):
    statuses = wrong_passwords(client, 5)
    response = sign_in(client, PASSWORD)

    assert statuses == [200, 200, 200, 200, 429]
    assert response.status_code == 429
    assert signed_in(client) is None
    # The refused right one counts too: each attempt restarts the cool-off.
    assert attempts() == [("alice", ATTACKER, 6)]


def test_the_lockout_page_is_the_site_s_and_says_when_to_try_again(client, alice):
    wrong_passwords(client, 4)

    response = sign_in(client, "wrong-again")

    assert response.status_code == 429
    assert response["Retry-After"] == "900"
    until = AccessAttempt.objects.get().attempt_time + COOL_OFF
    assertContains(response, "<h1>Sign-in paused</h1>", status_code=429, html=True)
    assertContains(
        response,
        "<p>After 5 failed sign-ins for this username from your address, signing in "
        "from there is paused.</p>",
        status_code=429,
        html=True,
    )
    assertContains(
        response,
        f"<p>Try again in 15 minutes, after {until:%H:%M} UTC. Each attempt before "
        "then starts the wait again.</p>",
        status_code=429,
        html=True,
    )
    assertContains(
        response,
        '<link rel="stylesheet" href="/static/chat/chat.css">',
        status_code=429,
    )


def test_a_wrong_password_before_the_limit_shows_the_form_error(client, alice):
    response = sign_in(client, "wrong")

    assert response.status_code == 200
    assert response.context["form"].errors == {
        "__all__": [
            "Please enter a correct username and password. Note that both fields "
            "may be case-sensitive."
        ]
    }
    assert attempts() == [("alice", ATTACKER, 1)]


def test_the_same_username_from_another_address_still_signs_in(client, alice):
    wrong_passwords(client, 5)

    response = sign_in(client, PASSWORD, REMOTE_ADDR=ELSEWHERE)

    assertRedirects(response, "/", fetch_redirect_response=False)
    assert signed_in(client) == str(alice.pk)
    # The attacker's pair stays locked.
    assert attempts() == [("alice", ATTACKER, 5)]
    client.logout()
    assert sign_in(client, PASSWORD).status_code == 429


def test_another_username_from_the_locked_address_still_signs_in(
    client, alice, make_user
):
    bob = make_user("bob")
    wrong_passwords(client, 5)

    response = sign_in(client, PASSWORD, username="bob")

    assertRedirects(response, "/", fetch_redirect_response=False)
    assert signed_in(client) == str(bob.pk)


def test_after_the_cool_off_signing_in_works_again(client, alice):
    wrong_passwords(client, 5)
    attempt = AccessAttempt.objects.get()

    attempt.attempt_time -= COOL_OFF - timedelta(seconds=5)
    attempt.save()
    assert sign_in(client, PASSWORD).status_code == 429

    # That refused attempt restarted the wait: it must pass again, in full.
    AccessAttempt.objects.update(attempt_time=attempt.attempt_time - COOL_OFF)
    response = sign_in(client, PASSWORD)

    assertRedirects(response, "/", fetch_redirect_response=False)
    assert signed_in(client) == str(alice.pk)
    assert attempts() == []


def test_a_success_resets_the_count(client, alice):
    first = wrong_passwords(client, 4)
    assertRedirects(sign_in(client, PASSWORD), "/", fetch_redirect_response=False)
    assert attempts() == []
    client.logout()

    second = wrong_passwords(client, 5)

    assert (first, second) == ([200] * 4, [200, 200, 200, 200, 429])
    assert attempts() == [("alice", ATTACKER, 5)]


def test_the_admin_sign_in_shares_the_lockout(client, make_user):
    root = make_user("root", is_staff=True, is_superuser=True)
    wrong_passwords(client, 5, username="root")

    response = sign_in(client, PASSWORD, username="root", path="/admin/login/")

    assert response.status_code == 429
    assertContains(response, "<h1>Sign-in paused</h1>", status_code=429, html=True)
    assert signed_in(client) is None
    assert attempts() == [(root.username, ATTACKER, 6)]


@override_settings(AXES_FAILURE_LIMIT=2)
def test_the_limit_is_the_setting(client, alice):
    assert wrong_passwords(client, 3) == [200, 429, 429]


# --- sign-up ------------------------------------------------------------------


def sign_up(client, username, **extra):
    extra.setdefault("REMOTE_ADDR", ATTACKER)
    data = {"username": username, "password1": "a-long-pass-9876"}
    data["password2"] = data["password1"]
    return client.post("/accounts/signup/", data, **extra)


def test_sign_up_neither_signs_into_nor_unlocks_a_locked_account(client, alice):
    wrong_passwords(client, 5)

    taken = sign_up(client, "alice")

    assert taken.status_code == 200
    assert taken.context["form"].errors == {
        "username": ["A user with that username already exists."]
    }
    assert signed_in(client) is None
    # A new account signs in, and its success resets only its own count.
    assertRedirects(sign_up(client, "mallory"), "/", fetch_redirect_response=False)
    assert attempts() == [("alice", ATTACKER, 5)]
    client.logout()
    assert sign_in(client, PASSWORD).status_code == 429
    assert signed_in(client) is None


# --- the address behind the TLS proxy -----------------------------------------


@override_settings(CHAT_CLIENT_IP_FROM_PROXY=True)
def test_behind_the_proxy_the_address_it_appended_counts(client, alice):
    # What the client sent comes first; nginx appends the peer it saw.
    spoofed = {
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_X_FORWARDED_FOR": f"10.0.0.1, {ATTACKER}",
    }
    statuses = wrong_passwords(client, 5, **spoofed)
    other_spoof = {**spoofed, "HTTP_X_FORWARDED_FOR": f"10.9.9.9, {ATTACKER}"}

    assert statuses == [200, 200, 200, 200, 429]
    assert attempts() == [("alice", ATTACKER, 5)]
    assert sign_in(client, PASSWORD, **other_spoof).status_code == 429
    from_elsewhere = {**spoofed, "HTTP_X_FORWARDED_FOR": ELSEWHERE}
    assertRedirects(
        sign_in(client, PASSWORD, **from_elsewhere), "/", fetch_redirect_response=False
    )


@override_settings(CHAT_CLIENT_IP_FROM_PROXY=True)
@pytest.mark.parametrize("forwarded", ["", "not an address", "fe80::1%eth0"])
def test_behind_the_proxy_a_header_without_an_address_counts_the_peer(
    client, alice, forwarded
):
    wrong_passwords(client, 1, HTTP_X_FORWARDED_FOR=forwarded)

    assert attempts() == [("alice", ATTACKER, 1)]


def test_without_the_proxy_flag_x_forwarded_for_is_ignored(client, alice):
    wrong_passwords(client, 5, HTTP_X_FORWARDED_FOR="10.0.0.1")

    assert attempts() == [("alice", ATTACKER, 5)]
    assert sign_in(client, PASSWORD, HTTP_X_FORWARDED_FOR=ELSEWHERE).status_code == 429
