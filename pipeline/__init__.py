"""Images -> embeddings: sources, decoding, the timm backbone and the Parquet writer. No faiss here."""
