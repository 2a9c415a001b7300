"""A job's life: its spec, the producer, the Redis job store, export, the CLI and embedded mode."""
