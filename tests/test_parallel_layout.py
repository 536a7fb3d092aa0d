"""The one parallel-size check (gemma4vl/config/parallel.py), used by config validation, the memory plan and
runtime/distributed.py: the derived data-parallel sizes of valid layouts, and the arithmetic in every refusal."""

from __future__ import annotations

import pytest

from gemma4vl.config.parallel import ParallelSizeError, parallel_layout


@pytest.mark.parametrize("world,sizes,dp,expert_dp", [
    (1, {}, 1, 1),
    (8, {"tensor": 2}, 4, 4),                                   # ETP defaults to TP: 8 / (2 * 1 * 1) = 4
    (8, {"tensor": 2, "expert": 4, "expert_tensor": 1}, 4, 2),  # the 26B SFT layout: EDP = 8 / (1 * 4 * 1) = 2
    (8, {"expert": 8, "expert_tensor": 1}, 8, 1),
    (8, {"pipeline": 2, "expert": 2, "expert_tensor": 1}, 4, 2),
    (4, {"tensor": 2, "context": 2}, 1, 2),
    (16, {"tensor": 2, "pipeline": 2, "expert": 4, "expert_tensor": 2}, 4, 1),
])
def test_layouts_and_their_data_parallel_sizes(world, sizes, dp, expert_dp):
    layout = parallel_layout(world, **sizes)
    assert (layout.data, layout.expert_data) == (dp, expert_dp)
    assert layout.tensor * layout.pipeline * layout.context * layout.data == world
    assert layout.expert_tensor * layout.expert * layout.pipeline * layout.expert_data == world


@pytest.mark.parametrize("world,sizes,message", [
    (3, {"tensor": 2},
     "world size 3 is not divisible by TP 2 * PP 1 * CP 1 = 2: DP = world 3 / 2 = 1.5 is not an integer"),
    (8, {"tensor": 2, "pipeline": 3},
     "world size 8 is not divisible by TP 2 * PP 3 * CP 1 = 6: DP = world 8 / 6 = 1.33333 is not an integer"),
    (2, {"expert": 4},
     "world size 2 is not divisible by ETP 1 * EP 4 * PP 1 = 4: expert DP = world 2 / 4 = 0.5 is not an integer "
     "(ETP defaults to TP)"),
    (8, {"tensor": 2, "expert": 8, "expert_tensor": 2},
     "world size 8 is not divisible by ETP 2 * EP 8 * PP 1 = 16: expert DP = world 8 / 16 = 0.5 is not an integer"),
    (2, {"tensor": 0}, "TP must be a positive integer, got 0"),
    (2, {"expert_tensor": True}, "ETP must be a positive integer, got True"),
    (0, {}, "world size must be a positive integer, got 0"),
])
def test_refused_layouts_spell_out_the_arithmetic(world, sizes, message):
    with pytest.raises(ParallelSizeError) as error:
        parallel_layout(world, **sizes)
    assert str(error.value) == message


def test_describe_spells_out_both_data_parallel_sizes():
    layout = parallel_layout(8, tensor=2, expert=4, expert_tensor=1)
    assert layout.describe() == ("DP = world 8 / (TP 2 * PP 1 * CP 1) = 4; "
                                 "expert DP = world 8 / (ETP 1 * EP 4 * PP 1) = 2")


def test_memory_plan_and_runtime_use_the_same_check():
    """Statically: the other modules that need DP call parallel_layout and do no world-size arithmetic of their own."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "gemma4vl"
    for name in ("config/validate.py", "config/memory.py", "runtime/distributed.py"):
        tree = ast.parse((root / name).read_text())
        calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name)}
        assert "parallel_layout" in calls, name
        divisions = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.BinOp)
                     and isinstance(node.op, (ast.FloorDiv, ast.Mod)) and "world_size" in ast.unparse(node.left)]
        assert divisions == [], (name, divisions)
