"""Programs built on the layers below (the ``kickcall`` subcommands that are whole programs)."""
