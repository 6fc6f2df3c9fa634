"""Thin adapters for code written against sd-scripts' Python API (wrapper notebooks, GUIs).

Nothing in the core imports this package: it maps upstream's names onto the one runner and the
config machinery (DESIGN.md: compatibility adapters live at the edge).
"""
