from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        # A project that installs chat need not define its settings (chat.conf).
        from chat import conf

        conf.apply_defaults()
