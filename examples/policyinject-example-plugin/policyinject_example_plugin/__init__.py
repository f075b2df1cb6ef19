"""Example third-party policyinject plugin: a toy decoder architecture and the policy for its block."""
