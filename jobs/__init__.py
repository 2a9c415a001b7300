"""A job's life and its files: its spec and submission, the producer reading its input, dispatch,
shards, export, the ledger, verify; its state in Redis is jobs/state/."""
