"""Bridges to outside libraries, each imported lazily so the core needs only torch."""
