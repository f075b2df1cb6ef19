"""policyinject: declarative policies that make PyTorch models fast for inference."""
__version__ = "0.1.0"
