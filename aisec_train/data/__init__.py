"""Data: sources (arrays, files, image folders, your own Dataset), manifest, split, augmentation, sanity checks."""
