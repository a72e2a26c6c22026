"""`flowtuner dataset check`: the dataset doctor."""

from __future__ import annotations

from pathlib import Path

from flowtuner.config.caching import DatasetCheckConfig
from flowtuner.config.fields import add_arguments, from_namespace
from flowtuner.config.models import resolve_model_version


def register(sub) -> None:
    parser = sub.add_parser("dataset", help="dataset tools")
    tools = parser.add_subparsers(dest="dataset_command", metavar="TOOL", required=True)
    check = tools.add_parser("check", help="report every problem in a dataset before any model is loaded",
                             description="Counts, bucket histogram, problems and cache size estimate; exit 1 on errors.")
    add_arguments(check, DatasetCheckConfig)
    check.set_defaults(handler=lambda args: run(configure(args)))


def configure(args) -> DatasetCheckConfig:
    resolve_model_version(args)  # the family sets the size step and the cache size estimate
    return from_namespace(DatasetCheckConfig, args)


def run(cfg: DatasetCheckConfig) -> int:
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.doctor import check_dataset, format_report, write_previews
    from flowtuner.families import family_for

    family = family_for(cfg)
    errors = 0
    for ds in load_dataset_config(cfg.dataset_config):
        report = check_dataset(ds, family.size_step, family.cache_size_estimate, cfg.num_workers, family.max_controls)
        print("\n".join(format_report(report)))
        if cfg.preview:
            for path in write_previews(report, Path(cfg.preview)):
                print(f"  preview: {path}")
        errors += report.errors
    print(f"{errors} errors" if errors else "no errors")
    return 1 if errors else 0
