"""Pipeline stages: plain Python, each runnable as `python -m steps.<name>`, its DVC stage's cmd."""
