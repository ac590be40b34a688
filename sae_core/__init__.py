"""saescope core: everything that computes.

Pipeline, one module per stage:
    model.py   load a causal LM and cut its forward pass at a hook point
    corpus.py  documents from the demo corpus, text files or Hugging Face datasets -> token windows
    cache.py   activations of those windows, sharded on disk, resumable; shuffled batch reader
"""

__version__ = "0.1.0"
