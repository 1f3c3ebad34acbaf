"""The Autobahn TestSuite's cases against an echo endpoint on the chat's stack."""
