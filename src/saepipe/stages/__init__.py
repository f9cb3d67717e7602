"""One module per `saepipe` command: read the config, call the core, write outputs, print the summary line."""
