"""`promptmill compare`: the same sample of rows through several models, each a job of its own, scored
side by side (plan: what runs; score: the figures; page: the HTML report)."""
