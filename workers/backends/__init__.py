"""Backends: the transport to one provider or engine each, behind one small interface (base.py)."""
