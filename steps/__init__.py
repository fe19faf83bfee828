"""Pipeline stages: plain Python, each runnable as `python -m steps.<name>` (the cmd of its DVC stage)."""
