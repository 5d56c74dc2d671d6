"""Weakly supervised tumour segmentation of H&E slides (MONAI bundle code referenced by the configs as ``custom.X``).

Coordinate conventions, named at every boundary:
- ``(x, y)`` / ``(width, height)``: OpenSlide, QuPath, ASAP XML, GeoJSON, tile-grid CSVs; always level-0 pixels
  unless a name says otherwise.
- ``(row, col)`` / ``(height, width)``: numpy arrays, torch tensors and MONAI (``WSIReader.get_data(location=(y, x))``).
"""
