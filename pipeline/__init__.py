"""raykd: distill BERT-style encoders on Ray (teacher -> cached outputs -> students)."""
import os

# Read by Ray when it is first imported: keep a local Ray on 127.0.0.1 whatever imports Ray
# first (set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 yourself to opt out).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train re-routes a worker's print() through its logger, and every progress line then
# reaches the driver twice; our loop prints its own progress (local Ray workers inherit this).
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train's controller polls its workers every 2 s by default, and each `ray.train.report`
# (queue of one) and each run's end waits for that poll: ~2-4 s per training stage, which
# dominates short stages and tests. A poll is one small RPC per worker.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# transformers 5 draws a tqdm bar for every model load ("Loading weights") and save ("Writing
# model shards"): several per epoch in every worker's log. Our loops print their own progress.
# Read when huggingface_hub is first imported; set HF_HUB_DISABLE_PROGRESS_BARS=0 to keep them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
