"""Datasets: image decoding and resize policies, one loader per on-disk layout, corruptions, the demo benchmark."""
