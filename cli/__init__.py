"""The `cmoe` command line."""
