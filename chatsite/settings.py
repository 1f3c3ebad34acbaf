"""Settings for chatsite, read from the environment with safe defaults.

DATABASE_URL      database (default: SQLite file db.sqlite3 beside manage.py)
REDIS_URL         channels-redis layer and cross-process presence; unset means the
                  in-memory layer, good for one process only
DJANGO_SECRET_KEY required unless DJANGO_DEBUG is on
DJANGO_DEBUG      1/true/yes to turn debug on (default off)
DJANGO_ALLOWED_HOSTS  comma-separated (default: localhost,127.0.0.1,[::1])
DJANGO_CSRF_TRUSTED_ORIGINS  comma-separated https origins, behind a TLS proxy
DJANGO_BEHIND_TLS_PROXY  1 to trust X-Forwarded-Proto, use secure cookies,
                  redirect plain HTTP (DJANGO_SSL_REDIRECT=0 to stop) and send
                  HSTS (DJANGO_HSTS_SECONDS, default a year; 0 to stop;
                  DJANGO_HSTS_INCLUDE_SUBDOMAINS and DJANGO_HSTS_PRELOAD default on);
                  sign-in throttling then counts the address the proxy appended
                  to X-Forwarded-For
DJANGO_CONN_MAX_AGE  seconds a database connection is kept (default 300)
DJANGO_CONN_HEALTH_CHECKS  1: check a kept connection (SELECT 1) before each
                  database call of the sockets (default 0: a dead one fails one
                  call, answered as unavailable, and is reopened for the next)
CHAT_HEARTBEAT    seconds a client may stay silent before it must ping (default 30)
CHAT_ALLOWED_ORIGINS  comma-separated origins (scheme://host[:port]) a browser
                  socket may come from (default: this site, the handshake's Host
                  if it is in ALLOWED_HOSTS)
CHAT_REDIS_PREFIX prefix of Redis keys and channel names (default chat)
CHAT_CLOSE_ON_SIGTERM  close sockets with 1001 on SIGTERM (default on)
CHAT_MAX_CONNECTIONS_PER_USER  live sockets per user across processes (default
                  20; 0 for no limit); the next one is closed with 1013
CHAT_FAST_PATH    0 to serve every frame through plain ASGI instead of writing
                  prepared frames straight to daphne's sockets (default on)
CHAT_RATE_LIMIT   frames that read or write the database, per user across sockets
                  and processes: "N/S" is N frames per S seconds (default
                  60/10; 0 for no limit); beyond it `rate_limited`, and 1008 for
                  a client that keeps on
CHAT_SEND_BUFFER_BYTES  bytes a socket may have waiting to be written before it
                  is closed with 1008 as too slow a reader (default 1 MiB)
CHAT_SIGNUP_RATE  new accounts per address: "N/S" is N per S seconds (default
                  5/3600; 0 for no limit); beyond it the sign-up page answers 429
CHAT_LOGIN_FAILURE_LIMIT  failed sign-ins for one username from one address
                  before that pair is locked out (default 5; 0: no lockout)
CHAT_LOGIN_COOLOFF_MINUTES  how long a lockout lasts after the pair's last
                  attempt (default 15; 0: until an admin deletes the attempt)
CHAT_LOG_FORMAT   plain (default): log lines as they read; json: one JSON object
                  per line on stderr (chat.logs)
CHAT_MEDIA_ROOT   directory of uploaded files (default: media beside manage.py);
                  the default storage (STORAGES) keeps them there
CHAT_MAX_UPLOAD_BYTES  largest file POST /api/uploads takes (default 10 MiB);
                  a larger one is answered 413
CHAT_ACCEL_REDIRECT  a URL prefix nginx serves the media directory under as an
                  internal location (such as /protected-uploads/): attachments
                  are then sent by nginx (X-Accel-Redirect) after the access
                  check; unset, Django streams them itself
CHAT_SITE_NAME    the site's name in page titles and the header (default chatsite)

A value that is not what its variable takes (a word for a number, "maybe" for a
switch) stops start-up with ImproperlyConfigured naming the variable, the value
and what it should be.

The Content-Security-Policy is fixed, not read from the environment: see
CONTENT_SECURITY_POLICY below.
"""

