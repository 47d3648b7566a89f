"""Offline evaluation of a trained model: held-out loss, retrieval (passkey, needle), the layer-quality comparison, run plots."""
