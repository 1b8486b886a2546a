"""`python -m appliance.cli`: the `appliance` command (workers and tests start it this way)."""

from .main import main

main()
