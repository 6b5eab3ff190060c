"""tokengate: a token handler that validates bearer tokens and keeps browser sessions
server-side, in front of resource servers."""

__version__ = "0.1.0"
