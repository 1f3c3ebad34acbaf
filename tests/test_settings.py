"""Settings from the environment: a production configuration passes Django's checks."""

import os
import subprocess
import sys

import pytest

from tests.servers import ROOT

PRODUCTION = {
    "DJANGO_SECRET_KEY": "a-long-random-production-key-" + "x" * 40,
    "DJANGO_ALLOWED_HOSTS": "chat.example.com",
    "DJANGO_BEHIND_TLS_PROXY": "1",
    "DJANGO_SETTINGS_MODULE": "chatsite.settings",
}


def manage(*args, **env):
    """Run manage.py with ``env`` over this one's variables; None unsets one."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={k: v for k, v in {**clean, **env}.items() if v is not None},
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


def test_the_site_name_defaults_to_chatsite_and_comes_from_the_environment():
    assert settings_values("CHAT_SITE_NAME", CHAT_SITE_NAME=None) == ["'chatsite'"]
    assert settings_values("CHAT_SITE_NAME", CHAT_SITE_NAME="Acme Chat") == [
        "'Acme Chat'"
    ]


def start_up_error(**env):
    """The last line a start-up under ``env`` (a production one) fails with."""
    done = manage("check", **{**PRODUCTION, **env})
    assert done.returncode == 1, done.stdout
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CHAT_HEARTBEAT": "abc"},
            "CHAT_HEARTBEAT='abc' is not valid: expected a whole number of seconds "
            "(default 30)",
        ),
        (
            {"CHAT_SEND_BUFFER_BYTES": "-1"},
            "CHAT_SEND_BUFFER_BYTES='-1' is not valid: expected a whole number of "
            "bytes (default 1048576)",
        ),
        (
            {"DJANGO_CONN_MAX_AGE": ""},
            "DJANGO_CONN_MAX_AGE='' is not valid: expected a whole number of seconds "
            "(default 300)",
        ),
        (
            {"CHAT_FAST_PATH": "maybe"},
            "CHAT_FAST_PATH='maybe' is not valid: expected on (1, true, yes, on) or "
            "off (0, false, no, off) (default on)",
        ),
        (
            {"DJANGO_DEBUG": "2"},
            "DJANGO_DEBUG='2' is not valid: expected on (1, true, yes, on) or "
            "off (0, false, no, off) (default off)",
        ),
        (
            {"CHAT_LOG_FORMAT": "xml"},
            "CHAT_LOG_FORMAT='xml' is not valid: expected plain or json "
            "(default plain)",
        ),
        (
            {"CHAT_METRICS_ALLOW": "127.0.0.1,localhost"},
            "CHAT_METRICS_ALLOW='127.0.0.1,localhost' is not valid: expected "
            "comma-separated IP addresses or networks, such as 127.0.0.1,10.0.0.0/8 "
            "(default 127.0.0.1,::1)",
        ),
        (
            {"CHAT_SITE_NAME": " "},
            "CHAT_SITE_NAME=' ' is not valid: expected a name to show in page "
            "titles and the header (default chatsite)",
        ),
        (
            {"CHAT_RATE_LIMIT": "60/0"},
            "CHAT_RATE_LIMIT='60/0' is not valid: expected \"N/S\" (N per S seconds) "
            'or "0" for no limit (default 60/10)',
        ),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable_and_the_form(env, message):
    assert start_up_error(**env) == (
        "django.core.exceptions.ImproperlyConfigured: " + message
    )


def test_a_bad_database_url_is_refused_without_repeating_it():
    line = start_up_error(DATABASE_URL="nosuchdb://chat:s3cret@db.example.com/chat")

    assert line.startswith(
        "django.core.exceptions.ImproperlyConfigured: DATABASE_URL is not valid: "
        "expected a database URL such as postgres://user:password@host:5432/name "
        "(default: SQLite db.sqlite3 beside manage.py). Scheme 'nosuchdb://' is "
        "unknown."
    )
    assert "s3cret" not in line


def test_good_values_load_as_before():
    values = settings_values(
        "DEBUG",
        "CHAT_FAST_PATH",
        "CHAT_CLOSE_ON_SIGTERM",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_PRELOAD",
        "CHAT_HEARTBEAT",
        "SECURE_HSTS_SECONDS",
        "ALLOWED_HOSTS",
        "CHAT_ALLOWED_ORIGINS",
        "CHAT_LOG_FORMAT",
        "CHAT_REDIS_PREFIX",
        "SECRET_KEY",
        "DATABASES['default']['CONN_MAX_AGE']",
        "DATABASES['default']['ENGINE']",
        DJANGO_DEBUG=" Off ",
        CHAT_FAST_PATH="NO",
        CHAT_CLOSE_ON_SIGTERM="",
        DJANGO_SSL_REDIRECT="false",
        DJANGO_HSTS_PRELOAD="Yes",
        CHAT_HEARTBEAT=" 45 ",
        DJANGO_HSTS_SECONDS="0",
        DJANGO_ALLOWED_HOSTS=" chat.example.com , ,other.example.com,",
        CHAT_ALLOWED_ORIGINS="",
        CHAT_LOG_FORMAT="json",
        CHAT_REDIS_PREFIX="chat2",
        DJANGO_SECRET_KEY="$starts-with-a-dollar-" + "x" * 40,
        DJANGO_CONN_MAX_AGE="0",
        DATABASE_URL=None,
    )

    assert values == [
        "False",
        "False",
        "True",
        "False",
        "True",
        "45",
        "0",
        "['chat.example.com', 'other.example.com']",
        "[]",
        "'json'",
        "'chat2'",
        "'$starts-with-a-dollar-" + "x" * 40 + "'",
        "0",
        "'django.db.backends.sqlite3'",
    ]


def test_unset_values_keep_their_defaults():
    values = settings_values(
        "DEBUG",
        "CHAT_FAST_PATH",
        "CHAT_HEARTBEAT",
        "SECURE_HSTS_SECONDS",
        "CHAT_LOG_FORMAT",
        "CHAT_REDIS_PREFIX",
        "REDIS_URL",
        "DATABASES['default']['CONN_MAX_AGE']",
        "DATABASES['default']['NAME']",
        DATABASE_URL=None,
        REDIS_URL=None,
        CHAT_HEARTBEAT=None,
        CHAT_FAST_PATH=None,
        CHAT_LOG_FORMAT=None,
        CHAT_REDIS_PREFIX=None,
    )

    assert values == [
        "False",
        "True",
        "30",
        "31536000",
        "'plain'",
        "'chat'",
        "''",
        "300",
        repr(str(ROOT / "db.sqlite3")),
    ]
