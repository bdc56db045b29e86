"""The data stage: sources -> trajectories.jsonl (+ val_trajectories.jsonl, data_summary.json).

Every record that does not make it into the output is accounted for in `data_summary.json`: bad records
skipped under `data.on_error=skip` (with the file, line and field of each), and what each filter dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from atlas_exp.artifacts import SCHEMA_VERSION, fingerprint, summary_matches, write_json, write_jsonl
from atlas_exp.data.filters import FilterConfig, apply_filters, split_train_val
from atlas_exp.data.sources import load_trajectories
from atlas_exp.errors import AtlasError, ConfigError
from atlas_exp.run_dir import RunDir

log = logging.getLogger(__name__)

#: how many skipped records are listed one by one in the summary (all are counted)
MAX_LISTED_SKIPS = 100


def _build_sources(cfg: DictConfig) -> list[Any]:
    if not cfg.data.get("sources"):
        raise ConfigError("data.sources is empty: name at least one source (see conf/data/)")
    out = []
    for i, s in enumerate(cfg.data.sources):
        try:
            out.append(instantiate(s))
        except Exception as e:
            cause = e.__cause__ or e
            if isinstance(cause, AtlasError):
                raise cause from None
            raise ConfigError(f"data.sources[{i}]: cannot build {s.get('_target_')}: {cause}") from None
    return out


def run_data_stage(cfg: DictConfig, rd: RunDir) -> None:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    fp = fingerprint("data", SCHEMA_VERSION, data_cfg, int(cfg.seed))
    if not cfg.force and summary_matches(rd.data_summary, fp, rd.trajectories):
        log.info("data: %s is up to date, skipping", rd.trajectories)
        return
    on_error = str(cfg.data.get("on_error", "error"))
    t0 = time.time()
    sources = _build_sources(cfg)
    loaded = load_trajectories(sources, on_error=on_error)
    # `data.split_seed` fixes which trajectories are kept and held out across runs of other seeds, so a
    # sweep's seeds vary training only and every run is scored on the same held-out trajectories
    split_seed = cfg.data.get("split_seed")
    split_seed = int(cfg.seed) if split_seed is None else int(split_seed)
    data_opts = OmegaConf.to_container(cfg.data, resolve=True)
    filters = FilterConfig.from_mapping({k: v for k, v in data_opts.items() if k != "split_seed"}, seed=split_seed)
    kept, filter_report = apply_filters(loaded.trajectories, filters)
    val_fraction = float(cfg.data.get("val_fraction") or 0.0)
    val_size = int(cfg.data.get("val_size") or 0)
    if val_fraction or val_size:
        train, val = split_train_val(kept, val_fraction=val_fraction or None, val_size=val_size or None, seed=split_seed)
    else:
        train, val = kept, []
    if not train:
        raise AtlasError(
            f"data: no trajectories left (read {loaded.n_read}, skipped {len(loaded.skipped)}, "
            f"filters: {filter_report}); loosen data.envs / data.min_steps / data.max_steps"
        )
    write_jsonl(rd.trajectories, (t.to_dict() for t in train))
    if val:
        write_jsonl(rd.val_trajectories, (t.to_dict() for t in val))
    per_env: dict[str, dict[str, int]] = {}
    for t in train:
        e = per_env.setdefault(t.env, {"trajectories": 0, "steps": 0})
        e["trajectories"] += 1
        e["steps"] += t.n_steps
    summary = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        **loaded.summary(max_skipped=MAX_LISTED_SKIPS),
        "filters": filter_report,
        "n_train": len(train),
        "n_val": len(val),
        "n_steps": sum(t.n_steps for t in train),
        "per_env": per_env,
        "seconds": round(time.time() - t0, 3),
    }
    write_json(rd.data_summary, summary)
    log.info(
        "data: read %d, skipped %d, kept %d train + %d val trajectories (%d steps) -> %s",
        loaded.n_read,
        len(loaded.skipped),
        len(train),
        len(val),
        summary["n_steps"],
        rd.trajectories,
    )
