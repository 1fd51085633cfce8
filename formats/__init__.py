"""The on-disk formats, one module each, both writer and reader: the embeddings directory
(between pipeline and indexes) and the index directory."""