import ipaddress
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import dj_database_url
import environ  # type: ignore[import-untyped]  # no type information
import redis.exceptions
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

# Each variable is read raw and cast with django-environ's parse_value, not with
# env.str()/env.int(): those take a value that starts with "$" for the name of
# another variable, so a secret key such as "$k2…" would be looked up, not used.
env = environ.Env()

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _refuse(name, value, expected, default):
    return ImproperlyConfigured(
        f"{name}={value!r} is not valid: expected {expected} (default {default})"
    )


def env_int(name, default, expected="a whole number"):
    """The whole number (0 or more) in ``name``; ``expected`` says what it counts."""
    value = env.ENVIRON.get(name)
    if value is None:
        return default
    try:
        number = env.parse_value(value, int)
    except ValueError:
        number = -1
    if number < 0:
        raise _refuse(name, value, expected, default)
    return number


def env_bool(name, default):
    """On for 1/true/yes/on, off for 0/false/no/off, any case; empty: default."""
    value = env.ENVIRON.get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise _refuse(
            name,
            value,
            f"on ({', '.join(TRUE_WORDS)}) or off ({', '.join(FALSE_WORDS)})",
            "on" if default else "off",
        )
    return word in TRUE_WORDS


def env_list(name, default):
    """The comma-separated items of ``name``, trimmed; unset or empty: ``default``."""
    value = env.ENVIRON.get(name, "")
    items = [item.strip() for item in env.parse_value(value, list) if item.strip()]
    return items or list(default)


def env_str(
    name, default, valid: Callable[[str], bool] = lambda value: True, expected=""
):
    """The text of ``name``, refused unless ``valid`` (``expected`` says what is)."""
    value = env.ENVIRON.get(name)
    if value is None:
        return default
    if not valid(value):
        raise _refuse(name, value, expected, default)
    return value


def is_rate(text):
    """Whether ``text`` is a rate chat.throttle.parse_rate reads: "N/S", "N" or "0"."""
    text = text.strip()
    if text in {"", "0"}:
        return True
    count, slash, seconds = text.partition("/")
    try:
        return int(count) >= 1 and (not slash or int(seconds) >= 1)
    except ValueError:
        return False


RATE = '"N/S" (N per S seconds) or "0" for no limit'

DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = env_str("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Set it to a long random string, or set "
            "DJANGO_DEBUG=1 for a development run with a built-in key."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# Behind a TLS-terminating proxy: the https origins forms are posted from.
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
if env_bool("DJANGO_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    # Served over TLS only: plain HTTP is redirected, and browsers are told to
    # come back over HTTPS only (HSTS). Both can be turned down.
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SSL_REDIRECT", True)
    # Health checks and Prometheus ask each process itself, over plain HTTP on
    # loopback: answer them, not a redirect.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int(
        "DJANGO_HSTS_SECONDS", 31536000, "a whole number of seconds"
    )
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", True)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "csp",
    "channels",
    "chat",
]

MIDDLEWARE = [
    # First: it times and logs every response, those of the others included.
    "chat.logs.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "chat.views.SiteCSPMiddleware",
    "chat.views.nul_refused",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # A user banned from the whole site gets 403 (the ban page) on its pages.
    "chat.views.SiteBanMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as axes asks: it turns a locked-out sign-in into the lockout page.
    "axes.middleware.AxesMiddleware",
]

# The Content-Security-Policy of every page, the admin's included. Nothing inline:
# scripts and styles are files of ours, and data reaches chat.js through
# json_script (a JSON data block, which CSP leaves alone). The admin of Django
# 5.2 needs no 'unsafe-inline' either: its scripts are files and it styles
# elements through the CSSOM, which style-src does not govern.
# connect-src: CSP3 browsers let 'self' match this site's ws:/wss: too, older ones
# (Safari before 15.4) do not, so chat.views.SiteCSPMiddleware adds the socket's
# origin as the request names it (wss://host[:port] on HTTPS, ws:// on HTTP)
# rather than any ws:/wss: host.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "connect-src": [SELF],
        "img-src": [SELF, "data:"],
        "object-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    },
}

