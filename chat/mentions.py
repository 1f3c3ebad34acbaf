"""``@username`` in a message body: which users it names.

A mention is ``@`` after the start of the body or a character that cannot be in
a username (so ``a@b.example`` mentions nobody), then a username. Usernames may
end in ``.``, ``-`` or ``+``, which also end sentences: ``@alice.`` mentions
``alice.`` if there is such a user, else ``alice``. Only existing, active users
who may read the room are mentioned (``services`` decides that).
"""

import re

# Django's default username characters: letters, digits and @ . + - _
_USERNAME_CHAR = r"[\w.@+-]"
MENTION_RE = re.compile(rf"(?<!{_USERNAME_CHAR})@({_USERNAME_CHAR}{{1,150}})")
_TRAILING = ".-+@"
# A body naming more users than this mentions the first ones only.
MAX_MENTIONS_PER_MESSAGE = 50


def mention_candidates(body: str) -> list[list[str]]:
    """Per ``@`` mention in ``body``, the usernames it may be, longest first.

    Repeated mentions of one name come once, in the order of first use.
    """
    if "@" not in body:
        return []
    seen: set[str] = set()
    found: list[list[str]] = []
    for match in MENTION_RE.finditer(body):
        name = match.group(1)
        if name in seen:
            continue
        seen.add(name)
        names = [name]
        while name and name[-1] in _TRAILING:
            name = name[:-1]
            if name:
                names.append(name)
        found.append(names)
        if len(found) >= MAX_MENTIONS_PER_MESSAGE:
            break
    return found


def resolve_mentions(candidates: list[list[str]], existing: set[str]) -> list[str]:
    """The usernames mentioned: per mention its longest candidate in ``existing``."""
    mentioned: list[str] = []
    for names in candidates:
        for name in names:
            if name in existing:
                if name not in mentioned:
                    mentioned.append(name)
                break
    return mentioned
