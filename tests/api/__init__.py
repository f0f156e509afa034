"""The public API as higher code uses it (``import loft as higher``)."""
