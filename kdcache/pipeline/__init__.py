"""The generate stage, teacher backends, dataset tokenisation, the CLI and the demo."""
