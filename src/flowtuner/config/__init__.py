"""Typed configs: dataclasses whose fields carry the help text; CLI flags come from them."""
