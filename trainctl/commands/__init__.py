"""One module per `trainctl` command, each the same small shape: ``main(argv)`` parses its command
line, composes (or reads) the run spec, builds what it needs and acts. `trainctl.cli` only dispatches.
A new command is a module here plus one line in `cli.COMMANDS`."""
