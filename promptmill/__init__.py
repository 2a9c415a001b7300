"""promptmill: one LLM call per row of a dataset, through Redis and Celery workers.

The layers live in the repo's top folders and install under this name; each imports only the ones
before it: `config` <- `pipelines` <- `jobs` <- `workers` <- `cli`.
"""
