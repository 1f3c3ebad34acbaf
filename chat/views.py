"""Web pages: sign up, the room list, a room."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from chat import selectors


@login_required
def room_list(request):
    rooms = selectors.room_list_for_user(user=request.user)
    return render(request, "chat/room_list.html", {"rooms": rooms})
