"""The `consortia` command line."""
