"""Thin entry points (`python -m jobs.<name>`). Importing `pipeline` first sets its environment
defaults (Ray on 127.0.0.1, no usage stats, no transformers progress bars) before any job module
imports Ray or transformers."""
import pipeline  # noqa: F401