# Sign-in throttling (django-axes): after CHAT_LOGIN_FAILURE_LIMIT failed sign-ins
# for one username from one address, that pair is locked out for
# CHAT_LOGIN_COOLOFF_MINUTES, each further attempt starting the wait again. The
# pair, not the username alone: an attacker elsewhere cannot lock a user out.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int(
    "CHAT_LOGIN_FAILURE_LIMIT", 5, "a whole number of failed sign-ins"
)
AXES_LOCK_OUT_AT_FAILURE = AXES_FAILURE_LIMIT > 0
_COOLOFF_MINUTES = env_int(
    "CHAT_LOGIN_COOLOFF_MINUTES", 15, "a whole number of minutes"
)
# None: locked until an admin deletes the access attempt.
AXES_COOLOFF_TIME = timedelta(minutes=_COOLOFF_MINUTES) if _COOLOFF_MINUTES else None
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "chat.views.sign_in_locked_out"
# The address counted is the peer's; behind the proxy, the one the proxy appended to
# X-Forwarded-For. (axes' AXES_IPWARE_* settings would do nothing: they need
# django-ipware, which is not installed.)
AXES_CLIENT_IP_CALLABLE = "chat.views.client_ip_address"
CHAT_CLIENT_IP_FROM_PROXY = env_bool("DJANGO_BEHIND_TLS_PROXY", False)

ROOT_URLCONF = "chatsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "chat.context_processors.site_name",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "chatsite.asgi.application"


def database_from_url():
    """``DATABASE_URL`` as Django's DATABASES entry; its value (a password) unsaid."""
    url = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
    try:
        return dj_database_url.parse(
            url,
            # Keep connections: the consumers' database thread would otherwise
            # open a new one (a new PostgreSQL backend) for every call.
            conn_max_age=env_int(
                "DJANGO_CONN_MAX_AGE", 300, "a whole number of seconds"
            ),
            # Off by default: with it, every database call of a socket (each
            # database_sync_to_async) paid a SELECT 1 round trip first; off,
            # 9 % less server CPU per connect and join in an A/B of the join
            # storm. A connection PostgreSQL dropped fails its next call, which
            # is answered as an outage, and Django reopens it for the call after.
            conn_health_checks=env_bool("DJANGO_CONN_HEALTH_CHECKS", False),
        )
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"DATABASE_URL is not valid: expected a database URL such as "
            f"postgres://user:password@host:5432/name (default: SQLite db.sqlite3 "
            f"beside manage.py). {exc}"
        ) from None


DATABASES = {"default": database_from_url()}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several server processes may write at once: take the write lock when the
    # transaction starts (no upgrade deadlocks), wait for it, and let readers
    # proceed beside the writer.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_VALIDATORS = "django.contrib.auth.password_validation."
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": _VALIDATORS + "UserAttributeSimilarityValidator"},
    {"NAME": _VALIDATORS + "MinimumLengthValidator"},
    {"NAME": _VALIDATORS + "CommonPasswordValidator"},
    {"NAME": _VALIDATORS + "NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:room_list"
LOGOUT_REDIRECT_URL = "login"

REDIS_URL = env_str("REDIS_URL", "")
CHAT_REDIS_PREFIX = env_str("CHAT_REDIS_PREFIX", "chat")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chat.layers.RedisChannelLayer",
            "CONFIG": {
                # After a Redis restart every pooled connection is dead: retry
                # a command once on a fresh one instead of failing it.
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "retry_on_error": [redis.exceptions.ConnectionError],
                        # Above the layer's 5 s blocking receive: at redis-py's
                        # default of 5 s every idle wait timed out and reconnected.
                        "socket_timeout": 15,
                    }
                ],
                "prefix": CHAT_REDIS_PREFIX,
                # One channel per server process carries all of its room
                # traffic, so it needs room for bursts.
                "capacity": 100_000,
                "expiry": 60,
                "group_expiry": 86400,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 100_000, "expiry": 60},
        }
    }

