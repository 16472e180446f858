"""`encdec plan`: memory, communication and step-time model of a layout (see planner/model.py)."""
