"""CLI subcommands; each module has ``register(subparsers)``.  Keep them thin."""
