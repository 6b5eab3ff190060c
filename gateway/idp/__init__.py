"""Talking to the identity provider: discovery, the OAuth 2.0 calls, the JSON dialect."""
