from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from chat import views

# Without Django's CSRF wrapper, which fails again on a body it cannot decode.
handler400 = "chat.views.bad_request"
handler500 = "chat.views.server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    # Django's auth URLs but the password reset ones: this site sends no mail
    # (accounts have no address, and a reset would fail on the mail server).
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    # Signing out also closes the session's sockets.
    path("accounts/logout/", views.sign_out, name="logout"),
    path(
        "accounts/password_change/",
        auth_views.PasswordChangeView.as_view(),
        name="password_change",
    ),
    path(
        "accounts/password_change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    # Browsers ask for it unbidden; chat's pages link the SVG icon itself.
    path("favicon.ico", views.favicon, name="favicon"),
    path("", include("chat.urls")),
]
