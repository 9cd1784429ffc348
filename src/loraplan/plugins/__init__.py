"""Built-in strategies. Each module is a plugin, registered exactly as a third-party plugin would be."""
