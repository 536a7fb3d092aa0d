"""Export a saved checkpoint of a finetuning run:

    python -m recipes.export <run_dir> [checkpoint=iter_N] [format=merged|adapter|both] [out=DIR] [verify=true]
                             [device=cpu|cuda] [tensor=1] [pipeline=1] [expert=1]

``checkpoint``: ``iter_0000002``, ``iter_2`` or ``2`` (default: the newest complete checkpoint); ``format``: an HF
checkpoint with LoRA adapters merged, an HF PEFT adapter (LoRA runs), or both (default: the run's
``export.format``); ``out``: where ``hf_export/`` / ``hf_adapter/`` go (default ``<run_dir>/exports/iter_N``);
``verify``: compare the export's logits with the checkpoint's model (needs the model twice in host memory).
Under torchrun, ``tensor`` / ``pipeline`` / ``expert`` lay the model out over the processes. See
:mod:`gemma4vl.training.export_run`. Exit status 0 when the export is written and verified, 2 on a usage error
(message on stderr).
"""

import sys

from gemma4vl.training.export_run import ExportRunError, export_run

_KEYS = {"checkpoint": str, "format": str, "out": str, "verify": "bool", "device": str, "tensor": int,
         "pipeline": int, "expert": int}


def parse(argv: list[str]) -> tuple[str, dict]:
    """(run_dir, keyword arguments of :func:`export_run`) from the command line."""
    if not argv or "=" in argv[0]:
        raise ExportRunError("usage: python -m recipes.export <run_dir> [key=value ...] (keys: "
                             f"{', '.join(_KEYS)})")
    kwargs = {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in _KEYS:
            raise ExportRunError(f"{arg!r}: expected key=value with key one of {', '.join(_KEYS)}")
        kind = _KEYS[key]
        if kind == "bool":
            if value.lower() not in ("true", "false"):
                raise ExportRunError(f"{key}={value!r}: expected true or false")
            kwargs[key] = value.lower() == "true"
        elif kind is int:
            if not value.isdigit() or int(value) < 1:
                raise ExportRunError(f"{key}={value!r}: expected a positive integer")
            kwargs[key] = int(value)
        else:
            kwargs[key] = value
    if "out" in kwargs:
        kwargs["out_dir"] = kwargs.pop("out")
    return argv[0], kwargs


def main(argv: list[str] | None = None) -> int:
    try:
        run_dir, kwargs = parse(sys.argv[1:] if argv is None else argv)
        result = export_run(run_dir, **kwargs)
    except (ExportRunError, FileNotFoundError) as e:
        print(f"recipes.export: {e}", file=sys.stderr)
        return 2
    if result is not None:
        for kind, path in (("merged HF checkpoint", result.merged_dir), ("PEFT adapter", result.adapter_dir)):
            if path is not None:
                diff = result.max_logit_diff.get("merged" if path == result.merged_dir else "adapter")
                check = f"; max |logit difference| to the checkpoint's model {diff:.3g}" if diff is not None else ""
                print(f"exported the {kind} of step {result.step} to {path}{check}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
