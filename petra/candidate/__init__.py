"""One candidate: a genome's recipe applied to a copy of the model, fine-tuned, exported to its
artifact and measured against the dense baseline (which is trained and cached here too)."""
