"""The training data: preparation of packed MDS shards from raw text (`python -m train.data.prepare`),
the tokenizers, and the loader the trainer reads its batches from (`loader.py`)."""
