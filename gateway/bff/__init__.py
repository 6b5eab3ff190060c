"""The Backend-for-Frontend endpoints under ``/auth/``: login, callback, session, logout,
back-channel logout. Proxying is ``proxy``'s; sessions themselves are ``sessions``'s."""
