"""transformers-rxt: the Reactive Transformer (RxT), native to transformers."""
__version__ = "0.1.0"
