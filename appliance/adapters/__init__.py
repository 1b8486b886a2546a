"""The adapters to the outside: SQLite (store), Podman (runtime), the front router, host facts."""
