"""The named job configs (`--config NAME` -> NAME.yaml here), shipped inside the package."""
