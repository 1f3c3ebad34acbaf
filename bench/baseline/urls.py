"""No pages: the baseline serves only its WebSocket route."""

urlpatterns = []
