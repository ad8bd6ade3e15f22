"""Warehouse change events: the message schema, tick planning and the CDC publisher."""
