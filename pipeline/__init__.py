"""raykd: distill BERT-style encoders on Ray (teacher -> cached outputs -> students)."""
import os

# Read by Ray when it is first imported: keep a local Ray on 127.0.0.1 whatever imports Ray
# first (set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 yourself to opt out).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
