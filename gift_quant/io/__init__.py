"""Files: loading models and text, writing checkpoints atomically, manifests."""
