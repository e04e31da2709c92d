"""Experiments run with the reference trainer (``python -m fastgmmdiff.experiments.<name>``)."""
