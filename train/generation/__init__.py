"""Using a trained model: consolidated export of a sharded checkpoint, and text generation from it."""
