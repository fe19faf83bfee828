"""Pipeline stages: plain Python, each runnable as `python -m steps.<name>`, its DVC stage's cmd."""

from steps.overhead import start_from_env

start_from_env()  # samples where this process's time goes when LLMPIPE_PROFILE_DIR is set
