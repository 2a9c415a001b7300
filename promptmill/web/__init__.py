"""`promptmill ui` and `pm.ui()`: a local live viewer of the jobs in this Redis, served to this machine's
browser only (a random token on every request), with its assets from the package (no CDN)."""
