"""Create the users, API tokens, rooms and memberships of a benchmark run.

Runs inside chatsite (``python -m bench.seed`` with its settings): reads the
spec as JSON on stdin, prints the users' token keys as JSON on stdout.
"""

import json
import sys

import django


def username(index):
    return f"bench{index:05d}"


def seed(*, users, rooms):
    """``rooms`` maps a slug to the indices of the users who are its members."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.db import transaction

    from chat import services
    from chat.models import Membership

    user_model = get_user_model()
    with transaction.atomic():
        created = user_model.objects.bulk_create(
            user_model(username=username(i), password=make_password(None))
            for i in range(users)
        )
        keys = [
            services.api_token_create(user=user, name="bench")[1] for user in created
        ]
        memberships = []
        for slug, members in rooms.items():
            room = services.room_create(slug=slug, title=f"Bench {slug}")
            # Members already, as people coming back to a room they use.
            memberships += [Membership(room=room, user=created[i]) for i in members]
        Membership.objects.bulk_create(memberships, batch_size=2000)
    return keys


def main():
    spec = json.load(sys.stdin)
    django.setup()
    json.dump(seed(users=spec["users"], rooms=spec["rooms"]), sys.stdout)


if __name__ == "__main__":
    main()
