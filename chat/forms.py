"""Forms of the web pages: create a room, start a direct conversation."""

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from chat import selectors
from chat.models import Room
from chat.protocol import NOT_FOUND, ChatError


class RoomCreateForm(forms.Form):
    SLUG_TAKEN = "A room with this slug already exists."

    slug = forms.SlugField(
        max_length=64,
        help_text="Letters, digits, - and _; it is in the room’s address.",
    )
    title = forms.CharField(max_length=200, required=False)
    is_private = forms.BooleanField(
        required=False, label="Private", help_text="Only members may read and join."
    )

    def clean_slug(self) -> str:
        slug = self.cleaned_data["slug"]
        if slug.lower().startswith(Room.DIRECT_SLUG_PREFIX):
            raise ValidationError(Room.DIRECT_SLUG_MESSAGE)
        try:
            selectors.room_get(slug=slug)
        except ChatError:
            return slug
        raise ValidationError(self.SLUG_TAKEN)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if not cleaned.get("title") and cleaned.get("slug"):
            cleaned["title"] = cleaned["slug"]
        return cleaned


class DirectStartForm(forms.Form):
    username = forms.CharField(max_length=150, label="Username")

    def clean_username(self) -> str:
        username = self.cleaned_data["username"].strip()
        try:
            self.cleaned_data["other"] = selectors.user_get_active(username=username)
        except ChatError as exc:
            if exc.code != NOT_FOUND:
                raise
            raise ValidationError(f"There is no user named “{username}”.") from None
        return username
