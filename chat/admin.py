"""The moderation UI. Every change with a live effect goes through a service, so
it reaches open sockets on every server process whichever screen or action
made it."""

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.html import format_html

from chat import registry, services
from chat.models import (
    ApiToken,
    Ban,
    Membership,
    Mention,
    Message,
    ModerationAction,
    Mute,
    Reaction,
    Room,
    Upload,
)


def _starts_read(membership: Membership) -> None:
    """A member added here starts with the room read, as a joining one does."""
    if membership.pk is None:
        membership.read_seq = Room.objects.get(pk=membership.room_id).last_seq


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]
    fields = ["user", "role", "read_seq", "joined_at"]
    readonly_fields = ["read_seq", "joined_at"]


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = [
        "slug",
        "title",
        "is_private",
        "is_direct",
        "is_closed",
        "last_seq",
        "member_count",
        "created_at",
    ]
    list_filter = ["is_private", "is_direct", "is_closed", "created_at"]
    search_fields = ["slug", "title"]
    readonly_fields = ["last_seq", "is_direct", "created_at"]
    prepopulated_fields = {"slug": ["title"]}
    inlines = [MembershipInline]
    date_hierarchy = "created_at"
    actions = ["close_rooms", "reopen_rooms"]
    change_list_template = "admin/chat/room/change_list.html"

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.is_direct:
            return [*self.readonly_fields, "slug", "is_private"]
        return self.readonly_fields

    def get_prepopulated_fields(self, request, obj=None):
        return {} if obj is not None and obj.is_direct else self.prepopulated_fields

    def save_formset(self, request, form, formset, change):
        """Memberships deleted on the room's page end through the service too.

        Deleting one here must close the room to the user's open sockets, as
        deleting it from the membership list does.
        """
        if formset.model is not Membership:
            return super().save_formset(request, form, formset, change)
        memberships = formset.save(commit=False)
        for membership in formset.deleted_objects:
            services.membership_remove(membership=membership, actor=request.user)
        for membership in memberships:
            _starts_read(membership)
            membership.save()
        formset.save_m2m()

    @admin.display(description="members")
    def member_count(self, room):
        return room.memberships.count()

    def save_model(self, request, obj, form, change):
        closing = change and "is_closed" in form.changed_data
        if closing:
            # The service flips the flag and takes the room's sockets out.
            obj.is_closed = not obj.is_closed
        super().save_model(request, obj, form, change)
        if closing and not obj.is_closed:
            services.room_close(room=obj, actor=request.user)
        elif closing:
            services.room_reopen(room=obj, actor=request.user)

    @admin.action(description="Close selected rooms (read-only, members removed)")
    def close_rooms(self, request, queryset):
        for room in queryset.filter(is_closed=False):
            services.room_close(room=room, actor=request.user)
            self.log_change(request, room, "Closed the room.")
        self.message_user(request, "Closed the selected rooms.")

    @admin.action(description="Reopen selected rooms")
    def reopen_rooms(self, request, queryset):
        for room in queryset.filter(is_closed=True):
            services.room_reopen(room=room, actor=request.user)
            self.log_change(request, room, "Reopened the room.")
        self.message_user(request, "Reopened the selected rooms.")

    # --- live connections ----------------------------------------------------

    def get_urls(self):
        live = self.admin_site.admin_view(self.live_connections_view)
        return [
            path("live/", live, name="chat_live_connections"),
            *super().get_urls(),
        ]

    def live_connections_view(self, request):
        """Every live socket on every server process, with a disconnect button."""
        if not request.user.has_perm("chat.change_room"):
            raise PermissionDenied
        if request.method == "POST":
            connection_id = request.POST.get("connection_id", "")
            reason = request.POST.get("reason", "").strip()
            services.connection_disconnect(
                connection_id=connection_id, actor=request.user, reason=reason
            )
            self.message_user(request, f"Disconnected {connection_id}.")
            return redirect("admin:chat_live_connections")
        connections = async_to_sync(registry.live_connections)()
        per_room: dict[str, int] = {}
        for connection in connections:
            for slug in connection["rooms"]:
                per_room[slug] = per_room.get(slug, 0) + 1
        context = {
            **self.admin_site.each_context(request),
            "title": "Live connections",
            "opts": self.model._meta,
            "connections": connections,
            "per_room": sorted(per_room.items()),
        }
        return TemplateResponse(request, "admin/chat/live_connections.html", context)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "role", "read_seq", "joined_at"]
    list_filter = ["role", "room__is_private", "room__is_direct"]
    search_fields = ["room__slug", "user__username"]
    autocomplete_fields = ["room", "user"]
    list_select_related = ["room", "user"]
    readonly_fields = ["read_seq", "uncounted_after_read", "unread_mentions"]

    def save_model(self, request, obj, form, change):
        _starts_read(obj)
        super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        services.membership_remove(membership=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for membership in queryset.select_related("room", "user"):
            services.membership_remove(membership=membership, actor=request.user)


class _ReadOnlyInline(admin.TabularInline):
    """What a message carries, shown where a moderator looks; changed only by
    the users themselves (or gone with the message)."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class ReactionInline(_ReadOnlyInline):
    model = Reaction
    fields = readonly_fields = ("emoji", "user", "created_at")


class MentionInline(_ReadOnlyInline):
    model = Mention
    fields = readonly_fields = ("user",)


class AttachmentInline(_ReadOnlyInline):
    model = Upload
    verbose_name = "attachment"
    fields = readonly_fields = ("link", "content_type", "size", "owner", "created_at")

    @admin.display(description="file")
    def link(self, upload):
        return format_html(
            '<a href="{}">{}</a>', services.upload_url(upload), upload.name
        )


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = [
        "room",
        "seq",
        "author",
        "short_body",
        "created_at",
        "edited_at",
        "deleted_at",
    ]
    list_filter = ["room", ("deleted_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["body", "author__username", "room__slug", "client_msg_id"]
    list_select_related = ["room", "author"]
    readonly_fields = [
        "room",
        "seq",
        "author",
        "client_msg_id",
        "created_at",
        "edited_at",
        "deleted_at",
        "reply_to",
        "reply_count",
    ]
    date_hierarchy = "created_at"
    ordering = ["-created_at"]
    actions = ["hide_messages"]
    inlines = [AttachmentInline, ReactionInline, MentionInline]

    def has_add_permission(self, request):
        # Messages get their seq from the send path; the admin moderates them.
        return False

    @admin.display(description="body")
    def short_body(self, message):
        text = message.body if len(message.body) <= 80 else message.body[:79] + "…"
        if message.deleted_at is not None:
            return format_html("<s>{}</s>", text)
        return text

    def delete_model(self, request, obj):
        # "Delete" keeps the row (its seq stays taken) and hides it for everyone.
        services.message_hide(message=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for message in queryset:
            services.message_hide(message=message, actor=request.user)

    @admin.action(description="Delete selected messages for everyone")
    def hide_messages(self, request, queryset):
        for message in queryset.filter(deleted_at__isnull=True):
            services.message_hide(message=message, actor=request.user)
            self.log_change(request, message, "Deleted the message for everyone.")
        self.message_user(request, "Deleted the selected messages.")


class SanctionAdmin(admin.ModelAdmin):
    """Shared by bans and mutes: created and lifted through the services."""

    list_display = ["user", "room", "reason", "expires_at", "active", "created_by"]
    list_filter = ["created_at", "expires_at"]
    search_fields = ["user__username", "room__slug", "reason"]
    autocomplete_fields = ["user", "room"]
    list_select_related = ["user", "room", "created_by"]
    readonly_fields = ["created_by", "created_at"]

    def create(self, request, data):
        """Create the sanction through its service; each admin says which."""
        raise NotImplementedError

    def get_readonly_fields(self, request, obj=None):
        if obj is not None:
            return [*self.readonly_fields, "user", "room"]
        return self.readonly_fields

    @admin.display(boolean=True)
    def active(self, sanction):
        return sanction.is_active

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        created = self.create(request, form.cleaned_data)
        obj.pk = created.pk
        obj.refresh_from_db()

    def delete_queryset(self, request, queryset):
        for sanction in queryset:
            self.delete_model(request, sanction)


@admin.register(Ban)
class BanAdmin(SanctionAdmin):
    list_filter = [("room", admin.EmptyFieldListFilter), *SanctionAdmin.list_filter]

    def create(self, request, data):
        fields = {
            "user": data["user"],
            "reason": data["reason"],
            "expires_at": data["expires_at"],
            "actor": request.user,
        }
        if data["room"] is None:
            return services.user_ban(**fields)
        return services.room_ban(room=data["room"], **fields)

    def save_model(self, request, obj, form, change):
        if change:
            services.ban_update(ban=obj, actor=request.user)
            return
        super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        services.ban_lift(ban=obj, actor=request.user)


@admin.register(Mute)
class MuteAdmin(SanctionAdmin):
    def create(self, request, data):
        return services.user_mute(
            user=data["user"],
            room=data["room"],
            reason=data["reason"],
            expires_at=data["expires_at"],
            actor=request.user,
        )

    def delete_model(self, request, obj):
        services.mute_lift(mute=obj, actor=request.user)


@admin.register(ModerationAction)
class ModerationActionAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "kind",
        "actor",
        "target_user",
        "room",
        "reason",
        "detail",
    ]
    list_filter = ["kind", "created_at"]
    search_fields = ["actor__username", "target_user__username", "room__slug", "reason"]
    list_select_related = ["actor", "target_user", "room"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["hint", "user", "name", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["user__username", "name", "hint"]
    autocomplete_fields = ["user"]
    readonly_fields = ["hint", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke_tokens"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["user", "name"]
        return ["user", "name", "hint", "created_at", "last_used_at", "revoked_at"]

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        token, key = services.api_token_create(user=obj.user, name=obj.name)
        obj.pk = token.pk
        obj.refresh_from_db()
        self.message_user(
            request,
            f"New token for {obj.user}: {key} — copy it now, it is not shown again.",
            messages.WARNING,
        )

    def delete_model(self, request, obj):
        services.api_token_revoke(token=obj, actor=request.user)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for token in queryset:
            self.delete_model(request, token)

    @admin.action(description="Revoke selected tokens (their sockets close)")
    def revoke_tokens(self, request, queryset):
        for token in queryset:
            services.api_token_revoke(token=token, actor=request.user)
            self.log_change(request, token, "Revoked the token.")
        self.message_user(request, f"Revoked {queryset.count()} token(s).")


User = get_user_model()
if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class ChatUserAdmin(UserAdmin):
    """Django's user admin, with the chat's account-wide actions."""

    actions = ["sign_out_everywhere", "revoke_all_tokens", "deactivate"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            services.user_deactivate(user=obj, actor=request.user)

    @admin.action(description="Deactivate (their sockets close)")
    def deactivate(self, request, queryset):
        for user in queryset.filter(is_active=True):
            services.user_deactivate(user=user, actor=request.user)
            self.log_change(request, user, "Deactivated.")
        self.message_user(request, "Deactivated the selected users.")

    @admin.action(description="Sign out of all sessions (their sockets close)")
    def sign_out_everywhere(self, request, queryset):
        for user in queryset:
            ended = services.user_sign_out_everywhere(user=user, actor=request.user)
            self.log_change(request, user, f"Signed out of {ended} session(s).")
        self.message_user(request, "Signed the selected users out everywhere.")

    @admin.action(description="Revoke all API tokens (their sockets close)")
    def revoke_all_tokens(self, request, queryset):
        for token in ApiToken.objects.active().filter(user__in=queryset):
            services.api_token_revoke(token=token, actor=request.user)
            self.log_change(request, token.user, f"Revoked token {token.hint}.")
        self.message_user(request, "Revoked the selected users' tokens.")
