"""The admin screens and the chat_token command."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from chat import selectors, services
from chat.models import ApiToken


@pytest.fixture
def staff_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client


@pytest.mark.parametrize(
    ("model", "query"),
    [
        ("room", "lob"),
        ("membership", "alice"),
        ("message", "there"),
        ("apitoken", "laptop"),
    ],
)
def test_changelists_find_by_search(staff_client, make_user, model, query):
    alice = make_user("alice")
    room = services.room_create(slug="lobby", title="Lobby", creator=alice)
    services.message_create(
        room=room, author=alice, body="hi there", client_msg_id="c1"
    )
    services.api_token_create(user=alice, name="laptop")
    url = reverse(f"admin:chat_{model}_changelist")
    response = staff_client.get(url, {"q": query})
    assert response.status_code == 200
    assert response.context["cl"].result_count == 1


def test_message_changelist_filters_deleted(staff_client, make_user):
    alice = make_user("alice")
    room = services.room_create(slug="lobby", title="Lobby")
    services.message_create(room=room, author=alice, body="kept", client_msg_id="c1")
    gone, _ = services.message_create(
        room=room, author=alice, body="gone", client_msg_id="c2"
    )
    services.message_delete(room=room, message_id=gone.pk, user=alice)
    url = reverse("admin:chat_message_changelist")
    response = staff_client.get(url, {"deleted_at__isempty": "0"})
    assert [m.body for m in response.context["cl"].result_list] == ["gone"]


def test_token_added_in_admin_is_shown_once_and_stored_hashed(staff_client, make_user):
    alice = make_user("alice")
    url = reverse("admin:chat_apitoken_add")
    response = staff_client.post(url, {"user": alice.pk, "name": "ci"}, follow=True)
    assert response.status_code == 200
    [token] = ApiToken.objects.all()
    [notice] = [str(m) for m in response.context["messages"] if "New token" in str(m)]
    key = notice.split(": ", 1)[1].split(" — ")[0]
    assert key.startswith("cs_")
    assert token.key_hash == ApiToken.hash_key(key)
    assert key not in token.key_hash
    assert selectors.user_get_by_token(key=key) == alice


def test_revoke_action_makes_the_token_useless(staff_client, make_user):
    alice = make_user("alice")
    token, key = services.api_token_create(user=alice)
    url = reverse("admin:chat_apitoken_changelist")
    staff_client.post(
        url, {"action": "revoke_tokens", "_selected_action": [token.pk]}, follow=True
    )
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert selectors.user_get_by_token(key=key) is None


def test_message_admin_has_no_add_form(staff_client):
    response = staff_client.get(reverse("admin:chat_message_add"))
    assert response.status_code == 403


def test_chat_token_command_prints_a_working_token_last(make_user):
    alice = make_user("alice")
    out = StringIO()
    call_command("chat_token", "alice", stdout=out, stderr=StringIO())
    key = out.getvalue().strip().splitlines()[-1]
    assert selectors.user_get_by_token(key=key) == alice
    assert ApiToken.objects.get().hint == key[:10]


@pytest.mark.django_db
def test_chat_token_command_for_unknown_user_fails():
    with pytest.raises(CommandError, match="No user named 'ghost'"):
        call_command("chat_token", "ghost", stdout=StringIO(), stderr=StringIO())


def test_inactive_users_token_is_refused(make_user):
    alice = make_user("alice", is_active=False)
    _, key = services.api_token_create(user=alice)
    assert selectors.user_get_by_token(key=key) is None


def test_admin_refuses_a_room_with_a_direct_room_slug(staff_client):
    url = reverse("admin:chat_room_add")
    data = {
        "slug": "dm-1-2",
        "title": "Sneaky",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
    }
    response = staff_client.post(url, data)
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["slug"] == [
        "Slugs starting with “dm-” are kept for direct conversations."
    ]
