"""Embeddings -> FAISS index -> search and dedup. Reads the on-disk formats (formats/) and runs
its tasks on executors/; never imports pipeline/ (images become vectors through the image model a
caller composes a Searcher with)."""
