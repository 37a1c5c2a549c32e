"""The `dmr` command line, shaped like `docker model`."""
