"""The models: the config section that names them, and loading denoisers and classifiers."""
