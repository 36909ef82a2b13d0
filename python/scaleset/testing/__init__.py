"""Test and benchmark support shipped with scaleset (like ``numpy.testing``)."""
