"""Settings from the environment: a production configuration passes Django's checks."""

import os
import subprocess
import sys

from tests.servers import ROOT

PRODUCTION = {
    "DJANGO_SECRET_KEY": "a-long-random-production-key-" + "x" * 40,
    "DJANGO_ALLOWED_HOSTS": "chat.example.com",
    "DJANGO_BEHIND_TLS_PROXY": "1",
    "DJANGO_SETTINGS_MODULE": "chatsite.settings",
}


def manage(*args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_is_clean_behind_a_tls_proxy():
    done = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (
        0,
        "System check identified no issues (0 silenced).",
        "",
    )


def test_hsts_and_the_https_redirect_can_be_turned_down():
    done = manage(
        "check",
        "--deploy",
        **PRODUCTION,
        DJANGO_HSTS_SECONDS="0",
        DJANGO_SSL_REDIRECT="0",
    )
    warnings = sorted(
        line.split(")")[0].split("(")[1]
        for line in done.stderr.splitlines() + done.stdout.splitlines()
        if line.startswith("?: (security.")
    )
    assert (done.returncode, warnings) == (0, ["security.W004", "security.W008"])


def test_without_a_secret_key_the_error_names_the_fix():
    done = manage("check", DJANGO_SETTINGS_MODULE="chatsite.settings")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: DJANGO_SECRET_KEY is not set. "
        "Set it to a long random string, or set DJANGO_DEBUG=1 for a development "
        "run with a built-in key."
    )


def settings_values(*names, **env):
    """The values of settings ``names`` under ``env``, as the process reads them."""
    code = "from django.conf import settings as s; " + "; ".join(
        f"print(repr(s.{name}))" for name in names
    )
    done = manage("shell", "--no-imports", "-c", code, **{**PRODUCTION, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


THROTTLE = (
    "AXES_FAILURE_LIMIT",
    "AXES_LOCK_OUT_AT_FAILURE",
    "AXES_COOLOFF_TIME",
    "AXES_LOCKOUT_PARAMETERS",
    "CHAT_CLIENT_IP_FROM_PROXY",
)


def test_sign_in_throttling_defaults_to_5_failures_and_15_minutes():
    assert settings_values(*THROTTLE) == [
        "5",
        "True",
        "datetime.timedelta(seconds=900)",
        "[['username', 'ip_address']]",
        "True",
    ]


def test_sign_in_throttling_comes_from_the_environment():
    values = settings_values(
        *THROTTLE,
        CHAT_LOGIN_FAILURE_LIMIT="3",
        CHAT_LOGIN_COOLOFF_MINUTES="60",
        DJANGO_BEHIND_TLS_PROXY="0",
    )

    assert values == [
        "3",
        "True",
        "datetime.timedelta(seconds=3600)",
        "[['username', 'ip_address']]",
        "False",
    ]


def test_a_limit_of_0_turns_the_lockout_off_and_a_cool_off_of_0_is_for_good():
    values = settings_values(
        *THROTTLE[:3], CHAT_LOGIN_FAILURE_LIMIT="0", CHAT_LOGIN_COOLOFF_MINUTES="0"
    )

    assert values == ["0", "False", "None"]


def test_behind_the_tls_proxy_a_page_carries_the_policy_with_wss_and_hsts():
    code = (
        "from django.test import Client; "
        "r = Client().get('/accounts/login/', headers={'X-Forwarded-Proto': 'https'}, "
        "HTTP_HOST='chat.example.com'); "
        "print(r.status_code); "
        "print('; '.join(sorted(r.headers['Content-Security-Policy'].split('; ')))); "
        "print(r.headers['Strict-Transport-Security'])"
    )
    done = manage("shell", "--no-imports", "-c", code, **PRODUCTION)

    assert done.stdout.splitlines() == [
        "200",
        "base-uri 'none'; connect-src 'self' wss://chat.example.com; "
        "default-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "img-src 'self' data:; object-src 'none'; script-src 'self'; "
        "style-src 'self'",
        "max-age=31536000; includeSubDomains; preload",
    ], done.stderr


LIMITS = (
    "CHAT_RATE_LIMIT",
    "CHAT_SEND_BUFFER_BYTES",
    "CHAT_MAX_CONNECTIONS_PER_USER",
    "CHAT_SIGNUP_RATE",
)


def test_the_limits_default_to_what_docs_protocol_md_says():
    assert settings_values(*LIMITS) == ["'60/10'", "1048576", "20", "'5/3600'"]


def test_the_limits_come_from_the_environment():
    values = settings_values(
        *LIMITS,
        CHAT_RATE_LIMIT="20/10",
        CHAT_SEND_BUFFER_BYTES="65536",
        CHAT_MAX_CONNECTIONS_PER_USER="3",
        CHAT_SIGNUP_RATE="0",
    )
    assert values == ["'20/10'", "65536", "3", "'0'"]
