"""The admin screens and the chat_token command."""

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from chat import selectors, services
from chat.models import ApiToken, Membership, ModerationAction

# ApiToken.new_key: the prefix, then 32 random bytes in URL-safe base64.
TOKEN_KEY = re.compile(r"cs_[A-Za-z0-9_-]{43}")


@pytest.fixture
def staff_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client


@pytest.mark.parametrize(
    ("model", "query", "found"),
    [
        ("room", "lob", {"slug": "lobby"}),
        ("membership", "alice", {"user__username": "alice"}),
        ("message", "there", {"body": "hi there"}),
        ("apitoken", "laptop", {"name": "laptop"}),
    ],
)
def test_changelists_find_by_search(staff_client, make_user, model, query, found):
    alice = make_user("alice")
    bob = make_user("bob")
    room = services.room_create(slug="lobby", title="Lobby", creator=alice)
    services.message_create(
        room=room, author=alice, body="hi there", client_msg_id="c1"
    )
    services.api_token_create(user=alice, name="laptop")
    # One of each that the search must leave out.
    other = services.room_create(slug="garden", title="Garden", creator=bob)
    services.message_create(room=other, author=bob, body="bye", client_msg_id="c2")
    services.api_token_create(user=bob, name="desktop")
    url = reverse(f"admin:chat_{model}_changelist")
    response = staff_client.get(url, {"q": query})
    assert response.status_code == 200
    changelist = response.context["cl"]
    assert changelist.result_count == 1
    [shown] = changelist.result_list
    assert shown == changelist.model.objects.get(**found)


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
    assert TOKEN_KEY.fullmatch(key), key
    assert notice == (
        f"New token for alice: {key} — copy it now, it is not shown again."
    )
    assert (token.user, token.name, token.hint) == (alice, "ci", key[:10])
    assert token.key_hash == ApiToken.hash_key(key)
    assert key not in token.key_hash
    assert selectors.user_get_by_token(key=key) == alice


def test_revoke_action_makes_the_token_useless(staff_client, make_user):
    alice = make_user("alice")
    token, key = services.api_token_create(user=alice)
    url = reverse("admin:chat_apitoken_changelist")
    before = timezone.now()
    response = staff_client.post(
        url, {"action": "revoke_tokens", "_selected_action": [token.pk]}, follow=True
    )
    after = timezone.now()
    assert [str(m) for m in response.context["messages"]] == ["Revoked 1 token(s)."]
    token.refresh_from_db()
    assert before <= token.revoked_at <= after
    assert selectors.user_get_by_token(key=key) is None


def test_message_admin_has_no_add_form(staff_client):
    response = staff_client.get(reverse("admin:chat_message_add"))
    assert response.status_code == 403


def test_chat_token_command_prints_a_working_token_last(make_user):
    alice = make_user("alice")
    out, err = StringIO(), StringIO()
    call_command("chat_token", "alice", stdout=out, stderr=err)
    key = out.getvalue().strip().splitlines()[-1]
    assert TOKEN_KEY.fullmatch(key), key
    assert out.getvalue() == f"{key}\n"
    assert err.getvalue() == f"Token {key[:10]}… created for alice; keep it secret.\n"
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


def test_deleting_a_membership_in_the_admin_goes_through_the_service(
    staff_client, make_user
):
    bob = make_user("bob")
    staff = services.room_create(slug="staff", title="Staff", is_private=True)
    membership = services.membership_add(room=staff, user=bob)
    url = reverse("admin:chat_membership_changelist")
    staff_client.post(
        url,
        {
            "action": "delete_selected",
            "_selected_action": [membership.pk],
            "post": "yes",
        },
        follow=True,
    )
    assert Membership.objects.filter(pk=membership.pk).count() == 0
    assert list(
        ModerationAction.objects.values_list("kind", "actor__username", "room__slug")
    ) == [("membership_remove", "root", "staff")]


