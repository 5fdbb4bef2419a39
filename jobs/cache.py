"""Teacher-output cache: build (default), list, inspect, verify, delete.

  python -m jobs.cache [--config FILE] [key=value ...]          build what cache.* asks for
  python -m jobs.cache --list | --inspect KEY | --verify KEY | --delete KEY
"""
import json

from jobs.cli import main, save_resolved
from pipeline.cache import store
from pipeline.cache.build import ensure_caches, request
from pipeline.cache.schema import quantities_of
from pipeline.errors import ConfigError
from pipeline import data
from pipeline.data import check_available
from pipeline.ray_runtime import init_ray
from pipeline.teacher import run_dir, train_teachers


def options(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="list caches under cache.root")
    group.add_argument("--inspect", metavar="KEY", help="show a cache's key fields and manifests")
    group.add_argument("--verify", metavar="KEY", help="check every shard's checksum")
    group.add_argument("--delete", metavar="KEY", help="delete a cache")


def run(cfg, args) -> None:
    root = cfg.cache.root
    if args.list:
        for c in store.list_caches(root):
            f = c["fields"]
            print(f"{c['key']}  rows={c['rows']}  {c['bytes'] / 2**20:.1f} MiB  task={f['task']} "
                  f"split={f['split']} max_len={f['max_len']} teacher={f['teacher_paths'][0]}\n"
                  f"    quantities: {', '.join(c['quantities'])}")
        return
    if args.inspect:
        sets = store.committed_sets(root, args.inspect)
        fs, base = store.filesystem(root)
        print(json.dumps({"key": store.read_json(fs, store.join(base, args.inspect, store.KEY_FILE)),
                          "sets": [s.manifest for s in sets]}, indent=2))
        return
    if args.verify:
        problems = store.verify(root, args.verify)
        for p in problems:
            print(f"BAD {p}")
        if problems:
            raise SystemExit(1)
        print(f"OK {args.verify}: every shard matches its checksum")
        return
    if args.delete:
        store.delete(root, args.delete)
        print(f"deleted {args.delete}")
        return
    quantities = quantities_of(cfg.cache)
    if not quantities:
        raise ConfigError("cache.*: nothing to cache; set cache.logits=true or hidden_layers etc.")
    save_resolved(cfg, run_dir(cfg))
    check_available(cfg.data)
    init_ray(cfg.ray, args.address)
    splits = ("train", "dev", *([data.AUGMENTED] if cfg.data.augment.copies else []))
    requests = [request(folders, task, split, ["logits"] if split == "dev" else quantities)
                for group, folders in train_teachers(cfg).items()
                for task in (cfg.data.tasks if group in ("multitask", "given") else [group])
                for split in splits]
    for r, key in zip(requests, ensure_caches(cfg, requests)):  # one cache job per teacher
        print(f"[raykd cache] {r.task}/{r.split}: {key}", flush=True)


if __name__ == "__main__":
    main(run, __doc__, options)
