"""A job's state in Redis: every key, field and Lua script, each with one owner (keys.py names them all),
and the embedded Redis that holds them on a laptop."""