CHAT_HEARTBEAT = env_int("CHAT_HEARTBEAT", 30, "a whole number of seconds")
CHAT_ALLOWED_ORIGINS = env_list("CHAT_ALLOWED_ORIGINS", [])
# Close open sockets with 1001 on SIGTERM before the server process exits.
CHAT_CLOSE_ON_SIGTERM = env_bool("CHAT_CLOSE_ON_SIGTERM", True)
# Off (0/false/no/off): every frame goes through plain ASGI, not chat.serving's
# direct socket writes; those are off anyway on versions they were not written for.
CHAT_FAST_PATH = env_bool("CHAT_FAST_PATH", True)
# Live sockets one user may hold across processes; the next closes with 1013.
CHAT_MAX_CONNECTIONS_PER_USER = env_int(
    "CHAT_MAX_CONNECTIONS_PER_USER", 20, "a whole number of sockets"
)
# Database frames per user across sockets and processes: "N/S", or "0" for none.
CHAT_RATE_LIMIT = env_str("CHAT_RATE_LIMIT", "60/10", is_rate, RATE)
# New accounts per client address (as sign-in throttling counts it): "N/S".
CHAT_SIGNUP_RATE = env_str("CHAT_SIGNUP_RATE", "5/3600", is_rate, RATE)
# Bytes waiting to be written to one socket before it closes with 1008.
CHAT_SEND_BUFFER_BYTES = env_int(
    "CHAT_SEND_BUFFER_BYTES", 1 << 20, "a whole number of bytes"
)
# Uploaded files (POST /api/uploads) go through the default storage, here the
# file system under MEDIA_ROOT; set STORAGES["default"] for another backend.
MEDIA_ROOT = env_str("CHAT_MEDIA_ROOT", str(BASE_DIR / "media"))
CHAT_MAX_UPLOAD_BYTES = env_int(
    "CHAT_MAX_UPLOAD_BYTES", 10 * 1024 * 1024, "a whole number of bytes"
)
CHAT_ACCEL_REDIRECT = env_str(
    "CHAT_ACCEL_REDIRECT",
    "",
    lambda value: value == "" or (value.startswith("/") and value.endswith("/")),
    "a URL path that starts and ends with /, such as /protected-uploads/",
)
# Named in every page's title ("Rooms · chatsite") and header.
CHAT_SITE_NAME = env_str(
    "CHAT_SITE_NAME",
    "chatsite",
    lambda value: bool(value.strip()),
    "a name to show in page titles and the header",
)


def is_networks(text):
    """Whether ``text`` is comma-separated IP addresses or networks (CIDR)."""
    try:
        for item in text.split(","):
            ipaddress.ip_network(item.strip(), strict=False)
    except ValueError:
        return False
    return True


# Who may read /metrics (chat.ops): comma-separated addresses or networks,
# compared with the peer's own address. Default: loopback only.
CHAT_METRICS_ALLOW = [
    item.strip()
    for item in env_str(
        "CHAT_METRICS_ALLOW",
        "127.0.0.1,::1",
        is_networks,
        "comma-separated IP addresses or networks, such as 127.0.0.1,10.0.0.0/8",
    ).split(",")
]

# plain: each line as the message reads; json: one object per line (chat.logs).
CHAT_LOG_FORMAT = env_str(
    "CHAT_LOG_FORMAT",
    "plain",
    lambda value: value in {"plain", "json"},
    "plain or json",
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"connection": {"()": "chat.logs.ConnectionFilter"}},
    "formatters": {
        "plain": {"()": "chat.logs.PlainFormatter"},
        "json": {"()": "chat.logs.JSONFormatter"},
    },
    "handlers": {
        # stderr; the filter adds the connection a line was logged for.
        "console": {
            "class": "logging.StreamHandler",
            "formatter": CHAT_LOG_FORMAT,
            "filters": ["connection"],
        }
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "chat": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
