"""Browser sessions: the cookie, encryption, the store, the lock and refresh."""
