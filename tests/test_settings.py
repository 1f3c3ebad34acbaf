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
