"""`python -m packit_broker` = the `packit-broker` command."""

from packit_broker.cli import main

main()
