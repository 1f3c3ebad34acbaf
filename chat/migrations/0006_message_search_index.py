"""The full-text index behind ``search`` on PostgreSQL (SQLite needs none)."""

from django.db import migrations

INDEX = "chat_message_body_search"


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    # The very expression chat.selectors.message_search filters on, so that the
    # planner can answer from the index.
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON chat_message USING gin "
        "(to_tsvector('simple'::regconfig, COALESCE(body, '')))"
    )


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("chat", "0005_team_chat")]

    operations = [migrations.RunPython(create_index, drop_index)]
