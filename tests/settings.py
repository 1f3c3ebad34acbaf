"""Settings for the test suite: the project's, with a test key and fast hashing."""

import os
import tempfile

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

# The test process is not a server: leave its SIGTERM alone.
CHAT_CLOSE_ON_SIGTERM = False
