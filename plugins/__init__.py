"""Built-in policyinject plugins, one module per architecture family.

Installed as the package ``policyinject_plugins`` and registered through the ``policyinject`` entry-point
group, exactly as a third-party plugin package would be.
"""
