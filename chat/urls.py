from django.urls import path

from chat import ops, views

app_name = "chat"

urlpatterns = [
    path("", views.room_list, name="room_list"),
    path("rooms/new/", views.room_create, name="room_create"),
    path("direct/", views.direct_start, name="direct_start"),
    path("r/<slug:slug>/", views.room_detail, name="room"),
    path("accounts/signup/", views.signup, name="signup"),
    path("api/me", views.api_me, name="api_me"),
    path("api/push", views.api_push, name="api_push"),
    path("api/rooms/<slug:slug>/members", views.room_members, name="room_members"),
    path("api/rooms/<slug:slug>/leave", views.room_leave, name="room_leave"),
    path("api/uploads", views.api_uploads, name="api_uploads"),
    path("uploads/<int:upload_id>/<str:name>", views.upload_file, name="upload"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
]
