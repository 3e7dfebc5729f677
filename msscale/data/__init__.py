"""Data sets as WebDataset shards (docs/design.md §3.1): sources, writing, reading, streaming."""
