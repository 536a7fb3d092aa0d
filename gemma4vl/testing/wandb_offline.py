"""Reading back what wandb wrote in offline mode (tests): the history rows of a ``run-*.wandb`` file."""

from __future__ import annotations

import glob
import json
from pathlib import Path


def offline_run_files(directory: str | Path) -> list[str]:
    """The ``run-*.wandb`` files under ``directory`` (any depth), oldest first."""
    return sorted(glob.glob(str(Path(directory) / "**" / "offline-run-*" / "run-*.wandb"), recursive=True))


def wandb_history(run_file: str | Path) -> list[dict]:
    """Every history row logged to ``run_file`` (keys as logged, values JSON-decoded), in order."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    history = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return history
