"""Data: the embedded arithmetic task, file/HF loaders, tokenisation and collation."""