def change_form_data(response):
    """What the browser would post back from an admin change page, unchanged."""
    data = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        management = formset.management_form
        data.update(
            {
                management[name].html_name: management[name].value()
                for name in management.fields
            }
        )
        forms.extend(formset.forms)
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is True:
                data[form[name].html_name] = "on"
            elif value not in (False, None):
                data[form[name].html_name] = value
    return data


def test_deleting_a_membership_on_the_room_page_goes_through_the_service(
    staff_client, make_user
):
    bob = make_user("bob")
    carol = make_user("carol")
    staff = services.room_create(slug="staff", title="Staff", is_private=True)
    removed = services.membership_add(room=staff, user=bob)
    kept = services.membership_add(room=staff, user=carol)
    url = reverse("admin:chat_room_change", args=[staff.pk])
    data = change_form_data(staff_client.get(url))
    [prefix] = [
        key[: -len("-id")]
        for key, value in data.items()
        if key.endswith("-id") and str(value) == str(removed.pk)
    ]
    data[f"{prefix}-DELETE"] = "on"
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.context["errors"]
    assert list(Membership.objects.filter(room=staff).values_list("pk", flat=True)) == [
        kept.pk
    ]
    assert list(
        ModerationAction.objects.values_list(
            "kind", "actor__username", "room__slug", "target_user"
        )
    ) == [("membership_remove", "root", "staff", bob.pk)]


def test_deactivating_in_the_admin_goes_through_the_service(staff_client, make_user):
    bob = make_user("bob")
    url = reverse("admin:auth_user_changelist")
    staff_client.post(
        url, {"action": "deactivate", "_selected_action": [bob.pk]}, follow=True
    )
    bob.refresh_from_db()
    assert bob.is_active is False
    assert list(
        ModerationAction.objects.values_list("kind", "actor__username", "target_user")
    ) == [("deactivate", "root", bob.pk)]


def test_a_messages_page_shows_its_attachments_reactions_and_mentions(
    staff_client, make_user, settings, tmp_path
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.MEDIA_ROOT = str(tmp_path)
    alice = make_user("alice")
    make_user("bob")
    room = services.room_create(slug="lobby", title="Lobby", creator=alice)
    upload = services.upload_create(
        owner=alice, file=SimpleUploadedFile("plan.txt", b"the plan")
    )
    message, _ = services.message_create(
        room=room,
        author=alice,
        body="@bob see the plan",
        client_msg_id="c1",
        attachments=[upload.pk],
    )
    services.reaction_set(
        room=room, message_id=message.pk, user=alice, emoji="🎉", on=True
    )
    page = staff_client.get(reverse("admin:chat_message_change", args=[message.pk]))
    assert page.status_code == 200
    text = page.content.decode()
    assert f'<a href="/uploads/{upload.pk}/plan.txt">plan.txt</a>' in text
    inlines = {
        formset.opts.model.__name__: formset
        for formset in page.context["inline_admin_formsets"]
    }
    assert sorted(inlines) == ["Mention", "Reaction", "Upload"]
    assert [str(r) for r in inlines["Reaction"].formset.queryset] == [
        "🎉 by alice on lobby#1"
    ]
    assert [m.user.username for m in inlines["Mention"].formset.queryset] == ["bob"]


def test_a_member_added_in_the_admin_starts_with_the_room_read(staff_client, make_user):
    alice = make_user("alice")
    bob = make_user("bob")
    room = services.room_create(slug="lobby", title="Lobby", creator=alice)
    for n in range(3):
        services.message_create(
            room=room, author=alice, body="x", client_msg_id=f"c{n}"
        )
    response = staff_client.post(
        reverse("admin:chat_membership_add"),
        {"room": room.pk, "user": bob.pk, "role": "member"},
    )
    assert response.status_code == 302
    membership = Membership.objects.get(room=room, user=bob)
    room.refresh_from_db()
    assert (room.last_seq, membership.read_seq) == (3, 3)
    assert selectors.read_state(membership).unread(room.last_seq) == 0
