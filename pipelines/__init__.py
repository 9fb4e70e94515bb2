"""Raw sources -> unified conversation+mask Samples -> deterministic WebDataset shards -> mixture; loader."""
