"""Built-in model factories a config can name (``factory: prunekit.models.demo:DemoNet``)."""
