"""The demo on the digits, its small models, and the embedded default configs."""
