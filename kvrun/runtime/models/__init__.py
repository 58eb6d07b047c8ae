"""Model families as plug-ins (registry.py) over one shared decoder (decoder.py) and loader (weights.py)."""
