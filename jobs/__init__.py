"""Thin entry points (`python -m jobs.<name>`). Importing `pipeline` first sets its environment
defaults (Ray on 127.0.0.1, no usage stats, no transformers progress bars) before any job module
imports Ray or transformers. It goes through importlib so that the name `pipeline` in this
package stays free for the `jobs.pipeline` entry point (`from jobs import pipeline`)."""
import importlib

importlib.import_module("pipeline")
