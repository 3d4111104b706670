"""`python -m cmoe.cli`: the same as the `cmoe` command."""

from cmoe.cli.main import main

main()
