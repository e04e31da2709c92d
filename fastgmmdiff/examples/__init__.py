"""Small runnable examples (python -m fastgmmdiff.examples.<name>)."""
