"""The command line: the `appliance` command and its groups (spaces, gpus, users, bundle…)."""
