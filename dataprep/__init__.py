"""headpose-dataprep: raw 300W-LP, AFLW2000-3D and BIWI files to verified WebDataset shards."""
__version__ = "0.3.1"
