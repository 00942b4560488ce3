"""Per-chapter modules: what only one chapter of the book uses (its analyses and its sentence builders).

Each module serves one chapter and is tested in its own test file. A chapter module may import every
core module of :mod:`moeaudit` (base, numerics, presentation, model, measurement, protocol) but no other
chapter module and no tooling.
"""
