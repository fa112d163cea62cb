"""micropatch: in-memory micropatching of running Linux x86-64 processes."""

__version__ = "0.1.0"
