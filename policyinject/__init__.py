"""policyinject: declarative policies that make PyTorch models fast for inference."""

from .hooks import hookimpl, hookspec

__version__ = "0.1.0"
