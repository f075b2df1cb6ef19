"""Example third-party policyinject plugin: a plain ``nn.Module`` decoder with no model config, and its policy."""
