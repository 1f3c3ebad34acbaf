from django.contrib import admin
from django.urls import include, path

from chat import views

urlpatterns = [
    path("admin/", admin.site.urls),
    # Before Django's auth URLs: signing out also closes the session's sockets.
    path("accounts/logout/", views.sign_out, name="logout"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("chat.urls")),
]
