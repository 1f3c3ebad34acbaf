"""Settings for the test suite: the project's, with a test key and fast hashing."""

import os
import tempfile

from django.utils.module_loading import import_string

os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-secret-key-not-for-production")

from chatsite.settings import *  # noqa: E402,F403
from chatsite.settings import DATABASES  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: the server processes the tests start share it.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(
            tempfile.gettempdir(), f"chatsite-test-{os.getpid()}.sqlite3"
        )
    }

# Uploads of the tests go to a directory of their own, not the checkout's.
MEDIA_ROOT = tempfile.mkdtemp(prefix="chatsite-test-media-")

# The test process is not a server: leave its SIGTERM alone.
CHAT_CLOSE_ON_SIGTERM = False


class AxesUnlessNoRequest:
    """axes' backend, but an ``authenticate()`` without a request passes it by.

    Django's test ``Client.login`` passes none, which axes refuses with an error;
    the site's sign-in forms always pass one, so they stay throttled. The class
    cannot subclass axes' own: importing axes here would read these settings.
    """

    def authenticate(self, request, **credentials):
        if request is None:
            return None
        axes_backend = import_string("axes.backends.AxesStandaloneBackend")
        return axes_backend().authenticate(request, **credentials)


AUTHENTICATION_BACKENDS = [
    "tests.settings.AxesUnlessNoRequest",
    "django.contrib.auth.backends.ModelBackend",
]
# axes' check wants its backend class or a subclass; this one stands in for it.
SILENCED_SYSTEM_CHECKS = ["axes.W003"]
