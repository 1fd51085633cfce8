"""Embeddings -> FAISS index -> search and dedup, and the `imgindex` command line."""
