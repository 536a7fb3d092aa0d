"""What a run's log shows: Megatron's noise hidden per logger (never all warnings), shown with
``logger.megatron_details`` (gemma4vl.runtime.log_noise). The progress line itself is tested end to end in
tests/test_recipe.py (read back from <run_dir>/finetune.log)."""

import logging

import pytest


@pytest.fixture
def captured():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield records
    root.removeHandler(handler)
    root.setLevel(old)


def _emit():
    logging.getLogger("megatron.bridge.utils.import_utils").info("Import of X from y failed with: Traceback")
    logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info("Params for bucket 1 (10 elements)")
    logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info(
        "Number of buckets: 1\nParams for bucket 1 (10 elements):\n\tembed.weight (torch.float32)")
    logging.getLogger("megatron.bridge.utils.import_utils").warning("Import of Z failed badly")
    logging.getLogger("gemma4vl.training.bad_rows").warning("step 3: skipping bad row: rows.jsonl:7")


def test_megatron_noise_hidden_by_default_and_shown_on_request(captured, capsys):
    from gemma4vl.runtime.log_noise import show_megatron_details  # first: gemma4vl's TE shim

    from megatron.bridge.training.utils import train_utils  # noqa: I001
    from megatron.bridge.utils.common_utils import print_rank_last

    try:
        show_megatron_details(False)
        captured.clear()  # what importing Megatron-Bridge logged
        _emit()
        assert [r.getMessage() for r in captured] == [
            "Number of buckets: 1", "Import of Z failed badly", "step 3: skipping bad row: rows.jsonl:7"]
        train_utils.print_rank_last(" [2026] iteration 1/ 8 | elapsed time per iteration (ms): 5.0\n")
        assert capsys.readouterr().out == ""
        assert captured[-1].name == "megatron.bridge.training.utils.train_utils"
        assert (captured[-1].levelno, captured[-1].getMessage()) == (
            logging.DEBUG, "[2026] iteration 1/ 8 | elapsed time per iteration (ms): 5.0")

        captured.clear()
        show_megatron_details(True)
        _emit()
        assert len(captured) == 5
        assert captured[2].getMessage() == "Number of buckets: 1\nParams for bucket 1 (10 elements):\n\tembed.weight (torch.float32)"
        assert train_utils.print_rank_last is print_rank_last
        train_utils.print_rank_last("iteration 1/ 8")
        assert capsys.readouterr().out == "iteration 1/ 8\n"
    finally:
        show_megatron_details(False)
