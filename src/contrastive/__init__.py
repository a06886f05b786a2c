"""contrastive: the package behind the book *Contrastive Learning, Derived and Trained*.

Data and augmentation live on the training device; one explicit training loop
serves every method; every method is evaluated with the same kNN and linear
probe protocol.
"""

__version__ = "0.1.0"
