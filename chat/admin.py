"""The moderation UI: rooms, memberships, messages and API tokens."""

from django.contrib import admin, messages
from django.utils.html import format_html

from chat import services
from chat.models import ApiToken, Membership, Message, Room


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

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.is_direct:
            return [*self.readonly_fields, "slug", "is_private"]
        return self.readonly_fields

    def get_prepopulated_fields(self, request, obj=None):
        return {} if obj is not None and obj.is_direct else self.prepopulated_fields

    @admin.display(description="members")
    def member_count(self, room):
        return room.memberships.count()


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "role", "read_seq", "joined_at"]
    list_filter = ["role", "room__is_private", "room__is_direct"]
    search_fields = ["room__slug", "user__username"]
    autocomplete_fields = ["room", "user"]
    list_select_related = ["room", "user"]


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
    ]
    date_hierarchy = "created_at"
    ordering = ["-created_at"]

    def has_add_permission(self, request):
        # Messages get their seq from the send path; the admin moderates them.
        return False

    @admin.display(description="body")
    def short_body(self, message):
        text = message.body if len(message.body) <= 80 else message.body[:79] + "…"
        if message.deleted_at is not None:
            return format_html("<s>{}</s>", text)
        return text


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

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request, queryset):
        for token in queryset:
            services.api_token_revoke(token=token)
        self.message_user(request, f"Revoked {queryset.count()} token(s).")
