"""Built-in components, one module per family. Each module registers its components on import."""
